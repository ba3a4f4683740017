"""`u2ad study`: the comparison ladder over several cohorts, with confidence intervals.

One cohort gives a dozen lesions and the ranking of the learned rungs moves from cohort to
cohort, so a single table cannot say whether one rung beats another. A study draws N cohorts
(seeds), runs the ladder on each (`ablate.run_ablation`, unchanged: one shared pretraining, then
each adaptation rung and the intensity rung through the same scoring code), keeps the per-patient
results and reports, per rung and metric, the mean over cohorts with a 95 % hierarchical bootstrap
interval, and the paired differences U2AD - baseline and U2AD - intensity (`stats.py`).

Cohorts per seed s: the phantom's public (seed s) and clinical (seed s + 1) cohorts, as `u2ad
demo --seed s` draws them; or, with `source` (real labelled slices, `u2ad synth --from-slices`),
a real-anatomy pseudo-patient cohort with seed s and the phantom public cohort (seed s) for
pretraining, unless a fixed `public_dir` is given.

Layout of `out_dir`: seed-<s>/ (data/ with the cohorts, ladder/ with the `u2ad ablate` outputs,
tables.json with the per-patient results), study.json, study.csv, study.md,
figures/study_ladder.png. A seed whose tables.json exists is not rerun, so running the same
command again resumes an interrupted study (and recomputes the statistics); a non-empty folder
that is not a study is refused (`output_guard`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from u2ad_jax import io_utils
from u2ad_jax import labels as label_values
from u2ad_jax import output_guard
from u2ad_jax import recon_quality
from u2ad_jax import stages
from u2ad_jax.evaluation import ladder
from u2ad_jax.evaluation import stats
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.workflows import ablate
from u2ad_jax.workflows import demo

TABLES_FILE = "tables.json"
# (a, b): the differences a - b reported.
PAIRS = (("eu_au", "baseline"), ("eu_au", "intensity"))


def _log(text: str) -> None:
  print(f"[study] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ per-patient tables


def patient_table(result: Any, slice_set: Any) -> stats.PatientTable:
  """The per-patient results of one rung (`analysis.CohortResult`) on its cohort's slices."""
  if result.truth is None:
    raise ValueError(f"rung {result.name}: the cohort has no truth; a study needs participants.tsv "
                     "or lesion labels")
  index = {sid: i for i, sid in enumerate(result.subject_ids)}
  p = len(result.subject_ids)
  ssim_sum, ssim_count = np.zeros(p), np.zeros(p)
  if result.recon is not None:
    if result.recon.shape != slice_set.images.shape:
      raise ValueError(f"rung {result.name}: reconstructions {result.recon.shape} do not match "
                       f"the cohort's slices {slice_set.images.shape}")
    # The evaluator's definition (analysis.reconstruction_ssim), kept per patient.
    for img, rec, lab, roi, sid in zip(slice_set.images, result.recon, slice_set.labels,
                                       slice_set.score_roi, slice_set.subject_ids):
      normal = np.asarray(roi, bool) & (np.asarray(lab) != label_values.LESION)
      if normal.any():
        ssim_sum[index[sid]] += recon_quality.ssim(np.clip(img, 0, 1), np.clip(rec, 0, 1), normal)
        ssim_count[index[sid]] += 1
  return stats.PatientTable(
      patient_scores=np.asarray(result.patient_scores, np.float64),
      patient_flags=np.asarray(result.decisions.patient_flags, bool),
      patient_truth=np.asarray(result.truth.patient, bool),
      segment_scores=np.asarray(result.segment_scores, np.float64),
      segment_flags=np.asarray(result.decisions.segment_flags, bool),
      segment_truth=np.asarray(result.truth.segments, bool),
      ssim_sum=ssim_sum, ssim_count=ssim_count,
      segment_known=np.asarray(result.truth.segments_known, bool))


# ------------------------------------------------------------------------------ cohorts


def make_study_cohorts(data_dir: str, seed: int, size: demo.DemoSize, source: str | None,
                       verbose: bool = True) -> tuple[str, str]:
  """(public, clinical) cohort directories of one seed (see the module docstring)."""
  if source is None:
    return demo.make_cohorts(data_dir, size, seed, verbose)
  from u2ad_jax.phantom import cohort_writer  # pylint: disable=g-import-not-at-top
  from u2ad_jax.phantom import pseudo_patients  # pylint: disable=g-import-not-at-top
  public = os.path.join(data_dir, "public")
  clinical = os.path.join(data_dir, "real")
  # Regenerated only when the generation record differs (generation is deterministic per seed).
  for root, record, write in (
      (public, {"profile": "public", "num_subjects": size.num_public, "seed": seed,
                "num_slices": size.num_slices},
       lambda root: cohort_writer.write_cohort(root, size.num_public, "public", seed, 0.0,
                                         num_slices=size.num_slices)),
      (clinical, {"source": os.path.abspath(source), "num_subjects": size.num_clinical,
                  "seed": seed, "num_slices": size.num_slices},
       lambda root: pseudo_patients.write_cohort(
           root, source, size.num_clinical, seed, 0.5,
           num_slices=size.num_slices or pseudo_patients.DEFAULT_NUM_SLICES))):
    record_path = os.path.join(root, "u2ad_study_cohort.json")
    if os.path.isfile(record_path):
      with open(record_path, encoding="utf-8") as f:
        if json.load(f) == record:
          continue
    t0 = time.monotonic()
    # Staged like `u2ad synth`: a kill leaves the previous cohort or none, never a mix.
    with output_guard.staged_directory(root, "synth") as staging:
      write(staging)
      io_utils.write_json(os.path.join(staging, "u2ad_study_cohort.json"), record)
    if verbose:
      _log(f"wrote {root} in {time.monotonic() - t0:.1f} s")
  return public, clinical


# ------------------------------------------------------------------------------ the study


def run_study(out_dir: str | os.PathLike, seeds: Sequence[int], *, source: str | None = None,
              public_dir: str | None = None, smoke: bool = False, config_spec: str | None = None,
              config: Any = None, methods: Sequence[str] = stages.ABLATION_METHODS,
              overrides: Sequence[str] = (),
              size: demo.DemoSize | None = None, num_resamples: int = stats.DEFAULT_RESAMPLES,
              verbose: bool = True) -> dict[str, Any]:
  """Runs the ladder on every seed's cohort and writes the summary (see the module docstring).

  `config` (a ConfigDict) replaces the one `smoke` / `config_spec` would load.
  Returns the summary dict written to study.json.
  """
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top

  if not seeds:
    raise ValueError("a study needs at least one seed")
  # The config first: a bad file or override fails before anything is generated or trained.
  if config is None:
    config = demo.load_config(config_spec, smoke)
  config = config.copy_and_resolve_references()
  config_lib.apply_overrides(config, overrides)
  size = size or (demo.SMOKE_SIZE if smoke else demo.DEMO_SIZE)
  out_dir = os.path.abspath(os.fspath(out_dir))
  # A study folder of its own is resumed (finished seeds reused); any other non-empty folder is
  # refused, and the inputs are protected in both cases (a resumed study writes too).
  output_guard.check_output_dir(out_dir, "study", overwrite=True, swapped=False,
                                protected={"--from-slices": source, "--public": public_dir})
  os.makedirs(out_dir, exist_ok=True)
  output_guard.write_marker(out_dir, "study")

  per_seed: list[dict[str, stats.PatientTable]] = []
  for seed in seeds:
    seed_dir = os.path.join(out_dir, f"seed-{seed}")
    tables_path = os.path.join(seed_dir, TABLES_FILE)
    if os.path.isfile(tables_path):
      with open(tables_path, encoding="utf-8") as f:
        saved = json.load(f)
      per_seed.append({rung: stats.PatientTable.from_json(t) for rung, t in saved["rungs"].items()})
      if verbose:
        _log(f"seed {seed}: reusing {tables_path}")
      continue
    t0 = time.monotonic()
    public, clinical = make_study_cohorts(os.path.join(seed_dir, "data"), seed, size, source,
                                          verbose)
    if public_dir is not None:
      public = public_dir
    # The ladder beside (not around) the seed's cohorts; a ladder an interrupted run left
    # behind is this study's own output and is replaced.
    results = ablate.run_ablation(os.path.join(seed_dir, "ladder"), public, clinical,
                                    config=config, methods=methods, seed=seed, overwrite=True,
                                    verbose=verbose)
    prepared = rung_base.prepare_cohort(clinical, config.data, progress=False)
    tables = {rung: patient_table(res, prepared.slice_set) for rung, res in results.items()}
    io_utils.write_json(tables_path, {
        "seed": seed, "cohort": clinical, "public": public,
        "subject_ids": next(iter(results.values())).subject_ids,
        "rungs": {rung: t.to_json() for rung, t in tables.items()}})
    per_seed.append(tables)
    if verbose:
      _log(f"seed {seed}: ladder done in {time.monotonic() - t0:.0f} s")

  rungs = [r for r in ladder.RUNGS if all(r in t for t in per_seed)]
  summary = stats.summarize({r: [t[r] for t in per_seed] for r in rungs}, pairs=PAIRS,
                            num_resamples=num_resamples, seed=0)
  summary["seeds"] = [int(s) for s in seeds]
  summary["benchmark"] = ("real-anatomy pseudo-patients from "
                          + os.path.basename(os.path.normpath(os.path.abspath(source)))
                          if source else "phantom")
  write_summary(out_dir, summary)
  return summary


# ------------------------------------------------------------------------------ outputs


def _nan_to_none(obj: Any) -> Any:
  """Standard JSON: NaN (an undefined metric) -> null."""
  if isinstance(obj, Mapping):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def _ci(entry: Mapping[str, Any] | None, signed: bool = False) -> str:
  if entry is None or entry["mean"] is None or not np.isfinite(entry["mean"]):
    return "n/a"
  fmt = "{:+.3f}" if signed else "{:.3f}"
  if not np.isfinite(entry["lo"]):
    return fmt.format(entry["mean"])
  return f"{fmt.format(entry['mean'])} [{fmt.format(entry['lo'])}, {fmt.format(entry['hi'])}]"


def write_summary(out_dir: str, summary: Mapping[str, Any]) -> None:
  """study.json, study.csv (one row per rung / difference and metric), study.md, the figure."""
  names = list(stats.METRICS)
  io_utils.write_json(os.path.join(out_dir, "study.json"), _nan_to_none(summary))
  rows = []
  for kind, group in (("rung", summary["rungs"]), ("difference", summary["differences"])):
    for key, by_metric in group.items():
      for name, e in by_metric.items():
        rows.append([kind, key, name, e["mean"], e["lo"], e["hi"],
                     ";".join(f"{v:.6g}" for v in e["per_cohort"])])
  io_utils.write_csv(os.path.join(out_dir, "study.csv"), rows,
                     ["kind", "rung", "metric", "mean", "ci_lo", "ci_hi", "per_cohort"])
  level = int(round(100 * summary["level"]))
  header = ["rung"] + [stats.METRICS[n][0] for n in names]
  lines = [
      "# Study: the ladder over several cohorts", "",
      f"Benchmark: {summary['benchmark']}; seeds {summary['seeds']} "
      f"({summary['num_cohorts']} cohort(s) of {summary['patients_per_cohort']} patients). "
      f"Mean over cohorts [{level} % interval: hierarchical bootstrap over cohorts and patients, "
      f"{summary['num_resamples']} resamples, decisions as made on each whole cohort].", "",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rung, by_metric in summary["rungs"].items():
    lines.append("| " + " | ".join([ladder.RUNG_TITLES.get(rung, rung)]
                                   + [_ci(by_metric.get(n)) for n in names]) + " |")
  if summary["differences"]:
    lines += ["", "Paired differences (same resampled patients for both rungs):", "",
              "| difference | " + " | ".join(stats.METRICS[n][0] for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for key, by_metric in summary["differences"].items():
      lines.append("| " + " | ".join([key] + [_ci(by_metric.get(n), signed=True) for n in names])
                   + " |")
  lines += ["", "![the ladder with its intervals](figures/study_ladder.png)", ""]
  io_utils.write_text(os.path.join(out_dir, "study.md"), "\n".join(lines))
  ladder_figure(os.path.join(out_dir, "figures", "study_ladder.png"), summary)


def ladder_figure(path: str, summary: Mapping[str, Any]) -> None:
  """One panel per metric: each rung's mean with its interval, per-cohort values as dots."""
  from u2ad_jax.evaluation import figures  # pylint: disable=g-import-not-at-top  (sets Agg)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(stats.METRICS)
  rungs = list(summary["rungs"])
  fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    for x, rung in enumerate(rungs):
      e = summary["rungs"][rung].get(name)
      if e is None or not np.isfinite(e["mean"]):
        continue
      lo = e["lo"] if np.isfinite(e["lo"]) else e["mean"]
      hi = e["hi"] if np.isfinite(e["hi"]) else e["mean"]
      ax.errorbar([x], [e["mean"]], yerr=[[e["mean"] - lo], [hi - e["mean"]]], fmt="o", capsize=3,
                  color=f"C{x}")
      per = [v for v in e["per_cohort"] if np.isfinite(v)]
      ax.scatter(x + 0.15 + np.zeros(len(per)), per, s=8, color=f"C{x}", alpha=0.5)
    ax.set_xticks(range(len(rungs)), rungs, rotation=45, fontsize=7)
    ax.set_title(stats.METRICS[name][0], fontsize=9)
    ax.set_ylim(-0.05, 1.05)
  fig.suptitle(f"{summary['benchmark']}: mean and {int(round(100 * summary['level']))} % interval "
               f"over {summary['num_cohorts']} cohorts", fontsize=9)
  # Room for the title above the panels' own titles, and for the rotated rung names below.
  fig.subplots_adjust(top=0.82, bottom=0.2, wspace=0.3)
  figures._save(fig, path)  # pylint: disable=protected-access

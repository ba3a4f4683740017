"""`u2ad study`: the comparison ladder over several cohorts, with confidence intervals.

One cohort gives a dozen lesions and the ranking of the learned rungs moves from cohort to
cohort, so a single table cannot say whether one rung beats another. A study draws N cohorts
(seeds), runs the ladder on each (`ablate.run_ablation`, unchanged: one shared pretraining, then
each adaptation rung and the intensity rung through the same scoring code), keeps the per-patient
results and reports, per rung and metric, the mean over cohorts with a 95 % hierarchical bootstrap
interval, and the paired differences of each guided rung minus random masking and of U2AD minus
the intensity threshold (`stats.py`). Pixel AP and best Dice pool a cohort's pixels: one value per
cohort, their interval resamples cohorts. With `also_residuals` every trained rung is also scored
with another anomaly map (e.g. the method's own |x - mean|; scoring only, `rescore_seed`) and
gets its own tables.

Cohorts per seed s: the phantom's public (seed s) and clinical (seed s + 1) cohorts, as `u2ad
demo --seed s` draws them; or, with `source` (real labelled slices, `u2ad synth --from-slices`),
a real-anatomy pseudo-patient cohort with seed s and the phantom public cohort (seed s) for
pretraining, unless a fixed `public_dir` is given.

Layout of `out_dir`: seed-<s>/ (data/ with the cohorts, ladder/ with the `u2ad ablate` outputs,
tables.json with the per-patient results; rescored/<map>/<rung>/ and tables-<map>.json for each
other map), study.json, study.csv, study.md,
figures/study_ladder.png. A seed whose tables.json exists is not rerun, so running the same
command again resumes an interrupted study (and recomputes the statistics); a non-empty folder
that is not a study is refused (`output_guard`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from u2ad_jax import errors
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
# (a, b): the differences a - b reported: what each kind of guidance adds to random masking,
# and where U2AD stands against the threshold that needs no training.
PAIRS = (("eu", "baseline"), ("au", "baseline"), ("eu_au", "baseline"), ("eu_au", "intensity"))
# Where the rescored evaluations of a seed go (`rescore_seed`): seed-<s>/rescored/<residual>/<rung>.
RESCORED_DIR = "rescored"


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


# ------------------------------------------------------------------------------ pixel metrics, rescoring


def pixel_metrics(eval_dir: str) -> dict[str, float]:
  """`stats.PIXEL_METRICS` of one evaluation (its metrics.json), NaN where undefined (no pixel
  truth, or a cohort without a lesion pixel)."""
  path = os.path.join(eval_dir, "metrics.json")
  with open(path, encoding="utf-8") as f:
    pixel = json.load(f).get("pixel") or {}
  return {name: (math.nan if pixel.get(key) is None else float(pixel[key]))
          for name, (_, key) in stats.PIXEL_METRICS.items()}


def rescore_seed(seed_dir: str, residual: str, tables: Mapping[str, stats.PatientTable],
                 pixel: Mapping[str, Mapping[str, float]], data_config: Any, verbose: bool = True
                 ) -> tuple[dict[str, stats.PatientTable], dict[str, dict[str, float]]]:
  """The seed's trained rungs scored again with another anomaly map (`evaluation.residual`).

  Scoring only: each rung's checkpoint (ladder/runs/<rung>) is evaluated on the seed's cohort
  with `evaluation.residual=<residual>` into rescored/<residual>/<rung>/, exactly as `u2ad
  evaluate --set evaluation.residual=...` would; the intensity rung has no reconstruction and
  keeps its own map (it stays in the tables, with its `pixel` metrics, as the reference). The
  tables are kept in tables-<residual>.json, so a resumed study does not evaluate again.

  Returns:
    (rung -> PatientTable, rung -> pixel metrics (`pixel_metrics`)), in the order of `tables`.
  """
  from u2ad_jax.evaluation.rungs import model as model_rung  # pylint: disable=g-import-not-at-top

  path = os.path.join(seed_dir, f"tables-{residual}.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    return ({rung: stats.PatientTable.from_json(t) for rung, t in saved["rungs"].items()},
            {rung: {k: (math.nan if v is None else v) for k, v in px.items()}
             for rung, px in saved["pixel"].items()})
  with open(os.path.join(seed_dir, TABLES_FILE), encoding="utf-8") as f:
    cohort_dir = json.load(f)["cohort"]
  prepared = rung_base.prepare_cohort(cohort_dir, data_config, progress=False)
  out_tables: dict[str, stats.PatientTable] = {}
  out_pixel: dict[str, dict[str, float]] = {}
  for rung in tables:
    if rung == "intensity":
      out_tables[rung] = tables[rung]
      out_pixel[rung] = dict(pixel[rung])
      continue
    eval_dir = os.path.join(seed_dir, RESCORED_DIR, residual, rung)
    t0 = time.monotonic()
    result = model_rung.evaluate_checkpoint(
        os.path.join(seed_dir, "ladder", "runs", rung), cohort_dir, eval_dir, name=rung,
        prepared=prepared, overrides=[f"evaluation.residual={residual}"], overwrite=True,
        verbose=False)
    out_tables[rung] = patient_table(result, prepared.slice_set)
    out_pixel[rung] = pixel_metrics(eval_dir)
    if verbose:
      _log(f"{os.path.basename(seed_dir)}: {rung} rescored with the {residual} map in "
           f"{time.monotonic() - t0:.0f} s")
  io_utils.write_json(path, _nan_to_none({
      "residual": residual, "cohort": cohort_dir,
      "rungs": {rung: t.to_json() for rung, t in out_tables.items()}, "pixel": out_pixel}))
  return out_tables, out_pixel


def summarize_seeds(per_seed: Sequence[Mapping[str, stats.PatientTable]],
                    pixel_per_seed: Sequence[Mapping[str, Mapping[str, float]]],
                    num_resamples: int) -> dict[str, Any]:
  """`stats.summarize` of the rungs every seed has, with their pixel metrics
  (`stats.summarize_cohort_values`) under "pixel"."""
  rungs = [r for r in ladder.RUNGS if all(r in t for t in per_seed)]
  summary = stats.summarize({r: [t[r] for t in per_seed] for r in rungs}, pairs=PAIRS,
                            num_resamples=num_resamples, seed=0)
  summary["pixel"] = stats.summarize_cohort_values(
      {r: {name: [px[r][name] for px in pixel_per_seed] for name in stats.PIXEL_METRICS}
       for r in rungs}, pairs=PAIRS, num_resamples=num_resamples, seed=0)
  return summary


# ------------------------------------------------------------------------------ the study


def run_study(out_dir: str | os.PathLike, seeds: Sequence[int], *, source: str | None = None,
              public_dir: str | None = None, smoke: bool = False, config_spec: str | None = None,
              config: Any = None, methods: Sequence[str] = stages.ABLATION_METHODS,
              overrides: Sequence[str] = (), also_residuals: Sequence[str] = (),
              size: demo.DemoSize | None = None, num_resamples: int = stats.DEFAULT_RESAMPLES,
              verbose: bool = True) -> dict[str, Any]:
  """Runs the ladder on every seed's cohort and writes the summary (see the module docstring).

  `config` (a ConfigDict) replaces the one `smoke` / `config_spec` would load.
  `also_residuals`: other anomaly maps (`anomaly.RESIDUALS`, e.g. "absolute", the method's own
  |x - mean|) with which every trained rung is also scored (`rescore_seed`: scoring only); each
  gets its own table under "rescored" in the summary.
  Returns the summary dict written to study.json.
  """
  from u2ad_jax import anomaly  # pylint: disable=g-import-not-at-top
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top

  if not seeds:
    raise ValueError("a study needs at least one seed")
  # The config first: a bad file or override fails before anything is generated or trained.
  if config is None:
    config = demo.load_config(config_spec, smoke)
  config = config.copy_and_resolve_references()
  config_lib.apply_overrides(config, overrides)
  residual = str(config.evaluation.get("residual", anomaly.DEFAULT_RESIDUAL))
  also_residuals = [r for r in also_residuals if r != residual]
  unknown = [r for r in also_residuals if r not in anomaly.RESIDUALS]
  if unknown:
    raise errors.UsageError(f"unknown anomaly map(s) {unknown} for rescoring; choose from "
                            f"{list(anomaly.RESIDUALS)}")
  size = size or (demo.SMOKE_SIZE if smoke else demo.DEMO_SIZE)
  out_dir = os.path.abspath(os.fspath(out_dir))
  # A study folder of its own is resumed (finished seeds reused); any other non-empty folder is
  # refused, and the inputs are protected in both cases (a resumed study writes too).
  output_guard.check_output_dir(out_dir, "study", overwrite=True, swapped=False,
                                protected={"--from-slices": source, "--public": public_dir})
  os.makedirs(out_dir, exist_ok=True)
  output_guard.write_marker(out_dir, "study")

  per_seed: list[dict[str, stats.PatientTable]] = []
  pixel_per_seed: list[dict[str, dict[str, float]]] = []
  rescored: dict[str, tuple[list, list]] = {r: ([], []) for r in also_residuals}
  for seed in seeds:
    seed_dir = os.path.join(out_dir, f"seed-{seed}")
    tables_path = os.path.join(seed_dir, TABLES_FILE)
    if os.path.isfile(tables_path):
      with open(tables_path, encoding="utf-8") as f:
        saved = json.load(f)
      tables = {rung: stats.PatientTable.from_json(t) for rung, t in saved["rungs"].items()}
      # Tables written before they held the pixel metrics: read from the ladder's evaluations.
      pixel = saved.get("pixel") or {
          rung: pixel_metrics(os.path.join(seed_dir, "ladder", rung)) for rung in tables}
      if verbose:
        _log(f"seed {seed}: reusing {tables_path}")
    else:
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
      pixel = {rung: pixel_metrics(os.path.join(seed_dir, "ladder", rung)) for rung in tables}
      io_utils.write_json(tables_path, _nan_to_none({
          "seed": seed, "cohort": clinical, "public": public,
          "subject_ids": next(iter(results.values())).subject_ids,
          "rungs": {rung: t.to_json() for rung, t in tables.items()}, "pixel": pixel}))
      if verbose:
        _log(f"seed {seed}: ladder done in {time.monotonic() - t0:.0f} s")
    per_seed.append(tables)
    pixel_per_seed.append({rung: {k: (math.nan if v is None else float(v)) for k, v in px.items()}
                           for rung, px in pixel.items()})
    for other in also_residuals:
      seed_tables, seed_pixel = rescore_seed(seed_dir, other, tables, pixel, config.data,
                                             verbose)
      rescored[other][0].append(seed_tables)
      rescored[other][1].append(seed_pixel)

  summary = summarize_seeds(per_seed, pixel_per_seed, num_resamples)
  summary["residual"] = residual
  summary["rescored"] = {r: summarize_seeds(t, px, num_resamples)
                         for r, (t, px) in rescored.items()}
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


def _metric_columns(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
  """(group, metric, title) of the study tables: the per-patient metrics, then the pixel ones."""
  return ([("rungs", n, stats.METRICS[n][0]) for n in stats.METRICS]
          + [("pixel", n, t) for n, (t, _) in stats.PIXEL_METRICS.items() if "pixel" in summary])


def _entry(summary: Mapping[str, Any], kind: str, key: str, group: str, name: str
           ) -> Mapping[str, Any] | None:
  """One table cell's entry: `kind` "rungs" or "differences", `group` "rungs" (per-patient
  metrics) or "pixel"."""
  source = summary if group == "rungs" else summary.get("pixel", {})
  return source.get(kind, {}).get(key, {}).get(name)


def _table_lines(summary: Mapping[str, Any]) -> list[str]:
  """The rung table and the paired-difference table of one map's summary (Markdown)."""
  columns = _metric_columns(summary)
  lines = ["| rung | " + " | ".join(t for _, _, t in columns) + " |",
           "|" + "---|" * (len(columns) + 1)]
  for rung in summary["rungs"]:
    lines.append("| " + " | ".join([ladder.RUNG_TITLES.get(rung, rung)] + [
        _ci(_entry(summary, "rungs", rung, g, n)) for g, n, _ in columns]) + " |")
  if summary["differences"]:
    lines += ["", "Paired differences (same resampled patients, or cohorts for the pixel "
              "metrics, for both rungs):", "",
              "| difference | " + " | ".join(t for _, _, t in columns) + " |",
              "|" + "---|" * (len(columns) + 1)]
    for key in summary["differences"]:
      lines.append("| " + " | ".join([key] + [
          _ci(_entry(summary, "differences", key, g, n), signed=True) for g, n, _ in columns])
          + " |")
  return lines


def _csv_rows(summary: Mapping[str, Any], residual: str) -> list[list[Any]]:
  rows = []
  for kind, label in (("rungs", "rung"), ("differences", "difference")):
    for group in ("rungs", "pixel"):
      source = summary if group == "rungs" else summary.get("pixel", {})
      for key, by_metric in source.get(kind, {}).items():
        for name, e in by_metric.items():
          rows.append([residual, label, key, name, e["mean"], e["lo"], e["hi"],
                       ";".join(f"{v:.6g}" for v in e["per_cohort"])])
  return rows


def write_summary(out_dir: str, summary: Mapping[str, Any]) -> None:
  """study.json, study.csv (one row per map, rung / difference and metric), study.md, the
  figure."""
  from u2ad_jax import anomaly  # pylint: disable=g-import-not-at-top

  residual = summary.get("residual", anomaly.DEFAULT_RESIDUAL)
  rescored = summary.get("rescored", {})
  io_utils.write_json(os.path.join(out_dir, "study.json"), _nan_to_none(summary))
  rows = _csv_rows(summary, residual)
  for other, other_summary in rescored.items():
    rows += _csv_rows(other_summary, other)
  io_utils.write_csv(os.path.join(out_dir, "study.csv"), rows,
                     ["map", "kind", "rung", "metric", "mean", "ci_lo", "ci_hi", "per_cohort"])
  level = int(round(100 * summary["level"]))
  lines = [
      "# Study: the ladder over several cohorts", "",
      f"Benchmark: {summary['benchmark']}; seeds {summary['seeds']} "
      f"({summary['num_cohorts']} cohort(s) of {summary['patients_per_cohort']} patients). "
      f"Mean over cohorts [{level} % interval: hierarchical bootstrap over cohorts and patients, "
      f"{summary['num_resamples']} resamples, decisions as made on each whole cohort; pixel "
      "metrics pool a cohort's pixels, so their interval resamples cohorts only].", "",
      f"Anomaly map: {anomaly.describe(residual)}.", ""]
  lines += _table_lines(summary)
  for other, other_summary in rescored.items():
    lines += ["", f"## The same trained rungs scored with another map: {other}", "",
              f"Anomaly map: {anomaly.describe(other)} (the intensity rung keeps its own map).",
              ""]
    lines += _table_lines(other_summary)
  lines += ["", "![the ladder with its intervals](figures/study_ladder.png)", ""]
  io_utils.write_text(os.path.join(out_dir, "study.md"), "\n".join(lines))
  ladder_figure(os.path.join(out_dir, "figures", "study_ladder.png"), summary)


def ladder_figure(path: str, summary: Mapping[str, Any]) -> None:
  """One panel per metric: each rung's mean with its interval, per-cohort values as dots."""
  from u2ad_jax.evaluation import figures  # pylint: disable=g-import-not-at-top  (sets Agg)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  columns = _metric_columns(summary)
  rungs = list(summary["rungs"])
  fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 3.2), squeeze=False)
  for ax, (group, name, title) in zip(axes[0], columns):
    for x, rung in enumerate(rungs):
      e = _entry(summary, "rungs", rung, group, name)
      if e is None or not np.isfinite(e["mean"]):
        continue
      lo = e["lo"] if np.isfinite(e["lo"]) else e["mean"]
      hi = e["hi"] if np.isfinite(e["hi"]) else e["mean"]
      ax.errorbar([x], [e["mean"]], yerr=[[e["mean"] - lo], [hi - e["mean"]]], fmt="o", capsize=3,
                  color=f"C{x}")
      per = [v for v in e["per_cohort"] if np.isfinite(v)]
      ax.scatter(x + 0.15 + np.zeros(len(per)), per, s=8, color=f"C{x}", alpha=0.5)
    ax.set_xticks(range(len(rungs)), rungs, rotation=45, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-0.05, 1.05)
  fig.suptitle(f"{summary['benchmark']}: mean and {int(round(100 * summary['level']))} % interval "
               f"over {summary['num_cohorts']} cohorts", fontsize=9)
  # Room for the title above the panels' own titles, and for the rotated rung names below.
  fig.subplots_adjust(top=0.82, bottom=0.2, wspace=0.3)
  figures._save(fig, path)  # pylint: disable=protected-access

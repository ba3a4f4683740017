"""End-to-end workflows behind `u2ad demo` and `u2ad ablate` (importable; the commands only
parse flags).

demo:   synthetic public (healthy) + clinical cohorts -> pretrain -> EU / EU+AU adaptation ->
        evaluation of U2AD and of the cord-intensity rung -> report.md at the top of --out.
ablate: one shared pretraining run, then the four adaptation rungs (baseline, eu, au, eu_au)
        from it on the same cohort and seed, each evaluated by the same code, plus the intensity
        rung -> comparison.md / comparison.csv.

Sharing the pretraining is exact, not an approximation: pretraining uses random masking in every
rung, so the rungs differ only from adaptation on; it saves three pretraining runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Sequence

import ml_collections

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import evaluator
from u2ad_jax.evaluation import ladder
from u2ad_jax.evaluation import report
from u2ad_jax.stages import ABLATION_METHODS
from u2ad_jax.stages import ADAPT_STAGES

DEMO_CONFIG = "cpu.py"


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """Cohort sizes of a demo run (num_slices: sagittal slices per subject, None = the profile's)."""
  num_public: int
  num_clinical: int
  num_slices: int | None = None


DEMO_SIZE = DemoSize(num_public=16, num_clinical=24)
SMOKE_SIZE = DemoSize(num_public=3, num_clinical=5, num_slices=5)


def _log(text: str) -> None:
  print(f"[u2ad] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ configs


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """`path/to/config.py[:args]` -> ConfigDict (`config_files.load`: a bare file name is looked up
  in the checkout's configs/ and in the installed package). Default: the demo's configs/cpu.py.

  Raises:
    InputError: the config file does not exist.  UsageError: bad `:args`.
  """
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top

  return config_files.load(spec or DEMO_CONFIG)


def smoke_config() -> ml_collections.ConfigDict:
  """The demo's code path at test size: the 'mu' transformer on 80 px slices, pretraining and
  EU+AU adaptation (which exercises the map refresh and both guidances), 1-2 epochs each."""
  config = load_config("base.py:runlocal")
  config.data.image_size = 80  # 2.5 mm pixels: vertebral bodies stay separate components
  config.data.patch_size = 8
  config.stage_epochs.pretrain = 2
  config.stages = ("pretrain", "adapt_eu_au")  # one guided stage: compile time dominates here
  config.stage_epochs.adapt_eu_au = 1
  config.batch_size = 8
  # A 2.5 mm pixel leaves the eroded cord 1-2 pixels wide: single-pixel components must count.
  config.postprocess.min_size = 1
  config.uncertainty.num_samples = 2
  config.uncertainty.slices_per_device = 8
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 1000
  config.data.augment = True
  return config


# ------------------------------------------------------------------------------ data


def make_cohorts(data_dir: str, size: DemoSize, seed: int,
                 verbose: bool = True) -> tuple[str, str]:
  """Writes (or reuses) the public and clinical phantom cohorts; returns their directories.

  A cohort directory is reused when its participants.tsv lists the requested number of subjects
  and its generation record matches (profile, seed); generation is deterministic per seed. A
  cohort is (re)written through a staged swap, as `u2ad synth` does, so its folders and
  participants.tsv always agree.
  """
  from u2ad_jax.data import phantom  # pylint: disable=g-import-not-at-top

  dirs = []
  for profile, num, offset, lesion_fraction in (("public", size.num_public, 0, 0.0),
                                                ("clinical", size.num_clinical, 1, 0.5)):
    root = os.path.join(data_dir, profile)
    record_path = os.path.join(root, "u2ad_demo_cohort.json")
    record = {"profile": profile, "num_subjects": num, "seed": seed + offset,
              "lesion_fraction": lesion_fraction, "num_slices": size.num_slices}
    if os.path.isfile(record_path):
      with open(record_path, encoding="utf-8") as f:
        if json.load(f) == record:
          dirs.append(root)
          continue
    t0 = time.monotonic()
    with output_guard.staged_directory(root, "synth") as staging:
      phantom.write_cohort(staging, num, profile, seed + offset, lesion_fraction=lesion_fraction,
                           num_slices=size.num_slices)
      io_utils.write_json(os.path.join(staging, "u2ad_demo_cohort.json"), record)
    if verbose:
      _log(f"wrote the {profile} cohort ({num} subjects) in {time.monotonic() - t0:.1f} s: {root}")
    dirs.append(root)
  return dirs[0], dirs[1]


# ------------------------------------------------------------------------------ demo


@dataclasses.dataclass
class DemoResult:
  out_dir: str
  u2ad: analysis.CohortResult
  intensity: analysis.CohortResult
  timings: dict[str, float]
  report_path: str


def _stage_seconds(workdir: str) -> dict[str, float]:
  """Per-stage training time from the run's metrics.jsonl (stage_end events)."""
  out: dict[str, float] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("event") == "stage_end":
        out[f"train_{record['stage']}"] = float(record["seconds"])
  return out


def _prefix_links(markdown: str, prefix: str) -> str:
  """Rewrites relative Markdown links / images `](x)` to `](prefix/x)`."""
  return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)


def run_demo(out_dir: str | os.PathLike, *, smoke: bool = False, config_spec: str | None = None,
             size: DemoSize | None = None, seed: int = 0, overrides: Sequence[str] = (),
             overwrite: bool = False, verbose: bool = True) -> DemoResult:
  """The README's main command. See the module docstring.

  `overrides`: `key.path=value` settings applied to the loaded config (`config_lib.
  apply_overrides`), checked before any work.

  Layout of `out_dir`: data/{public,clinical}/ (cohorts), run/ (training workdir),
  evaluation/ (U2AD outputs), intensity/ (intensity rung outputs), comparison.{md,csv},
  report.md (the one-page summary, linking into evaluation/), timings.json.
  """
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import trainer  # pylint: disable=g-import-not-at-top

  # The config first: a bad file or override fails before anything is generated.
  config = smoke_config() if smoke and config_spec is None else load_config(config_spec)
  config_lib.apply_overrides(config, overrides)
  # `output_guard`: a non-empty out_dir must be an earlier demo's, and replacing it needs
  # `overwrite`; its cohorts are then reused when they match and its run resumes.
  out_dir = output_guard.check_output_dir(out_dir, "demo", overwrite=overwrite)
  os.makedirs(out_dir, exist_ok=True)
  output_guard.write_marker(out_dir, "demo")
  size = size or (SMOKE_SIZE if smoke else DEMO_SIZE)
  timings: dict[str, float] = {}
  start = time.monotonic()

  t0 = time.monotonic()
  public_dir, clinical_dir = make_cohorts(os.path.join(out_dir, "data"), size, seed, verbose)
  timings["data"] = time.monotonic() - t0

  config.seed = int(seed)
  config.data.public_dir = public_dir
  config.data.clinical_dir = clinical_dir

  t0 = time.monotonic()
  prepared = evaluator.prepare_cohort(clinical_dir, config.data, progress=False)
  public = preprocess.load_cohort(public_dir, config.data, progress=False)
  timings["preprocess"] = time.monotonic() - t0
  if verbose:
    _log(f"preprocessed {len(public)} public and {len(prepared.slice_set)} clinical slices in "
         f"{timings['preprocess']:.1f} s")

  workdir = os.path.join(out_dir, "run")
  t0 = time.monotonic()
  trainer.train(config, workdir, verbose=verbose,
                slice_sets={"public_dir": public, "clinical_dir": prepared.slice_set})
  timings["train"] = time.monotonic() - t0
  timings.update(_stage_seconds(workdir))

  t0 = time.monotonic()
  # The sub-outputs below lie in this demo's own directory: replacing them is overwriting its own.
  u2ad = evaluator.evaluate_checkpoint(workdir, clinical_dir, os.path.join(out_dir, "evaluation"),
                                       name="U2AD (eu_au)", prepared=prepared, overwrite=True,
                                       verbose=verbose)
  settings = evaluator.EvalSettings.from_config(config)
  intensity = evaluator.evaluate_intensity(prepared, settings, os.path.join(out_dir, "intensity"),
                                           overwrite=True)
  timings["evaluate"] = time.monotonic() - t0
  ladder.write_comparison(out_dir, {"intensity": intensity, "eu_au": u2ad},
                          [f"Demo cohort: `{clinical_dir}`."])
  timings["total"] = time.monotonic() - start

  with open(os.path.join(out_dir, "evaluation", "report.md"), encoding="utf-8") as f:
    evaluation_md = f.read()
  command = "u2ad demo --out " + os.path.basename(out_dir) + (" --smoke" if smoke else "")
  lines = [
      "# U2AD demo", "",
      f"`{command}`: synthetic public cohort ({size.num_public} healthy subjects) and clinical "
      f"cohort ({size.num_clinical} subjects, about half with T2 hyperintensities); model "
      f"`{config.model.variant}` at {config.data.image_size} px; stages "
      f"{', '.join(config.stages)} ({', '.join(str(config.stage_epochs[s]) for s in config.stages)}"
      f" epochs); K = {config.uncertainty.num_samples} in training, "
      f"{config.evaluation.num_samples or config.uncertainty.num_samples} at evaluation.",
      "",
      "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
      "",
      "## Ladder on this cohort", "",
  ]
  with open(os.path.join(out_dir, "comparison.md"), encoding="utf-8") as f:
    comparison_md = f.read()
  table = [l for l in comparison_md.splitlines() if l.startswith("|")]
  lines += table + ["", "Full ladder (baseline / EU / AU rungs): `u2ad ablate`. Intensity rung "
                    "report: [intensity/report.md](intensity/report.md).", ""]
  body = _prefix_links(evaluation_md, "evaluation").replace(
      "# U2AD evaluation:", "## Evaluation:", 1)
  report_path = os.path.join(out_dir, "report.md")
  io_utils.write_text(report_path, "\n".join(lines) + "\n" + body)
  io_utils.write_json(os.path.join(out_dir, "timings.json"), timings)
  if verbose:
    _log(f"demo done in {timings['total']:.0f} s; report: {report_path}")
  return DemoResult(out_dir=out_dir, u2ad=u2ad, intensity=intensity, timings=timings,
                    report_path=report_path)


# ------------------------------------------------------------------------------ ablation


def run_ablation(out_dir: str | os.PathLike, public_dir: str, clinical_dir: str, *,
                 config_spec: str | None = None, config: ml_collections.ConfigDict | None = None,
                 methods: Sequence[str] = ABLATION_METHODS, seed: int | None = None,
                 overrides: Sequence[str] = (), overwrite: bool = False,
                 verbose: bool = True) -> dict[str, analysis.CohortResult]:
  """Trains and scores the ladder on one cohort; writes comparison.{md,csv} into `out_dir`.

  Layout: runs/pretrain, runs/<method> (workdirs), <method>/ and intensity/ (evaluation
  outputs), comparison.md, comparison.csv, figures/roc_ladder.png.
  """
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import trainer  # pylint: disable=g-import-not-at-top

  unknown = [m for m in methods if m not in ABLATION_METHODS]
  if unknown:
    raise errors.UsageError(f"unknown ablation methods {unknown}; choose from "
                            f"{sorted(ABLATION_METHODS)}")
  base = config if config is not None else load_config(config_spec)
  base = base.copy_and_resolve_references()
  config_lib.apply_overrides(base, overrides)
  out_dir = output_guard.check_output_dir(
      out_dir, "ablate", overwrite=overwrite,
      protected={"--public": public_dir, "--clinical": clinical_dir})
  if seed is not None:
    base.seed = int(seed)
  base.data.public_dir = os.fspath(public_dir)
  base.data.clinical_dir = os.fspath(clinical_dir)

  prepared = evaluator.prepare_cohort(clinical_dir, base.data, progress=False)
  public = preprocess.load_cohort(public_dir, base.data, progress=False)
  slice_sets = {"public_dir": public, "clinical_dir": prepared.slice_set}
  os.makedirs(out_dir, exist_ok=True)
  output_guard.write_marker(out_dir, "ablate")

  pretrain_dir = os.path.join(out_dir, "runs", "pretrain")
  if "pretrain" in base.stages:
    pre = base.copy_and_resolve_references()
    pre.stages = ("pretrain",)
    config_lib.set_ablation(pre, "baseline")
    t0 = time.monotonic()
    trainer.train(pre, pretrain_dir, slice_sets=slice_sets, verbose=verbose)
    if verbose:
      _log(f"shared pretraining done in {time.monotonic() - t0:.0f} s")
  init_from = pretrain_dir if "pretrain" in base.stages else None

  results: dict[str, analysis.CohortResult] = {}
  settings = evaluator.EvalSettings.from_config(base)
  results["intensity"] = evaluator.evaluate_intensity(
      prepared, settings, os.path.join(out_dir, "intensity"), overwrite=True)
  for method in methods:
    cfg = base.copy_and_resolve_references()
    config_lib.set_ablation(cfg, method)
    cfg.stages = tuple(s for s in base.stages if s in ADAPT_STAGES)
    workdir = os.path.join(out_dir, "runs", method)
    t0 = time.monotonic()
    trainer.train(cfg, workdir, init_from=init_from, slice_sets=slice_sets, verbose=verbose)
    train_seconds = time.monotonic() - t0
    results[method] = evaluator.evaluate_checkpoint(
        workdir, clinical_dir, os.path.join(out_dir, method), name=method, prepared=prepared,
        overwrite=True, verbose=verbose)
    results[method].info["train_seconds"] = train_seconds
    if verbose:
      _log(f"{method}: adaptation {train_seconds:.0f} s; " + report.format_table(
          results[method]).splitlines()[-1])
  ladder.write_comparison(out_dir, results, [
      f"Cohort: `{clinical_dir}` ({len(prepared.slice_set.subjects)} patients); pretraining on "
      f"`{public_dir}`; seed {base.seed}; model `{base.model.variant}` at "
      f"{base.data.image_size} px; adaptation epochs "
      f"{', '.join(f'{s} {base.stage_epochs[s]}' for s in base.stages if s in ADAPT_STAGES)}."])
  return results

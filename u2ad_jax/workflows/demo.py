"""`u2ad demo`: the whole method on synthetic data, end to end.

Synthetic public (healthy) + clinical cohorts -> pretrain -> EU / EU+AU adaptation -> evaluation
of U2AD and of the cord-intensity rung -> comparison.{md,csv} and report.md at the top of --out.
Its config is a config file (`config_files.load`): configs/cpu.py by default, configs/smoke.py
with `smoke`.
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

from u2ad_jax import config_files
from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import ladder
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.evaluation.rungs import registry

DEMO_CONFIG = "cpu.py"
SMOKE_CONFIG = "smoke.py"


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """Cohort sizes of a demo run (num_slices: sagittal slices per subject, None = the profile's)."""
  num_public: int
  num_clinical: int
  num_slices: int | None = None
  num_validation: int = 2  # healthy clinical-profile subjects scored while training


DEMO_SIZE = DemoSize(num_public=16, num_clinical=24)
SMOKE_SIZE = DemoSize(num_public=3, num_clinical=5, num_slices=5)


def _log(text: str) -> None:
  print(f"[u2ad] {text}", file=sys.stderr, flush=True)


def load_config(spec: str | None, smoke: bool = False) -> ml_collections.ConfigDict:
  """`path/to/config.py[:args]` -> ConfigDict (`config_files.load`); without `spec`, the demo's
  configs/cpu.py, or configs/smoke.py when `smoke`.

  Raises:
    InputError: the config file does not exist.  UsageError: bad `:args`.
  """
  return config_files.load(spec or (SMOKE_CONFIG if smoke else DEMO_CONFIG))


# ------------------------------------------------------------------------------ data


def _phantom_cohort(root: str, profile: str, num: int, seed: int, lesion_fraction: float,
                    num_slices: int | None, verbose: bool) -> str:
  """Writes (or reuses) one phantom cohort at `root`; see `make_cohorts`."""
  from u2ad_jax.phantom import cohort_writer  # pylint: disable=g-import-not-at-top

  record_path = os.path.join(root, "u2ad_demo_cohort.json")
  record = {"profile": profile, "num_subjects": num, "seed": seed,
            "lesion_fraction": lesion_fraction, "num_slices": num_slices}
  if os.path.isfile(record_path):
    with open(record_path, encoding="utf-8") as f:
      if json.load(f) == record:
        return root
  t0 = time.monotonic()
  with output_guard.staged_directory(root, "synth") as staging:
    cohort_writer.write_cohort(staging, num, profile, seed, lesion_fraction=lesion_fraction,
                               num_slices=num_slices)
    io_utils.write_json(os.path.join(staging, "u2ad_demo_cohort.json"), record)
  if verbose:
    _log(f"wrote the {os.path.basename(root)} cohort ({num} subjects) in "
         f"{time.monotonic() - t0:.1f} s: {root}")
  return root


def make_cohorts(data_dir: str, size: DemoSize, seed: int,
                 verbose: bool = True) -> tuple[str, str]:
  """Writes (or reuses) the public and clinical phantom cohorts; returns their directories.

  A cohort directory is reused when its participants.tsv lists the requested number of subjects
  and its generation record matches (profile, seed); generation is deterministic per seed. A
  cohort is (re)written through a staged swap, as `u2ad synth` does, so its folders and
  participants.tsv always agree.
  """
  return (_phantom_cohort(os.path.join(data_dir, "public"), "public", size.num_public, seed,
                          0.0, size.num_slices, verbose),
          _phantom_cohort(os.path.join(data_dir, "clinical"), "clinical", size.num_clinical,
                          seed + 1, 0.5, size.num_slices, verbose))


def make_validation_cohort(data_dir: str, size: DemoSize, seed: int,
                           verbose: bool = True) -> str:
  """Healthy subjects of the CLINICAL profile (seed + 2), never trained on: the demo's held-out
  normal anatomy. The demo's score is made on the clinical cohort, so reconstruction quality
  is watched on its scanner profile; the public profile (another scanner, left mostly behind by
  adaptation) would say little about it."""
  return _phantom_cohort(os.path.join(data_dir, "validation"), "clinical", size.num_validation,
                         seed + 2, 0.0, size.num_slices, verbose)


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

  Layout of `out_dir`: data/{public,clinical,validation}/ (cohorts; validation only when
  the config validates while training), run/ (training workdir),
  evaluation/ (U2AD outputs), intensity/ (intensity rung outputs), comparison.{md,csv},
  report.md (the one-page summary, linking into evaluation/), timings.json.
  """
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import trainer  # pylint: disable=g-import-not-at-top

  # The config first: a bad file or override fails before anything is generated.
  config = load_config(config_spec, smoke)
  config_lib.apply_overrides(config, overrides)
  # `output_guard`: a non-empty out_dir must be an earlier demo's, and replacing it needs
  # `overwrite`; its cohorts are then reused when they match and its run resumes.
  marker = output_guard.read_marker(out_dir) if os.path.isdir(out_dir) else None
  if marker is not None and marker["command"] == "demo" and not overwrite:
    # The guard's generic "pass --overwrite to replace it" would hide that --overwrite RESUMES
    # an interrupted demo (the usual reason to run it again) rather than starting over.
    raise errors.InputError(os.path.abspath(os.fspath(out_dir)),
                            "holds an earlier `u2ad demo` run (finished or interrupted); pass "
                            "--overwrite to resume it: matching cohorts are reused, training "
                            "continues from its last checkpoint, the evaluations are replaced")
  out_dir = output_guard.check_output_dir(out_dir, "demo", overwrite=overwrite, swapped=False)
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
  if int(config.validation.every_steps) > 0 and not config.validation.data_dir \
      and size.num_validation > 0:
    t0 = time.monotonic()
    config.validation.data_dir = make_validation_cohort(os.path.join(out_dir, "data"), size, seed,
                                                        verbose)
    timings["data"] += time.monotonic() - t0

  t0 = time.monotonic()
  prepared = rung_base.prepare_cohort(clinical_dir, config.data, progress=False)
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
  u2ad = model_rung.evaluate_checkpoint(workdir, clinical_dir,
                                        os.path.join(out_dir, "evaluation"), name="U2AD (eu_au)",
                                        prepared=prepared, overwrite=True, verbose=verbose)
  intensity = rung_base.evaluate(registry.get("intensity")(), prepared,
                                 settings_lib.EvalSettings.from_config(config),
                                 os.path.join(out_dir, "intensity"), overwrite=True)
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

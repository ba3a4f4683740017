"""`u2ad ablate`: one shared pretraining run, then the four adaptation rungs (baseline, eu, au,
eu_au) from it on the same cohort and seed, each evaluated by the same code, plus the intensity
rung -> comparison.md / comparison.csv.

Sharing the pretraining is exact, not an approximation: pretraining uses random masking in every
rung, so the rungs differ only from adaptation on; it saves three pretraining runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import ml_collections

from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import ladder
from u2ad_jax.evaluation import report
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.evaluation.rungs import registry
from u2ad_jax.stages import ABLATION_METHODS
from u2ad_jax.stages import ADAPT_STAGES
from u2ad_jax.workflows import demo


def _log(text: str) -> None:
  print(f"[u2ad] {text}", file=sys.stderr, flush=True)


def run_ablation(out_dir: str | os.PathLike, public_dir: str, clinical_dir: str, *,
                 config_spec: str | None = None, smoke: bool = False,
                 config: ml_collections.ConfigDict | None = None,
                 methods: Sequence[str] = ABLATION_METHODS, seed: int | None = None,
                 overrides: Sequence[str] = (), overwrite: bool = False,
                 verbose: bool = True) -> dict[str, analysis.CohortResult]:
  """Trains and scores the ladder on one cohort; writes comparison.{md,csv} into `out_dir`.

  The config: `config` when given, else the file `config_spec`, else configs/smoke.py when
  `smoke`, else configs/cpu.py (`demo.load_config`).
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
  base = config if config is not None else demo.load_config(config_spec, smoke)
  base = base.copy_and_resolve_references()
  config_lib.apply_overrides(base, overrides)
  out_dir = output_guard.check_output_dir(
      out_dir, "ablate", overwrite=overwrite, swapped=False,
      protected={"--public": public_dir, "--clinical": clinical_dir})
  if seed is not None:
    base.seed = int(seed)
  base.data.public_dir = os.fspath(public_dir)
  base.data.clinical_dir = os.fspath(clinical_dir)

  prepared = rung_base.prepare_cohort(clinical_dir, base.data, progress=False)
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
  results["intensity"] = rung_base.evaluate(
      registry.get("intensity")(), prepared, settings_lib.EvalSettings.from_config(base),
      os.path.join(out_dir, "intensity"), overwrite=True)
  for method in methods:
    cfg = base.copy_and_resolve_references()
    config_lib.set_ablation(cfg, method)
    cfg.stages = tuple(s for s in base.stages if s in ADAPT_STAGES)
    workdir = os.path.join(out_dir, "runs", method)
    t0 = time.monotonic()
    trainer.train(cfg, workdir, init_from=init_from, slice_sets=slice_sets, verbose=verbose)
    train_seconds = time.monotonic() - t0
    results[method] = model_rung.evaluate_checkpoint(
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

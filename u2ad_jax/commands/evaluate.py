"""`u2ad evaluate --workdir RUN [--step N] --data COHORT --out DIR`.

Restores a checkpoint read-only, computes Monte-Carlo anomaly maps for every slice of the cohort,
scores the six segments C2-3 ... C7-T1 and every patient, decides with the unsupervised threshold
(median + k robust sigma of the cohort's segment scores; no labels) and writes per-patient NIfTI
maps and JSON sidecars, CSV tables, metrics (when the cohort has truth), figures and report.md.
With `--intensity_out DIR` it also scores the cord-intensity rung on the same cohort. `--set
section.key=value` changes the run's scoring settings (evaluation.*, postprocess.*) for this
evaluation only, e.g. `--set evaluation.residual=absolute` for the method's |x - mean| map.
An output directory must be missing, empty or (with --overwrite) an earlier `u2ad evaluate`
output, and may not be, lie inside or contain the workdir or the cohort.
`--threshold-from EVAL_DIR` applies the threshold an earlier evaluation of the same checkpoint
recorded (a new patient alone has no cohort statistics); the report names it and its source.
Where the numbers cannot be fully trusted (a threshold from fewer than 10 patients, a model or
threshold of another kind of cohort, a checkpoint before the final stage, levels cut by the field
of view, ...: `evaluation/trust.py`) one warning line each goes to stderr, report.md and
summary.json.
`--steps all|latest|N,M,...` sweeps the run's kept checkpoints instead of scoring one: one
evaluation folder per step plus sweep.csv / sweep.png in --out, resumed when run again
(`evaluation/sweep.py`; keep checkpoints with config.checkpoint.keep_every_steps).
Multi-host: `--distributed` (SLURM / TPU auto-detection) or explicit `--coordinator_address
--num_processes --process_id`, the same command in every process: the cohort's subjects are
split over the processes for the Monte-Carlo maps, and process 0 alone scores and writes
(see launch/).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.commands import multihost
from u2ad_jax.evaluation import report
from u2ad_jax.evaluation import settings as settings_lib
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.evaluation.rungs import registry

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (config.json + checkpoints/)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_STEPS = flags.DEFINE_string(
    "steps", None, "sweep checkpoints instead: all, latest or N,M,... (kept steps); writes "
    "step_NNNNNNN/ per step, sweep.csv and sweep.png into --out and resumes when run again")
_DATA = flags.DEFINE_string("data", None, "cohort directory (as written by `u2ad synth`)")
_OUT = flags.DEFINE_string("out", None, "output directory (replaced only when complete)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out / --intensity_out when they "
                               "hold an earlier u2ad evaluate output")
_BATCH = flags.DEFINE_integer("batch_size", model_rung.DEFAULT_BATCH_SIZE,
                              "slices per Monte-Carlo call, split over the local devices "
                              "(use a multiple of the device count)")
_INTENSITY_OUT = flags.DEFINE_string("intensity_out", None,
                                     "also score the cord-intensity rung into this directory")
_SET = flags.DEFINE_multi_string(
    "set", [], "scoring override section.key=value of the run's evaluation / postprocess config, "
    "e.g. --set evaluation.residual=absolute --set evaluation.num_samples=10 (repeatable)")
_THRESHOLD_FROM = flags.DEFINE_string(
    "threshold_from", None, "apply the threshold recorded by this earlier evaluation (its --out "
    "directory, same checkpoint and scoring settings) instead of computing one from --data, "
    "e.g. for a single new patient")
flags.DEFINE_alias("threshold-from", "threshold_from")  # the spelling the README uses
_QUIET = flags.DEFINE_bool("quiet", False, "no progress messages")

flags.mark_flags_as_required(["workdir", "data", "out"])


def _sweep_conflicts() -> None:
  """UsageError for the flags a checkpoint sweep cannot take."""
  for flag, value, why in (
      ("--step", _STEP.value, "use --step N for one checkpoint or --steps N,M,... for several"),
      ("--threshold-from", _THRESHOLD_FROM.value,
       "a recorded threshold belongs to one checkpoint"),
      ("--intensity_out", _INTENSITY_OUT.value, "the intensity rung has no checkpoint; score it "
                                                "once with a plain `u2ad evaluate`")):
    if value is not None:
      raise errors.UsageError(f"--steps with {flag}: {why}")


def _sweep() -> None:
  """`--steps`: the checkpoint sweep (`evaluation/sweep.py`)."""
  from u2ad_jax.evaluation import sweep  # pylint: disable=g-import-not-at-top

  _sweep_conflicts()
  if multihost.requested():
    raise errors.UsageError("--steps runs in one process: sweep without --distributed / "
                            "--num_processes")
  steps = sweep.parse_steps(_STEPS.value)  # before any work: `--steps 12,abc` is one line
  log = model_rung.stderr_log(not _QUIET.value)
  result = sweep.run_sweep(_WORKDIR.value, _DATA.value, _OUT.value, steps, overrides=_SET.value,
                           batch_size=_BATCH.value, overwrite=_OVERWRITE.value, log=log)
  print(sweep.format_table(result.rows))
  print(f"sweep: {os.path.join(_OUT.value, sweep.CSV_FILE)}, "
        f"{os.path.join(_OUT.value, sweep.FIGURE_FILE)}")


def main(argv):
  del argv  # stray arguments are refused by the dispatcher
  # Library logs (checkpoint I/O, read-only notices) would bury the progress lines.
  logging.set_verbosity(logging.ERROR)
  if _STEPS.value is not None:
    _sweep()
    return
  # Before any JAX work (the checkpoint restore is the first).
  from u2ad_jax.train import distributed  # pylint: disable=g-import-not-at-top
  multihost.start()
  # Both outputs are checked before any work (the rungs check them again before writing).
  protected = {"--workdir": _WORKDIR.value, "--data": _DATA.value,
               "--threshold-from": _THRESHOLD_FROM.value}
  output_guard.check_output_dir(_OUT.value, "evaluate", overwrite=_OVERWRITE.value,
                                protected=protected)
  if _INTENSITY_OUT.value:
    output_guard.check_output_dir(_INTENSITY_OUT.value, "evaluate", overwrite=_OVERWRITE.value,
                                  protected={**protected, "--out": _OUT.value},
                                  flag="--intensity_out")
  log = model_rung.stderr_log(not _QUIET.value)
  if log and multihost.requested():
    log(distributed.describe())
  rung = registry.get("model").restore(
      _WORKDIR.value, step=_STEP.value, overrides=_SET.value, batch_size=_BATCH.value,
      threshold_from=_THRESHOLD_FROM.value, log=log)
  # The cohort is loaded once, with the run's data settings, for both rungs.
  prepared = rung_base.prepare_cohort(_DATA.value, rung.config.data, progress=not _QUIET.value)
  settings = settings_lib.EvalSettings.from_config(rung.config)
  result = rung_base.evaluate(rung, prepared, settings, _OUT.value, overwrite=_OVERWRITE.value,
                              protected=protected, log=log)
  if result is None:  # a multi-process job: process 0 scores and writes both rungs
    return
  if log:
    log(f"wrote {os.path.abspath(_OUT.value)}")
  print(report.format_table(result))
  print(f"report: {_OUT.value}/report.md")
  if _INTENSITY_OUT.value:
    intensity_log = None if log is None else (lambda msg: log(f"intensity rung: {msg}"))
    intensity = rung_base.evaluate(registry.get("intensity")(), prepared, settings,
                                   _INTENSITY_OUT.value, overwrite=_OVERWRITE.value,
                                   log=intensity_log)
    print("intensity rung: " + report.format_table(intensity).splitlines()[-1])
    print(f"intensity rung report: {_INTENSITY_OUT.value}/report.md")

"""`u2ad demo --out DIR [--smoke]`: the whole method on synthetic data, end to end.

Generates a healthy public cohort and a clinical cohort (about half of the patients with T2
hyperintensities) with the phantom, pretrains the masked autoencoder on the public cohort, adapts
it to the clinical cohort with EU- then EU+AU-guided masking, evaluates it (and the cord-intensity
rung) on the clinical cohort, writes DIR/report.md and prints the patient / segment table.
`--smoke` runs the same path at test size (5 patients, a tiny model, configs/smoke.py).
`--config FILE[:args]` picks another config (default configs/cpu.py) and `--set key.path=value`
changes single settings (e.g. `--set stage_epochs.pretrain=24`).
Re-running with the same DIR needs `--overwrite` (DIR must hold an earlier demo, finished or
interrupted): it reuses the cohorts that match, resumes / reuses the training run and replaces
the evaluations.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from u2ad_jax import errors

from u2ad_jax.evaluation import report
from u2ad_jax.workflows import demo

_OUT = flags.DEFINE_string("out", None, "output directory")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "reuse / replace --out when it holds an "
                               "earlier u2ad demo output")
_SMOKE = flags.DEFINE_bool("smoke", False, "test-size run: 5 patients, tiny model, 1-2 epochs")
_CONFIG = flags.DEFINE_string("config", None, "config file[:args] (default configs/cpu.py; "
                                              "--smoke uses its own tiny config)")
_PUBLIC = flags.DEFINE_integer("num_public", None, "public cohort size (default 16, smoke 3)")
_CLINICAL = flags.DEFINE_integer("num_clinical", None, "clinical cohort size (default 24, smoke 5)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the cohorts and of training")
_SET = flags.DEFINE_multi_string(
    "set", [], "config override key.path=value, e.g. --set stage_epochs.pretrain=24 "
    "--set evaluation.residual=absolute (repeatable; unknown keys fail)")

flags.mark_flag_as_required("out")


def main(argv):
  del argv  # stray arguments are refused by the dispatcher
  # Library logs (checkpoint I/O, read-only notices) would bury the progress lines.
  logging.set_verbosity(logging.ERROR)
  default = demo.SMOKE_SIZE if _SMOKE.value else demo.DEMO_SIZE
  size = demo.DemoSize(
      num_public=_PUBLIC.value if _PUBLIC.value is not None else default.num_public,
      num_clinical=_CLINICAL.value if _CLINICAL.value is not None else default.num_clinical)
  try:
    result = demo.run_demo(_OUT.value, smoke=_SMOKE.value, config_spec=_CONFIG.value,
                           size=size, seed=_SEED.value, overrides=_SET.value,
                           overwrite=_OVERWRITE.value)
  except errors.TrainingInterrupted as e:
    # An earlier demo output is resumed only with --overwrite.
    raise e.with_hint("run the same command with --overwrite to resume (its cohorts are reused "
                      "and training continues from that checkpoint)") from None
  print(report.format_table(result.u2ad))
  print("intensity rung: " + report.format_table(result.intensity).splitlines()[-1])
  print(f"report: {result.report_path}")

"""`u2ad ablate --public P --clinical C --out DIR [--config FILE[:args]] [--methods ...]`.

Trains the comparison ladder on one cohort and seed: one shared pretraining run on the public
cohort, then the adaptation of each rung (baseline = random masking, eu, au, eu_au = U2AD) on the
clinical cohort, each evaluated by the same scoring code, plus the cord-intensity rung. Writes
DIR/comparison.md and DIR/comparison.csv (and every rung's full evaluation in DIR/<rung>/).
An existing DIR must be an earlier `u2ad ablate` output and needs `--overwrite` (its runs resume);
DIR may not be, lie inside or contain either cohort.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from u2ad_jax import errors

from u2ad_jax import stages
from u2ad_jax.workflows import ablate

_OUT = flags.DEFINE_string("out", None, "output directory")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "reuse / replace --out when it holds an "
                               "earlier u2ad ablate output")
_PUBLIC = flags.DEFINE_string("public", None, "healthy public cohort (pretraining)")
_CLINICAL = flags.DEFINE_string("clinical", None, "clinical cohort (adaptation and evaluation)")
_CONFIG = flags.DEFINE_string("config", None, "config file[:args] (default configs/cpu.py)")
_METHODS = flags.DEFINE_list("methods", list(stages.ABLATION_METHODS), "rungs to train")
_SEED = flags.DEFINE_integer("seed", None, "override config.seed")
_SMOKE = flags.DEFINE_bool("smoke", False, "use the smoke demo's tiny config")
_SET = flags.DEFINE_multi_string(
    "set", [], "config override key.path=value, e.g. --set stage_epochs.adapt_eu=12 "
    "(repeatable; unknown keys fail)")

flags.mark_flags_as_required(["out", "public", "clinical"])


def main(argv):
  del argv  # stray arguments are refused by the dispatcher
  # Library logs (checkpoint I/O, read-only notices) would bury the progress lines.
  logging.set_verbosity(logging.ERROR)
  try:
    ablate.run_ablation(_OUT.value, _PUBLIC.value, _CLINICAL.value, config_spec=_CONFIG.value,
                        smoke=_SMOKE.value, methods=_METHODS.value, seed=_SEED.value,
                        overrides=_SET.value, overwrite=_OVERWRITE.value)
  except errors.TrainingInterrupted as e:
    # An earlier ablate output is resumed only with --overwrite.
    raise e.with_hint("run the same command with --overwrite to resume (its runs continue "
                      "from their last checkpoints)") from None
  with open(f"{_OUT.value}/comparison.md", encoding="utf-8") as f:
    print(f.read())

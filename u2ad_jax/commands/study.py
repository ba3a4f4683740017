"""`u2ad study --out DIR --seeds N [--first_seed S] [--from-slices SRC] [--smoke] ...`.

Runs the comparison ladder (`u2ad ablate`) on N cohorts, seeds S ... S + N - 1 (phantom cohorts,
or real-anatomy pseudo-patients built from SRC), and reports per metric the mean over cohorts with
its 95 % interval and the paired differences + EU / + AU / U2AD - baseline and U2AD - intensity
(hierarchical bootstrap over cohorts and patients; pixel AP and best Dice over cohorts):
DIR/study.md, study.csv, study.json and figures/study_ladder.png. `--also_residual absolute` also
scores every trained rung with the method's own |x - mean| map (scoring only). A seed already
done (DIR/seed-<s>/tables.json, tables-<map>.json) is reused.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from u2ad_jax import errors
from u2ad_jax.evaluation import stats
from u2ad_jax import stages
from u2ad_jax.workflows import demo

_OUT = flags.DEFINE_string("out", None, "output directory")
_SEEDS = flags.DEFINE_integer("seeds", 3, "number of cohorts (seeds)", lower_bound=1)
_FIRST = flags.DEFINE_integer("first_seed", 0, "first seed; the study uses first_seed ... + seeds - 1")
_FROM = flags.DEFINE_string("from_slices", None,
                            "real labelled slices (.npy folder or cohort): real-anatomy benchmark")
flags.DEFINE_alias("from-slices", "from_slices")
_PUBLIC = flags.DEFINE_string("public", None, "fixed pretraining cohort (default: phantom public per seed)")
_SUBJECTS = flags.DEFINE_integer("subjects", None, "clinical subjects per cohort (default: demo size)",
                                 lower_bound=2)
_CONFIG = flags.DEFINE_string("config", None, "config file[:args] (default configs/cpu.py)")
_METHODS = flags.DEFINE_list("methods", list(stages.ABLATION_METHODS), "rungs to train")
_SMOKE = flags.DEFINE_bool("smoke", False, "the smoke demo's tiny config and cohort sizes")
_RESAMPLES = flags.DEFINE_integer("resamples", stats.DEFAULT_RESAMPLES, "bootstrap resamples",
                                  lower_bound=100)
_ALSO = flags.DEFINE_list(
    "also_residual", [], "other anomaly maps to score every trained rung with as well (scoring "
    "only), e.g. 'absolute' for the method's own |x - mean|; each gets its own table")
_SET = flags.DEFINE_multi_string(
    "set", [], "config override key.path=value (repeatable; unknown keys fail)")


def main(argv):
  del argv  # stray arguments are refused by the dispatcher
  if not _OUT.value:
    raise errors.UsageError("--out is required")
  logging.set_verbosity(logging.ERROR)
  size = demo.SMOKE_SIZE if _SMOKE.value else demo.DEMO_SIZE
  if _SUBJECTS.value is not None:
    size = demo.DemoSize(size.num_public, _SUBJECTS.value, size.num_slices)
  seeds = list(range(_FIRST.value, _FIRST.value + _SEEDS.value))
  from u2ad_jax.workflows import study  # pylint: disable=g-import-not-at-top
  study.run_study(_OUT.value, seeds, source=_FROM.value, public_dir=_PUBLIC.value,
                  smoke=_SMOKE.value, config_spec=_CONFIG.value, methods=_METHODS.value,
                  overrides=_SET.value, also_residuals=_ALSO.value, size=size, num_resamples=_RESAMPLES.value)
  with open(f"{_OUT.value}/study.md", encoding="utf-8") as f:
    print(f.read())

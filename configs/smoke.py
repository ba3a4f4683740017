"""Smoke configuration: the demo's code path at test size (`u2ad demo --smoke`, the tests).

The 'mu' transformer (base.py's runlocal sizes) on 80 px slices, pretraining and EU+AU
adaptation (which exercises the map refresh and both guidances), 1-2 epochs each.

  u2ad demo --out DIR --smoke      (this config, with the smoke cohort sizes)

Starts from base.py with its runlocal sizes (`config_lib.set_runlocal`). Arguments as
base.py's: ablation=..., schedule=..., runlocal (shrinks it further, to the 32 px runlocal run).
"""

from u2ad_jax import config_lib

base = config_lib.sibling(__file__, "base")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, **config_lib.COMMON_ARGS)
  config = base.make_config()
  config_lib.set_runlocal(config)
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
  return config_lib.finalize(config, args)

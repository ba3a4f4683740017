"""The paper's configuration: 256 px, the 'paper' ViT-MAE, batch 10,
200 pretraining epochs on the public cohort, then 150 EU-guided and 50 EU+AU-guided adaptation
epochs on the clinical cohort, K = 10 reconstructions per patch, maps refreshed every 10 epochs.

  u2ad train --config configs/paper.py --workdir runs/paper \
      --config.data.public_dir=PUBLIC --config.data.clinical_dir=CLINICAL

Arguments: ablation=baseline|eu|au|eu_au, schedule=NAME (schedules.available()), runlocal.
"""

from u2ad_jax import config_lib

base = config_lib.sibling(__file__, "base")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, **config_lib.COMMON_ARGS)
  config = base.make_config()
  config.model.variant = "paper"
  config.data.image_size = 256
  config.data.patch_size = 8
  config.batch_size = 10
  config.stage_epochs.pretrain = 200
  config.stage_epochs.adapt_eu = 150
  config.stage_epochs.adapt_eu_au = 50
  config.optim.lr = 3e-3
  config.optim.decay_every_epochs = 50
  config.uncertainty.num_samples = 10
  config.uncertainty.refresh_epochs = 10
  # Mixed precision on accelerators (bf16 compute, float32 params / optimizer / softmax / loss);
  # float32 on CPU.
  config.model.overrides.dtype = "auto"
  config.uncertainty.pass_chunk = 2    # benchmarks/README.md: lower peak memory, same speed
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 50
  return config_lib.finalize(config, args)

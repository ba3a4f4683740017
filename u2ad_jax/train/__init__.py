"""The training system.

  state.py        TrainState (step, params, opt_state), the Adam + step-decay optimizer, the model.
  step.py         the ONE per-device train step (masks drawn inside, pooled loss, pmean'd grads).
  parallel.py     its pmap and jit(shard_map) wrappers and the matching data placement.
  maps.py         Monte-Carlo EU / AU map refreshes during adaptation, sharded over devices.
  checkpoint.py   Orbax checkpoints, the workdir's config record, `restore_for_eval`.
  metrics_log.py  metrics.jsonl and the training-curve PNG.
  progress.py     the console progress line (loss terms, norms, steps/s, ETA).
  trainer.py      the stage driver (pretrain -> adapt_eu -> adapt_eu_au), resume logic.
  distributed.py  multi-process start-up (jax.distributed.initialize).
  config_lib.py   helpers of the config files in configs/ (arguments, ablations, runlocal).
"""

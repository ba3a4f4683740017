"""The training system.

  settings.py     the config resolved once, at the trainer's door, into typed settings; the model.
  state.py        TrainState (step, params, opt_state), OptimizerSettings and the Adam optimizer.
  step.py         the ONE per-device train step (masks drawn inside, pooled loss, pmean'd grads).
  maps.py         Monte-Carlo EU / AU map refreshes during adaptation, sharded over devices.
  checkpoint.py   Orbax checkpoints, the workdir's config record, `restore_for_eval`.
  metrics_log.py  metrics.jsonl and the training-curve PNG.
  progress.py     the console progress line (loss terms, norms, steps/s, ETA).
  trainer.py      `train`: the door (checks every input) and the stages in order.
  resume.py       where a run starts: its checkpoint, another run's parameters, or fresh ones.
  stage.py        one stage: batches, guidance per epoch, map refreshes, checkpoints.
  run_log.py      the run's metric records, console lines and loss check.
  distributed.py  multi-process start-up (jax.distributed.initialize) and the bounded exchanges
                  of the start-up (where to resume, the workdir ready).
"""

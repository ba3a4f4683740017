"""One training stage: its batches, the guidance of each epoch, map refreshes and checkpoints.

Which guidance is on, and how strong, comes from the schedule evaluated once per epoch
(`schedules.stage_guidance`), so the ablations are configs. During adaptation the maps are
regenerated from the current parameters at epoch 0 and every `refresh_epochs` epochs
(`maps.MapGenerator`), only when some epoch of the stage uses them.

A new optimizer state (moments and schedule counter, so the learning rate restarts at `lr`) is
created at the start of every stage (`restart='stage'`) or only when entering adaptation from
pretraining (`'adaptation'`: adapt_eu_au then continues adapt_eu's schedule). The global step
keeps counting across stages.

Randomness: the data of epoch e is a function of (seed, stage, e) (`data_seed`), the masks of
step s of (seed, s) (the step folds `s` into the train key) and the maps of a refresh of (seed,
stage, refresh epoch) (`maps_key`), so a resumed stage repeats exactly what it would have done.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from u2ad_jax import errors
from u2ad_jax import parallel
from u2ad_jax import schedules
from u2ad_jax.data import pipeline
from u2ad_jax.data import sliceset
from u2ad_jax.stages import STAGES
from u2ad_jax.train import checkpoint
from u2ad_jax.train import faults
from u2ad_jax.train import maps as maps_lib
from u2ad_jax.train import run_log
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib
from u2ad_jax.train import validation as validation_lib
from u2ad_jax.train import workdir as workdir_lib


# fold_in tag of the map keys in the run's root key (the trainer holds the others).
MAPS_TAG = 2
# The validation figures' folder in the workdir (`validation.figures`).
VALIDATION_DIR = "validation"


class Stop(Exception):
  """debug_stop_after_steps reached: leave like a killed process (no further saves)."""


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What every stage of a run shares (read-only).

  Attributes:
    run: the resolved settings.
    config: the run config, read only by the maps' training adapter (`maps.MapGenerator`).
    model: the flax module.
    cohorts: the loaded slices, keyed by `settings.STAGE_DATA` values.
    ckpts: the open checkpoint manager.
    log: the run's log.
    devices: devices of all processes.
    root_key: `key(seed)`; train_key: its training branch (folded with the step inside).
    validator: scores held-out normal slices (None: validation off).
    cpu_start, wall_start: process CPU time and monotonic time when the stages started.
    stop_requested: polled after every step (and its checkpoint): True stops the run there with
      KeyboardInterrupt (the trainer's Ctrl-C handling: the step finishes, nothing is torn).
  """
  run: settings_lib.RunSettings
  config: Any
  model: Any
  cohorts: dict[str, sliceset.SliceSet]
  ckpts: checkpoint.Checkpoints
  log: run_log.RunLog
  devices: list
  root_key: jax.Array
  train_key: jax.Array
  validator: validation_lib.Validator | None = None
  cpu_start: float = dataclasses.field(default_factory=validation_lib.process_cpu_seconds)
  wall_start: float = dataclasses.field(default_factory=time.monotonic)
  stop_requested: Callable[[], bool] = lambda: False


@dataclasses.dataclass
class Cursor:
  """The run's progress, advanced by `run_stage` (and read back by the trainer after a Stop).

  Attributes:
    state: the TrainState (host copy before the first stage, then on the devices), or None
      before the first stage of a run that starts from parameters.
    step: global steps done.
    last_saved: the newest step saved (or restored), None before any.
    maps: the guidance maps in use (`{'patch_eu', 'exclude'}`), or None.
    last_validated: the step of the last validation, None before any.
    last_panel: the step of the last TensorBoard panel, None before any.
  """
  state: state_lib.TrainState | None
  step: int
  last_saved: int | None
  maps: dict[str, np.ndarray] | None
  last_validated: int | None = None
  last_panel: int | None = None


def data_seed(seed: int, stage: str) -> int:
  """Shuffling / augmentation seed of a stage (stages on the same cohort see different orders)."""
  return int(np.random.SeedSequence([int(seed), STAGES.index(stage)]).generate_state(1)[0])


def maps_key(root: jax.Array, stage: str, epoch: int) -> jax.Array:
  """Key of the map refresh at `epoch` of `stage`: a function of (seed, stage, epoch) only."""
  key = jax.random.fold_in(jax.random.fold_in(root, MAPS_TAG), STAGES.index(stage))
  return jax.random.fold_in(key, int(epoch))


def restarts_optimizer(restart: str, stages: tuple[str, ...], stage_index: int) -> bool:
  """Whether entering `stages[stage_index]` creates a new optimizer state."""
  if restart == "stage" or stage_index == 0:
    return True
  # 'adaptation': restart only where pretraining hands over to adaptation.
  return stages[stage_index - 1] == "pretrain"


def run_stage(ctx: RunContext, stage_index: int, cursor: Cursor, start_epoch: int,
              start_batch: int, params: Any) -> None:
  """Trains `ctx.run.stages[stage_index]` from batch `start_batch` of epoch `start_epoch`.

  Advances `cursor` step by step (state, step, saves, maps) and saves at the end of the stage.
  `params` start the run when `cursor.state` is None.

  Raises:
    Stop: `debug_stop_after_steps` reached (nothing saved after the last periodic checkpoint).
    NonFiniteLossError, CheckpointWriteError: see `trainer.train`.
  """
  run, log = ctx.run, ctx.log
  stage = run.stages[stage_index]
  epochs = run.stage_epochs[stage]
  slices = ctx.cohorts[settings_lib.STAGE_DATA[stage]]
  iterator = pipeline.BatchIterator(
      slices, global_batch=run.data.batch_size,
      num_devices=len(parallel.local_devices_of(ctx.devices)),
      seed=data_seed(run.seed, stage), augment=False, with_examples=False,
      drop_remainder=False, process_index=jax.process_index(),
      process_count=jax.process_count(), prefetch=run.data.prefetch,
      device_positions=parallel.mesh_positions(ctx.devices), total_devices=len(ctx.devices))
  steps_per_epoch = iterator.steps_per_epoch
  optimizer = state_lib.make_optimizer(run.optimizer, steps_per_epoch, epochs)
  fresh_stage = (start_epoch, start_batch) == (0, 0)
  if cursor.state is None:
    cursor.state = state_lib.create_state(params, optimizer, cursor.step)
  elif fresh_stage and restarts_optimizer(run.optimizer.restart, run.stages, stage_index):
    cursor.state = state_lib.create_state(cursor.state.params, optimizer, cursor.step)

  guided = stage != "pretrain"
  guidance = schedules.stage_guidance(run.schedule, stage, epochs)
  needs_maps = guided and any(g.w_eu != 0 or g.au_exclusion for g in guidance)
  if not needs_maps:
    cursor.maps = None
  train_step = step_lib.make_train_step(
      ctx.model, optimizer, step_lib.cohort_settings(run.step, guided, slices.train_roi),
      run.parallel, ctx.devices)
  generator = (maps_lib.MapGenerator(ctx.model, ctx.config, run.parallel, ctx.devices)
               if needs_maps else None)
  cursor.state = train_step.replicate(cursor.state)
  # The stage's slices live on the devices; each step gathers (and augments) its rows there,
  # so the host only sends slice indices (`step.examples`).
  cohort = step_lib.device_cohort(train_step, slices.images, slices.train_roi)
  log.begin_stage(stage, epochs, steps_per_epoch, start_epoch * steps_per_epoch + start_batch,
                  run.log_every_steps)
  if fresh_stage:
    log.event({"event": "stage_start", "stage": stage, "step": cursor.step, "epochs": epochs,
               "steps_per_epoch": steps_per_epoch, "slices": len(slices)})
  log.message(f"{len(slices)} slices, {steps_per_epoch} steps/epoch x {epochs} epochs, "
              f"{len(ctx.devices)} device(s), {run.parallel}"
              + (", resumed" if not fresh_stage else ""))
  stage_start_time = time.monotonic()

  for epoch in range(start_epoch, epochs):
    g = guidance[epoch]
    guidance_in = step_lib.guidance_arrays(g.w_eu, g.tau, g.au_exclusion)
    refresh = run.refresh_epochs
    # Maps are missing only when resuming a checkpoint saved without them (the guidance
    # settings changed): rebuild them with the key of their refresh epoch.
    if needs_maps and (cursor.maps is None or (start_batch == 0 and epoch % refresh == 0)):
      _refresh_maps(ctx, generator, cursor, stage, epoch, epoch - epoch % refresh, slices)
    for batch_index, batch in enumerate(iterator.epoch(epoch)):
      if batch_index < start_batch:
        continue  # done before the checkpoint this run resumed from
      feed = maps_lib.step_feed(batch, cursor.maps, guided, ctx.model.num_patches)
      step_cohort = cohort
      if faults.hit("step", cursor.step + 1) == "nan":  # this step's images are all NaN
        step_cohort = step_lib.device_cohort(
            train_step, np.full_like(slices.images, np.nan), slices.train_roi)
      cursor.state, metrics = train_step(cursor.state, feed, ctx.train_key, guidance_in,
                                         step_cohort)
      cursor.step += 1
      log.add({"step": cursor.step, "stage": stage, "epoch": epoch, "w_eu": g.w_eu,
               "tau": g.tau, "au_exclusion": g.au_exclusion}, metrics, cursor.last_saved,
              ctx.ckpts.directory)
      next_position = ((epoch + 1, 0) if batch_index + 1 == steps_per_epoch
                       else (epoch, batch_index + 1))
      if ctx.validator is not None and cursor.step % run.validation.every_steps == 0:
        validate(ctx, stage, cursor)  # before a save at this step: a resume never repeats it
      every = run.checkpoint.every_steps
      if every > 0 and cursor.step % every == 0:
        save(ctx, stage, cursor, *next_position)
      if 0 < run.debug_stop_after_steps <= cursor.step:
        log.flush(cursor.last_saved, ctx.ckpts.directory)
        raise Stop()
      if ctx.stop_requested():
        log.flush(cursor.last_saved, ctx.ckpts.directory)
        raise KeyboardInterrupt
    start_batch = 0
  log.flush(cursor.last_saved, ctx.ckpts.directory)
  if ctx.validator is not None and cursor.last_validated != cursor.step:
    validate(ctx, stage, cursor)
  panel(ctx, cursor)
  if cursor.last_saved != cursor.step:
    save(ctx, stage, cursor, epochs, 0)
  try:
    ctx.ckpts.wait()
  except OSError as e:
    raise errors.CheckpointWriteError(ctx.ckpts.failure_message(e)) from e
  log.end_stage(cursor.step, time.monotonic() - stage_start_time)


def _refresh_maps(ctx: RunContext, generator: maps_lib.MapGenerator, cursor: Cursor, stage: str,
                  epoch: int, key_epoch: int, slices: sliceset.SliceSet) -> None:
  """New maps from the current parameters, keyed by their refresh epoch `key_epoch`."""
  t0 = time.monotonic()
  cursor.maps = generator(cursor.state.params, maps_key(ctx.root_key, stage, key_epoch), slices)
  seconds = time.monotonic() - t0
  ctx.log.message(f"maps refreshed at epoch {epoch + 1} in {seconds:.1f} s "
                  f"({int(cursor.maps['exclude'].sum())} candidate patches)")
  ctx.log.event({"event": "maps", "stage": stage, "epoch": epoch, "step": cursor.step,
                 "seconds": seconds, "mean_patch_eu": float(cursor.maps["patch_eu"].mean()),
                 "candidate_patches": int(cursor.maps["exclude"].sum())})
  panel(ctx, cursor)


def panel(ctx: RunContext, cursor: Cursor) -> None:
  """The TensorBoard panel of the validation slices with the current parameters
  (`validation.Validator.panel`), once per step: a stage's end and the next stage's first map
  refresh share their parameters. Collective (every process computes, process 0 writes); the
  decision depends on the config only, so every process takes it alike."""
  if (ctx.validator is None or not ctx.run.tensorboard or cursor.last_panel == cursor.step
      or not ctx.validator.panel_ids.size):
    return
  maps = ctx.validator.panel(cursor.state.params)
  ctx.log.panel(cursor.step, maps)
  cursor.last_panel = cursor.step


def validate(ctx: RunContext, stage: str, cursor: Cursor) -> None:
  """Scores the held-out normal slices with the current parameters and logs the record
  (`validation.Validator`), with the training time so far, validation excluded."""
  ctx.log.flush(cursor.last_saved, ctx.ckpts.directory)  # step records stay in order
  validator = ctx.validator
  metrics, means = validator(cursor.state.params)
  train_cpu = (validation_lib.process_cpu_seconds() - ctx.cpu_start
               - validator.validation_cpu_s)
  train_wall = time.monotonic() - ctx.wall_start - validator.validation_wall_s
  ctx.log.event({"event": "validation", "stage": stage, "step": cursor.step, **metrics,
                 "train_cpu_s": train_cpu, "train_wall_s": train_wall})
  ctx.log.message(f"validation at step {cursor.step}: loss {metrics['val_loss']:.4g}, normal "
                  f"cord SSIM {metrics['val_ssim']:.3f}, PSNR {metrics['val_psnr']:.1f} dB, "
                  f"corr {metrics['val_corr']:.3f} ({metrics['seconds']:.1f} s)")
  if ctx.run.validation.figures and ctx.log.chief and not workdir_lib.is_uri(ctx.log.workdir):
    folder = workdir_lib.join(ctx.log.workdir, VALIDATION_DIR)
    os.makedirs(folder, exist_ok=True)
    validation_lib.write_figure(
        os.path.join(folder, f"step_{cursor.step:07d}.png"), validator.slices.images, means,
        validator.slices.score_roi,
        f"step {cursor.step} ({stage}): normal-cord SSIM {metrics['val_ssim']:.3f}, "
        f"corr {metrics['val_corr']:.3f}")
  cursor.last_validated = cursor.step


def save(ctx: RunContext, stage: str, cursor: Cursor, epoch: int, batch: int) -> None:
  """Checkpoints the state with the position of the next batch (`epoch`, `batch` of `stage`)
  and the maps in use, once the last step's loss is checked."""
  ctx.log.flush(cursor.last_saved, ctx.ckpts.directory)  # never save an unchecked state
  maps = cursor.maps
  meta = {"stage": stage, "stage_index": STAGES.index(stage), "epoch": epoch,
          "batch": batch, "step": cursor.step, "fingerprint": ctx.run.fingerprint,
          "maps_slices": 0 if maps is None else int(maps["patch_eu"].shape[0]),
          "maps_patches": ctx.model.num_patches}
  try:
    ctx.ckpts.save(cursor.step, parallel.to_host(cursor.state), meta, maps)
  except OSError as e:  # a full disk, a lost mount: stop cleanly, keep what is complete
    raise errors.CheckpointWriteError(ctx.ckpts.failure_message(e)) from e
  cursor.last_saved = cursor.step

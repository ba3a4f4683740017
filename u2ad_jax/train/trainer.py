"""The training driver: the configured stages in order, with checkpoints, maps and metrics.

Stages (method.md section 7; `config.stages` picks a subset, in this order):
  pretrain      `config.data.public_dir`, random ROI masking;
  adapt_eu      `config.data.clinical_dir`, EU-guided masking;
  adapt_eu_au   `config.data.clinical_dir`, EU guidance + AU-candidate exclusion.
Which guidance is actually on, and how strong, comes from the schedule
(`schedules.get_schedule(config.guidance.schedule, ...)`) evaluated once per epoch at
`progress = epoch / max(1, epochs - 1)` (0 at the first epoch, 1 at the last), so the ablations
are configs. During adaptation the maps are regenerated from the current parameters at epoch 0
and every `config.uncertainty.refresh_epochs` epochs (maps.MapGenerator), only when some epoch of
the stage uses them.

Optimizer: Adam with step decay every `decay_every_epochs` epochs of the stage's data. A new
optimizer state (moments and schedule counter, so the learning rate restarts at `lr`) is created
at the start of every stage (`config.optim.restart='stage'`, default) or only when entering
adaptation from pretraining (`'adaptation'`: adapt_eu_au then continues adapt_eu's schedule).
The global step keeps counting across stages.

Resume order (big_vision): the workdir's own newest complete checkpoint (a damaged newer one is
skipped with a warning and moved to `checkpoints_damaged/`), then `init_from` (another run's
parameters only, e.g. a pretraining run for an adaptation-only run), then fresh parameters. All
of it, and every cohort the remaining stages train on, is checked before the workdir is created
or written, so a bad input costs seconds and leaves nothing behind. A
checkpoint stores the position `(stage, epoch, batch)` of the next batch; the data of epoch e is a
pure function of (seed, stage, e), the masks of step s of (seed, s), and the maps in use are saved
with the checkpoint, so a resumed run continues EXACTLY as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from u2ad_jax import anomaly
from u2ad_jax import candidates
from u2ad_jax import errors
from u2ad_jax import schedules
from u2ad_jax.data import pipeline
from u2ad_jax.data import preprocess
from u2ad_jax.data import sliceset
from u2ad_jax.evaluation import postprocess as postprocess_lib
from u2ad_jax.train import checkpoint
from u2ad_jax.train import faults
from u2ad_jax.train import maps as maps_lib
from u2ad_jax.train import metrics_log
from u2ad_jax.train import parallel
from u2ad_jax.train import progress as progress_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib
from u2ad_jax.train import workdir as workdir_lib

STAGES = schedules.STAGES
# Which cohort each stage trains on: the key of config.data holding its directory.
STAGE_DATA = {"pretrain": "public_dir", "adapt_eu": "clinical_dir", "adapt_eu_au": "clinical_dir"}
# Where checkpoints that fail to restore are moved (inside the workdir, never deleted).
DAMAGED_DIR = "checkpoints_damaged"
# fold_in tags of the run's root key.
_INIT_TAG, _TRAIN_TAG, _MAPS_TAG = 0, 1, 2


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final TrainState as numpy arrays (host copy).
    step: global steps done.
    stopped: True when `debug_stop_after_steps` ended the run early (no final save).
    workdir: the run directory.
  """
  state: state_lib.TrainState
  step: int
  stopped: bool
  workdir: str


class _Stop(Exception):
  """debug_stop_after_steps reached: leave like a killed process (no further saves)."""


@dataclasses.dataclass
class _Position:
  """Next batch to run: batch `batch` of epoch `epoch` of stage `config.stages[stage_index]`."""
  stage_index: int
  epoch: int
  batch: int


def validate_config(config: Any) -> None:
  """Raises ValueError for settings the trainer cannot run (message names the field).

  Everything that would otherwise fail (or silently misbehave) mid-run is checked here, before
  any data is read: stages, epochs, the guidance weights / temperatures of the schedule (finite;
  weights >= 0, temperatures > 0), the AU-candidate and postprocessing parameters.
  """
  stages = tuple(config.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ValueError(f"config.stages must be a non-empty subset of {STAGES}, got {stages}")
  if list(stages) != sorted(stages, key=STAGES.index) or len(set(stages)) != len(stages):
    raise ValueError(f"config.stages must follow the order {STAGES} without repeats: {stages}")
  for s in stages:
    if int(config.stage_epochs[s]) < 0:
      raise ValueError(f"config.stage_epochs.{s} must be >= 0")
  if config.parallel not in parallel.MODES:
    raise ValueError(f"config.parallel must be one of {parallel.MODES}, got {config.parallel!r}")
  if config.optim.restart not in ("stage", "adaptation"):
    raise ValueError(f"config.optim.restart must be 'stage' or 'adaptation', "
                     f"got {config.optim.restart!r}")
  if int(config.uncertainty.refresh_epochs) < 1:
    raise ValueError("config.uncertainty.refresh_epochs must be >= 1")
  if int(config.batch_size) < 1:
    raise ValueError("config.batch_size must be >= 1")
  _validate_guidance(config)
  _validate_candidates(config)
  postprocess_lib.PostprocessParams.from_config(config.get("postprocess"))
  try:
    schedule = make_schedule(config)
  except ValueError as e:
    raise errors.ConfigValueError(f"config.guidance ({config.guidance.schedule}): {e}") from e
  pretrain_epochs = max(1, int(config.stage_epochs.pretrain))
  if any(g.w_eu != 0 or g.au_exclusion
         for g in stage_guidance(schedule, "pretrain", pretrain_epochs)):
    raise ValueError("config.guidance puts EU / AU guidance in 'pretrain', which has no "
                     "uncertainty maps (pretraining uses random masking); use eu_stages / "
                     "au_stages within the adaptation stages")


# Guidance settings and what they must be: weights finite and >= 0 (a negative w_eu inverts EU
# guidance), temperatures finite and > 0 (they divide the logits). None = the schedule default.
_WEIGHTS = ("params.w_eu", "ramp.w_eu_start")
_TEMPERATURES = ("params.tau", "ramp.tau_start")


def _validate_guidance(config: Any) -> None:
  for dotted in _WEIGHTS + _TEMPERATURES:
    section, key = dotted.split(".")
    block = config.guidance.get(section)
    value = None if block is None else block.get(key)
    if value is None:
      continue
    name = f"config.guidance.{dotted}"
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise errors.ConfigValueError(f"{name} must be a number, got {value!r}") from None
    if dotted in _WEIGHTS and not (math.isfinite(number) and number >= 0):
      raise errors.ConfigValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if dotted in _TEMPERATURES and not (math.isfinite(number) and number > 0):
      raise errors.ConfigValueError(f"{name} must be a finite number > 0, got {value!r}")


def _validate_candidates(config: Any) -> None:
  c = config.candidates
  residual = c.get("residual")
  if residual not in anomaly.RESIDUALS:
    # No silent default: a config without the key would otherwise train on another map.
    raise errors.ConfigValueError(f"config.candidates.residual must be one of "
                                  f"{anomaly.RESIDUALS}, got {residual!r}")
  try:
    candidates.check_params(c.percentile, c.min_size, c.top_k)
  except (TypeError, ValueError) as e:
    raise errors.ConfigValueError(f"config.candidates: {e}") from e


def make_schedule(config: Any) -> schedules.ScheduleFn:
  """The guidance schedule of `config.guidance` (ramp fields only for ramp schedules)."""
  g = config.guidance
  params = dict(g.params.to_dict())
  if g.schedule != "piecewise":
    ramp = {k: v for k, v in g.ramp.to_dict().items() if v is not None}
    if "ramp_lengths" not in ramp:
      # Default: each ramp stage takes a share of the ramp proportional to its epochs.
      ramp_stages = ramp.get("ramp_stages", params.get("eu_stages", ()))
      ramp_stages = schedules.stage_tuple(ramp_stages, "ramp_stages")
      ordered = [s for s in STAGES if s in ramp_stages]
      lengths = [max(1, int(config.stage_epochs[s])) for s in ordered]
      if lengths:
        ramp["ramp_lengths"] = tuple(lengths)
    params.update(ramp)
  return schedules.get_schedule(g.schedule, **params)


def stage_guidance(schedule: schedules.ScheduleFn, stage: str,
                   epochs: int) -> list[schedules.Guidance]:
  """Guidance of every epoch of a stage (progress 0 at the first epoch, 1 at the last)."""
  return [schedule(stage, e / max(1, epochs - 1)) for e in range(epochs)]


def data_seed(seed: int, stage: str) -> int:
  """Shuffling / augmentation seed of a stage (stages on the same cohort see different orders)."""
  return int(np.random.SeedSequence([int(seed), STAGES.index(stage)]).generate_state(1)[0])


def maps_key(root: jax.Array, stage: str, epoch: int) -> jax.Array:
  """Key of the map refresh at `epoch` of `stage`: a function of (seed, stage, epoch) only."""
  key = jax.random.fold_in(jax.random.fold_in(root, _MAPS_TAG), STAGES.index(stage))
  return jax.random.fold_in(key, int(epoch))


def _load_slices(config: Any, field: str, verbose: bool) -> sliceset.SliceSet:
  """Loads and validates the cohort of `config.data.<field>` (InputError naming the file)."""
  root = str(config.data[field])
  stage = [s for s in config.stages if STAGE_DATA[s] == field][0]
  if not root:
    raise errors.InputError(None, f"config.data.{field} is not set; stage {stage!r} trains on "
                                  f"it (pass --config.data.{field}=DIR)")
  if not os.path.isdir(root):
    raise errors.InputError(root, f"config.data.{field}: no such directory")
  return preprocess.load_cohort(root, config.data, progress=verbose)


@dataclasses.dataclass
class _Start:
  """Where a run starts, found before anything is written.

  Attributes:
    position: the next batch to run.
    host_state: the restored TrainState (numpy), or None when starting from `params`.
    params: initial parameters (init_from or fresh) when `host_state` is None.
    maps: the restored guidance maps, or None.
    step: the checkpoint step restored, or None.
    damaged: newer checkpoint steps that could not be restored (set aside before training).
    message: what to tell the user.
  """
  position: _Position
  host_state: state_lib.TrainState | None = None
  params: Any = None
  maps: dict[str, np.ndarray] | None = None
  step: int | None = None
  damaged: tuple[int, ...] = ()
  message: str = ""


def _short(text: str, limit: int = 200) -> str:
  """First line of an error, cut to `limit` characters (TensorStore appends its whole spec)."""
  line = str(text).splitlines()[0] if str(text) else ""
  return line if len(line) <= limit else line[:limit] + " ..."


def _warn(text: str) -> None:
  print(f"[train] WARNING: {text}", file=sys.stderr, flush=True)


def _find_start(config: Any, workdir: str, model: Any,
                init_from: str | os.PathLike | None) -> _Start:
  """The newest complete checkpoint of `workdir`, else `init_from`, else fresh parameters
  (`params` None: drawn by the caller once the data is checked).

  Read-only. A checkpoint that cannot be restored (truncated, corrupted, half-deleted) is skipped
  with a warning in favour of the previous one; a checkpoint of another model or of stages this
  config does not run is an error (it is intact: falling back past it would silently drop work).

  Raises:
    CheckpointError: checkpoints exist and none of them can be restored (names the newest), or
      `init_from` is not a usable run.
    ConfigMismatchError: see above.
  """
  directory = workdir_lib.join(workdir, checkpoint.CHECKPOINT_DIR)
  steps = []
  if workdir_lib.path(directory).is_dir():
    with checkpoint.Checkpoints(workdir, read_only=True) as ckpts:
      steps = sorted(ckpts.all_steps(), reverse=True)
      template = checkpoint.abstract_train_state(model, config)
      failures: list[errors.CheckpointError] = []
      for step in steps:
        try:
          start = _restore_start(config, workdir, ckpts, step, template)
        except errors.CheckpointError as e:
          failures.append(e)
          _warn(f"checkpoint step {step} cannot be restored ({_short(e.problem)}); "
                + ("trying the previous one" if step != steps[-1] else "it was the last one"))
          continue
        start.damaged = tuple(steps[:len(failures)])
        if failures:
          _warn(f"resuming from step {step}, the newest complete checkpoint; the damaged "
                f"step(s) {list(start.damaged)} are moved to "
                f"{workdir_lib.join(workdir, DAMAGED_DIR)}")
        if init_from:
          start.message += f"; --init_from {init_from} ignored"
        return start
      if failures:
        raise errors.CheckpointError(
            ckpts.step_dir(steps[0]),
            f"no complete checkpoint to resume from: step(s) {steps} all fail to restore (newest: "
            f"{_short(failures[0].problem)}); move {directory} away to start afresh, or use a new "
            "--workdir")
  position = _Position(0, 0, 0)
  if init_from:
    _, params, other_config, other_step = checkpoint.restore_for_eval(init_from)
    checkpoint.check_compatible(other_config, config, os.fspath(init_from))
    return _Start(position, params=params,
                  message=f"initialising from {init_from} (step {other_step}, parameters only)")
  return _Start(position)  # fresh parameters, drawn once every input has been checked


def _restore_start(config: Any, workdir: str, ckpts: checkpoint.Checkpoints, step: int,
                   template: Any) -> _Start:
  """Restores checkpoint `step` (CheckpointError when it is damaged)."""
  stages = tuple(config.stages)
  meta = ckpts.restore_meta(step)
  if meta.get("fingerprint") != checkpoint.fingerprint(config):
    raise errors.ConfigMismatchError(
        f"{workdir}: checkpoint {step} was saved with model/input fingerprint "
        f"{meta.get('fingerprint')}, this config has {checkpoint.fingerprint(config)}; "
        "use a new --workdir")
  try:
    stage, epoch, batch = str(meta["stage"]), int(meta["epoch"]), int(meta["batch"])
    maps_slices, maps_patches = int(meta.get("maps_slices", 0)), int(meta.get("maps_patches", 0))
  except (KeyError, TypeError, ValueError) as e:
    raise errors.CheckpointError(ckpts.step_dir(step), f"incomplete meta record ({e!r})") from e
  if stage not in stages:
    raise errors.ConfigMismatchError(
        f"{workdir}: its checkpoint is in stage {stage!r}, which config.stages "
        f"{stages} does not run; include it or use a new --workdir")
  maps_template = None
  if maps_slices:
    shape = (maps_slices, maps_patches)
    maps_template = {"patch_eu": jax.ShapeDtypeStruct(shape, np.float32),
                     "exclude": jax.ShapeDtypeStruct(shape, np.bool_)}
  host_state, maps, _ = ckpts.restore(step, template, maps_template)
  if int(host_state.step) != int(step):
    raise errors.CheckpointError(ckpts.step_dir(step), f"holds the state of step "
                                 f"{int(host_state.step)}, not {step}")
  position = _Position(stages.index(stage), epoch, batch)
  return _Start(position, host_state=host_state, maps=maps, step=int(step),
                message=f"resuming {workdir} from checkpoint step {step} ({stage}, epoch "
                        f"{epoch}, batch {batch})")


def _start_record(start: _Start) -> np.ndarray:
  """`[5]` int32: what must be equal in every process, (step or -1, stage, epoch, batch, from
  init_from or fresh: 0 / 1)."""
  step = -1 if start.step is None else int(start.step)
  return np.array([step, start.position.stage_index, start.position.epoch, start.position.batch,
                   int(start.params is not None)], np.int32)


def check_same_start(workdir: str, records: np.ndarray) -> None:
  """Raises WorkdirError unless every process found the same start (`records [P, 5]`).

  Processes that see different checkpoints (a local --workdir on each host instead of shared
  storage, a host with a stale mount) would otherwise train from different states and mix
  their checkpoints.
  """
  records = np.asarray(records).reshape(-1, 5)
  if (records == records[0]).all():
    return
  seen = "; ".join(
      f"process {p}: " + ("no checkpoint" if r[0] < 0 else f"checkpoint step {r[0]}")
      + f" (stage {r[1]}, epoch {r[2]}, batch {r[3]})" for p, r in enumerate(records))
  raise errors.WorkdirError(
      workdir, f"the processes disagree on where to resume ({seen}); every process must see the "
      "same workdir (shared storage or a URI such as gs://bucket/run); nothing was written")


def _check_same_start(workdir: str, start: _Start) -> None:
  """Gathers every process's start (a collective: all processes call it) and checks them."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  records = multihost_utils.process_allgather(_start_record(start))
  check_same_start(workdir, np.asarray(records))


def _stages_to_run(config: Any, start: _Start) -> list[str]:
  """The stages that still have batches to run from `start`."""
  stages = tuple(config.stages)
  todo = []
  for index in range(start.position.stage_index, len(stages)):
    resume_here = start.host_state is not None and index == start.position.stage_index
    first_epoch = start.position.epoch if resume_here else 0
    if first_epoch < int(config.stage_epochs[stages[index]]):
      todo.append(stages[index])
  return todo


def _load_inputs(config: Any, workdir: str, start: _Start, slice_sets: dict | None,
                 verbose: bool) -> dict[str, sliceset.SliceSet]:
  """Loads and validates every cohort the remaining stages train on, before any compute.

  A bad cohort (labels, shapes, NaN, empty ROI, ...) therefore stops the run here, not after
  hours of pretraining; and the maps restored with a checkpoint must still fit their cohort.
  """
  cohorts: dict[str, sliceset.SliceSet] = {}
  todo = _stages_to_run(config, start)
  for stage in todo:
    field = STAGE_DATA[stage]
    if field in cohorts:
      continue
    if slice_sets is not None and field in slice_sets:
      cohorts[field] = slice_sets[field]
    else:
      cohorts[field] = _load_slices(config, field, verbose)
  if start.maps is not None and todo and todo[0] == config.stages[start.position.stage_index]:
    slices = cohorts[STAGE_DATA[todo[0]]]
    if start.maps["patch_eu"].shape[0] != len(slices):
      raise errors.CheckpointError(
          workdir_lib.join(workdir, checkpoint.CHECKPOINT_DIR, str(start.step)),
          f"its maps cover {start.maps['patch_eu'].shape[0]} slices but the "
          f"{STAGE_DATA[todo[0]]} cohort now has {len(slices)}: the data changed; use a new "
          "--workdir")
  return cohorts


def _set_aside(workdir: str, steps: tuple[int, ...]) -> None:
  """Moves damaged checkpoint steps out of checkpoints/ (kept for inspection, never deleted);
  the resumed run will write those steps again."""
  target_root = workdir_lib.path(workdir, DAMAGED_DIR)
  target_root.mkdir(parents=True, exist_ok=True)
  for step in steps:
    source = workdir_lib.path(workdir, checkpoint.CHECKPOINT_DIR, str(int(step)))
    target = target_root / str(int(step))
    suffix = 1
    while target.exists():
      target = target_root / f"{int(step)}.{suffix}"
      suffix += 1
    source.rename(target)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          init_from: str | os.PathLike | None = None,
          slice_sets: dict[str, sliceset.SliceSet] | None = None,
          verbose: bool = True, devices: list | None = None) -> TrainResult:
  """Runs (or resumes) the configured stages in `workdir`.

  Every input is checked before anything is written or computed: the config, the workdir (a
  non-empty directory that is not a u2ad run is refused), its checkpoint (or `init_from`) and
  every cohort the remaining stages train on. Any failure there leaves the file system as it was.

  Args:
    config: the run config (configs/*.py).
    workdir: run directory (created); holds config.json, checkpoints/, metrics.jsonl, curves.
    init_from: another workdir whose latest parameters start this run when `workdir` has no
      checkpoint (parameters only: the optimizer and step start fresh).
    slice_sets: optional preloaded data keyed 'public_dir' / 'clinical_dir' (notebooks, tests);
      otherwise the cohorts of `config.data` are loaded.
    verbose: print progress (process 0 only).
    devices: devices to train on (default: all devices of all processes).

  Returns:
    TrainResult.

  Raises:
    ConfigMismatchError: the workdir (or init_from) was trained with another model / input shape.
    NonFiniteLossError: a step produced a non-finite loss; the last good checkpoint is kept.
    CheckpointWriteError: a checkpoint could not be written (e.g. disk full); the last complete
      one is kept and the same command resumes from it.
    WorkdirError, CheckpointError, InputError: bad workdir, checkpoint or data.
  """
  validate_config(config)
  # A URI (gs://bucket/run) is used as given, a local path made absolute (workdir_lib.resolve).
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_train_workdir(workdir)
  verbose = verbose and jax.process_index() == 0
  devices = list(jax.devices() if devices is None else devices)
  try:  # a device layout the parallel mode cannot run: refused before anything is written
    parallel.check_layout(config.parallel, devices)
    parallel.mesh_positions(devices)
  except ValueError as e:
    raise errors.ConfigValueError(str(e)) from e
  if workdir_lib.path(workdir, checkpoint.CONFIG_FILE).exists():
    checkpoint.check_compatible(checkpoint.read_config(workdir), config, workdir)
  model = state_lib.build_model(config)
  start = _find_start(config, workdir, model, init_from)
  _check_same_start(workdir, start)
  cohorts = _load_inputs(config, workdir, start, slice_sets, verbose)
  if start.host_state is None and start.params is None:
    start.params = state_lib.init_params(
        model, jax.random.fold_in(jax.random.key(int(config.seed)), _INIT_TAG))
  # ---- every input is checked; from here on the workdir is written.
  workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    workdir_lib.mark(workdir)
    if start.damaged:
      _set_aside(workdir, start.damaged)
  with checkpoint.Checkpoints(workdir, max_to_keep=config.checkpoint.max_to_keep) as ckpts:
    try:
      return _run(config, workdir, model, ckpts, start, cohorts, verbose, devices)
    finally:
      try:
        ckpts.wait()  # a pending asynchronous save completes even when training failed
      except OSError as e:
        raise errors.CheckpointWriteError(_write_failure(ckpts, e)) from e


def _write_failure(ckpts: checkpoint.Checkpoints, error: OSError) -> str:
  """One line for a failed checkpoint write, naming the newest checkpoint that is complete."""
  try:
    ckpts.wait()  # an earlier asynchronous save may still be committing
  except OSError:
    pass  # the failure being reported
  ckpts.manager.reload()
  latest = ckpts.latest_step()
  kept = (f"the last complete checkpoint is step {latest}; free space and run the same command "
          "to resume from it" if latest is not None else "no checkpoint was completed")
  return f"{ckpts.directory}: writing a checkpoint failed ({error}); training stopped and {kept}"


def _run(config: Any, workdir: str, model: Any, ckpts: checkpoint.Checkpoints, start: _Start,
         cohorts: dict[str, sliceset.SliceSet], verbose: bool, devices: list) -> TrainResult:
  """The body of `train` (the checkpoint manager is opened and closed by the caller)."""
  chief = jax.process_index() == 0
  stages = tuple(config.stages)
  log = metrics_log.MetricsLog(workdir) if chief else None
  root = jax.random.key(int(config.seed))
  train_key = jax.random.fold_in(root, _TRAIN_TAG)

  def say(text: str) -> None:
    if verbose:
      print(f"[train] {text}", file=sys.stderr, flush=True)  # a log, not a result

  host_state, params, maps = start.host_state, start.params, start.maps
  position, latest = start.position, start.step
  if start.message:
    say(start.message)
  if chief:
    # Drops the records an interrupted attempt logged after its checkpoint (all of them when
    # it saved nothing).
    log.truncate_for_resume(0 if latest is None else latest)
    checkpoint.write_config(workdir, config)

  schedule = make_schedule(config)
  step = int(host_state.step) if host_state is not None else 0
  last_saved = latest
  stopped = False
  device_state = None
  run_state = host_state

  try:
    for stage_index in range(position.stage_index, len(stages)):
      stage = stages[stage_index]
      epochs = int(config.stage_epochs[stage])
      resume_here = host_state is not None and stage_index == position.stage_index
      start_epoch = position.epoch if resume_here else 0
      start_batch = position.batch if resume_here else 0
      if start_epoch >= epochs:
        continue  # this stage was finished when the checkpoint was taken
      slices = cohorts[STAGE_DATA[stage]]
      iterator = pipeline.BatchIterator(
          slices, global_batch=int(config.batch_size),
          num_devices=len(parallel.local_devices_of(devices)),
          seed=data_seed(config.seed, stage), augment=bool(config.data.augment),
          drop_remainder=False, process_index=jax.process_index(),
          process_count=jax.process_count(), prefetch=int(config.data.prefetch),
          device_positions=parallel.mesh_positions(devices), total_devices=len(devices))
      steps_per_epoch = iterator.steps_per_epoch
      optimizer = state_lib.make_optimizer(config.optim, steps_per_epoch)
      fresh_stage = (start_epoch, start_batch) == (0, 0)
      if run_state is None:
        run_state = state_lib.create_state(params, optimizer, step)
      elif fresh_stage and _restart_optimizer(config, stages, stage_index):
        run_state = state_lib.create_state(run_state.params, optimizer, step)

      guided = stage != "pretrain"
      guidance = stage_guidance(schedule, stage, epochs)
      needs_maps = guided and any(g.w_eu != 0 or g.au_exclusion for g in guidance)
      if not needs_maps:
        maps = None
      train_step = step_lib.make_train_step(
          model, config.optim, steps_per_epoch,
          step_lib.StepSettings.from_config(config, guided), config.parallel, devices)
      generator = (maps_lib.MapGenerator(model, config, config.parallel, devices)
                   if needs_maps else None)
      device_state = train_step.replicate(run_state)
      run_state = None
      num_patches = model.num_patches
      progress = progress_lib.Progress(stage, epochs * steps_per_epoch,
                                       start_epoch * steps_per_epoch + start_batch,
                                       every=int(config.log_every_steps), enabled=verbose)
      if fresh_stage and chief:
        log.write({"event": "stage_start", "stage": stage, "step": step, "epochs": epochs,
                   "steps_per_epoch": steps_per_epoch, "slices": len(slices)})
      progress.message(f"{len(slices)} slices, {steps_per_epoch} steps/epoch x {epochs} epochs, "
                       f"{len(devices)} device(s), {config.parallel}"
                       + (", resumed" if not fresh_stage else ""))
      stage_start_time = time.monotonic()
      pending: dict[str, Any] | None = None

      def flush():
        """Fetches the last step's metrics (one step late, so the host never waits on the
        device in between), checks them and logs them."""
        nonlocal pending
        if pending is None:
          return
        record, metrics = pending
        pending = None
        values = {k: float(v) for k, v in parallel.to_host(metrics).items()}
        record.update(values)
        if not np.isfinite(values["loss"]):
          kept = (f"the last good checkpoint is step {last_saved} in {ckpts.directory}"
                  if last_saved is not None else "no checkpoint had been saved")
          raise errors.NonFiniteLossError(
              f"non-finite loss ({values['loss']}) at step {record['step']} (stage {stage}, "
              f"epoch {record['epoch'] + 1}); training stopped and {kept}")
        record.update(progress.update(record["step"], record["epoch"], epochs, values))
        if chief:
          log.write(record)

      def save(epoch: int, batch: int):
        nonlocal last_saved
        flush()  # never save a state whose loss has not been checked
        meta = {"stage": stage, "stage_index": STAGES.index(stage), "epoch": epoch,
                "batch": batch, "step": step, "fingerprint": checkpoint.fingerprint(config),
                "maps_slices": 0 if maps is None else int(maps["patch_eu"].shape[0]),
                "maps_patches": num_patches}
        try:
          ckpts.save(step, parallel.to_host(device_state), meta, maps)
        except OSError as e:  # a full disk, a lost mount: stop cleanly, keep what is complete
          raise errors.CheckpointWriteError(_write_failure(ckpts, e)) from e
        last_saved = step

      for epoch in range(start_epoch, epochs):
        g = guidance[epoch]
        guidance_in = step_lib.guidance_arrays(g.w_eu, g.tau, g.au_exclusion)
        refresh = int(config.uncertainty.refresh_epochs)
        # Maps are missing only when resuming a checkpoint saved without them (the guidance
        # settings changed): rebuild them with the key of their refresh epoch.
        if needs_maps and (maps is None or (start_batch == 0 and epoch % refresh == 0)):
          t0 = time.monotonic()
          maps = generator(device_state.params, maps_key(root, stage, epoch - epoch % refresh),
                           slices)
          seconds = time.monotonic() - t0
          progress.message(f"maps refreshed at epoch {epoch + 1} in {seconds:.1f} s "
                           f"({int(maps['exclude'].sum())} candidate patches)")
          if chief:
            log.write({"event": "maps", "stage": stage, "epoch": epoch, "step": step,
                       "seconds": seconds, "mean_patch_eu": float(maps["patch_eu"].mean()),
                       "candidate_patches": int(maps["exclude"].sum())})
        for batch_index, batch in enumerate(iterator.epoch(epoch)):
          if batch_index < start_batch:
            continue  # done before the checkpoint this run resumed from
          feed = {"image": batch["image"], "train_roi": batch["train_roi"],
                  "valid": batch["valid"]}
          if guided:
            if maps is not None:
              feed.update(maps_lib.gather_guidance(maps, batch["index"]))
            else:
              feed["patch_eu"] = np.zeros(batch["index"].shape + (num_patches,), np.float32)
              feed["exclude"] = np.zeros(batch["index"].shape + (num_patches,), bool)
          if faults.hit("step", step + 1) == "nan":
            feed["image"] = np.full_like(feed["image"], np.nan)
          device_state, metrics = train_step(device_state, feed, train_key, guidance_in)
          step += 1
          flush()
          pending = ({"step": step, "stage": stage, "epoch": epoch, "w_eu": g.w_eu,
                      "tau": g.tau, "au_exclusion": g.au_exclusion}, metrics)
          next_epoch, next_batch = ((epoch + 1, 0) if batch_index + 1 == steps_per_epoch
                                    else (epoch, batch_index + 1))
          every = int(config.checkpoint.every_steps)
          if every > 0 and step % every == 0:
            save(next_epoch, next_batch)
          if 0 < int(config.debug_stop_after_steps) <= step:
            flush()
            raise _Stop()
        start_batch = 0
      flush()
      if last_saved != step:
        save(epochs, 0)
      try:
        ckpts.wait()
      except OSError as e:
        raise errors.CheckpointWriteError(_write_failure(ckpts, e)) from e
      seconds = time.monotonic() - stage_start_time
      progress.message(f"done in {progress_lib.format_duration(seconds)} (step {step})")
      if chief:
        log.write({"event": "stage_end", "stage": stage, "step": step, "seconds": seconds})
        metrics_log.plot_curves(log.read(), workdir_lib.join(workdir, metrics_log.CURVES_FILE))
      run_state = device_state
  except _Stop:
    stopped = True
    say(f"stopped after step {step} (debug_stop_after_steps={config.debug_stop_after_steps})")

  final = device_state if device_state is not None else run_state
  if final is None:  # no stage had anything left to run: the start point is the result
    final = state_lib.create_state(params, state_lib.make_optimizer(config.optim, 1), step)
  return TrainResult(state=parallel.to_host(final), step=step, stopped=stopped, workdir=workdir)


def _restart_optimizer(config: Any, stages: tuple[str, ...], stage_index: int) -> bool:
  """Whether entering `stages[stage_index]` creates a new optimizer state."""
  if config.optim.restart == "stage" or stage_index == 0:
    return True
  # 'adaptation': restart only where pretraining hands over to adaptation.
  return stages[stage_index - 1] == "pretrain"

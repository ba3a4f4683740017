"""The training driver: the configured stages in order, with checkpoints, maps and metrics.

Stages (`stages.STAGES`; `config.stages` picks a subset, in this order):
  pretrain      `config.data.public_dir`, random ROI masking;
  adapt_eu      `config.data.clinical_dir`, EU-guided masking;
  adapt_eu_au   `config.data.clinical_dir`, EU guidance + AU-candidate exclusion.

`train` is the door: the ConfigDict is resolved there, once, into typed settings
(`settings.resolve`), and everything is checked before the workdir is created or written: the
config, the workdir, where the run starts (`resume.find_start`: its own newest complete
checkpoint, else `init_from`, else fresh parameters) and every cohort the remaining stages train
on, so a bad input costs seconds and leaves nothing behind. Then each stage runs
(`stage.run_stage`: optimizer restarts, guidance per epoch, map refreshes, checkpoints), logging
through `run_log.RunLog`. A resumed run continues EXACTLY as the uninterrupted run would have
(see `resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Callable, Iterator

import jax
import ml_collections

from u2ad_jax import errors
from u2ad_jax import parallel
from u2ad_jax.data import preprocess
from u2ad_jax.data import sliceset
from u2ad_jax.train import checkpoint
from u2ad_jax.train import distributed
from u2ad_jax.train import resume
from u2ad_jax.train import run_log
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import stage as stage_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import validation as validation_lib
from u2ad_jax.train import workdir as workdir_lib

# fold_in tags of the run's root key (the maps' tag is `stage.MAPS_TAG`).
_INIT_TAG, _TRAIN_TAG = 0, 1


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


def _load_slices(config: ml_collections.ConfigDict, field: str, stages: tuple[str, ...],
                 verbose: bool) -> sliceset.SliceSet:
  """Loads and validates the cohort of `config.data.<field>` (InputError naming the file)."""
  root = str(config.data[field])
  stage = [s for s in stages if settings_lib.STAGE_DATA[s] == field][0]
  if not root:
    raise errors.InputError(None, f"config.data.{field} is not set; stage {stage!r} trains on "
                                  f"it (pass --config.data.{field}=DIR)")
  if not os.path.isdir(root):
    raise errors.InputError(root, f"config.data.{field}: no such directory")
  return preprocess.load_cohort(root, config.data, progress=verbose)


def _load_inputs(config: ml_collections.ConfigDict, run: settings_lib.RunSettings, workdir: str,
                 start: resume.Start, slice_sets: dict | None,
                 verbose: bool) -> dict[str, sliceset.SliceSet]:
  """Loads and validates every cohort the remaining stages train on, before any compute.

  A bad cohort (labels, shapes, NaN, empty ROI, ...) therefore stops the run here, not after
  hours of pretraining; and the maps restored with a checkpoint must still fit their cohort.
  """
  cohorts: dict[str, sliceset.SliceSet] = {}
  todo = resume.stages_to_run(run.stages, run.stage_epochs, start)
  for stage in todo:
    field = settings_lib.STAGE_DATA[stage]
    if field in cohorts:
      continue
    if slice_sets is not None and field in slice_sets:
      cohorts[field] = slice_sets[field]
    else:
      cohorts[field] = _load_slices(config, field, run.stages, verbose)
  if start.maps is not None and todo and todo[0] == run.stages[start.position.stage_index]:
    field = settings_lib.STAGE_DATA[todo[0]]
    if start.maps["patch_eu"].shape[0] != len(cohorts[field]):
      raise errors.CheckpointError(
          workdir_lib.join(workdir, checkpoint.CHECKPOINT_DIR, str(start.step)),
          f"its maps cover {start.maps['patch_eu'].shape[0]} slices but the {field} cohort now "
          f"has {len(cohorts[field])}: the data changed; use a new --workdir")
  return cohorts


def _validation_inputs(config: ml_collections.ConfigDict, run: settings_lib.RunSettings,
                       cohorts: dict[str, sliceset.SliceSet], slice_sets: dict | None,
                       verbose: bool) -> tuple[sliceset.SliceSet | None, tuple[str, ...]]:
  """The validation slices, and the public subjects held out of pretraining for them.

  `cohorts['public_dir']` (when loaded) loses the held-out subjects. None when validation is
  off, or when there is neither `validation.data_dir` nor a public cohort to hold out from.
  """
  v = run.validation
  if not v.enabled:
    return None, ()
  if v.data_dir:
    if not os.path.isdir(v.data_dir):
      raise errors.InputError(v.data_dir, "config.validation.data_dir: no such directory")
    slices = preprocess.load_cohort(v.data_dir, config.data, progress=verbose)
    return validation_lib.choose_slices(slices, v.max_slices), ()
  public = cohorts.get("public_dir")
  if public is None and slice_sets is not None:
    public = slice_sets.get("public_dir")
  if public is None and config.data.public_dir:
    public = _load_slices(config, "public_dir", ("pretrain",), verbose)
  if public is None:
    return None, ()
  subjects = v.subjects or tuple(
      validation_lib.held_out_subjects(public.subjects, v.num_subjects, run.seed))
  unknown = sorted(set(subjects) - set(public.subjects))
  if unknown:
    raise errors.InputError(str(config.data.public_dir or None),
                            f"config.validation.subjects names {unknown}, not in the public "
                            f"cohort")
  if not subjects:
    return None, ()
  train_part, held = validation_lib.split_public(public, subjects)
  if "public_dir" in cohorts:
    cohorts["public_dir"] = train_part
  return validation_lib.choose_slices(held, v.max_slices), tuple(subjects)


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
    ConfigValueError: a setting the trainer cannot run (`settings.resolve`).
    ConfigMismatchError: the workdir (or init_from) was trained with another model / input shape.
    NonFiniteLossError: a step produced a non-finite loss; the last good checkpoint is kept.
    CheckpointWriteError: a checkpoint could not be written (e.g. disk full); the last complete
      one is kept and the same command resumes from it.
    TrainingInterrupted: Ctrl-C; the save in flight is completed, the message names the step
      reached and the last checkpoint (the same command resumes from it).
    WorkdirError, CheckpointError, InputError: bad workdir, checkpoint or data.
  """
  run = settings_lib.resolve(config)
  # A URI (gs://bucket/run) is used as given, a local path made absolute (workdir_lib.resolve).
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_train_workdir(workdir)
  verbose = verbose and jax.process_index() == 0
  devices = list(jax.devices() if devices is None else devices)
  try:  # a device layout the parallel mode cannot run: refused before anything is written
    parallel.check_layout(run.parallel, devices)
    parallel.mesh_positions(devices)
  except ValueError as e:
    raise errors.ConfigValueError(str(e)) from e
  shape = settings_lib.shape_fields(config)
  if workdir_lib.path(workdir, checkpoint.CONFIG_FILE).exists():
    checkpoint.check_compatible(checkpoint.read_config(workdir), shape, workdir)
  model = settings_lib.build_model(config)
  start = resume.find_start(workdir, run.stages, model, state_lib.make_optimizer(run.optimizer, 1),
                            shape, run.fingerprint, init_from)
  resume.check_same_start_everywhere(workdir, start)
  cohorts = _load_inputs(config, run, workdir, start, slice_sets, verbose)
  validation_slices, held_out = _validation_inputs(config, run, cohorts, slice_sets, verbose)
  if held_out:  # recorded in config.json: the subjects this run never trains on
    config = config.copy_and_resolve_references()
    config.validation.subjects = held_out
  if start.host_state is None and start.params is None:
    start.params = state_lib.init_params(
        model, jax.random.fold_in(jax.random.key(run.seed), _INIT_TAG))
  # ---- every input is checked; from here on the workdir is written.
  try:
    _prepare_workdir(workdir, start)
    chief = jax.process_index() == 0
    with checkpoint.Checkpoints(workdir, max_to_keep=run.checkpoint.max_to_keep,
                                keep_every_steps=run.checkpoint.keep_every_steps) as ckpts, \
        _deferred_interrupt(verbose) as stop_requested:
      log = run_log.RunLog(workdir, chief, verbose, tensorboard=run.tensorboard)
      try:
        root = jax.random.key(run.seed)
        validator = None
        if validation_slices is not None and len(validation_slices):
          validator = validation_lib.Validator(model, validation_slices, run.step,
                                               run.validation, root, run.parallel, devices)
          log.say(f"validation: {len(validation_slices)} normal slices "
                  + (f"of the held-out public subjects {', '.join(held_out)}" if held_out
                     else f"of {run.validation.data_dir}")
                  + f", every {run.validation.every_steps} steps")
        ctx = stage_lib.RunContext(run=run, config=config, model=model, cohorts=cohorts,
                                   ckpts=ckpts, log=log, devices=devices, root_key=root,
                                   train_key=jax.random.fold_in(root, _TRAIN_TAG),
                                   validator=validator, stop_requested=stop_requested)
        if start.message:
          log.say(start.message)
        log.resume_from(start.step)
        if chief:
          checkpoint.write_config(workdir, config)
        try:
          return _run(ctx, start, workdir)
        except _Interrupted as stop:
          ckpts.wait()  # the save in flight completes: it is the checkpoint to resume from
          ckpts.manager.reload()  # a wait cut short by a second Ctrl-C left its list stale
          raise errors.TrainingInterrupted(stop.step, ckpts.latest_step(),
                                           ckpts.directory) from None
      finally:
        try:
          ckpts.wait()  # a pending asynchronous save completes even when training failed
        except OSError as e:
          raise errors.CheckpointWriteError(ckpts.failure_message(e)) from e
        finally:
          log.close()  # the TensorBoard events logged so far reach the workdir, failed or not
  except OSError as e:
    # Writing metrics.jsonl, config.json, the curves or the marker failed (a full disk, a lost
    # mount; checkpoint writes are CheckpointWriteErrors already): one line, like those.
    raise errors.RunWriteError(checkpoint.write_failure_message(workdir, e)) from e


def _prepare_workdir(workdir: str, start: resume.Start) -> None:
  """Creates the workdir; process 0 marks it and sets the damaged checkpoints aside.

  On several processes the others wait for process 0 to say it is done (a bounded wait,
  `distributed.share`) before any of them opens the checkpoint manager: one opened earlier would
  still list the damaged steps, which the resumed run writes again. If process 0 fails here, it
  says so and every process stops with one line.

  Raises:
    OSError: process 0 could not write (the caller reports it with the last checkpoint).
    WorkdirError: (other processes) process 0 could not prepare the workdir.
    ProcessLostError: (other processes) process 0 did not answer in time.
  """
  workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
  chief = jax.process_index() == 0
  failure = None
  if chief:
    try:
      workdir_lib.mark(workdir)
      if start.damaged:
        resume.set_aside(workdir, start.damaged)
    except OSError as e:
      failure = e
  if jax.process_count() > 1:
    said = distributed.share(
        "workdir_ready", (f"failed: {failure}" if failure else "ready") if chief else None,
        what="that the workdir is ready (damaged checkpoints set aside)", senders=[0])[0]
    if not chief and said != "ready":
      raise errors.WorkdirError(workdir, f"process 0 could not prepare it ({said}); nothing was "
                                         "trained")
  if failure is not None:
    raise failure


@contextlib.contextmanager
def _deferred_interrupt(verbose: bool) -> Iterator[Callable[[], bool]]:
  """While training: the first Ctrl-C (SIGINT) only asks the stage loop to stop after the
  current step (and its checkpoint save), so no save or map refresh is cut in half; a second
  Ctrl-C interrupts at once. Yields the poll the loop calls. Outside the main thread (where
  Python cannot install a handler) and in multi-process jobs (processes polling the flag at
  different steps would leave one waiting in a collective) Ctrl-C keeps its default behaviour."""
  requested = threading.Event()
  if (threading.current_thread() is not threading.main_thread()
      or jax.process_count() > 1):
    yield requested.is_set
    return

  def handler(signum, frame):
    del signum, frame
    if requested.is_set():
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    requested.set()
    if verbose:
      print("\n[train] Ctrl-C: stopping after this step (Ctrl-C again to stop at once)",
            file=sys.stderr, flush=True)

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield requested.is_set
  finally:
    signal.signal(signal.SIGINT, previous)


class _Interrupted(KeyboardInterrupt):
  """Ctrl-C inside the stage loop, with the number of steps done."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def _run(ctx: stage_lib.RunContext, start: resume.Start, workdir: str) -> TrainResult:
  """The stages from `start` on (the checkpoint manager is opened and closed by the caller)."""
  run = ctx.run
  step = int(start.host_state.step) if start.host_state is not None else 0
  cursor = stage_lib.Cursor(state=start.host_state, step=step, last_saved=start.step,
                            maps=start.maps)
  stopped = False
  try:
    for stage_index in range(start.position.stage_index, len(run.stages)):
      resume_here = start.host_state is not None and stage_index == start.position.stage_index
      start_epoch = start.position.epoch if resume_here else 0
      start_batch = start.position.batch if resume_here else 0
      if start_epoch >= run.stage_epochs[run.stages[stage_index]]:
        continue  # this stage was finished when the checkpoint was taken
      stage_lib.run_stage(ctx, stage_index, cursor, start_epoch, start_batch, start.params)
  except stage_lib.Stop:
    stopped = True
    ctx.log.say(f"stopped after step {cursor.step} "
                f"(debug_stop_after_steps={run.debug_stop_after_steps})")
  except KeyboardInterrupt:
    # Ctrl-C: one line saying where the run stands, not a traceback (`train` finishes it).
    raise _Interrupted(cursor.step) from None

  final = cursor.state
  if final is None:  # no stage had anything left to run: the start point is the result
    final = state_lib.create_state(start.params, state_lib.make_optimizer(run.optimizer, 1),
                                   cursor.step)
  return TrainResult(state=parallel.to_host(final), step=cursor.step, stopped=stopped,
                     workdir=workdir)

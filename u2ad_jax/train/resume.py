"""Where a run starts: its own checkpoint, another run's parameters, or fresh ones.

Resume order (big_vision): the workdir's own newest complete checkpoint (a damaged newer one is
skipped with a warning and moved to `checkpoints_damaged/`), then `init_from` (another run's
parameters only, e.g. a pretraining run for an adaptation-only run), then fresh parameters.
Everything here is read-only until the trainer has checked every input (`set_aside` is the one
writer, called after that).

A checkpoint stores the position `(stage, epoch, batch)` of the next batch; the data of epoch e
is a pure function of (seed, stage, e), the masks of step s of (seed, s), and the maps in use are
saved with the checkpoint, so a resumed run continues EXACTLY as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from u2ad_jax import errors
from u2ad_jax.train import checkpoint
from u2ad_jax.train import distributed
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import workdir as workdir_lib

# Where checkpoints that fail to restore are moved (inside the workdir, never deleted).
DAMAGED_DIR = "checkpoints_damaged"


@dataclasses.dataclass(frozen=True)
class Position:
  """Next batch to run: batch `batch` of epoch `epoch` of stage `stages[stage_index]`."""
  stage_index: int
  epoch: int
  batch: int


@dataclasses.dataclass
class Start:
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
  position: Position
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


def find_start(workdir: str, stages: tuple[str, ...], model: Any, optimizer: Any,
               shape: dict[str, Any], fingerprint: str,
               init_from: str | os.PathLike | None) -> Start:
  """The newest complete checkpoint of `workdir`, else `init_from`, else fresh parameters
  (`params` None: drawn by the caller once the data is checked).

  Read-only. A checkpoint that cannot be restored (truncated, corrupted, half-deleted) is skipped
  with a warning in favour of the previous one; a checkpoint of another model or of stages this
  run does not include is an error (it is intact: falling back past it would silently drop work).

  Args:
    workdir: the run directory.
    stages: the stages this run trains.
    model, optimizer: what the checkpoints' TrainState was built with (their structure).
    shape: this run's `settings.shape_fields` (checked against init_from's record).
    fingerprint: this run's model / input fingerprint (checked against each checkpoint's).
    init_from: another workdir whose parameters start a run without checkpoints.

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
      template = checkpoint.abstract_train_state(model, optimizer)
      failures: list[errors.CheckpointError] = []
      for step in steps:
        try:
          start = _restore_start(workdir, stages, fingerprint, ckpts, step, template)
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
  position = Position(0, 0, 0)
  if init_from:
    _, params, other_config, other_step = checkpoint.restore_for_eval(init_from)
    checkpoint.check_compatible(other_config, shape, os.fspath(init_from))
    return Start(position, params=params,
                 message=f"initialising from {init_from} (step {other_step}, parameters only)")
  return Start(position)  # fresh parameters, drawn once every input has been checked


def _restore_start(workdir: str, stages: tuple[str, ...], fingerprint: str,
                   ckpts: checkpoint.Checkpoints, step: int, template: Any) -> Start:
  """Restores checkpoint `step` (CheckpointError when it is damaged)."""
  meta = ckpts.restore_meta(step)
  if meta.get("fingerprint") != fingerprint:
    raise errors.ConfigMismatchError(
        f"{workdir}: checkpoint {step} was saved with model/input fingerprint "
        f"{meta.get('fingerprint')}, this config has {fingerprint}; use a new --workdir")
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
  position = Position(stages.index(stage), epoch, batch)
  return Start(position, host_state=host_state, maps=maps, step=int(step),
               message=f"resuming {workdir} from checkpoint step {step} ({stage}, epoch "
                       f"{epoch}, batch {batch})")


def start_record(start: Start) -> np.ndarray:
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


def check_same_start_everywhere(workdir: str, start: Start) -> None:
  """Gathers every process's start and checks them (all processes call it).

  Through `distributed.share`, a bounded wait: a process that died before this point makes the
  others stop with one line (ProcessLostError) instead of waiting in a collective until the
  job's time limit.
  """
  if jax.process_count() == 1:
    return
  records = distributed.share("resume", json.dumps(start_record(start).tolist()),
                              what="where it resumes")
  check_same_start(workdir, np.array([json.loads(records[p]) for p in sorted(records)]))


def stages_to_run(stages: tuple[str, ...], stage_epochs: dict[str, int],
                  start: Start) -> list[str]:
  """The stages that still have batches to run from `start`."""
  todo = []
  for index in range(start.position.stage_index, len(stages)):
    resume_here = start.host_state is not None and index == start.position.stage_index
    first_epoch = start.position.epoch if resume_here else 0
    if first_epoch < stage_epochs[stages[index]]:
      todo.append(stages[index])
  return todo


def set_aside(workdir: str, steps: tuple[int, ...]) -> None:
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

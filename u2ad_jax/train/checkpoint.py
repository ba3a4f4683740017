"""Checkpoints (orbax-checkpoint CheckpointManager) and the workdir's config record.

Workdir layout:
  workdir/config.json      the resolved config of the latest run in this workdir
  workdir/checkpoints/<step>/{state, maps, meta}
  workdir/metrics.jsonl, workdir/train_curves.png   (see metrics_log)

Each checkpoint is `Composite(state=StandardSave(TrainState), meta=JsonSave(...))` plus, during
adaptation, `maps=StandardSave({'patch_eu': [S, N] float32, 'exclude': [S, N] bool})`: the
per-patch EU and the AU-candidate patches in use at that step. The maps are SAVED rather than
regenerated on resume because they were computed from the parameters of the last refresh epoch,
which are not the parameters in the checkpoint; restoring them makes a resume mid-adaptation
exactly equal to an uninterrupted run. (They are small: two numbers per patch per slice.)

The workdir may be a local path or a URI Orbax accepts (`gs://bucket/run`): it is used as given
(`workdir.resolve`), every file here is reached through etils epath, never os.path.

The state is saved as host (numpy) arrays, the global unstacked state: the same files serve any
device count, and multi-process runs (whose pmapped state is process-local) save it too.

`meta` holds the training position `{stage, stage_index, epoch, batch, step, done}` (the next
batch to run is batch `batch` of epoch `epoch` of stage `stage`), the data size the maps belong
to, and the config fingerprint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax.train import faults
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import workdir as workdir_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# What Orbax / TensorStore raise for a damaged, truncated or half-deleted checkpoint (measured on
# orbax-checkpoint 0.12.8: truncated or overwritten array files -> ValueError 'DATA_LOSS', a
# garbage JSON item -> json.JSONDecodeError (a ValueError), a missing item -> KeyError, missing
# files -> FileNotFoundError). Anything else (TypeError, AttributeError, ...) is a programming
# error and must surface as one, not as a "damaged checkpoint".
DAMAGED_CHECKPOINT_ERRORS = (OSError, ValueError, KeyError)


# ------------------------------------------------------------------------------ config record


def check_compatible(saved: Any, fields: dict[str, Any], where: str) -> None:
  """Raises ConfigMismatchError when `saved` differs from this run in a shape-relevant field.

  Args:
    saved: the config recorded with the checkpoint (ConfigDict or dict).
    fields: this run's `settings.shape_fields(config)`.
    where: the workdir or run the saved config belongs to (named in the message).
  """
  old = settings_lib.shape_fields(saved)
  diffs = [f"{k}: {old[k]!r} there, {fields[k]!r} now" for k in settings_lib.SHAPE_FIELDS
           if old[k] != fields[k]]
  if diffs:
    raise errors.ConfigMismatchError(
        f"{where} was trained with a different model / input shape ({'; '.join(diffs)}); "
        "use a new --workdir, or the same model and image settings to resume")


def config_path(workdir: str | os.PathLike) -> str:
  return workdir_lib.join(workdir, CONFIG_FILE)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config recorded in `workdir`; CheckpointError (naming the file) when absent or bad."""
  path = config_path(workdir)
  record = workdir_lib.path(workdir, CONFIG_FILE)
  if not record.is_file():
    raise errors.CheckpointError(path, "no config.json: not a u2ad training workdir")
  try:
    data = json.loads(record.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(path, f"unreadable config record ({e})") from e
  if not isinstance(data, dict):
    raise errors.CheckpointError(path, "config record is not a JSON object")
  return ml_collections.ConfigDict(data)


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Records the resolved config (atomic: a local temporary file renamed, or one object write)."""
  text = config.to_json(indent=2, sort_keys=True) + "\n"
  with io_utils.naming(config_path(workdir)):
    if workdir_lib.is_uri(workdir):
      workdir_lib.path(workdir, CONFIG_FILE).write_text(text)
    else:
      io_utils.write_text(config_path(workdir), text)


# ------------------------------------------------------------------------------ checkpoints


class Checkpoints:
  """The workdir's CheckpointManager.

  Args:
    workdir: run directory (checkpoints live in `workdir/checkpoints`).
    max_to_keep: keep the newest N checkpoints (None keeps all).
    keep_every_steps: also keep every checkpoint whose step is a multiple of this (0: none), for
      sweeping a run's checkpoints later (`u2ad evaluate --steps all`).
    read_only: open an existing directory without creating or deleting anything (evaluation).
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = None,
               keep_every_steps: int = 0, read_only: bool = False):
    # Used as given for a URI (Orbax / epath read it), absolute for a local path.
    self.directory = workdir_lib.join(workdir, CHECKPOINT_DIR)
    if read_only and not epath.Path(self.directory).is_dir():
      raise errors.CheckpointError(self.directory, "no checkpoint directory")
    keep: dict[str, Any] = {"max_to_keep": max_to_keep}
    if keep_every_steps and not read_only:
      # Orbax's preservation policies replace its deprecated keep_period, and exclude
      # max_to_keep: a checkpoint stays when one of them keeps it.
      keep = {"preservation_policy": preservation_policy.AnyPreservationPolicy([
          preservation_policy.LatestN(max_to_keep),
          preservation_policy.EveryNSteps(int(keep_every_steps))])}
    options = ocp.CheckpointManagerOptions(
        **keep, create=not read_only, read_only=read_only,
        # A save interrupted by a kill leaves an uncommitted temporary directory, which Orbax
        # never lists as a step; a writing manager removes those leftovers of its own saves.
        cleanup_tmp_directories=not read_only,
        # Save is forced at the steps the trainer picks (periodic + end of stage).
        save_interval_steps=1)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.fspath(epath.Path(self.directory) / str(int(step)))

  def save(self, step: int, state: state_lib.TrainState, meta: dict[str, Any],
           maps: dict[str, np.ndarray] | None = None) -> None:
    """Saves (asynchronously; `wait` blocks) the host copy of `state`, `meta` and `maps`.

    Every process must call it (Orbax coordinates the write; the primary process writes the
    replicated arrays). The step directory appears only when the write is complete (Orbax
    writes a temporary directory and renames it), so a kill at any point leaves either the
    whole checkpoint or none.

    Raises:
      OSError: the write failed (e.g. ENOSPC), now or (asynchronously) in the previous save.
    """
    faults.hit("save_begin", step)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta))}
    if maps is not None:
      items["maps"] = ocp.args.StandardSave(dict(maps))
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    faults.hit("save_inflight", step)
    if faults.wanted("save_done", step):
      self.wait()
      faults.hit("save_done", step)

  def restore_meta(self, step: int) -> dict[str, Any]:
    try:
      restored = self.manager.restore(int(step),
                                      args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except DAMAGED_CHECKPOINT_ERRORS as e:
      raise errors.CheckpointError(self.step_dir(step), f"cannot read checkpoint meta ({e})") from e
    return dict(restored["meta"])

  def restore(self, step: int, state_template: Any,
              maps_template: dict[str, Any] | None = None) -> tuple[Any, dict | None, dict]:
    """Restores `(state, maps or None, meta)` at `step` as numpy arrays.

    Args:
      step: checkpoint step.
      state_template: pytree of arrays / ShapeDtypeStructs with the state's structure.
      maps_template: the maps' structure, or None to skip them.

    Raises:
      CheckpointError: the checkpoint is missing, damaged or has another structure.
    """
    items = {"state": ocp.args.StandardRestore(_abstract(state_template)),
             "meta": ocp.args.JsonRestore()}
    if maps_template is not None:
      items["maps"] = ocp.args.StandardRestore(_abstract(maps_template))
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    except DAMAGED_CHECKPOINT_ERRORS as e:  # damaged, or saved with another structure
      raise errors.CheckpointError(self.step_dir(step), f"cannot restore checkpoint ({e})") from e
    maps = dict(restored["maps"]) if maps_template is not None else None
    return restored["state"], maps, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def failure_message(self, error: OSError) -> str:
    """One line for a failed checkpoint write, naming the newest checkpoint that is complete."""
    try:
      self.wait()  # an earlier asynchronous save may still be committing
    except OSError:
      pass  # the failure being reported
    self.manager.reload()
    return (f"{self.directory}: writing a checkpoint failed ({error}); training stopped and "
            f"{_kept(self.latest_step())}")

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _kept(latest: int | None) -> str:
  return (f"the last complete checkpoint is step {latest}; free space and run the same command "
          "to resume from it" if latest is not None else "no checkpoint was completed")


def write_failure_message(workdir: str | os.PathLike, error: OSError) -> str:
  """One line for a failed write of a run's other files (metrics.jsonl, config.json, ...),
  naming the file (`error.filename`) and the newest complete checkpoint (looked up afresh, once
  the run's own manager has finished its saves)."""
  try:
    with Checkpoints(workdir, read_only=True) as ckpts:
      latest = ckpts.latest_step()
  except (errors.CheckpointError, *DAMAGED_CHECKPOINT_ERRORS):
    latest = None
  where = error.filename or workdir_lib.resolve(workdir)
  return (f"{where}: writing failed ({error.strerror or error}); training stopped and "
          f"{_kept(latest)}")


def _abstract(tree: Any) -> Any:
  # Sharding-free shape/dtype targets restore as numpy arrays on every process.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


# ------------------------------------------------------------------------------ evaluation


def abstract_train_state(model: Any, optimizer: Any) -> state_lib.TrainState:
  """ShapeDtypeStruct pytree of the TrainState of `model` and `optimizer` (no computation)."""
  def build():
    params = state_lib.init_params(model, jax.random.key(0))
    return state_lib.create_state(params, optimizer)
  return jax.eval_shape(build)


def restore_for_eval(workdir: str | os.PathLike, step: int | None = None
                     ) -> tuple[Any, Any, ml_collections.ConfigDict, int]:
  """Loads a trained model from a workdir, read-only.

  Args:
    workdir: a `u2ad train` workdir.
    step: checkpoint step (default: the latest).

  Returns:
    `(model, params, config, step)`: the flax module built from the recorded config, its
    parameters (numpy pytree, usable as `model.apply({'params': params}, ...)`), the recorded
    config and the restored step.

  Raises:
    CheckpointError: no config record, no checkpoint (or not `step`), or a damaged checkpoint;
      the message names the path.
  """
  config = read_config(workdir)
  try:
    model = settings_lib.build_model(config)
    optimizer = state_lib.make_optimizer(settings_lib.optimizer_settings(config.optim), 1)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise errors.CheckpointError(config_path(workdir), f"cannot build the recorded model ({e})")
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise errors.CheckpointError(checkpoints.directory, "no checkpoint saved yet")
    if step is None:
      step = max(steps)
    elif int(step) not in steps:
      raise errors.CheckpointError(checkpoints.step_dir(step),
                                   f"no checkpoint at step {step} (available: {steps})")
    template = abstract_train_state(model, optimizer)
    restored, _, _ = checkpoints.restore(int(step), template)
  finally:
    checkpoints.close()
  return model, restored.params, config, int(step)

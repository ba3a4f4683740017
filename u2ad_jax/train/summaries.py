"""TensorBoard event files of a training run, written beside metrics.jsonl (process 0 only).

`metrics.jsonl` stays the record of truth (every figure and test reads it); the event files
are the live view a researcher keeps open during a run of hours:

  tensorboard --logdir WORKDIR        (or the folder above several runs, to compare them)

What is written (the tag, and the metrics.jsonl field it comes from):
  train/{loss,image,edge}            the loss and its terms of every step;
  train/{grad_norm,update_norm,param_norm,lr}
  guidance/{w_eu,tau,au_exclusion}   the guidance of the step's epoch (schedules.py);
  speed/{steps_per_sec,images_per_sec}   measured between metric fetches (progress.py);
  validation/{loss,ssim,psnr,corr,seconds}   each validation record (train/validation.py);
  maps/{mean_patch_eu,candidate_patches,seconds}   each map refresh;
  validation/panel                   an image at every map refresh and stage end: input, mean
                                     reconstruction, EU and anomaly map (rows) of a fixed set of
                                     validation slices (columns), `panel_image`;
  validation/panel_{eu,anomaly}_max  the values shown as the brightest EU / anomaly pixel.

The writer is tensorboardX's (a plain `pip install`: numpy, protobuf, packaging; no TensorFlow,
no PyTorch). Steps are the global step. A resumed run opens a new event file with
`purge_step` = its checkpoint's step + 1: TensorBoard then hides what the interrupted attempt had
logged after that checkpoint, as `metrics_log.truncate_for_resume` drops it from metrics.jsonl.

A URI workdir (`gs://bucket/run`) is reached through etils epath, like every other file of the
run: object stores cannot append, so the event file is kept in memory and the whole object
rewritten at every flush (every `FLUSH_SECONDS`, at each stage end and at the end of the run).
"""

from __future__ import annotations

import io
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from etils import epath

from u2ad_jax.train import workdir as workdir_lib

# How often the writer's thread flushes pending events (TensorBoard reloads about every 30 s).
FLUSH_SECONDS = 30

# metrics.jsonl field of a step record -> TensorBoard tag.
STEP_TAGS = {
    "loss": "train/loss", "image": "train/image", "edge": "train/edge",
    "grad_norm": "train/grad_norm", "update_norm": "train/update_norm",
    "param_norm": "train/param_norm", "lr": "train/lr",
    "w_eu": "guidance/w_eu", "tau": "guidance/tau", "au_exclusion": "guidance/au_exclusion",
    "steps_per_sec": "speed/steps_per_sec", "images_per_sec": "speed/images_per_sec",
}
# metrics.jsonl event -> {field: tag} of its record.
EVENT_TAGS = {
    "validation": {"val_loss": "validation/loss", "val_ssim": "validation/ssim",
                   "val_psnr": "validation/psnr", "val_corr": "validation/corr",
                   "seconds": "validation/seconds"},
    "maps": {"mean_patch_eu": "maps/mean_patch_eu", "candidate_patches": "maps/candidate_patches",
             "seconds": "maps/seconds"},
}
PANEL_TAG = "validation/panel"
# The rows of the panel, top to bottom (`panel_image`).
PANEL_ROWS = ("image", "mean", "eu", "anomaly")


class _ObjectFile:
  """An event file on object storage: appended in memory, the whole object written at flush."""

  def __init__(self, path: str):
    self.path = path
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    epath.Path(self.path).write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectFiles:
  """tensorboardX's writer factory for a URI scheme (`record_writer.register_writer_factory`)."""

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    del path  # an object store has no directories to create


def _number(value: Any) -> float | None:
  """`value` as a finite float, or None (bools count as 0 / 1; text, NaN and inf do not)."""
  if isinstance(value, (bool, np.bool_)):
    return float(value)
  if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
    return float(value)
  return None


class Summaries:
  """The run's TensorBoard writer (create it on process 0 only).

  Args:
    workdir: the run directory (local path or URI); the event files go directly into it.
    purge_step: a resumed run's checkpoint step + 1 (events of the interrupted attempt from this
      step on are hidden), None for a fresh run.
  """

  def __init__(self, workdir: str, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

    self.logdir = workdir_lib.resolve(workdir)
    if workdir_lib.is_uri(self.logdir):
      # tensorboardX picks the file opener by the path's scheme; its own gs / s3 openers need
      # other cloud clients, while the run reaches every file through epath.
      record_writer.register_writer_factory(self.logdir.split(":", 1)[0], _ObjectFiles())
    # The event file is named by the second it was opened and the host: a resume within the same
    # second would reopen (and truncate) the first attempt's file. The nanosecond suffix keeps
    # the names distinct and in the order TensorBoard must read them (by name).
    self._writer = SummaryWriter(logdir=self.logdir, purge_step=purge_step,
                                 flush_secs=FLUSH_SECONDS, max_queue=1000,
                                 filename_suffix=f".{time.time_ns():020d}")

  def scalars(self, step: int, values: Mapping[str, Any], tags: Mapping[str, str]) -> None:
    """Writes `values[name]` under `tags[name]` for every name with a finite number."""
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top

    # The values tensorboardX's add_scalar writes (`simple_value`), but all the values of a
    # record in ONE event: a dozen times fewer events through the writer's queue per step.
    entries = [summary_pb2.Summary.Value(tag=tag, simple_value=value)
               for tag, value in ((tag, _number(values.get(name))) for name, tag in tags.items())
               if value is not None]
    if entries:
      self._writer.file_writer.add_summary(summary_pb2.Summary(value=entries), int(step))

  def step_record(self, record: Mapping[str, Any]) -> None:
    """A step's metrics.jsonl record (`RunLog.flush`)."""
    self.scalars(record["step"], record, STEP_TAGS)

  def event(self, record: Mapping[str, Any]) -> None:
    """A metrics.jsonl event record; only validation and map refreshes carry scalars."""
    tags = EVENT_TAGS.get(record.get("event"))
    if tags is not None:
      self.scalars(record["step"], record, tags)

  def panel(self, step: int, maps: Mapping[str, np.ndarray]) -> None:
    """The validation panel (`panel_image`) and the values of its brightest EU / anomaly."""
    image, scales = panel_image(maps)
    self._writer.add_image(PANEL_TAG, image, int(step), dataformats="HWC")
    self.scalars(step, scales, {name: f"{PANEL_TAG}_{name}_max" for name in scales})

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def panel_image(maps: Mapping[str, np.ndarray], gap: int = 2) -> tuple[np.ndarray, dict]:
  """The validation panel: one row per map of PANEL_ROWS, one column per slice.

  Args:
    maps: `{'image', 'mean', 'eu', 'anomaly'}` each `[k, H, W]` float (inputs and
      reconstructions in [0, 1]).
    gap: white pixels between the cells.

  Returns:
    (`[4 H + 3 gap, k W + (k - 1) gap, 3]` uint8 RGB, {'eu': max, 'anomaly': max}). Inputs and
    reconstructions are grey on the fixed [0, 1] scale; EU and anomaly use a colour map scaled
    to their maximum over the panel (returned, so that the brightness can be read as a value).
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  k, h, w = np.shape(maps["image"])
  scales = {}
  rows = []
  for name in PANEL_ROWS:
    values = np.asarray(maps[name], np.float32)
    if name in ("image", "mean"):
      grey = np.clip(np.nan_to_num(values), 0.0, 1.0)
      cells = np.repeat(grey[..., None], 3, axis=-1)
    else:
      values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
      top = float(values.max()) if values.size else 0.0
      scales[name] = top
      cells = colormaps["magma"](values / top if top > 0 else values)[..., :3]
    rows.append(cells)
  out = np.ones((4 * h + 3 * gap, k * w + (k - 1) * gap, 3), np.float32)
  for r, cells in enumerate(rows):
    for c in range(k):
      out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = cells[c]
  return (out * 255.0 + 0.5).astype(np.uint8), scales


def event_files(workdir: str | os.PathLike) -> list[str]:
  """The TensorBoard event files in `workdir` (sorted names)."""
  root = workdir_lib.path(workdir)
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir() if p.name.startswith("events.out.tfevents."))

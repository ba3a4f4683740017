"""Host-side batching of a SliceSet for the data-parallel training step (NumPy only).

Batches are laid out `[num_devices, per_device, ...]` for a pmapped / shard_mapped step.

Determinism: epoch e's order is `np.random.default_rng([seed, e]).permutation(S)`, the same in
every process, and each example's augmentation draws from its own stream keyed by
`(seed, e, position in the epoch)`. So epoch e is reproduced exactly on resume, and the global
batch (images included) does not depend on how it is split across processes or devices.

Multi-host: the global batch of step t is `order[t * G : (t + 1) * G]`, split over the D devices
of the mesh in mesh order: mesh slot m gets rows `[m * b, (m + 1) * b)`, b = G / D. A process
builds the blocks of ITS devices' slots (`device_positions`, from `parallel.mesh_positions`), so
a process's devices need not be contiguous in the mesh nor equal in number across processes.
Without `device_positions` the layout is the classic one (process p owns slots
`[p * num_devices, (p + 1) * num_devices)`, equal device counts).

Remainder: `drop_remainder=True` drops the last partial global batch; False pads it to G with
examples flagged `valid=False`, `index=-1`, zero image and empty ROIs (the step must weight
them out, e.g. with `valid` as the per-example weight).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:  # annotations only (keeps this module, imported by the train step, light)
  from u2ad_jax.data import sliceset

BRIGHTNESS_RANGE = (0.8, 1.2)
CONTRAST_RANGE = (0.8, 1.2)
NOISE_STD = 0.02

Batch = dict[str, np.ndarray]


def augment_batch(images: np.ndarray, roi: np.ndarray, rng: np.random.Generator,
                  brightness_range: tuple[float, float] = BRIGHTNESS_RANGE,
                  contrast_range: tuple[float, float] = CONTRAST_RANGE,
                  noise_std: float = NOISE_STD, return_params: bool = False) -> Any:
  """Training augmentation (`docs/method.md`), per image: the law's NumPy reference.

  The trainer runs the same law inside the jitted step (`data/augment.py`, tested against this
  function), so that the host does no per-pixel work; this one serves host-side batches
  (`BatchIterator(augment=True)`) and the tests.

  x -> contrast c about the image's ROI mean (whole-image mean when the ROI is empty; pivoting on
  the cord / CSF level keeps that level while stretching its contrast) -> brightness factor b ->
  + Gaussian noise (sigma `noise_std`) -> clip to [0, 1].

  Decision: no min-max after the clip (the method lists one). Brightness and contrast are affine,
  so a final min-max would undo them wherever the clip did not saturate: the augmentation would
  be noise only. Without it the ROI level moves down (b < 1) and up (b > 1), and its contrast
  shrinks (c < 1) and grows (c > 1); the output stays in [0, 1].

  Args:
    images: `[B, H, W]` float in [0, 1].
    roi: `[B, H, W]` bool train ROI.
    rng: NumPy generator; draws b, c (uniform in their ranges) then the noise, in that order.
    return_params: also return `{"brightness": [B], "contrast": [B]}`.

  Returns:
    `[B, H, W]` float32 in [0, 1]; with `return_params`, the tuple `(images, params)`.
  """
  images = np.asarray(images, np.float32)
  roi = np.asarray(roi, bool)
  b = images.shape[0]
  brightness = rng.uniform(*brightness_range, size=b)
  contrast = rng.uniform(*contrast_range, size=b)
  roi_count = roi.sum(axis=(1, 2))
  roi_mean = (images * roi).sum(axis=(1, 2)) / np.maximum(roi_count, 1)
  pivot = np.where(roi_count > 0, roi_mean, images.mean(axis=(1, 2)))[:, None, None]
  x = ((images - pivot) * contrast[:, None, None] + pivot) * brightness[:, None, None]
  if noise_std > 0:
    x = x + rng.normal(0.0, noise_std, size=x.shape)
  x = np.clip(x, 0.0, 1.0).astype(np.float32)
  if return_params:
    return x, {"brightness": brightness, "contrast": contrast}
  return x


class BatchIterator:
  """Epochs of fixed-shape batches from a SliceSet.

  Each batch is a dict:
    image: `[D, b, H, W, 1]` float32;  train_roi, score_roi: `[D, b, H, W]` bool;
    index: `[D, b]` int32 position in the SliceSet (-1 = padding);  valid: `[D, b]` bool,
  where D = num_devices (local to this process, row block i for mesh slot device_positions[i])
  and b = global_batch / total devices. With `with_examples=False` only index and valid (the
  train step gathers the examples from its device-resident cohort).
  """

  def __init__(self, slice_set: sliceset.SliceSet, *, global_batch: int, num_devices: int,
               seed: int, augment: bool, drop_remainder: bool, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1, prefetch: int = 0,
               device_positions: Any = None, total_devices: int | None = None,
               with_examples: bool = True):
    """
    Args:
      slice_set: the slices.
      global_batch: examples per step over all processes and devices.
      num_devices: devices of THIS process.
      seed: base seed (non-negative) of shuffling and augmentation.
      augment: apply `augment_batch` (training); the ROIs are never changed.
      drop_remainder: drop (True) or pad (False) the last partial global batch.
      shuffle: False keeps SliceSet order (evaluation).
      process_index, process_count: this process's block of each global batch.
      prefetch: > 0 builds up to this many batches ahead in a background thread, overlapping
        host batching with the device step.
      device_positions: `[num_devices]` mesh slots of this process's devices, in the order of
        its row blocks (None: `process_index * num_devices + arange(num_devices)`).
      total_devices: devices of the whole mesh (None: `process_count * num_devices`); required
        with `device_positions`.
      with_examples: False leaves out image / train_roi / score_roi (and the augmentation):
        the batch is only which slices (index, valid), microseconds of host work per step.

    Raises:
      ValueError: the batch does not split evenly, or `drop_remainder` leaves no batch.
    """
    if len(slice_set) == 0:
      raise ValueError("empty SliceSet")
    if global_batch < 1 or num_devices < 1 or process_count < 1:
      raise ValueError("global_batch, num_devices and process_count must be positive")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if device_positions is None:
      device_positions = process_index * num_devices + np.arange(num_devices)
      total_devices = process_count * num_devices
    elif total_devices is None:
      raise ValueError("device_positions needs total_devices (the mesh size)")
    positions = np.asarray(device_positions, np.int64).reshape(-1)
    total_devices = int(total_devices)
    if (positions.size != num_devices or np.unique(positions).size != positions.size
        or positions.min() < 0 or positions.max() >= total_devices):
      raise ValueError(f"device_positions {positions.tolist()} must be {num_devices} distinct "
                       f"mesh slots in [0, {total_devices})")
    if global_batch % total_devices:
      raise ValueError(f"global batch {global_batch} does not split over {total_devices} "
                       f"device(s) ({process_count} process(es))")
    if seed < 0:
      raise ValueError("seed must be non-negative")
    self.slice_set = slice_set
    self.global_batch = int(global_batch)
    self.num_devices = int(num_devices)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.device_positions = positions
    self.total_devices = total_devices
    self.per_device = self.global_batch // total_devices
    self.local_batch = self.per_device * self.num_devices
    self.seed = int(seed)
    self.augment = bool(augment)
    self.drop_remainder = bool(drop_remainder)
    self.shuffle = bool(shuffle)
    self.prefetch = int(prefetch)
    self.with_examples = bool(with_examples)
    if self.augment and not self.with_examples:
      raise ValueError("augment=True needs with_examples=True (it augments the host images)")
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(slice_set)} slices make no full global batch of {global_batch} "
                       f"with drop_remainder=True")

  @property
  def steps_per_epoch(self) -> int:
    """Global steps per epoch (the same in every process)."""
    n = len(self.slice_set)
    if self.drop_remainder:
      return n // self.global_batch
    return math.ceil(n / self.global_batch)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """`[S]` the order in which epoch `epoch` visits the slices (identical in every process)."""
    n = len(self.slice_set)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

  def epoch(self, epoch: int) -> Iterator[Batch]:
    """Yields this process's part of every batch of epoch `epoch`."""
    batches = self._batches(int(epoch))
    if self.prefetch > 0:
      return _prefetched(batches, self.prefetch)
    return batches

  def _batches(self, epoch: int) -> Iterator[Batch]:
    order = self.epoch_order(epoch)
    for step in range(self.steps_per_epoch):
      yield self._batch(epoch, step, order)

  def _batch(self, epoch: int, step: int, order: np.ndarray) -> Batch:
    # Positions in the epoch of this process's rows: each local device's slot block, in turn.
    first = step * self.global_batch + self.device_positions * self.per_device
    positions = (first[:, None] + np.arange(self.per_device)).reshape(-1)
    in_range = positions < order.shape[0]
    index = np.where(in_range, order[np.minimum(positions, order.shape[0] - 1)], -1)
    valid = index >= 0
    shape = (self.num_devices, self.per_device)
    if not self.with_examples:
      return {"index": index.astype(np.int32).reshape(shape), "valid": valid.reshape(shape)}
    real = index[valid]
    data = self.slice_set
    h, w = data.image_shape
    images = np.zeros((self.local_batch, h, w), np.float32)
    train_roi = np.zeros((self.local_batch, h, w), bool)
    score_roi = np.zeros((self.local_batch, h, w), bool)
    images[valid] = data.images[real]
    train_roi[valid] = data.train_roi[real]
    score_roi[valid] = data.score_roi[real]
    if self.augment:
      for slot in np.flatnonzero(valid):
        # One stream per (seed, epoch, position): independent of the process / device split.
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, epoch], spawn_key=(1, int(positions[slot]))))
        images[slot] = augment_batch(images[slot][None], train_roi[slot][None], rng)[0]
    return {
        "image": images.reshape(shape + (h, w, 1)),
        "train_roi": train_roi.reshape(shape + (h, w)),
        "score_roi": score_roi.reshape(shape + (h, w)),
        "index": index.astype(np.int32).reshape(shape),
        "valid": valid.reshape(shape),
    }


_END = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


def _prefetched(items: Iterator[Any], size: int) -> Iterator[Any]:
  """Runs `items` in a daemon thread, at most `size` ahead.

  A generator: the thread starts at the first `next` and is stopped when the consumer finishes,
  breaks out or drops the generator (its `finally` runs on close).
  """
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # handed to the consumer, which re-raises it.
      put(_Failure(e))

  thread = threading.Thread(target=produce, daemon=True, name="u2ad-prefetch")
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join(timeout=10)

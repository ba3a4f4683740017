"""Monte-Carlo maps of a set of slices: the ONE path of the training refresh and the evaluation.

`uncertainty.mc_uncertainty` holds the exact-coverage math for one batch of images; this module
runs it over a whole slice set, as both callers need it:

- Passes folded into the batch: each device runs ONE model call over `passes x c` rows for its
  `c` slices (`slices_per_device`), not a vmap over single slices (a plain batch keeps the
  model's own loops unbatched).
- Slices sharded over all devices of all processes (`parallel.DataParallel`, pmap or
  jit(shard_map), the train step's wrappers): a chunk of `D * c` slices per call, mesh slot `m`
  computing chunk rows `[m * c, (m + 1) * c)` (`parallel.mesh_positions`). Every row travels
  with its slice id, and the ids that come back are checked against the ids sent.
- Per-slice keys drawn from the slice's index in the set, before any split: slice `s` gets the
  masks of a one-slice call `mc_uncertainty(..., key=fold_in(key, s), ...)` (`slice_keys`), so
  its maps depend only on (params, key, s, slice), not on the device count, the chunk size or
  the order of the slices. A subset of a set passes its slices' indices in the whole set
  (`slice_ids`), so it draws the masks the whole set's run draws for those slices: the
  evaluation of a multi-process job splits the cohort by subject this way
  (`evaluation.rungs.model.model_maps`) and gathers the maps on process 0.
- Chunks ordered by ROI size, largest first, with the static encoder length
  `uncertainty.mc_encoder_length` of each chunk (with a context band, one pair of band lengths
  for the whole set): every pass of a slice masks the same count, so
  the encoder needs only the visible tokens (results equal the full length up to float rounding;
  similar ROI sizes share a chunk, so the length is short for most chunks).
- Maps stay where they were computed: `local_chunks` yields, per chunk, the maps of the slices
  this process's devices computed (this module never sends full-resolution arrays between
  processes), and `exchange` all-gathers small per-slice arrays (e.g. the training guidance
  `patch_eu [S, N]`, `exclude [S, N]`) so every process ends with them for every slice, checked
  slice by slice.

Chunk `k + 1` is dispatched before chunk `k` is read back, so the host's work on a chunk (e.g. the
training's AU candidates) overlaps the devices' work on the next one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from u2ad_jax import masking
from u2ad_jax import parallel
from u2ad_jax import patches
from u2ad_jax import uncertainty
from u2ad_jax.data import sliceset


# What a device may return per slice: the `mc_uncertainty` maps `[H, W]` and the EU summed per
# patch `[N]` (`patches.patch_sum`; the training guidance needs only that).
OUTPUTS = ("eu", "mean", "au", "patch_eu")
# Rounding of a context band's token counts (a band holds tens of tokens, not hundreds).
BAND_LENGTH_MULTIPLE = 16


def slice_keys(key: jax.Array, slice_ids: jax.Array) -> jax.Array:
  """`[R]` slice indices -> `[R]` per-image keys of `uncertainty.mc_masks`.

  Slice `s` gets the key that a one-slice call `mc_uncertainty(..., key=fold_in(key, s), ...)`
  gives its image (`mc_masks` splits the call's key into one key per image).
  """
  return jax.vmap(lambda s: jax.random.split(jax.random.fold_in(key, s), 1)[0])(slice_ids)


class MonteCarloMaps:
  """Monte-Carlo maps of slice sets with fixed settings, compiled once per encoder length.

  Args:
    apply_fn: `apply_fn(params, images [B,H,W,1], plan) -> (recon, edge, aux)` (see
      `uncertainty.ApplyFn`); each output row must depend on its own input row only.
    patch_size: p.
    ratio: masking ratio r.
    num_samples: K, reconstructions per ROI patch (`uncertainty.num_passes`).
    pass_chunk: passes per sequential model call (None: all passes in one call).
    min_roi: smallest ROI size guaranteed K reconstructions.
    slices_per_device: c, slices per device per call (each `passes` rows in the model batch).
    mode: 'pmap' or 'shard_map' (`parallel`).
    devices: the devices to shard over, of every process taking part (default all).
    outputs: which of OUTPUTS the devices return (others are never read back).
    length_multiple: rounding of the encoder length (`mc_encoder_length`); fewer distinct
      lengths compile fewer functions.
    context_patches: None = the model sees every patch; r = the context band of radius r
      around the ROI (`masking.context_band`), as the model was trained. The band's lengths are
      rounded to multiples of `BAND_LENGTH_MULTIPLE`.
  """

  def __init__(self, apply_fn: uncertainty.ApplyFn, *, patch_size: int, ratio: float,
               num_samples: int, pass_chunk: int | None = None, min_roi: int = 1,
               slices_per_device: int = 1, mode: str = "shard_map",
               devices: Sequence[jax.Device] | None = None,
               outputs: Sequence[str] = ("eu", "mean", "au"), length_multiple: int = 64,
               context_patches: int | None = None):
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown or not outputs:
      raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {tuple(outputs)}")
    if int(slices_per_device) < 1:
      raise ValueError(f"slices_per_device must be >= 1, got {slices_per_device}")
    self.apply_fn = apply_fn
    self.patch_size = int(patch_size)
    self.ratio = float(ratio)
    self.num_samples = int(num_samples)
    self.pass_chunk = None if pass_chunk is None else int(pass_chunk)
    self.min_roi = int(min_roi)
    self.per_device = int(slices_per_device)
    self.mode = mode
    self.devices = tuple(jax.devices() if devices is None else devices)
    self.outputs = tuple(outputs)
    self.length_multiple = int(length_multiple)
    self.context_patches = None if context_patches is None else int(context_patches)
    self._mc = {}  # (encoder length, decoder length or None) -> DataParallel
    # Gathers this process's rows of small per-slice arrays to every process (`exchange`).
    self._gather = parallel.DataParallel(
        lambda ids, arrays: (parallel.gather_rows(ids), jax.tree.map(parallel.gather_rows, arrays)),
        mode, num_args=2, sharded=(0, 1), devices=self.devices)
    self.num_devices = self._gather.num_devices
    self.num_local_devices = self._gather.num_local_devices
    self.local_positions = self._gather.local_positions

  @property
  def chunk(self) -> int:
    """Slices per call, over all devices."""
    return self.num_devices * self.per_device

  def _body(self, params: Any, key: jax.Array, images: jax.Array, train_roi: jax.Array,
            slice_ids: jax.Array, *, lengths: tuple[int, int | None]) -> tuple[jax.Array, ...]:
    """Per device: `c` slices `[c, H, W, 1]` -> its outputs `[c, ...]` and the ids `[c]`."""
    num_keep, num_active = lengths
    out = uncertainty.mc_uncertainty(
        self.apply_fn, params, None, images, train_roi, patch_size=self.patch_size,
        ratio=self.ratio, num_samples=self.num_samples, num_keep=num_keep,
        pass_chunk=self.pass_chunk, min_roi=self.min_roi,
        image_keys=slice_keys(key, slice_ids), context_patches=self.context_patches,
        num_active=num_active)
    if "patch_eu" in self.outputs:
      out["patch_eu"] = patches.patch_sum(out["eu"], self.patch_size)
    return tuple(out[name] for name in self.outputs) + (slice_ids,)

  def _lengths(self, train_roi: np.ndarray) -> tuple[int, int | None]:
    """Static (encoder, decoder) lengths for the slices of one chunk `[c, H, W]`; decoder None
    without a context band (every patch is decoded)."""
    if self.context_patches is None:
      return uncertainty.mc_encoder_length(train_roi, self.patch_size, self.ratio,
                                           multiple=self.length_multiple), None
    h, w = train_roi.shape[1:]
    return masking.band_lengths(
        sliceset.roi_patch_mask(train_roi, self.patch_size), (h // self.patch_size,
                                                              w // self.patch_size),
        self.context_patches, self.ratio, exact_count=True, multiple=BAND_LENGTH_MULTIPLE)

  def _wrapped(self, lengths: tuple[int, int | None]) -> parallel.DataParallel:
    if lengths not in self._mc:
      def body(params, key, images, train_roi, slice_ids):
        return self._body(params, key, images, train_roi, slice_ids, lengths=lengths)
      self._mc[lengths] = parallel.DataParallel(
          body, self.mode, num_args=5, sharded=(2, 3, 4), devices=list(self.devices),
          sharded_outputs=True)
    return self._mc[lengths]

  def local_chunks(self, params: Any, key: jax.Array, images: np.ndarray, train_roi: np.ndarray,
                   slice_ids: np.ndarray | None = None
                   ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Maps of the slices this process's devices compute, one chunk at a time.

    Every process of `devices` must iterate (the calls are collective) with the same arguments.

    Args:
      params: model parameters (host or device; placed replicated here).
      key: the maps' key; slice s uses `slice_keys(key, slice_ids[s])`.
      images: `[S, H, W]` float32 slices (un-augmented).
      train_roi: `[S, H, W]` bool train ROIs (the masked region).
      slice_ids: `[S]` distinct int indices of the slices in the set their keys come from
        (default `arange(S)`: the slices are the whole set). Each device returns the ids it
        drew keys from, checked against the ids sent.

    Yields:
      `(ids [r] int64, {name: [r, ...] numpy})` for each chunk with rows on this process: the
      slice indices and their maps (`outputs`; 'eu' / 'mean' / 'au' `[r, H, W]` float32,
      'patch_eu' `[r, N]` float32). Over all chunks and processes every slice comes exactly once.
    """
    num = images.shape[0]
    if num == 0:
      return
    if train_roi.shape != images.shape:
      raise ValueError(f"train_roi {train_roi.shape} and images {images.shape} differ")
    key_ids = np.arange(num) if slice_ids is None else np.asarray(slice_ids, np.int64)
    if key_ids.shape != (num,) or np.unique(key_ids).size != num or key_ids.min() < 0:
      raise ValueError(f"slice_ids must be {num} distinct indices >= 0, got {key_ids.tolist()}")
    chunk = self.chunk
    # Largest ROIs first; the last chunk is padded with its last (smallest-ROI) slice, whose
    # extra rows are dropped, so shapes stay fixed and padding never lengthens the encoder.
    order = np.argsort(-sliceset.roi_patch_count(train_roi, self.patch_size), kind="stable")
    positions = np.concatenate([order, np.full(-num % chunk, order[-1])])
    # This process's rows of a chunk: each local device's mesh-slot block, in turn.
    local = (self.local_positions[:, None] * self.per_device
             + np.arange(self.per_device)).reshape(-1)
    shape = (self.num_local_devices, self.per_device)
    params = self._gather.replicate(params)
    # A context band holds a few dozen tokens whatever the ROI size, so one pair of lengths
    # for the whole set costs little and compiles once (per-chunk lengths would compile a
    # function for nearly every chunk).
    band_lengths = None if self.context_patches is None else self._lengths(train_roi)
    pending = None
    for start in range(0, positions.size, chunk):
      rows = positions[start:start + chunk]
      fn = self._wrapped(band_lengths or self._lengths(train_roi[rows]))
      ids = rows[local]
      sent = key_ids[ids].astype(np.int32)
      result = fn(params, key, images[ids].reshape(shape + images.shape[1:] + (1,)),
                  train_roi[ids].reshape(shape + train_roi.shape[1:]), sent.reshape(shape))
      # Dispatched; read the previous chunk back while the devices work on this one.
      if pending is not None:
        yield self._read(*pending)
      pending = (fn, result, ids, sent, start + local < num)
    yield self._read(*pending)

  def _read(self, fn: parallel.DataParallel, result: tuple, ids: np.ndarray, sent: np.ndarray,
            valid: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    *maps, got = fn.local_rows(result)
    got = got.reshape(-1)
    if not np.array_equal(got, sent):
      raise RuntimeError(f"Monte-Carlo maps: the rows read back belong to slices {got.tolist()}, "
                         f"expected {sent.tolist()}; the device layout of the mesh disagrees "
                         "with this process's view of it")
    maps = {name: m.reshape((-1,) + m.shape[2:])[valid] for name, m in zip(self.outputs, maps)}
    return ids[valid].astype(np.int64), maps

  def exchange(self, num: int, ids: np.ndarray, arrays: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """This process's per-slice arrays -> every slice's, in every process (collective).

    Args:
      num: S, the number of slices.
      ids: `[R]` this process's slice indices (as yielded by `local_chunks`).
      arrays: `{name: [R, ...]}` small per-slice arrays (float32, int32 or bool).

    Returns:
      `{name: [S, ...]}` in slice order, identical in every process.

    Raises:
      RuntimeError: when the gathered ids do not name every slice exactly once.
    """
    # Every device sends the same number of rows: at most a whole device's share of the
    # chunks, known to every process without communication.
    capacity = -(-num // self.chunk) * self.per_device
    rows = self.num_local_devices * capacity
    if len(ids) > rows:
      raise ValueError(f"{len(ids)} rows on this process, more than its devices compute ({rows})")
    pad = rows - len(ids)
    send_ids = np.concatenate([np.asarray(ids, np.int32), np.full(pad, -1, np.int32)])
    send = {}
    for name, a in arrays.items():
      a = np.asarray(a)
      if a.shape[0] != len(ids):
        raise ValueError(f"{name}: {a.shape[0]} rows for {len(ids)} slice ids")
      # Bools travel as int32 (the gather is a psum).
      a = a.astype(np.int32) if a.dtype == bool else a
      send[name] = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
    shape = (self.num_local_devices, capacity)
    got_ids, got = self._gather(send_ids.reshape(shape),
                                {k: v.reshape(shape + v.shape[1:]) for k, v in send.items()})
    got_ids, got = parallel.to_host((got_ids, got))
    valid = got_ids >= 0
    if not np.array_equal(np.sort(got_ids[valid]), np.arange(num)):
      raise RuntimeError(f"Monte-Carlo maps: the processes returned slices "
                         f"{np.sort(got_ids[valid]).tolist()}, expected each of 0..{num - 1} "
                         "once; the processes disagree on the device layout of the mesh")
    out = {}
    for name, a in got.items():
      full = np.zeros((num,) + a.shape[1:], a.dtype)
      full[got_ids[valid]] = a[valid]
      out[name] = full.astype(bool) if np.asarray(arrays[name]).dtype == bool else full
    return out


def compute_maps(apply_fn: uncertainty.ApplyFn, params: Any, key: jax.Array,
                 images: np.ndarray, train_roi: np.ndarray, *,
                 slice_ids: np.ndarray | None = None,
                 progress: Callable[[int], None] | None = None,
                 mc: MonteCarloMaps | None = None,
                 **settings: Any) -> dict[str, np.ndarray]:
  """Every slice's maps `{name: [S, ...]}`: `MonteCarloMaps(apply_fn, **settings)` over this
  process's devices (default; with devices of several processes, only the slices of this
  process's devices are filled); `slice_ids` as in `local_chunks`; `progress(done)` after each
  chunk. No slices: `{}`.

  `mc`: an existing MonteCarloMaps to run instead (`apply_fn` and `settings` are then unused):
  its functions are compiled already, so maps of other parameters of the same model (a sweep
  over a run's checkpoints) cost no compilation.
  """
  if mc is None:
    settings.setdefault("devices", jax.local_devices())
    mc = MonteCarloMaps(apply_fn, **settings)
  out = {}
  done = 0
  for ids, maps in mc.local_chunks(params, key, images, train_roi, slice_ids):
    for name, m in maps.items():
      if name not in out:
        out[name] = np.zeros((images.shape[0],) + m.shape[1:], m.dtype)
      out[name][ids] = m
    done += len(ids)
    if progress is not None:
      progress(done)
  return out

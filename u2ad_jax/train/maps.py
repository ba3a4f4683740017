"""Regenerating the guidance maps during adaptation: Monte-Carlo EU / AU on every training slice.

For each slice (un-augmented), `uncertainty.mc_uncertainty` draws the exact-coverage masked
reconstructions (all passes in one vmapped call); the slices are sharded over every device of
every process (pmap or shard_map, like the train step) and the results all-gathered, so each
process ends with the maps of all slices. Chunk rows belong to mesh slots like the train step's
batch rows (slot m computes chunk rows `[m * c, (m + 1) * c)`, `parallel.mesh_positions`), and
every row travels with its slice id: the gathered ids are checked against the expected ones, so a
device layout that put a map on the wrong slice would stop the run instead of training on it. The host then keeps two per-patch arrays per slice:

  patch_eu `[S, N]` float32: the EU map summed over each patch (`patches.patch_sum`), the input
    of `masking.guided_mask`;
  exclude `[S, N]` bool: patches touching an AU anomaly candidate (`candidates.select_candidates`
    on the AU map restricted to the scoring ROI, then `candidate_patches`), never masked while AU
    exclusion is on. The AU map is made from the residual x - mean reconstruction as
    `config.candidates.residual` says (`u2ad_jax.anomaly`; 'absolute' = |x - mean|).

Slice s uses the key `fold_in(key, s)`, so its maps depend only on (params, key, slice), not on
the device count or chunking; the trainer derives `key` from (seed, stage, refresh epoch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from u2ad_jax import anomaly
from u2ad_jax import candidates
from u2ad_jax import patches
from u2ad_jax import uncertainty
from u2ad_jax.train import parallel


def _maps_body(params: Any, key: jax.Array, images: jax.Array, train_roi: jax.Array,
               slice_ids: jax.Array, *, apply_fn, patch_size: int, ratio: float,
               num_samples: int, pass_chunk: int | None, min_roi: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per device: `c` slices -> all devices' `(patch_eu [D*c, N], mean [D*c, H, W], ids [D*c])`."""
  def model_fn(p, x, plan):
    return apply_fn({"params": p}, x, plan)

  def one(slice_id, image, roi):
    out = uncertainty.mc_uncertainty(
        model_fn, params, jax.random.fold_in(key, slice_id), image[None], roi[None],
        patch_size=patch_size, ratio=ratio, num_samples=num_samples, pass_chunk=pass_chunk,
        min_roi=min_roi)
    return patches.patch_sum(out["eu"], patch_size)[0], out["mean"][0]

  patch_eu, mean = jax.vmap(one)(slice_ids, images, train_roi)
  return (parallel.gather_rows(patch_eu), parallel.gather_rows(mean),
          parallel.gather_rows(slice_ids))


@functools.lru_cache(maxsize=8)
def _cached_maps_fn(model, patch_size: int, ratio: float, num_samples: int,
                    pass_chunk: int | None, min_roi: int, mode: str,
                    devices: tuple) -> parallel.DataParallel:
  # Cached on hashable settings: repeated runs in one process compile the maps once.
  body = functools.partial(_maps_body, apply_fn=model.apply, patch_size=patch_size, ratio=ratio,
                           num_samples=num_samples, pass_chunk=pass_chunk, min_roi=min_roi)
  return parallel.DataParallel(body, mode, num_args=5, sharded=(2, 3, 4), devices=list(devices))


class MapGenerator:
  """Computes `{'patch_eu', 'exclude'}` for a SliceSet with the current parameters.

  Args:
    model: the flax module.
    config: the run config (masking.ratio, data.patch_size / min_roi_patches, uncertainty.*,
      candidates.*).
    mode: 'pmap' or 'shard_map'.
    devices: devices of all processes (default all).
  """

  def __init__(self, model: Any, config: Any, mode: str, devices=None):
    u = config.uncertainty
    self.patch_size = int(config.data.patch_size)
    self.per_device = max(1, int(u.slices_per_device))
    self.candidate_args = dict(percentile=float(config.candidates.percentile),
                               min_size=int(config.candidates.min_size),
                               top_k=config.candidates.top_k)
    # No default here: configs/base.py holds the one default, and a config without the key
    # fails (trainer.validate_config checks it before any work) instead of silently training
    # on another map.
    self.residual = config.candidates.get("residual")
    if self.residual not in anomaly.RESIDUALS:
      raise ValueError(f"config.candidates.residual={self.residual!r}; expected one of "
                       f"{anomaly.RESIDUALS}")
    pass_chunk = None if u.pass_chunk is None else int(u.pass_chunk)
    devices = tuple(jax.devices() if devices is None else devices)
    self.parallel = _cached_maps_fn(
        model, self.patch_size, float(config.masking.ratio), int(u.num_samples), pass_chunk,
        max(1, int(config.data.min_roi_patches)), mode, devices)

  def __call__(self, params: Any, key: jax.Array, slice_set: Any) -> dict[str, np.ndarray]:
    """Maps of every slice of `slice_set` (a sliceset.SliceSet).

    Args:
      params: replicated parameters (as held by the train state).
      key: map key of this refresh.
      slice_set: the stage's slices; only images, train_roi and score_roi are used.

    Returns:
      {'patch_eu': [S, N] float32, 'exclude': [S, N] bool} (numpy, identical in every process).
    """
    num = len(slice_set)
    dp = self.parallel
    chunk = dp.num_devices * self.per_device
    # Chunk rows of this process's devices: each local device's mesh-slot block, in turn.
    local_rows = (dp.local_positions[:, None] * self.per_device
                  + np.arange(self.per_device)).reshape(-1)
    # Pad the last chunk by repeating the last slice (real data, results dropped).
    positions = np.minimum(np.arange(-(-num // chunk) * chunk), num - 1)
    patch_eu, exclude = [], []
    for start in range(0, positions.size, chunk):
      ids = positions[start + local_rows]
      shape = (dp.num_local_devices, self.per_device)
      images = slice_set.images[ids].reshape(shape + slice_set.images.shape[1:] + (1,))
      rois = slice_set.train_roi[ids].reshape(shape + slice_set.train_roi.shape[1:])
      eu, mean, got = dp(params, key, images, rois, ids.astype(np.int32).reshape(shape))
      eu, mean, got = parallel.to_host((eu, mean, got))
      expected = positions[start:start + chunk]
      if not np.array_equal(got, expected):
        raise RuntimeError(
            f"map refresh: the gathered rows belong to slices {got.tolist()}, expected "
            f"{expected.tolist()}; the processes disagree on the device layout of the mesh")
      rows = positions[start:start + min(chunk, num - start)]
      score_roi = slice_set.score_roi[rows]
      # Per-slice centring (each slice its own group): see u2ad_jax.anomaly.
      au = anomaly.anomaly_maps(slice_set.images[rows], mean[:rows.size], score_roi, list(rows),
                                self.residual)
      cands = candidates.select_candidates_batch(au, score_roi, **self.candidate_args)
      patch_eu.append(np.asarray(eu[:rows.size], np.float32))
      exclude.append(candidates.candidate_patches(cands, self.patch_size))
    return {"patch_eu": np.concatenate(patch_eu), "exclude": np.concatenate(exclude)}


def gather_guidance(maps: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  """Per-example guidance inputs for a batch: `index [D, b]` (-1 = padding) -> `[D, b, N]` each.

  Padding rows get zero EU and no exclusion (they weigh 0 in the loss anyway).
  """
  valid = index >= 0
  safe = np.where(valid, index, 0)
  patch_eu = np.where(valid[..., None], maps["patch_eu"][safe], 0.0).astype(np.float32)
  exclude = valid[..., None] & maps["exclude"][safe]
  return {"patch_eu": patch_eu, "exclude": exclude}

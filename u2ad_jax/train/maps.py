"""Regenerating the guidance maps during adaptation: Monte-Carlo EU / AU on every training slice.

The training adapter of `u2ad_jax.mc_maps` (the one Monte-Carlo path, shared with evaluation):
the run config becomes its explicit arguments, the slices (un-augmented) are sharded over every
device of every process like the train step's batch, and each process turns the maps of the
slices its own devices computed into two per-patch arrays, once per slice:

  patch_eu `[S, N]` float32: the EU map summed over each patch (`patches.patch_sum`, on the
    device), the input of `masking.guided_mask`;
  exclude `[S, N]` bool: patches touching an AU anomaly candidate (`candidates.select_candidates`
    on the AU map restricted to the scoring ROI, then `candidate_patches`), never masked while AU
    exclusion is on. The AU map is made from the residual x - mean reconstruction as
    `config.candidates.residual` says (`u2ad_jax.anomaly`; 'absolute' = |x - mean|).

Only these small arrays are exchanged between processes (`MonteCarloMaps.exchange`, checked slice
by slice); the full-resolution means stay with the process that computed them. Slice s uses the
key `fold_in(key, s)` (`mc_maps.slice_keys`), so its maps depend only on (params, key, slice),
not on the device count, chunking or order; the trainer derives `key` from (seed, stage, refresh
epoch).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from u2ad_jax import anomaly
from u2ad_jax import candidates
from u2ad_jax import mc_maps
from u2ad_jax.train import step as step_lib


@functools.lru_cache(maxsize=8)
def _cached_maps(model, patch_size: int, ratio: float, num_samples: int, pass_chunk: int | None,
                 min_roi: int, slices_per_device: int, mode: str,
                 devices: tuple, context_patches: int | None) -> mc_maps.MonteCarloMaps:
  # Cached on hashable settings: the refreshes of a run (and repeated runs in one process)
  # compile the maps once per encoder length.
  def apply_fn(params, images, plan):
    return model.apply({"params": params}, images, plan)
  return mc_maps.MonteCarloMaps(
      apply_fn, patch_size=patch_size, ratio=ratio, num_samples=num_samples,
      pass_chunk=pass_chunk, min_roi=min_roi, slices_per_device=slices_per_device, mode=mode,
      devices=devices, outputs=("patch_eu", "mean"), context_patches=context_patches)


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
    self.candidate_args = dict(percentile=float(config.candidates.percentile),
                               min_size=int(config.candidates.min_size),
                               top_k=config.candidates.top_k)
    # No default here: configs/base.py holds the one default, and a config without the key
    # fails (settings.resolve checks it before any work) instead of silently training
    # on another map.
    self.residual = config.candidates.get("residual")
    if self.residual not in anomaly.RESIDUALS:
      raise ValueError(f"config.candidates.residual={self.residual!r}; expected one of "
                       f"{anomaly.RESIDUALS}")
    pass_chunk = None if u.pass_chunk is None else int(u.pass_chunk)
    devices = tuple(jax.devices() if devices is None else devices)
    self.maps = _cached_maps(
        model, self.patch_size, float(config.masking.ratio), int(u.num_samples), pass_chunk,
        max(1, int(config.data.min_roi_patches)), max(1, int(u.slices_per_device)), mode,
        devices, step_lib.context_patches(config))

  def __call__(self, params: Any, key: jax.Array, slice_set: Any) -> dict[str, np.ndarray]:
    """Maps of every slice of `slice_set` (a sliceset.SliceSet).

    Args:
      params: replicated parameters (as held by the train state).
      key: map key of this refresh.
      slice_set: the stage's slices; only images, train_roi and score_roi are used.

    Returns:
      {'patch_eu': [S, N] float32, 'exclude': [S, N] bool} (numpy, identical in every process).
    """
    num_patches = (slice_set.images.shape[1] // self.patch_size) * (
        slice_set.images.shape[2] // self.patch_size)
    ids = [np.zeros(0, np.int64)]
    patch_eu = [np.zeros((0, num_patches), np.float32)]
    exclude = [np.zeros((0, num_patches), bool)]
    for rows, maps in self.maps.local_chunks(params, key, slice_set.images, slice_set.train_roi):
      score_roi = slice_set.score_roi[rows]
      # Per-slice centring (each slice its own group): see u2ad_jax.anomaly.
      au = anomaly.anomaly_maps(slice_set.images[rows], maps["mean"], score_roi, list(rows),
                                self.residual)
      cands = candidates.select_candidates_batch(au, score_roi, **self.candidate_args)
      ids.append(rows)
      patch_eu.append(maps["patch_eu"].astype(np.float32))
      exclude.append(candidates.candidate_patches(cands, self.patch_size))
    return self.maps.exchange(len(slice_set), np.concatenate(ids),
                              {"patch_eu": np.concatenate(patch_eu),
                               "exclude": np.concatenate(exclude)})


def step_feed(batch: dict[str, np.ndarray], maps: dict[str, np.ndarray] | None, guided: bool,
              num_patches: int) -> dict[str, np.ndarray]:
  """The train step's host batch: the pipeline's slice indices and validity `[D, b]` (the step
  gathers the images from its device cohort) plus, in a guided stage, the rows' per-patch EU and
  AU-candidate patches `[D, b, N]` (`gather_guidance`; zeros when no epoch of the stage uses
  guidance). All the host does per step."""
  feed = {"index": batch["index"], "valid": batch["valid"]}
  if guided:
    if maps is not None:
      feed.update(gather_guidance(maps, batch["index"]))
    else:
      feed["patch_eu"] = np.zeros(batch["index"].shape + (num_patches,), np.float32)
      feed["exclude"] = np.zeros(batch["index"].shape + (num_patches,), bool)
  return feed


def gather_guidance(maps: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  """Per-example guidance inputs for a batch: `index [D, b]` (-1 = padding) -> `[D, b, N]` each.

  Padding rows get zero EU and no exclusion (they weigh 0 in the loss anyway).
  """
  valid = index >= 0
  safe = np.where(valid, index, 0)
  patch_eu = np.where(valid[..., None], maps["patch_eu"][safe], 0.0).astype(np.float32)
  exclude = valid[..., None] & maps["exclude"][safe]
  return {"patch_eu": patch_eu, "exclude": exclude}

"""ROI-restricted masking as pure functions, and the MaskPlan the model consumes.

Masking lives outside the model: a masking function decides a boolean `mask [B, N]`
(True = hidden from the encoder, reconstructed, counted in the loss) and `make_plan` turns it
into fixed-shape gather indices for the encoder.

Fixed shapes: the number of masked patches is exact per image (round(r * n_roi)) and therefore
varies across images, while jit needs a static encoder length `L`. The plan lists the visible
patches first (in ascending patch order) and pads to `L` with masked patches flagged by
`keep_valid = False`; the encoder excludes padded tokens from attention, so a padded plan gives
the same result as feeding only the visible tokens. `L = N` is always valid; a smaller `L`
(see `encoder_length`) saves compute when every image is known to mask at least `N - L` patches.

Context band (optional, `make_plan(..., active=...)`): the model then processes only the ACTIVE
patches (`context_band`: the ROI patches and their neighbours within a few patches), in the
encoder (the visible active ones) and in the decoder (all active ones, padded to a static `M`
with `active_valid = False`). The loss and the uncertainty only ever read masked ROI patches, and
every masked patch is active, so the band changes what the model may look at (a neighbourhood of
the spinal canal instead of the whole neck) and what it costs, not what it is scored on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MaskPlan(NamedTuple):
  """What the model needs to know about one batch's masking.

  Attributes:
    mask: `[B, N]` bool, True = masked (encoder does not see it; decoder gets the mask token).
    ids_keep: `[B, L]` int32 patch indices fed to the encoder, visible ones first (ascending),
      then padding.
    keep_valid: `[B, L]` bool, False for padding slots (masked patches beyond the visible count).
    ids_active: `[B, M]` int32 patch indices the decoder processes, active ones first
      (ascending), then padding; None = every patch (M = N, no padding).
    active_valid: `[B, M]` bool, False for padding slots; None with `ids_active`.
  """
  mask: jnp.ndarray
  ids_keep: jnp.ndarray
  keep_valid: jnp.ndarray
  ids_active: jnp.ndarray | None = None
  active_valid: jnp.ndarray | None = None


def masked_count(num_roi: jnp.ndarray, ratio: float) -> jnp.ndarray:
  """Exact per-image masked count: round-half-up of `ratio * num_roi` (int32, same shape)."""
  return jnp.floor(ratio * num_roi.astype(jnp.float32) + 0.5).astype(jnp.int32)


def encoder_length(num_patches: int, ratio: float, min_roi_patches: int) -> int:
  """Static encoder length `L` that fits every image with at least `min_roi_patches` ROI patches.

  Such an image masks at least round(ratio * min_roi_patches) patches, so at most `N - that`
  are visible. Images with fewer ROI patches still work: their extra visible patches beyond L
  would be dropped, which `make_plan` prevents by requiring L >= visible count; use L = N there.
  """
  min_masked = int(math.floor(ratio * min_roi_patches + 0.5))
  return max(1, num_patches - min_masked)


def _make_plan_single(mask: jnp.ndarray, num_keep: int) -> MaskPlan:
  # Stable sort puts visible patches first in ascending index order, masked after.
  order = jnp.argsort(mask.astype(jnp.int32), stable=True).astype(jnp.int32)
  ids_keep = order[:num_keep]
  keep_valid = ~mask[ids_keep]
  return MaskPlan(mask=mask, ids_keep=ids_keep, keep_valid=keep_valid)


def _first_true(flags: jnp.ndarray, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`[N]` bool -> (`[length]` int32 indices of the True entries first, ascending, then the
  others; `[length]` bool: which slots hold a True entry)."""
  order = jnp.argsort(~flags, stable=True).astype(jnp.int32)[:length]
  return order, flags[order]


def _make_band_plan_single(mask: jnp.ndarray, active: jnp.ndarray, num_keep: int,
                           num_active: int) -> MaskPlan:
  ids_keep, keep_valid = _first_true(active & ~mask, num_keep)
  ids_active, active_valid = _first_true(active, num_active)
  return MaskPlan(mask=mask, ids_keep=ids_keep, keep_valid=keep_valid, ids_active=ids_active,
                  active_valid=active_valid)


def make_plan(mask: jnp.ndarray, num_keep: int | None = None, *,
              active: jnp.ndarray | None = None, num_active: int | None = None) -> MaskPlan:
  """`mask [B, N]` bool -> MaskPlan with static encoder length `num_keep` (default N).

  Without `active`, the encoder sees every visible patch and the decoder every patch. The caller
  guarantees that every image has at most `num_keep` visible patches (true for `num_keep = N`,
  and for `encoder_length(...)` when the slice filter enforces its minimum ROI).

  With `active` (`[B, N]` bool, e.g. `context_band(...)`), only active patches enter the model:
  the encoder gets the visible active ones (`num_keep` slots, default `num_active`) and the
  decoder the active ones (`num_active` slots, default N). Every masked patch must be active,
  and every image must have at most `num_active` active and `num_keep` visible active patches
  (`band_lengths` computes such lengths on the host); entries beyond a slot count are dropped.
  """
  n = mask.shape[-1]
  if active is None:
    if num_active is not None:
      raise ValueError("num_active needs an active patch set")
    num_keep = n if num_keep is None else int(num_keep)
    if not 0 < num_keep <= n:
      raise ValueError(f"num_keep must be in [1, {n}], got {num_keep}")
    return jax.vmap(lambda m: _make_plan_single(m, num_keep))(mask)
  if active.shape != mask.shape:
    raise ValueError(f"active {active.shape} and mask {mask.shape} must have one shape")
  num_active = n if num_active is None else int(num_active)
  num_keep = num_active if num_keep is None else int(num_keep)
  if not 0 < num_active <= n or not 0 < num_keep <= num_active:
    raise ValueError(f"need 0 < num_keep ({num_keep}) <= num_active ({num_active}) <= {n}")
  return jax.vmap(lambda m, a: _make_band_plan_single(m, a, num_keep, num_active))(
      mask, active.astype(bool))


def context_band(roi_patches: jnp.ndarray, grid: tuple[int, int], radius: int) -> jnp.ndarray:
  """`[B, N]` ROI patches -> `[B, N]` bool: the patches within `radius` patches (a square of
  side `2 * radius + 1`) of an ROI patch, the ROI included. The model's field of view with a
  context band; an image without ROI patches has an empty band."""
  if int(radius) < 0:
    raise ValueError(f"context radius must be >= 0, got {radius}")
  b = roi_patches.shape[0]
  gh, gw = grid
  side = 2 * int(radius) + 1
  grid_mask = roi_patches.reshape(b, gh, gw).astype(jnp.float32)
  near = jax.lax.reduce_window(grid_mask, 0.0, jax.lax.max, (1, side, side), (1, 1, 1), "SAME")
  return near.reshape(b, gh * gw) > 0


def round_up(value: int, multiple: int, cap: int) -> int:
  """`value` rounded up to a multiple of `multiple`, at most `cap` (and at least 1)."""
  return int(min(cap, max(1, -(-int(value) // int(multiple)) * int(multiple))))


def band_lengths(roi_patches: np.ndarray, grid: tuple[int, int], radius: int, ratio: float, *,
                 exact_count: bool, multiple: int = 8) -> tuple[int, int]:
  """Host side: static `(num_keep, num_active)` for the band plans of these images.

  Args:
    roi_patches: `[S, N]` bool ROI patches of every image the plans will be made for (a whole
      cohort for the train step, one chunk for the MC maps).
    grid: the patch grid.
    radius: context radius in patches (`context_band`).
    ratio: masking ratio r.
    exact_count: True when every image masks exactly `masked_count(n_roi, ratio)` patches
      (random masking, MC passes): the encoder then needs only `max(active - masked)` slots.
      False (guided masking, where AU exclusion can mask fewer): `num_keep = num_active`.
    multiple: rounding of both lengths, so that similar sets share one compilation.
  """
  roi_patches = np.asarray(roi_patches, bool)
  n = roi_patches.shape[-1]
  active = np.asarray(context_band(jnp.asarray(roi_patches), grid, radius))
  active_count = active.sum(-1)
  num_active = round_up(active_count.max(initial=1), multiple, n)
  if not exact_count:
    return num_active, num_active
  masked = np.floor(ratio * roi_patches.sum(-1) + 0.5).astype(np.int64)
  # One patch of slack: `masked_count` runs in float32 on the device and may round a .5 case
  # the other way.
  visible = active_count - np.maximum(masked - 1, 0)
  return round_up(visible.max(initial=1), multiple, num_active), num_active


# ----------------------------------------------------------------------------------------------
# Masking policies. All share one core: per-image scores (logits + Gumbel noise) over eligible
# patches, ranked, and the top `k` masked where `k = masked_count(n_roi, ratio)`. A rank test
# instead of `lax.top_k` keeps shapes static although `k` varies per image.
# ----------------------------------------------------------------------------------------------


def _rank_descending(scores: jnp.ndarray) -> jnp.ndarray:
  """`[N]` -> `[N]` int32: 0 for the largest score, N-1 for the smallest (ties: lower index first)."""
  order = jnp.argsort(-scores, stable=True)
  return jnp.argsort(order, stable=True).astype(jnp.int32)


def _gumbel_top_count(key: jax.Array, eligible: jnp.ndarray, count: jnp.ndarray,
                      logits: jnp.ndarray) -> jnp.ndarray:
  """One image: mask the `count` eligible patches with the largest `logits + Gumbel` (`[N]` bool).

  Gumbel-top-k draws `count` patches without replacement with probabilities proportional to
  `softmax(logits)` over the eligible set, renormalised after every draw. When fewer than `count`
  patches are eligible all of them are masked. Non-eligible patches get -inf and can never pass
  the `eligible` test anyway; the -inf only keeps them out of the top ranks.
  """
  noise = jax.random.gumbel(key, eligible.shape, dtype=jnp.float32)
  scores = jnp.where(eligible, logits.astype(jnp.float32) + noise, -jnp.inf)
  return eligible & (_rank_descending(scores) < count)


def random_mask(key: jax.Array, roi_patches: jnp.ndarray, ratio: float) -> jnp.ndarray:
  """Uniform ROI masking with an exact count per image.

  Args:
    key: PRNG key; split into one key per image (image `b` uses `jax.random.split(key, B)[b]`).
    roi_patches: `[B, N]` bool, True for patches that touch the ROI.
    ratio: fraction of each image's ROI patches to mask (python float or traced scalar).

  Returns:
    `[B, N]` bool mask: exactly `masked_count(n_roi_b, ratio)` patches of image `b`, chosen
    uniformly among its ROI patches; non-ROI patches are never masked; an image without ROI
    patches masks nothing. Identical, key for key, to `guided_mask(..., w_eu=0)` without exclusion.
  """
  zeros = jnp.zeros(roi_patches.shape, jnp.float32)
  return guided_mask(key, roi_patches, ratio, zeros, w_eu=0.0, tau=1.0, exclude=None)


def normalize_patch_uncertainty(roi_patches: jnp.ndarray,
                                patch_uncertainty: jnp.ndarray) -> jnp.ndarray:
  """`[B, N]` -> `[B, N]`: uncertainty divided by its per-image mean over ROI patches.

  Makes the guidance temperature independent of the intensity scale of the EU maps. Non-finite
  values are treated as 0 (so the masked count stays exact; a diverging model is caught by the
  training loop's non-finite loss check), and an image whose ROI mean is not positive (no ROI,
  or zero uncertainty everywhere) gets all zeros, i.e. uniform masking. Non-ROI entries are 0.
  """
  roi = roi_patches.astype(bool)
  u = jnp.where(roi & jnp.isfinite(patch_uncertainty), patch_uncertainty.astype(jnp.float32), 0.)
  n_roi = roi.sum(axis=-1, keepdims=True)
  mean = u.sum(axis=-1, keepdims=True) / jnp.maximum(n_roi, 1).astype(jnp.float32)
  safe_mean = jnp.where(mean > 0, mean, 1.0)
  return jnp.where((mean > 0) & roi, u / safe_mean, 0.0)


def guided_mask(key: jax.Array, roi_patches: jnp.ndarray, ratio: float,
                patch_uncertainty: jnp.ndarray, w_eu: float | jnp.ndarray,
                tau: float | jnp.ndarray, exclude: jnp.ndarray | None = None) -> jnp.ndarray:
  """EU-guided ROI masking with AU exclusion (Gumbel-top-k), exact count per image.

  Patch `i` of an image is drawn without replacement with probability
  `softmax(w_eu * u_norm_i / tau)` over the image's ELIGIBLE patches (`roi & ~exclude`), where
  `u_norm` is the patch uncertainty divided by its mean over the image's ROI patches
  (`normalize_patch_uncertainty`). With `w_eu > 0`, high-uncertainty patches are MORE likely to be
  masked. `w_eu = 0` (or `tau = inf`) gives exactly the uniform draw of `random_mask`, key for key.

  Count: `k = masked_count(n_roi, ratio)` counted on the FULL ROI, so AU exclusion does not change
  how much of the image is hidden. When fewer than `k` patches are eligible (many candidates),
  every eligible patch is masked and the image masks fewer than `k`; an image with no ROI patch
  masks nothing. Excluded and non-ROI patches are never masked.

  Args:
    key: PRNG key; split into one key per image.
    roi_patches: `[B, N]` bool ROI patches.
    ratio: masking ratio r (python float or traced scalar).
    patch_uncertainty: `[B, N]` float, e.g. `patches.patch_sum(eu_map, p)`; values outside the ROI
      are ignored.
    w_eu: guidance weight (scalar, may be traced: it comes from a schedule).
    tau: temperature > 0 (scalar, may be traced). Ignored when `w_eu == 0`.
    exclude: optional `[B, N]` bool, True for patches that must stay visible (AU candidates).

  Returns:
    `[B, N]` bool mask, True = masked.
  """
  roi = roi_patches.astype(bool)
  eligible = roi if exclude is None else roi & ~exclude.astype(bool)
  count = masked_count(roi.sum(axis=-1), ratio)
  w_eu = jnp.asarray(w_eu, jnp.float32)
  tau = jnp.asarray(tau, jnp.float32)
  # w_eu == 0 must mean "uniform" whatever tau is (tau = 0 would otherwise give 0/0 = nan).
  scale = jnp.where(w_eu == 0, 0.0, w_eu / jnp.where(w_eu == 0, 1.0, tau))
  logits = scale * normalize_patch_uncertainty(roi, patch_uncertainty)
  keys = jax.random.split(key, roi.shape[0])
  return jax.vmap(_gumbel_top_count)(keys, eligible, count, logits)

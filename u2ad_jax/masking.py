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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskPlan(NamedTuple):
  """What the model needs to know about one batch's masking.

  Attributes:
    mask: `[B, N]` bool, True = masked (encoder does not see it; decoder gets the mask token).
    ids_keep: `[B, L]` int32 patch indices fed to the encoder, visible ones first (ascending),
      then padding.
    keep_valid: `[B, L]` bool, False for padding slots (masked patches beyond the visible count).
  """
  mask: jnp.ndarray
  ids_keep: jnp.ndarray
  keep_valid: jnp.ndarray


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
  n = mask.shape[0]
  # Stable sort puts visible patches first in ascending index order, masked after.
  order = jnp.argsort(mask.astype(jnp.int32), stable=True).astype(jnp.int32)
  ids_keep = order[:num_keep]
  keep_valid = ~mask[ids_keep]
  del n
  return MaskPlan(mask=mask, ids_keep=ids_keep, keep_valid=keep_valid)


def make_plan(mask: jnp.ndarray, num_keep: int | None = None) -> MaskPlan:
  """`mask [B, N]` bool -> MaskPlan with static encoder length `num_keep` (default N).

  The caller guarantees that every image has at most `num_keep` visible patches (true for
  `num_keep = N`, and for `encoder_length(...)` when the slice filter enforces its minimum ROI).
  """
  n = mask.shape[-1]
  num_keep = n if num_keep is None else int(num_keep)
  if not 0 < num_keep <= n:
    raise ValueError(f"num_keep must be in [1, {n}], got {num_keep}")
  return jax.vmap(lambda m: _make_plan_single(m, num_keep))(mask)

"""Patch-grid helpers shared by the model, masking, loss and Monte-Carlo uncertainty.

Convention: images are `[B, H, W, C]`; the patch grid is row-major, so patch `n` covers rows
`(n // (W/p)) * p ...` and columns `(n % (W/p)) * p ...`. `N = (H/p) * (W/p)`.
"""

from __future__ import annotations

import jax.numpy as jnp


def grid_shape(image_size: tuple[int, int] | int, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of the patch grid; raises when the size is not a multiple of the patch."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {(h, w)} is not a multiple of patch size {patch_size}")
  return h // patch_size, w // patch_size


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """`[B, H, W, C]` -> `[B, N, p*p*C]` (row-major patches, pixels row-major inside a patch)."""
  b, h, w, c = images.shape
  gh, gw = grid_shape((h, w), patch_size)
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: jnp.ndarray, patch_size: int, grid: tuple[int, int],
               channels: int = 1) -> jnp.ndarray:
  """`[B, N, p*p*C]` -> `[B, H, W, C]`; inverse of `patchify`."""
  b = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(b, gh, gw, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch_size, gw * patch_size, channels)


def patch_any(pixel_mask: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """`[B, H, W]` bool -> `[B, N]` bool: True where the patch contains any True pixel.

  This is how ROI patches are defined: a patch is in the ROI when it touches an ROI pixel.
  """
  p = patchify(pixel_mask[..., None].astype(jnp.float32), patch_size)
  return p.max(axis=-1) > 0


def patch_sum(pixel_map: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """`[B, H, W]` -> `[B, N]`: the sum of the map over each patch (e.g. patch uncertainty)."""
  return patchify(pixel_map[..., None], patch_size).sum(axis=-1)


def patch_to_pixels(patch_values: jnp.ndarray, patch_size: int,
                    grid: tuple[int, int]) -> jnp.ndarray:
  """`[B, N]` -> `[B, H, W]`: broadcast one value per patch to its pixels."""
  b, n = patch_values.shape
  per_pixel = jnp.broadcast_to(patch_values[..., None], (b, n, patch_size * patch_size))
  return unpatchify(per_pixel, patch_size, grid, channels=1)[..., 0]

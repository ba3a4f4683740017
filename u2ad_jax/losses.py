"""U2AD's training loss: masked, ROI-restricted reconstruction of the image and its Sobel edges.

Pure functions of arrays; the model's predictions and the batch go in, a scalar comes out.

Which pixels count: a pixel contributes when it lies inside the train ROI AND its patch is masked.
Predictions outside the ROI are replaced by the target before the error is taken (as in the
original release), so their error is exactly 0 and they receive no gradient; visible patches are
dropped by the patch weighting.

Normalisation (as in the original release):
  per patch: mean over ALL p*p pixels of the patch of `structure_weight * squared error` (pixels
    outside the ROI contribute 0 but still count in the p*p denominator, so a patch's loss
    scales with its ROI coverage);
  over patches: the mean over all masked patches of the batch, pooled (every masked patch weighs
    the same, whichever image it belongs to), i.e. `sum(loss * mask) / sum(mask)`. An image
    with no masked patches contributes nothing; a batch without masked patches gives 0.
  `example_weight [B]` (e.g. 0 for padding examples) multiplies each image's masked patches in
  both sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from u2ad_jax import patches as patch_lib

def sobel_edges(images: jnp.ndarray) -> jnp.ndarray:
  """Sobel gradient magnitude, clipped to 1: `[B, H, W, 1]` -> `[B, H, W, 1]` float32.

  Kernels: d/dx = [1, 2, 1]^T (rows) x [-1, 0, 1] (columns) and its transpose for d/dy,
  NOT normalised (not divided by 8): a unit step between two flat regions gives 4 and saturates
  at the clip value 1, as does any step steeper than 0.25 of the [0, 1] range; a ramp of slope
  s per pixel gives 8 s. (A kernel divided by 8 could never exceed sqrt(2) / 2, making the clip
  moot.) Replicate ("edge") padding, so a flat image has zero edges at its borders too.
  Computed separably (difference, then [1, 2, 1] smoothing), which is exact on flat regions.
  The magnitude's gradient at 0 is defined as 0 (no NaN through sqrt).
  """
  x = jnp.pad(images.astype(jnp.float32)[..., 0], ((0, 0), (1, 1), (1, 1)), mode="edge")
  diff_cols = x[:, :, 2:] - x[:, :, :-2]  # [B, H+2, W]
  diff_rows = x[:, 2:, :] - x[:, :-2, :]  # [B, H, W+2]
  gx = diff_cols[:, :-2] + 2.0 * diff_cols[:, 1:-1] + diff_cols[:, 2:]
  gy = diff_rows[:, :, :-2] + 2.0 * diff_rows[:, :, 1:-1] + diff_rows[:, :, 2:]
  squared = gx * gx + gy * gy
  positive = squared > 0
  magnitude = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return jnp.minimum(magnitude, 1.0)[..., None]


def structure_weight(mask: jnp.ndarray, grid: tuple[int, int]) -> jnp.ndarray:
  """Per-patch weight `1 + avgpool3x3(mask)`: `mask [B, N]` bool -> `[B, N]` float32 in [1, 2].

  The 3x3 average over the row-major patch grid is zero-padded and always divided by 9
  (count_include_pad, as PyTorch's avg_pool2d default): an isolated masked patch weighs 1 + 1/9,
  a masked patch whose 8 neighbours are masked weighs 2, a fully masked corner 1 + 4/9.
  Masked patches inside large masked regions are harder to in-paint and weigh more.
  """
  b = mask.shape[0]
  gh, gw = grid
  m = mask.astype(jnp.float32).reshape(b, gh, gw)
  padded = jnp.pad(m, ((0, 0), (1, 1), (1, 1)))
  window_sum = sum(padded[:, i:i + gh, j:j + gw] for i in range(3) for j in range(3))
  return (1.0 + window_sum / 9.0).reshape(b, gh * gw)


def _masked_patch_mean(squared_error: jnp.ndarray, patch_weight: jnp.ndarray,
                       patch_size: int) -> jnp.ndarray:
  """`[B, H, W, 1]` pixel errors, `[B, N]` patch weights (0 for unmasked) -> scalar."""
  per_patch = patch_lib.patchify(squared_error, patch_size).mean(axis=-1)  # [B, N]
  return (per_patch * patch_weight).sum()


def reconstruction_loss(recon: jnp.ndarray, edge: jnp.ndarray, images: jnp.ndarray,
                        train_roi: jnp.ndarray, mask: jnp.ndarray, patch_size: int,
                        image_weight: float = 10.0, edge_weight: float = 1.0,
                        use_structure_weight: bool = True,
                        example_weight: jnp.ndarray | None = None,
                        ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """U2AD loss `image_weight * image + edge_weight * edge` (see the module docstring).

  Args:
    recon, edge: model outputs `[B, H, W, 1]`.
    images: targets `[B, H, W, 1]` in [0, 1]; the edge target is `sobel_edges(images)`.
    train_roi: `[B, H, W]` bool, pixels that may count.
    mask: `[B, N]` bool, True = masked patch (the ones that count).
    patch_size: p.
    image_weight, edge_weight: weights of the two terms (paper 10 : 1).
    use_structure_weight: multiply pixel errors by `structure_weight(mask)`; else weight 1.
    example_weight: optional `[B]` float/bool, e.g. 0 for padding examples of a batch.

  Returns:
    (total scalar, {'image': scalar, 'edge': scalar}) float32.
  """
  b, h, w, _ = images.shape
  grid = patch_lib.grid_shape((h, w), patch_size)
  images = images.astype(jnp.float32)
  edge_target = jax.lax.stop_gradient(sobel_edges(images))
  roi = train_roi[..., None]
  # Outside the ROI the prediction is replaced by the target: zero error and zero gradient.
  recon = jnp.where(roi, recon.astype(jnp.float32), images)
  edge = jnp.where(roi, edge.astype(jnp.float32), edge_target)

  masked = mask.astype(jnp.float32)
  if example_weight is not None:
    masked = masked * example_weight.astype(jnp.float32).reshape(b, 1)
  weight = masked * structure_weight(mask, grid) if use_structure_weight else masked
  # Pooled mean over masked patches; a batch with nothing masked gives 0 / 1 = 0.
  count = masked.sum()
  denominator = jnp.where(count > 0, count, 1.0)
  image_loss = _masked_patch_mean((recon - images) ** 2, weight, patch_size) / denominator
  edge_loss = _masked_patch_mean((edge - edge_target) ** 2, weight, patch_size) / denominator
  total = image_weight * image_loss + edge_weight * edge_loss
  return total, {"image": image_loss, "edge": edge_loss}

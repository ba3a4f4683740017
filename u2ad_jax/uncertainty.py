"""Monte-Carlo epistemic / aleatoric uncertainty from masked reconstructions, with exact coverage.

Every ROI patch must be masked (and therefore reconstructed) at least K times. Instead of drawing
random masks until that happens (the original: up to 400 sequential passes per image), the ROI
patches of an image get one random order and pass `j` masks the cyclic window of
`m = masked_count(n, r)` positions starting at `j * m`. Over `P` passes the windows tile the
positions `0 ... P*m - 1` modulo `n`, so every patch is masked `floor(P*m/n)` or `ceil(P*m/n)`
times; `num_passes` picks the smallest `P` with `floor(P*m/n) >= K` for every ROI size. The
passes are independent given the order, so they run as ONE model call over a batch of
`passes x images` rows (optionally in sequential chunks of passes).

Per pixel, over the passes where its patch was masked:
  mean = mean reconstruction, EU = variance of the reconstructions, AU = |x - mean|.
Pixels of patches that were never masked (outside the train-ROI patches) keep the input:
mean = x exactly, EU = 0, AU = 0.

`u2ad_jax.mc_maps` runs this over a whole slice set and every device (training and evaluation).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from u2ad_jax import masking
from u2ad_jax import patches

# apply_fn(params, images [B,H,W,1], plan) -> (recon [B,H,W,1], edge [B,H,W,1], aux dict).
ApplyFn = Callable[..., tuple[jnp.ndarray, jnp.ndarray, dict]]


def _masked_counts_conservative(ratio: float, sizes: np.ndarray) -> np.ndarray:
  """Smallest value `masked_count(n, ratio)` can take for each `n` (host side).

  `masked_count` runs in float32 on the device; a value `ratio * n` that sits on a .5 boundary
  could round differently in float64, in float32, or under a fused multiply-add, so take the
  minimum of these evaluations (a smaller `m` only makes `P` larger, never breaks coverage).
  """
  m64 = np.floor(ratio * sizes.astype(np.float64) + 0.5)
  m32 = np.floor(np.float32(ratio) * sizes.astype(np.float32) + np.float32(0.5))
  # Fused multiply-add: float32 ratio times n is exact in float64, one rounding at the end.
  m_fma = np.floor(float(np.float32(ratio)) * sizes.astype(np.float64) + 0.5)
  with jax.ensure_compile_time_eval():  # concrete even when called while tracing
    device = np.asarray(masking.masked_count(jnp.asarray(sizes, jnp.int32), ratio))
  return np.minimum.reduce([m64, m32, m_fma, device.astype(np.float64)]).astype(np.int64)


def num_passes(num_samples: int, ratio: float, num_patches: int, *, min_roi: int = 1) -> int:
  """Static number of MC passes `P` that masks every ROI patch at least `num_samples` times.

  `P` is the smallest integer with `P * m(n) >= K * n` for every ROI size `n` in
  `[min_roi, num_patches]`, where `m(n) = masked_count(n, ratio)` is what one pass masks. Because
  pass `j` masks the cyclic window starting at `j * m`, a patch is masked `floor(P*m/n)` or
  `ceil(P*m/n)` times, so this condition is exactly `min count >= K`.

  Compared with the method's `ceil(K / r)`: rounding `m` down for small `n` needs a few more
  passes, e.g. K = 10, r = 0.75 gives ceil(K/r) = 14, but n = 3 masks m = 2 per pass and needs 15
  (with `min_roi >= 4`, 14 suffices).

  Args:
    num_samples: K >= 1, the minimum number of reconstructions per ROI patch.
    ratio: masking ratio r in (0, 1].
    num_patches: N, the largest possible ROI size.
    min_roi: smallest ROI size that must be covered (images with fewer ROI patches still get
      masks, but may be covered fewer than K times; their `count` output says so).

  Raises:
    ValueError: for invalid arguments, or when some covered size masks nothing per pass
      (`masked_count(n, ratio) == 0`, e.g. r < 0.5 and n = 1), where no P can cover it.
  """
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"ratio must be in (0, 1], got {ratio}")
  if not 1 <= int(min_roi) <= int(num_patches):
    raise ValueError(f"min_roi must be in [1, num_patches={num_patches}], got {min_roi}")
  sizes = np.arange(int(min_roi), int(num_patches) + 1)
  per_pass = _masked_counts_conservative(float(ratio), sizes)
  if np.any(per_pass <= 0):
    bad = int(sizes[np.argmax(per_pass <= 0)])
    raise ValueError(
        f"ratio {ratio} masks 0 patches of an image with {bad} ROI patch(es), so no number of "
        f"passes covers it; raise min_roi above {bad} or use a larger ratio")
  needed = -(-int(num_samples) * sizes // per_pass)  # ceil(K * n / m) per size
  return int(needed.max())


def mc_encoder_length(train_roi, patch_size: int, ratio: float, *, multiple: int = 64) -> int:
  """Host side: a static `num_keep` (<= N) for `mc_uncertainty` on these images.

  Every MC pass of an image with `n` ROI patches masks exactly `masked_count(n, ratio)` of them,
  so no pass leaves more than `N - min_b masked_count(n_b)` patches visible; the encoder needs no
  longer sequence (results equal those with `num_keep = N`), and encoder attention cost grows
  with L^2 (savings measured in benchmarks/README.md). The length is rounded up to a multiple
  of `multiple` (capped at N) so that batches with similar ROI sizes share one compilation. A
  batch with an empty ROI (e.g. padding) gives N.

  Args:
    train_roi: `[B, H, W]` bool (numpy or jax) train ROIs of the images of ONE call.
    patch_size: p.
    ratio: masking ratio r.
    multiple: rounding of L (1 = exact).
  """
  roi_patches = np.asarray(patches.patch_any(jnp.asarray(np.asarray(train_roi, bool)),
                                             patch_size))
  n_patches = roi_patches.shape[-1]
  min_masked = int(_masked_counts_conservative(float(ratio), roi_patches.sum(-1)).min())
  length = max(1, n_patches - min_masked)
  return int(min(n_patches, -(-length // int(multiple)) * int(multiple)))


def _mc_masks_single(key: jax.Array, roi: jnp.ndarray, ratio: float,
                     passes: int) -> jnp.ndarray:
  """One image: `[N]` bool ROI -> `[P, N]` bool cyclic-window masks."""
  n = roi.sum().astype(jnp.int32)
  m = masking.masked_count(n, ratio)
  # Random order of the ROI patches: ROI ranks are 0..n-1, non-ROI patches rank after them.
  noise = jax.random.uniform(key, roi.shape)
  rank = jnp.argsort(jnp.argsort(jnp.where(roi, noise, 2.0), stable=True), stable=True)
  starts = jnp.arange(passes, dtype=jnp.int32) * m  # window start of pass j (before mod n)
  offset = jnp.mod(rank[None, :].astype(jnp.int32) - starts[:, None], jnp.maximum(n, 1))
  return roi[None, :] & (offset < m)


def mc_masks(key: jax.Array | None, roi_patches: jnp.ndarray, ratio: float,
             passes: int, *, image_keys: jax.Array | None = None) -> jnp.ndarray:
  """Exact-coverage masks for all MC passes.

  Args:
    key: PRNG key, split into one key per image (ignored when `image_keys` is given).
    roi_patches: `[B, N]` bool.
    ratio: masking ratio r (python float or traced scalar).
    passes: static P (see `num_passes`).
    image_keys: optional `[B]` per-image keys, used as they are.

  Returns:
    `[P, B, N]` bool. With `n` ROI patches and `m = masked_count(n, ratio)`, the image's ROI
    patches get a random rank `0..n-1` and pass `j` masks those with `(rank - j*m) mod n < m`:
    every pass masks exactly `m` ROI patches (like training), non-ROI patches are never masked,
    and each ROI patch is masked `floor(P*m/n)` or `ceil(P*m/n)` times in total.
  """
  keys = jax.random.split(key, roi_patches.shape[0]) if image_keys is None else image_keys
  per_image = jax.vmap(lambda k, r: _mc_masks_single(k, r, ratio, int(passes)))(
      keys, roi_patches.astype(bool))  # [B, P, N]
  return jnp.swapaxes(per_image, 0, 1)


def mc_uncertainty(apply_fn: ApplyFn, params, key: jax.Array | None, images: jnp.ndarray,
                   train_roi: jnp.ndarray, *, patch_size: int, ratio: float,
                   num_samples: int, num_keep: int | None = None,
                   pass_chunk: int | None = None, min_roi: int = 1,
                   image_keys: jax.Array | None = None, context_patches: int | None = None,
                   num_active: int | None = None) -> dict[str, jnp.ndarray]:
  """EU, mean reconstruction and AU maps from P exact-coverage masked reconstructions.

  jit-friendly: everything except `params`, `key`, `images`, `train_roi` and `image_keys` must be
  static (bind them with `functools.partial` before `jax.jit`; `u2ad_jax.mc_maps` runs it over
  slice sets and devices).

  Args:
    apply_fn: `apply_fn(params, images [B,H,W,1], plan: MaskPlan) -> (recon [B,H,W,1], edge, aux)`;
      each image's output must depend on its own row only (true of the model): the passes are
      run as extra rows of one batch of `P * B` (or `pass_chunk * B`) images.
    params: model parameters (closed over; not vmapped).
    key: PRNG key for the random patch orders, split into one key per image (`mc_masks`);
      None when `image_keys` is given.
    images: `[B, H, W, 1]` float inputs (un-augmented).
    train_roi: `[B, H, W]` bool train ROI; its patches are the ones masked.
    patch_size: p.
    ratio: masking ratio r (static python float).
    num_samples: K, minimum reconstructions per ROI patch.
    num_keep: static encoder length for `make_plan` (default N).
    pass_chunk: when set and < P, run the passes in sequential chunks (`lax.map`) of this many
      passes (a model batch of `pass_chunk * B` rows) to bound activation memory; results are
      identical up to float rounding.
    min_roi: smallest ROI size guaranteed K reconstructions (see `num_passes`).
    image_keys: optional `[B]` per-image keys instead of splitting `key`: a batch split over
      devices keeps the masks of its one-device run when each device gets its rows of
      `jax.random.split(key, B)`.
    context_patches: None = the model sees every patch; r = only the context band of radius r
      around the ROI patches (`masking.context_band`), as the model was trained.
    num_active: with a band, its static decoder length (`masking.band_lengths`; `num_keep` is
      then the band's encoder length).

  Returns:
    dict with
      'eu': `[B, H, W]` float32 population variance (ddof 0) of the reconstructions over the
        passes that masked the pixel's patch; 0 where never masked.
      'mean': `[B, H, W]` float32 mean reconstruction; the input itself where never masked.
      'au': `[B, H, W]` float32 `|x - mean|` (0 where never masked).
      'count': `[B, N]` int32 number of passes that masked each patch (0 outside the ROI).
  """
  b, h, w, c = images.shape
  if c != 1:
    raise ValueError(f"images must be [B, H, W, 1], got {images.shape}")
  if train_roi.shape != (b, h, w):
    raise ValueError(f"train_roi must be {(b, h, w)}, got {train_roi.shape}")
  grid = patches.grid_shape((h, w), patch_size)
  n_patches = grid[0] * grid[1]
  passes = num_passes(num_samples, ratio, n_patches, min_roi=min_roi)
  roi_patches = patches.patch_any(train_roi.astype(bool), patch_size)
  if key is None and image_keys is None:
    raise ValueError("mc_uncertainty needs a key or per-image keys")
  masks = mc_masks(key, roi_patches, ratio, passes, image_keys=image_keys)  # [P, B, N]
  active = (None if context_patches is None
            else masking.context_band(roi_patches, grid, context_patches))  # [B, N]

  def run_passes(pass_masks: jnp.ndarray) -> jnp.ndarray:
    """`[c, B, N]` masks -> `[c, B, H, W]` float32 reconstructions, ONE model call.

    The passes are folded into the model's batch axis (`c * B` rows, pass-major) instead of
    `vmap`-ing the model over passes: a plain batch keeps the model's own loops (scan over
    blocks, attention tiles) unbatched, which is faster and compiles faster
    (benchmarks/README.md).
    """
    c = pass_masks.shape[0]
    flat_masks = pass_masks.reshape(c * b, n_patches)
    if active is None:
      plan = masking.make_plan(flat_masks, num_keep)
    else:
      tiled_active = jnp.broadcast_to(active[None], (c, b, n_patches)).reshape(c * b, n_patches)
      plan = masking.make_plan(flat_masks, num_keep, active=tiled_active, num_active=num_active)
    tiled = jnp.broadcast_to(images[None], (c,) + images.shape).reshape((c * b, h, w, 1))
    recon, _, _ = apply_fn(params, tiled, plan)
    return recon[..., 0].astype(jnp.float32).reshape(c, b, h, w)

  if pass_chunk is None or int(pass_chunk) >= passes:
    recons = run_passes(masks)
  else:
    chunk = int(pass_chunk)
    if chunk < 1:
      raise ValueError(f"pass_chunk must be >= 1, got {pass_chunk}")
    num_chunks = -(-passes // chunk)
    # Pad with repeats of the first passes; their outputs are dropped below.
    padded = jnp.concatenate([masks, masks[:num_chunks * chunk - passes]], axis=0)
    chunked = padded.reshape(num_chunks, chunk, b, n_patches)
    recons = jax.lax.map(run_passes, chunked)
    recons = recons.reshape(num_chunks * chunk, b, h, w)[:passes]

  x = images[..., 0].astype(jnp.float32)
  pixel_masked = patches.patch_to_pixels(
      masks.reshape(passes * b, n_patches).astype(jnp.float32), patch_size, grid
  ).reshape(passes, b, h, w)
  pixel_count = pixel_masked.sum(axis=0)
  covered = pixel_count > 0
  safe_count = jnp.maximum(pixel_count, 1.0)
  # Statistics of the deviation from the input: exact zeros for a model that returns its input,
  # and better conditioned than raw second moments.
  deviation = (recons - x[None]) * pixel_masked
  mean_dev = deviation.sum(axis=0) / safe_count
  var = (((recons - x[None] - mean_dev[None]) ** 2) * pixel_masked).sum(axis=0) / safe_count
  return {
      "eu": jnp.where(covered, var, 0.0),
      "mean": jnp.where(covered, x + mean_dev, x),
      "au": jnp.where(covered, jnp.abs(mean_dev), 0.0),
      "count": masks.sum(axis=0).astype(jnp.int32),
  }

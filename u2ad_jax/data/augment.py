"""Training augmentation inside the jitted train step: the law of `pipeline.augment_batch`, in JAX.

The host version (`pipeline.augment_batch`, NumPy) costs ~1.7 ms per paper-size image on one
thread, ~600 images/s: a host far below the accelerator it feeds. Here the same law runs on the
device, in the step, from the step's key, so the host only picks slice indices.

The law, per image x `[H, W]` in [0, 1] with train ROI r:
  pivot = mean of x over r (over the whole image when r is empty),
  x' = ((x - pivot) * c + pivot) * b + n,   c ~ U(CONTRAST_RANGE), b ~ U(BRIGHTNESS_RANGE),
  n ~ N(0, NOISE_STD^2) per pixel, then clipped to [0, 1] (no min-max: it would undo b and c).

Randomness: example i of the global batch at step s draws from
`fold_in(fold_in(fold_in(train_key, s), AUGMENT_STREAM), i)`, a pure function of (seed, step,
position in the global batch): a resumed run redraws exactly, and the draw does not depend on
how the batch is split over devices or processes. The mask draws of the same step use
`fold_in(fold_in(train_key, s), i)` with i < global batch < AUGMENT_STREAM, so the two streams
never share a key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from u2ad_jax.data import pipeline

# fold_in tag of the augmentation stream in a step key; no example position reaches it.
AUGMENT_STREAM = 2**31 - 1


def example_keys(step_key: jax.Array, positions: jnp.ndarray) -> jax.Array:
  """`[b]` keys of the examples at global-batch `positions` `[b]` int32 for one step."""
  stream = jax.random.fold_in(step_key, AUGMENT_STREAM)
  return jax.vmap(lambda i: jax.random.fold_in(stream, i))(positions)


def draw_params(keys: jax.Array) -> dict[str, jnp.ndarray]:
  """`[b]` keys -> brightness `[b]`, contrast `[b]` float32 and the noise key of each example."""
  def one(key):
    k_brightness, k_contrast, k_noise = jax.random.split(key, 3)
    return (jax.random.uniform(k_brightness, (), jnp.float32, *pipeline.BRIGHTNESS_RANGE),
            jax.random.uniform(k_contrast, (), jnp.float32, *pipeline.CONTRAST_RANGE),
            k_noise)
  brightness, contrast, noise_keys = jax.vmap(one)(keys)
  return {"brightness": brightness, "contrast": contrast, "noise_keys": noise_keys}


def apply(images: jnp.ndarray, roi: jnp.ndarray, brightness: jnp.ndarray,
          contrast: jnp.ndarray, noise: jnp.ndarray | None) -> jnp.ndarray:
  """The deterministic part of the law: `[b, H, W]` images and bool ROIs, `[b]` factors,
  `[b, H, W]` additive noise (None = none) -> `[b, H, W]` float32 in [0, 1]."""
  images = images.astype(jnp.float32)
  roi = roi.astype(bool)
  roi_count = roi.sum(axis=(1, 2))
  roi_mean = jnp.where(roi, images, 0.0).sum(axis=(1, 2)) / jnp.maximum(roi_count, 1)
  pivot = jnp.where(roi_count > 0, roi_mean, images.mean(axis=(1, 2)))[:, None, None]
  x = ((images - pivot) * contrast[:, None, None] + pivot) * brightness[:, None, None]
  if noise is not None:
    x = x + noise
  return jnp.clip(x, 0.0, 1.0)


def augment(keys: jax.Array, images: jnp.ndarray, roi: jnp.ndarray,
            noise_std: float = pipeline.NOISE_STD) -> jnp.ndarray:
  """`[b]` keys (`example_keys`), images `[b, H, W]` in [0, 1], train ROIs `[b, H, W]` bool ->
  augmented `[b, H, W]` float32 in [0, 1] (the module docstring's law)."""
  params = draw_params(keys)
  noise = None
  if noise_std > 0:
    noise = noise_std * jax.vmap(
        lambda k: jax.random.normal(k, images.shape[1:], jnp.float32))(params["noise_keys"])
  return apply(images, roi, params["brightness"], params["contrast"], noise)

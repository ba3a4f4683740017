"""Monte-Carlo uncertainty: exact coverage, pass count, and the EU / mean / AU statistics.

The fake models are pure jnp functions with the model's signature
`apply_fn(params, images [B,H,W,1], plan) -> (recon, edge, aux)`; no network is needed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import masking
from u2ad_jax import patches
from u2ad_jax import uncertainty

P_SIZE = 4
H = W = 16  # 4 x 4 = 16 patches


def _brute_force_passes(k: int, ratio: float, n: int) -> int:
  """Smallest P whose cyclic windows cover every one of n positions >= k times (simulated)."""
  m = int(np.floor(ratio * n + 0.5))
  p = 0
  counts = np.zeros(n, int)
  while counts.min() < k:
    start = p * m
    counts[np.arange(start, start + m) % n] += 1
    p += 1
  return p


@pytest.mark.parametrize("k,ratio,n_patches", [(10, 0.75, 64), (3, 0.75, 40), (10, 0.5, 30),
                                               (1, 0.75, 16), (4, 0.9, 25), (10, 1.0, 8)])
def test_num_passes_matches_brute_force(k, ratio, n_patches):
  want = max(_brute_force_passes(k, ratio, n) for n in range(1, n_patches + 1))
  assert uncertainty.num_passes(k, ratio, n_patches) == want
  want4 = max(_brute_force_passes(k, ratio, n) for n in range(4, n_patches + 1))
  assert uncertainty.num_passes(k, ratio, n_patches, min_roi=4) == want4
  # Never fewer than the continuous bound ceil(K / r).
  assert want >= int(np.ceil(k / ratio - 1e-9))


def test_num_passes_paper_setting_and_errors():
  # K = 10, r = 0.75: ceil(K/r) = 14 for large ROIs, but n = 3 (m = 2) needs 15.
  assert uncertainty.num_passes(10, 0.75, 1024) == 15
  assert uncertainty.num_passes(10, 0.75, 1024, min_roi=4) == 14
  with pytest.raises(ValueError, match="masks 0 patches"):
    uncertainty.num_passes(10, 0.3, 16)  # n = 1 masks round(0.3) = 0 per pass
  assert uncertainty.num_passes(10, 0.3, 16, min_roi=2) > 0
  for bad in [dict(num_samples=0, ratio=0.75, num_patches=16),
              dict(num_samples=1, ratio=0.0, num_patches=16),
              dict(num_samples=1, ratio=1.5, num_patches=16)]:
    with pytest.raises(ValueError):
      uncertainty.num_passes(**bad)


def test_mc_masks_exact_coverage_for_many_roi_sizes():
  n_patches, k, ratio = 40, 10, 0.75
  sizes = [0, 1, 2, 3, 4, 5, 6, 7, 11, 17, 23, 31, 39, 40]
  rng = np.random.default_rng(0)
  roi = np.zeros((len(sizes), n_patches), bool)
  for b, n in enumerate(sizes):
    roi[b, rng.permutation(n_patches)[:n]] = True
  passes = uncertainty.num_passes(k, ratio, n_patches)
  draw = jax.jit(jax.vmap(lambda key: uncertainty.mc_masks(key, jnp.asarray(roi), ratio,
                                                           passes)))
  all_masks = np.asarray(draw(jax.random.split(jax.random.key(1), 8)))  # [8, P, B, N]
  m = np.floor(ratio * np.array(sizes) + 0.5).astype(int)
  for masks in all_masks:
    assert masks.shape == (passes, len(sizes), n_patches)
    assert not (masks & ~roi[None]).any(), "non-ROI patch masked"
    # Each pass masks exactly m = round(r * n), like a training step.
    np.testing.assert_array_equal(masks.sum(-1), np.broadcast_to(m, (passes, len(sizes))))
    counts = masks.sum(0)
    for b, n in enumerate(sizes):
      if n == 0:
        assert counts[b].sum() == 0
        continue
      c = counts[b][roi[b]]
      assert c.min() >= k, (n, c)
      assert c.max() - c.min() <= 1, (n, c)
  # Different keys give different orders; the same key the same.
  assert (all_masks[0] != all_masks[1]).any()
  again = np.asarray(draw(jax.random.split(jax.random.key(1), 8)))
  np.testing.assert_array_equal(again, all_masks)


# ---------------------------------------------------------------------------------------------
# Fake models.


def identity_model(params, images, plan):
  """Reconstructs the input whatever the mask: zero epistemic uncertainty."""
  del params, plan
  return images, jnp.zeros_like(images), {}


def inpaint_model(params, images, plan):
  """Masked patches get `scale * (mean of the visible pixels)`; depends on the plan.

  Uses the plan's gather indices (ids_keep / keep_valid) the way an encoder would.
  """
  b, h, w, _ = images.shape
  tokens = patches.patchify(images, P_SIZE)  # [B, N, p*p]
  kept = jnp.take_along_axis(tokens, plan.ids_keep[..., None], axis=1)  # [B, L, p*p]
  weight = plan.keep_valid[..., None].astype(jnp.float32)
  visible_mean = (kept * weight).sum((1, 2)) / jnp.maximum(weight.sum((1, 2)) * kept.shape[-1], 1)
  fill = params["scale"] * visible_mean[:, None, None, None]
  pixel_mask = patches.patch_to_pixels(plan.mask.astype(jnp.float32), P_SIZE, (h // P_SIZE,
                                                                                w // P_SIZE))
  recon = jnp.where(pixel_mask[..., None] > 0, fill, images)
  return recon, jnp.zeros_like(images), {"visible_mean": visible_mean}


def _batch(seed: int = 0):
  """Images [4, 16, 16, 1] in [0, 1] and train ROIs of 0, 1, 3 and 9 patches (ragged edges)."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.0, 1.0, (4, H, W, 1)).astype(np.float32)
  roi = np.zeros((4, H, W), bool)
  roi[1, 5, 6] = True                      # 1 patch
  roi[2, 1:3, 2:11] = True                 # 3 patches (one row of patches)
  roi[3, 2:11, 3:10] = True                # patch rows 0-2 x patch cols 0-2 -> 9 patches
  return jnp.asarray(images), jnp.asarray(roi)


def _reference(apply_fn, params, images, roi, masks):
  """numpy reference: per pixel mean / population variance over the passes that masked it."""
  images = np.asarray(images)
  recons, pix = [], []
  for mask in np.asarray(masks):
    plan = masking.make_plan(jnp.asarray(mask))
    recons.append(np.asarray(apply_fn(params, jnp.asarray(images), plan)[0])[..., 0])
    pix.append(np.asarray(patches.patch_to_pixels(jnp.asarray(mask, jnp.float32), P_SIZE,
                                                  (H // P_SIZE, W // P_SIZE))) > 0)
  recons, pix = np.stack(recons).astype(np.float64), np.stack(pix)
  x = images[..., 0].astype(np.float64)
  count = pix.sum(0)
  mean = np.where(count > 0, (recons * pix).sum(0) / np.maximum(count, 1), x)
  var = np.where(count > 0, (((recons - mean) ** 2) * pix).sum(0) / np.maximum(count, 1), 0.0)
  return mean, var


def test_identity_model_has_zero_eu_and_exact_mean():
  images, roi = _batch()
  out = uncertainty.mc_uncertainty(identity_model, {}, jax.random.key(0), images, roi,
                                   patch_size=P_SIZE, ratio=0.75, num_samples=3)
  assert set(out) == {"eu", "mean", "au", "count"}
  for name in ("eu", "mean", "au"):
    assert out[name].shape == (4, H, W) and out[name].dtype == jnp.float32
  assert out["count"].shape == (4, 16) and out["count"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out["eu"]), 0.0)
  np.testing.assert_array_equal(np.asarray(out["au"]), 0.0)
  np.testing.assert_array_equal(np.asarray(out["mean"]), np.asarray(images)[..., 0])


def test_plan_dependent_model_statistics_match_reference():
  images, roi = _batch(1)
  params = {"scale": jnp.float32(1.3)}
  key = jax.random.key(4)
  k, ratio = 4, 0.75
  out = uncertainty.mc_uncertainty(inpaint_model, params, key, images, roi,
                                   patch_size=P_SIZE, ratio=ratio, num_samples=k)
  roi_patches = np.asarray(patches.patch_any(roi, P_SIZE))
  passes = uncertainty.num_passes(k, ratio, 16)
  masks = uncertainty.mc_masks(key, jnp.asarray(roi_patches), ratio, passes)
  mean, var = _reference(inpaint_model, params, images, roi, masks)
  np.testing.assert_allclose(np.asarray(out["mean"]), mean, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["eu"]), var, atol=1e-6)
  x = np.asarray(images)[..., 0]
  np.testing.assert_allclose(np.asarray(out["au"]), np.abs(x - np.asarray(out["mean"])),
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["count"]), np.asarray(masks).sum(0))

  # Coverage: every ROI patch reconstructed >= K times, balanced; nothing else.
  count = np.asarray(out["count"])
  for b in range(4):
    if roi_patches[b].any():
      c = count[b][roi_patches[b]]
      assert c.min() >= k and c.max() - c.min() <= 1
  assert (count[~roi_patches] == 0).all()

  # The reconstructions vary with the plan wherever a patch has a varying context -> EU > 0
  # inside the ROI patches of images 2 and 3 (more than one ROI patch).
  pix_roi = np.asarray(patches.patch_to_pixels(jnp.asarray(roi_patches, jnp.float32), P_SIZE,
                                               (4, 4))) > 0
  eu = np.asarray(out["eu"])
  assert (eu[2][pix_roi[2]] > 0).all() and (eu[3][pix_roi[3]] > 0).all()
  # Outside the train-ROI patches: the input exactly, EU = AU = 0.
  np.testing.assert_array_equal(np.asarray(out["mean"])[~pix_roi], x[~pix_roi])
  assert (eu[~pix_roi] == 0).all() and (np.asarray(out["au"])[~pix_roi] == 0).all()
  # Image 0 has no ROI at all: untouched.
  np.testing.assert_array_equal(np.asarray(out["mean"])[0], x[0])


def test_pass_chunks_num_keep_and_jit_agree_without_retracing():
  images, roi = _batch(2)
  params = {"scale": jnp.float32(0.8)}
  key = jax.random.key(7)
  kwargs = dict(patch_size=P_SIZE, ratio=0.75, num_samples=3)
  full = uncertainty.mc_uncertainty(inpaint_model, params, key, images, roi, **kwargs)

  traces = []

  def counting_model(params, images, plan):
    traces.append(1)  # runs at trace time only
    return inpaint_model(params, images, plan)

  # Chunks of 3 passes, not a divisor of P: the last chunk is padded and the padding dropped.
  assert uncertainty.num_passes(3, 0.75, 16) % 3 != 0
  fn = jax.jit(functools.partial(uncertainty.mc_uncertainty, counting_model, pass_chunk=3,
                                 **kwargs))
  chunked = fn(params, key, images, roi)
  for name in full:
    np.testing.assert_allclose(np.asarray(chunked[name]), np.asarray(full[name]), atol=1e-6)
  n_traces = len(traces)
  again = fn(params, key, images + 0.0, roi)
  assert len(traces) == n_traces, "second call with the same shapes retraced"
  np.testing.assert_array_equal(np.asarray(again["eu"]), np.asarray(chunked["eu"]))
  # A different key draws a different order -> different statistics.
  other = fn(params, jax.random.key(8), images, roi)
  assert not np.array_equal(np.asarray(other["eu"]), np.asarray(chunked["eu"]))


def test_num_keep_shorter_than_n_matches_full_length():
  # All images with ROI >= 4 patches: every pass masks >= 3, so L = N - 3 holds the visible set.
  images, _ = _batch(3)
  roi = np.zeros((4, H, W), bool)
  roi[:, 0:9, 0:9] = True  # 9 patches
  roi[1, 12:, 12:] = True  # + 1 patch
  num_keep = masking.encoder_length(16, 0.75, 4)
  params = {"scale": jnp.float32(1.0)}
  kwargs = dict(patch_size=P_SIZE, ratio=0.75, num_samples=2)
  a = uncertainty.mc_uncertainty(inpaint_model, params, jax.random.key(0), images,
                                 jnp.asarray(roi), **kwargs)
  b = uncertainty.mc_uncertainty(inpaint_model, params, jax.random.key(0), images,
                                 jnp.asarray(roi), num_keep=num_keep, **kwargs)
  for name in a:
    np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), atol=1e-6)


def test_bfloat16_reconstructions_and_shape_errors():
  images, roi = _batch(4)

  def bf16_model(params, images, plan):
    recon, edge, aux = inpaint_model(params, images, plan)
    return recon.astype(jnp.bfloat16), edge, aux

  out = uncertainty.mc_uncertainty(bf16_model, {"scale": 1.0}, jax.random.key(0), images, roi,
                                   patch_size=P_SIZE, ratio=0.75, num_samples=2)
  assert out["eu"].dtype == jnp.float32 and np.isfinite(np.asarray(out["eu"])).all()
  with pytest.raises(ValueError):
    uncertainty.mc_uncertainty(identity_model, {}, jax.random.key(0), images[..., 0], roi,
                               patch_size=P_SIZE, ratio=0.75, num_samples=2)
  with pytest.raises(ValueError):
    uncertainty.mc_uncertainty(identity_model, {}, jax.random.key(0), images, roi[:2],
                               patch_size=P_SIZE, ratio=0.75, num_samples=2)


def test_image_keys_match_the_split_key_for_any_subset_of_rows():
  # What the evaluator's device split relies on: with per-image keys, an image's statistics
  # depend on that image and its key only, not on which rows share its call.
  images, roi = _batch(5)
  params = {"scale": jnp.float32(1.1)}
  key = jax.random.key(3)
  kwargs = dict(patch_size=P_SIZE, ratio=0.75, num_samples=3)
  full = uncertainty.mc_uncertainty(inpaint_model, params, key, images, roi, **kwargs)
  keys = jax.random.split(key, images.shape[0])
  same = uncertainty.mc_uncertainty(inpaint_model, params, None, images, roi, image_keys=keys,
                                    **kwargs)
  tail = uncertainty.mc_uncertainty(inpaint_model, params, None, images[2:], roi[2:],
                                    image_keys=keys[2:], **kwargs)
  for name in full:
    np.testing.assert_array_equal(np.asarray(same[name]), np.asarray(full[name]))
    np.testing.assert_allclose(np.asarray(tail[name]), np.asarray(full[name])[2:], atol=1e-6)
  # Other keys for the same rows: other orders, other statistics.
  shuffled = uncertainty.mc_uncertainty(inpaint_model, params, None, images[2:], roi[2:],
                                        image_keys=keys[:2], **kwargs)
  assert not np.array_equal(np.asarray(shuffled["eu"]), np.asarray(full["eu"])[2:])
  with pytest.raises(ValueError, match="key"):
    uncertainty.mc_uncertainty(inpaint_model, params, None, images, roi, **kwargs)

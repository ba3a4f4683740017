"""Exact properties of the U2AD loss: Sobel target, structure weight, masked ROI reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import losses
from u2ad_jax import patches as patch_lib


def _image(array_2d):
  return jnp.asarray(array_2d, jnp.float32)[None, :, :, None]


# ------------------------------------------------------------------------------------------
# Sobel edges


def test_sobel_of_constant_image_is_zero_everywhere_including_borders():
  # Zero padding would create edges at the border; replicate padding must not.
  edges = losses.sobel_edges(_image(np.full((12, 10), 0.7)))
  assert edges.shape == (1, 12, 10, 1)
  np.testing.assert_array_equal(np.asarray(edges), 0.0)


def test_sobel_step_edge_is_clipped_to_one():
  img = np.zeros((8, 10), np.float32)
  img[:, 5:] = 1.0  # vertical step between columns 4 and 5
  edges = np.asarray(losses.sobel_edges(_image(img)))[0, :, :, 0]
  # The un-normalised kernel gives 4 on both sides of a unit step: clipped to exactly 1.
  np.testing.assert_array_equal(edges[:, 4:6], 1.0)
  np.testing.assert_array_equal(edges[:, :4], 0.0)
  np.testing.assert_array_equal(edges[:, 6:], 0.0)


def test_sobel_kernel_normalisation_on_a_ramp():
  # Horizontal ramp with slope s per pixel: interior magnitude is 8 s (kernel [1,2,1] x [-1,0,1],
  # not divided by 8); at the replicated border column the difference spans one pixel: 4 s.
  slope = 0.01
  img = np.tile(np.arange(10, dtype=np.float32) * slope, (6, 1))
  edges = np.asarray(losses.sobel_edges(_image(img)))[0, :, :, 0]
  np.testing.assert_allclose(edges[:, 1:-1], 8 * slope, rtol=1e-5)
  np.testing.assert_allclose(edges[:, 0], 4 * slope, rtol=1e-5)
  np.testing.assert_allclose(edges[:, -1], 4 * slope, rtol=1e-5)


def test_sobel_gradient_is_finite_on_flat_regions():
  grad = jax.grad(lambda x: losses.sobel_edges(x).sum())(_image(np.full((6, 6), 0.3)))
  assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------------------------------
# Structure weight


def test_structure_weight_isolated_masked_patch():
  grid = (5, 5)
  mask = np.zeros((1, 25), bool)
  mask[0, 12] = True  # centre patch
  w = np.asarray(losses.structure_weight(jnp.asarray(mask), grid)).reshape(5, 5)
  assert w[2, 2] == pytest.approx(1 + 1 / 9, abs=1e-6)
  # Neighbours see one masked patch too; patches two steps away see none.
  assert w[1, 1] == pytest.approx(1 + 1 / 9, abs=1e-6)
  assert w[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_structure_weight_fully_masked_grid_counts_padding_as_unmasked():
  grid = (4, 5)
  w = np.asarray(losses.structure_weight(jnp.ones((2, 20), bool), grid)).reshape(2, 4, 5)
  np.testing.assert_allclose(w[:, 1:3, 1:4], 2.0, atol=1e-6)  # interior
  np.testing.assert_allclose(w[:, 0, 0], 1 + 4 / 9, atol=1e-6)  # corner: 4 of 9 inside
  np.testing.assert_allclose(w[:, 0, 2], 1 + 6 / 9, atol=1e-6)  # edge: 6 of 9 inside


def test_structure_weight_without_mask_is_one():
  w = losses.structure_weight(jnp.zeros((3, 12), bool), (3, 4))
  np.testing.assert_array_equal(np.asarray(w), 1.0)


# ------------------------------------------------------------------------------------------
# Reconstruction loss

P = 4
H = W = 16
GRID = (4, 4)


def _batch(seed=0, b=3):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(b, H, W, 1)).astype(np.float32)
  roi = np.zeros((b, H, W), bool)
  roi[:, 3:13, 5:11] = True  # partly covers several patches
  roi_patches = np.asarray(patch_lib.patch_any(jnp.asarray(roi), P))
  mask = np.zeros((b, 16), bool)
  for i in range(b):
    ids = np.flatnonzero(roi_patches[i])
    mask[i, rng.choice(ids, size=len(ids) // 2, replace=False)] = True
  return jnp.asarray(images), jnp.asarray(roi), jnp.asarray(mask)


def test_loss_is_zero_when_prediction_equals_target():
  images, roi, mask = _batch()
  total, parts = losses.reconstruction_loss(images, losses.sobel_edges(images), images, roi,
                                            mask, P)
  assert float(total) == 0.0
  assert float(parts["image"]) == 0.0 and float(parts["edge"]) == 0.0


def test_only_masked_roi_pixels_receive_gradient():
  images, roi, mask = _batch(seed=1)
  rng = np.random.default_rng(2)
  recon = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  edge = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  grad_recon, grad_edge = jax.grad(
      lambda r, e: losses.reconstruction_loss(r, e, images, roi, mask, P)[0],
      argnums=(0, 1))(recon, edge)
  counted = np.asarray(roi) & np.asarray(patch_lib.patch_to_pixels(mask, P, GRID) > 0)
  assert counted.any() and (~counted).any()
  for grad in (np.asarray(grad_recon)[..., 0], np.asarray(grad_edge)[..., 0]):
    np.testing.assert_array_equal(grad[~counted], 0.0)
    assert (grad[counted] != 0).all()


def test_loss_value_pooled_over_masked_patches_by_hand():
  # One image, one masked patch fully inside the ROI with error 0.5 on every pixel of the image
  # prediction and 0 edge error: loss = weight * 0.25 with weight = 1 + 1/9 (isolated patch).
  images = jnp.zeros((1, H, W, 1))
  roi = jnp.ones((1, H, W), bool)
  mask = jnp.zeros((1, 16), bool).at[0, 5].set(True)
  recon = jnp.full_like(images, 0.5)
  total, parts = losses.reconstruction_loss(recon, losses.sobel_edges(images), images, roi, mask,
                                            P, image_weight=10.0, edge_weight=1.0)
  assert float(parts["image"]) == pytest.approx((1 + 1 / 9) * 0.25, rel=1e-6)
  assert float(parts["edge"]) == 0.0
  assert float(total) == pytest.approx(10 * (1 + 1 / 9) * 0.25, rel=1e-6)
  _, plain = losses.reconstruction_loss(recon, losses.sobel_edges(images), images, roi, mask, P,
                                        use_structure_weight=False)
  assert float(plain["image"]) == pytest.approx(0.25, rel=1e-6)


def test_patch_mean_counts_all_patch_pixels():
  # Half of the masked patch lies in the ROI: its per-patch mean halves (p*p denominator).
  images = jnp.zeros((1, H, W, 1))
  roi = jnp.zeros((1, H, W), bool).at[0, 4:6, 4:8].set(True)  # top half of patch 5
  mask = jnp.zeros((1, 16), bool).at[0, 5].set(True)
  _, parts = losses.reconstruction_loss(jnp.ones_like(images), losses.sobel_edges(images),
                                        images, roi, mask, P, use_structure_weight=False)
  assert float(parts["image"]) == pytest.approx(0.5, rel=1e-6)


def test_total_is_weighted_sum_of_terms():
  images, roi, mask = _batch(seed=3)
  rng = np.random.default_rng(4)
  recon = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  edge = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  total, parts = losses.reconstruction_loss(recon, edge, images, roi, mask, P,
                                            image_weight=3.0, edge_weight=0.5)
  assert float(total) == pytest.approx(3.0 * float(parts["image"]) + 0.5 * float(parts["edge"]),
                                       rel=1e-6)
  assert float(parts["image"]) > 0 and float(parts["edge"]) > 0


def test_image_without_masked_patches_and_zero_weighted_examples_contribute_nothing():
  images, roi, mask = _batch(seed=5, b=2)
  rng = np.random.default_rng(6)
  recon = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  edge = jnp.asarray(rng.uniform(size=images.shape).astype(np.float32))
  ref, _ = losses.reconstruction_loss(recon, edge, images, roi, mask, P)
  # Append a third image with arbitrary errors but no masked patch: same loss.
  extra = lambda x, fill: jnp.concatenate([x, fill], axis=0)
  garbage = jnp.full((1, H, W, 1), 0.9)
  with_unmasked, _ = losses.reconstruction_loss(
      extra(recon, garbage), extra(edge, garbage), extra(images, jnp.zeros((1, H, W, 1))),
      extra(roi, jnp.ones((1, H, W), bool)), extra(mask, jnp.zeros((1, 16), bool)), P)
  assert float(with_unmasked) == pytest.approx(float(ref), rel=1e-6)
  # Append a masked padding example with example_weight 0: same loss again.
  weights = jnp.array([1.0, 1.0, 0.0])
  with_padding, _ = losses.reconstruction_loss(
      extra(recon, garbage), extra(edge, garbage), extra(images, jnp.zeros((1, H, W, 1))),
      extra(roi, jnp.ones((1, H, W), bool)), extra(mask, jnp.ones((1, 16), bool)), P,
      example_weight=weights)
  assert float(with_padding) == pytest.approx(float(ref), rel=1e-6)
  unweighted, _ = losses.reconstruction_loss(
      extra(recon, garbage), extra(edge, garbage), extra(images, jnp.zeros((1, H, W, 1))),
      extra(roi, jnp.ones((1, H, W), bool)), extra(mask, jnp.ones((1, 16), bool)), P)
  assert float(unweighted) != pytest.approx(float(ref), rel=1e-3)


def test_nothing_masked_gives_zero_loss_and_finite_gradient():
  images, roi, _ = _batch(seed=7)
  mask = jnp.zeros((images.shape[0], 16), bool)
  value, grad = jax.value_and_grad(
      lambda r: losses.reconstruction_loss(r, r, images, roi, mask, P)[0])(images * 0.5)
  assert float(value) == 0.0
  assert np.isfinite(np.asarray(grad)).all()

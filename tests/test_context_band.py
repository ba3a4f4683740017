"""The context band: the model processes only the ROI patches and their neighbours.

Masking, the plan's lengths, the model's outputs (what they may depend on), the train step and
the Monte-Carlo maps with a band.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import masking
from u2ad_jax import mc_maps
from u2ad_jax import patches
from u2ad_jax import uncertainty
from u2ad_jax.data import sliceset
from u2ad_jax.models import vit_mae
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib


GRID = (8, 8)
N = 64


def _roi_patches(b=3):
  """`[b, 64]` ROI patches: vertical bands of different widths and lengths on the 8 x 8 grid."""
  roi = np.zeros((b, 8, 8), bool)
  roi[0, 1:7, 3:5] = True
  roi[1, 0:8, 4] = True
  roi[2, 2:4, 1:3] = True
  return roi.reshape(b, N)[:b]


def test_context_band_is_the_square_neighbourhood_of_the_roi():
  roi = _roi_patches()
  band = np.asarray(masking.context_band(jnp.asarray(roi), GRID, 1)).reshape(3, 8, 8)
  expected = np.zeros((3, 8, 8), bool)
  expected[0, 0:8, 2:6] = True
  expected[1, 0:8, 3:6] = True
  expected[2, 1:5, 0:4] = True
  np.testing.assert_array_equal(band, expected)
  # Radius 0 is the ROI itself; an empty ROI has an empty band.
  np.testing.assert_array_equal(np.asarray(masking.context_band(jnp.asarray(roi), GRID, 0)), roi)
  assert not np.asarray(masking.context_band(jnp.zeros((1, N), bool), GRID, 2)).any()
  with pytest.raises(ValueError, match="radius"):
    masking.context_band(jnp.asarray(roi), GRID, -1)


def test_band_plan_lists_visible_active_and_active_patches():
  roi = jnp.asarray(_roi_patches())
  mask = masking.random_mask(jax.random.key(0), roi, 0.75)
  active = masking.context_band(roi, GRID, 1)
  num_keep, num_active = masking.band_lengths(np.asarray(roi), GRID, 1, 0.75, exact_count=True,
                                              multiple=1)
  plan = masking.make_plan(mask, num_keep, active=active, num_active=num_active)
  assert plan.ids_keep.shape == (3, num_keep) and plan.ids_active.shape == (3, num_active)
  for i in range(3):
    act, msk = np.asarray(active[i]), np.asarray(mask[i])
    visible = np.flatnonzero(act & ~msk)
    kept = np.asarray(plan.ids_keep[i])[np.asarray(plan.keep_valid[i])]
    np.testing.assert_array_equal(kept, visible)  # every visible active patch, ascending
    decoded = np.asarray(plan.ids_active[i])[np.asarray(plan.active_valid[i])]
    np.testing.assert_array_equal(decoded, np.flatnonzero(act))
    # Valid slots first (a prefix: what the fused attention kernels' key lengths need).
    for valid in (plan.keep_valid[i], plan.active_valid[i]):
      v = np.asarray(valid)
      assert not (~v[:-1] & v[1:]).any()
  # The lengths are tight: the widest band fills every decoder slot.
  assert num_active == int(np.asarray(active).sum(-1).max())
  with pytest.raises(ValueError, match="num_keep"):
    masking.make_plan(mask, num_active + 1, active=active, num_active=num_active)


def test_band_lengths_cover_guided_masks_that_mask_fewer():
  roi = _roi_patches()
  keep_exact, active_exact = masking.band_lengths(roi, GRID, 1, 0.75, exact_count=True)
  keep_guided, active_guided = masking.band_lengths(roi, GRID, 1, 0.75, exact_count=False)
  assert active_exact == active_guided and keep_guided == active_guided
  assert keep_exact < keep_guided and keep_exact % 8 == 0 and active_exact % 8 == 0
  # An AU exclusion covering the whole ROI leaves nothing masked: all active patches visible.
  exclude = jnp.asarray(roi)
  mask = masking.guided_mask(jax.random.key(1), jnp.asarray(roi), 0.75, jnp.ones((3, N)), 1.0,
                             1.0, exclude)
  active = masking.context_band(jnp.asarray(roi), GRID, 1)
  plan = masking.make_plan(mask, keep_guided, active=active, num_active=active_guided)
  np.testing.assert_array_equal(np.asarray(plan.keep_valid).sum(-1),
                                np.asarray(active).sum(-1))


@pytest.fixture(scope="module")
def mu_model():
  model = vit_mae.build_model("mu", attention="dense")
  images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1))
  params = model.init(jax.random.key(1), images,
                      masking.make_plan(jnp.zeros((3, N), bool)))["params"]
  return model, params, images


def _band_plan(roi, mask, radius=1, extra=0):
  active = masking.context_band(roi, GRID, radius)
  num_keep, num_active = masking.band_lengths(np.asarray(roi), GRID, radius, 0.75,
                                              exact_count=True, multiple=1)
  return masking.make_plan(mask, min(num_keep + extra, N), active=active,
                           num_active=min(num_active + extra, N)), np.asarray(active)


def test_all_active_band_is_the_full_model(mu_model):
  model, params, images = mu_model
  roi = jnp.asarray(_roi_patches())
  mask = masking.random_mask(jax.random.key(2), roi, 0.75)
  full = model.apply({"params": params}, images, masking.make_plan(mask))
  band = model.apply({"params": params}, images,
                     masking.make_plan(mask, active=jnp.ones((3, N), bool)))
  np.testing.assert_allclose(np.asarray(band[0]), np.asarray(full[0]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(band[1]), np.asarray(full[1]), atol=1e-6)


def test_band_outputs_depend_only_on_the_band(mu_model):
  model, params, images = mu_model
  roi = jnp.asarray(_roi_patches())
  mask = masking.random_mask(jax.random.key(3), roi, 0.75)
  plan, active = _band_plan(roi, mask)
  recon, edge, aux = model.apply({"params": params}, images, plan)
  inside = np.asarray(patches.patch_to_pixels(jnp.asarray(active, jnp.float32), 4, GRID)) > 0
  # Nothing is predicted outside the band.
  assert not np.asarray(recon)[..., 0][~inside].any()
  assert not np.asarray(edge)[..., 0][~inside].any()
  assert np.asarray(recon)[..., 0][inside].min() > 0
  assert aux["decoded"].shape == (3, plan.ids_active.shape[1], model.decoder_width)
  # Pixels outside the band (and under the mask) cannot change any output.
  hidden = ~inside | (np.asarray(patches.patch_to_pixels(mask.astype(jnp.float32), 4, GRID)) > 0)
  changed = jnp.where(jnp.asarray(hidden)[..., None], 1.0 - images, images)
  recon2, edge2, _ = model.apply({"params": params}, changed, plan)
  np.testing.assert_allclose(np.asarray(recon2), np.asarray(recon), atol=1e-6)
  np.testing.assert_allclose(np.asarray(edge2), np.asarray(edge), atol=1e-6)
  # More padding slots compute exactly the same outputs.
  padded, _ = _band_plan(roi, mask, extra=9)
  recon3, _, _ = model.apply({"params": params}, images, padded)
  np.testing.assert_allclose(np.asarray(recon3), np.asarray(recon), atol=1e-5)


def _toy_batch(b=4, size=32, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(b, size, size)).astype(np.float32)
  roi = np.zeros((b, size, size), bool)
  for i in range(b):
    c = 10 + 3 * i
    roi[i, 2:30, c:c + 5] = True
  return images, roi


def test_train_step_with_a_band_trains_and_differs_from_the_full_image(mu_model):
  model, params, _ = mu_model
  images, roi = _toy_batch()
  settings = step_lib.StepSettings(patch_size=4, ratio=0.75)
  slices = sliceset.roi_patch_mask(roi, 4)
  num_keep, num_active = masking.band_lengths(slices, GRID, 1, 0.75, exact_count=True)
  band = dataclasses.replace(settings, context_patches=1, num_keep=num_keep,
                             num_active=num_active)
  optimizer = state_lib.make_optimizer(
      state_lib.OptimizerSettings(lr=1e-3, b1=0.9, b2=0.95, decay_every_epochs=0,
                                  decay_factor=0.1), 1)
  batch = {"image": images[None, ..., None], "train_roi": roi[None],
           "valid": np.ones((1, 4), bool)}
  losses = {}
  for name, s in (("full", settings), ("band", band)):
    step = step_lib.make_train_step(model, optimizer, s, "pmap", jax.devices()[:1])
    state = step.replicate(state_lib.create_state(jax.tree.map(jnp.copy, params), optimizer))
    state, metrics = step(state, batch, jax.random.key(0), step_lib.guidance_arrays(), None)
    losses[name] = float(metrics["loss"])
    # The same masks (drawn before the plan): the same masked count.
    assert float(metrics["masked_patches"]) == float(np.floor(0.75 * slices.sum(-1) + 0.5).sum())
  assert np.isfinite(losses["band"]) and losses["band"] != losses["full"]


def test_mc_maps_with_a_band_equal_the_direct_call(mu_model):
  model, params, _ = mu_model
  images, roi = _toy_batch(b=5, seed=3)

  def apply_fn(p, x, plan):
    return model.apply({"params": p}, x, plan)

  mc = mc_maps.MonteCarloMaps(apply_fn, patch_size=4, ratio=0.75, num_samples=2,
                              slices_per_device=2, mode="pmap", devices=jax.devices()[:1],
                              outputs=("eu", "mean"), context_patches=1)
  key = jax.random.key(4)
  got = {"eu": np.zeros(images.shape, np.float32), "mean": np.zeros(images.shape, np.float32)}
  for ids, maps in mc.local_chunks(params, key, images, roi):
    for name in got:
      got[name][ids] = maps[name]
  assert all(num_active is not None for _, num_active in mc._mc)
  for s in range(images.shape[0]):
    direct = uncertainty.mc_uncertainty(
        apply_fn, params, None, jnp.asarray(images[s:s + 1, ..., None]),
        jnp.asarray(roi[s:s + 1]), patch_size=4, ratio=0.75, num_samples=2,
        image_keys=mc_maps.slice_keys(key, jnp.asarray([s])), context_patches=1, num_active=N)
    np.testing.assert_allclose(got["mean"][s], np.asarray(direct["mean"][0]), atol=1e-5)
    np.testing.assert_allclose(got["eu"][s], np.asarray(direct["eu"][0]), atol=1e-5)
  # Outside the ROI patches the mean is the input itself and EU is 0, band or not.
  roi_pixels = np.asarray(patches.patch_to_pixels(
      jnp.asarray(sliceset.roi_patch_mask(roi, 4), jnp.float32), 4, GRID)) > 0
  np.testing.assert_array_equal(got["mean"][~roi_pixels], images[~roi_pixels])
  assert not got["eu"][~roi_pixels].any() and got["eu"][roi_pixels].max() > 0

"""The augmentation inside the train step (`data/augment.py`) follows the host law
(`pipeline.augment_batch`), and the step's two input forms (device cohort + indices, host
images) train identically."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import toy_data
from u2ad_jax import config_lib
from u2ad_jax import parallel
from u2ad_jax.data import augment
from u2ad_jax.data import pipeline
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _images_and_rois(num=6, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.0, 1.0, (num, size, size)).astype(np.float32)
  roi = np.zeros((num, size, size), bool)
  roi[:, 4:12, 6:10] = True
  roi[1] = False  # empty ROI: the pivot is the whole-image mean
  images[2] = 0.95  # saturates at 1 when brightened
  return images, roi


def test_device_law_equals_host_law_for_the_same_draws():
  images, roi = _images_and_rois()
  rng = np.random.default_rng(3)
  host, params = pipeline.augment_batch(images, roi, rng, noise_std=0.0, return_params=True)
  device = augment.apply(jnp.asarray(images), jnp.asarray(roi),
                         jnp.asarray(params["brightness"], jnp.float32),
                         jnp.asarray(params["contrast"], jnp.float32), None)
  np.testing.assert_allclose(np.asarray(device), host, atol=2e-6)
  assert float(jnp.max(device)) == 1.0  # clipped, and no min-max afterwards


def _roi_level_ratios(images, roi, out):
  level = lambda x: (x * roi).sum(axis=(1, 2)) / roi.sum(axis=(1, 2))
  return level(out) / level(images)


def test_device_draws_have_the_host_distribution():
  """Brightness and contrast uniform on their ranges, noise sigma NOISE_STD, and the ROI level
  spread like the host's (two-sample KS test on 2,000 images each)."""
  n, size = 2000, 8
  image = np.full((n, size, size), 0.5, np.float32)
  image[:, :, :4] = 0.3  # contrast acts around the ROI level
  roi = np.zeros((n, size, size), bool)
  roi[:, 2:6, 2:6] = True
  keys = augment.example_keys(jax.random.key(7), jnp.arange(n))
  params = augment.draw_params(keys)
  for name, (low, high) in (("brightness", pipeline.BRIGHTNESS_RANGE),
                            ("contrast", pipeline.CONTRAST_RANGE)):
    values = np.asarray(params[name])
    assert low <= values.min() and values.max() <= high, name
    assert stats.kstest((values - low) / (high - low), "uniform").pvalue > 0.01, name
  device = np.asarray(augment.augment(keys, jnp.asarray(image), jnp.asarray(roi)))
  host = pipeline.augment_batch(image, roi, np.random.default_rng(0))
  # Noise: what remains after removing each image's affine part on a flat region of it.
  flat = device[:, :, 5:] - device[:, :, 5:].mean(axis=(1, 2), keepdims=True)
  assert abs(flat.std() / pipeline.NOISE_STD - 1.0) < 0.05
  device_levels = _roi_level_ratios(image, roi, device)
  host_levels = _roi_level_ratios(image, roi, host)
  assert device_levels.min() < 0.9 and device_levels.max() > 1.1  # both ways, no min-max
  assert stats.ks_2samp(device_levels, host_levels).pvalue > 0.01


def test_augmentation_keys_depend_on_step_and_position_only():
  key = jax.random.key(0)
  a = augment.example_keys(jax.random.fold_in(key, 5), jnp.arange(8))
  b = augment.example_keys(jax.random.fold_in(key, 5), jnp.arange(4, 8))  # another device's rows
  np.testing.assert_array_equal(jax.random.key_data(a[4:]), jax.random.key_data(b))
  c = augment.example_keys(jax.random.fold_in(key, 6), jnp.arange(8))
  assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(c))


# ------------------------------------------------------------------------------ the step


@pytest.fixture(scope="module")
def setup():
  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "base").get_config("runlocal")
  model = settings_lib.build_model(config)
  slices = toy_data.toy_slice_set(6, config.data.image_size, seed=3)
  return dict(config=config, model=model, slices=slices,
              params=state_lib.init_params(model, jax.random.key(0)))


def _two_steps(setup, *, augment_on, from_cohort, num_devices):
  """Params after two SGD steps on a global batch of 4 (one padding row in step 1)."""
  settings = step_lib.StepSettings(patch_size=setup["config"].data.patch_size, ratio=0.75,
                                   augment=augment_on)
  optimizer = optax.sgd(0.05)
  body = functools.partial(step_lib.train_step, apply_fn=setup["model"].apply,
                           optimizer=optimizer, settings=settings)
  fn = parallel.DataParallel(body, "pmap", num_args=5, sharded=(1,), donate=(0,),
                             devices=jax.devices()[:num_devices])
  slices = setup["slices"]
  state = fn.replicate(state_lib.create_state(jax.tree.map(np.array, setup["params"]), optimizer))
  cohort = step_lib.device_cohort(fn, slices.images, slices.train_roi) if from_cohort else None
  split = lambda x: x.reshape((num_devices, 4 // num_devices) + x.shape[1:])
  for index in (np.array([0, 1, 2, 3]), np.array([4, 5, 3, -1])):
    valid = index >= 0
    if from_cohort:
      batch = {"index": index.astype(np.int32), "valid": valid}
    else:
      safe = np.where(valid, index, 0)
      batch = {"image": np.where(valid[:, None, None], slices.images[safe], 0)[..., None],
               "train_roi": slices.train_roi[safe] & valid[:, None, None], "valid": valid}
    state, metrics = fn(state, {k: split(v) for k, v in batch.items()}, jax.random.key(1),
                        step_lib.guidance_arrays(), cohort)
    assert np.isfinite(float(metrics["loss"]))
  return parallel.to_host(state.params)


def _assert_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol)


def test_device_cohort_trains_like_host_images_and_augmentation_is_split_independent(setup):
  """Host images on one device vs cohort indices on two devices, both augmenting in the step:
  the same training (the rows' keys are their global positions, the gathered examples are the
  host's); without augmentation the result differs."""
  host = _two_steps(setup, augment_on=True, from_cohort=False, num_devices=1)
  cohort = _two_steps(setup, augment_on=True, from_cohort=True, num_devices=2)
  _assert_close(cohort, host, atol=1e-6)
  plain = _two_steps(setup, augment_on=False, from_cohort=True, num_devices=2)
  assert max(float(np.abs(x - y).max())
             for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(cohort))) > 1e-4

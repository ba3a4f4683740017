"""The one Monte-Carlo maps path (`u2ad_jax.mc_maps`) and its training adapter (`train.maps`).

Reference everywhere: a direct one-slice `uncertainty.mc_uncertainty` call per slice with the key
`fold_in(key, s)`, full encoder length, no devices, no chunks. The sharded, chunked,
ROI-ordered, shortened-encoder path must give the same maps (up to float rounding), whatever the
device count, mode or slices per device.
"""

import pathlib

import jax
import numpy as np
import pytest

import toy_data
from u2ad_jax import anomaly
from u2ad_jax import candidates
from u2ad_jax import config_lib
from u2ad_jax import mc_maps
from u2ad_jax import patches
from u2ad_jax import uncertainty
from u2ad_jax.data import sliceset
from u2ad_jax.train import maps as maps_lib
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import state as state_lib


CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def setup():
  config = config_lib.sibling(str(CONFIG), "base").get_config("runlocal")
  model = settings_lib.build_model(config)
  params = state_lib.init_params(model, jax.random.key(0))
  # 7 slices: chunks of 4 / 8 devices x rows are padded, so padding is exercised.
  slices = toy_data.toy_slice_set(7, config.data.image_size, seed=5, lesion_fraction=0.5)
  # ROI sizes out of index order (and different): ordering by size reorders the slices.
  keep = np.array([2, 5, 1, 6, 3, 4, 7])
  roi = slices.train_roi.copy()
  for s, rows in enumerate(keep):
    roi[s, 4 * rows + 4:] = False
  slices.train_roi[:] = roi
  return config, model, params, slices


def _apply(model):
  return lambda p, x, plan: model.apply({"params": p}, x, plan)


def _direct(config, model, params, key, slices):
  """Per slice: `mc_uncertainty(key=fold_in(key, s))` on that slice alone."""
  fn = jax.jit(lambda k, x, r: uncertainty.mc_uncertainty(
      _apply(model), params, k, x, r, patch_size=config.data.patch_size,
      ratio=config.masking.ratio, num_samples=config.uncertainty.num_samples,
      min_roi=config.data.min_roi_patches))
  out = [fn(jax.random.fold_in(key, s), slices.images[s][None, ..., None],
            slices.train_roi[s][None]) for s in range(len(slices))]
  return {name: np.concatenate([np.asarray(o[name]) for o in out]) for name in ("eu", "mean")}


def _settings(config, **kw):
  return dict(patch_size=config.data.patch_size, ratio=config.masking.ratio,
              num_samples=config.uncertainty.num_samples, min_roi=config.data.min_roi_patches,
              **kw)


def test_refresh_maps_equal_direct_per_slice_computation(setup):
  config, model, params, slices = setup
  key = jax.random.key(11)
  ref = _direct(config, model, params, key, slices)
  au = anomaly.anomaly_maps(slices.images, ref["mean"], slices.score_roi, list(range(7)),
                            config.candidates.residual)
  cands = candidates.select_candidates_batch(
      au, slices.score_roi, percentile=config.candidates.percentile,
      min_size=config.candidates.min_size, top_k=config.candidates.top_k)
  want_eu = np.asarray(patches.patch_sum(ref["eu"], config.data.patch_size))
  want_exclude = candidates.candidate_patches(cands, config.data.patch_size)
  assert want_exclude.any() and (want_eu > 0).mean() > 0.1  # real maps, real candidates
  for mode in ("pmap", "shard_map"):
    got = maps_lib.MapGenerator(model, config, mode, jax.devices())(params, key, slices)
    np.testing.assert_allclose(got["patch_eu"], want_eu, err_msg=mode, **TOL)
    np.testing.assert_array_equal(got["exclude"], want_exclude, err_msg=mode)
    assert got["patch_eu"].dtype == np.float32 and got["exclude"].dtype == bool


def test_maps_do_not_depend_on_devices_slices_per_device_or_mode(setup):
  config, model, params, slices = setup
  key = jax.random.key(3)
  devices = jax.devices()
  assert len(devices) == 4, "conftest asks for 4 CPU devices"
  ref = _direct(config, model, params, key, slices)
  runs = [dict(devices=devices[:1], slices_per_device=3, mode="shard_map"),
          dict(devices=devices, slices_per_device=2, mode="shard_map"),
          dict(devices=devices[:2], slices_per_device=1, mode="pmap")]
  for run in runs:
    got = mc_maps.compute_maps(_apply(model), params, key, slices.images, slices.train_roi,
                               **_settings(config, **run))
    for name in ("eu", "mean"):
      np.testing.assert_allclose(got[name], ref[name], err_msg=f"{run} {name}", **TOL)
  assert not np.allclose(ref["eu"], _direct(config, model, params, jax.random.key(4),
                                            slices)["eu"])


def test_a_subset_with_its_slice_ids_gets_the_whole_sets_maps(setup):
  """What a process of a multi-process evaluation computes: some slices of the set, each with
  the key of its index in the whole set."""
  config, model, params, slices = setup
  key = jax.random.key(3)
  ref = _direct(config, model, params, key, slices)
  subset = np.array([5, 0, 3])
  got = mc_maps.compute_maps(_apply(model), params, key, slices.images[subset],
                             slices.train_roi[subset], slice_ids=subset, **_settings(
                                 config, devices=jax.devices()[:2], slices_per_device=1))
  for name in ("eu", "mean"):
    np.testing.assert_allclose(got[name], ref[name][subset], err_msg=name, **TOL)
  # Without the ids the subset's slices would draw the keys of slices 0, 1, 2.
  assert not np.allclose(ref["eu"][subset], ref["eu"][:3])
  for bad in ([5, 0], [5, 5, 3], [5, 0, -1]):
    with pytest.raises(ValueError, match="slice_ids must be 3 distinct indices"):
      mc_maps.compute_maps(_apply(model), params, key, slices.images[subset],
                           slices.train_roi[subset], slice_ids=np.array(bad),
                           **_settings(config, devices=jax.devices()[:1]))


def test_roi_ordering_and_short_encoder_keep_the_maps(setup):
  config, model, params, slices = setup
  key = jax.random.key(5)
  mc = mc_maps.MonteCarloMaps(_apply(model), **_settings(
      config, slices_per_device=1, devices=jax.devices()[:2], mode="shard_map",
      length_multiple=1, outputs=("eu", "mean", "au", "patch_eu")))
  chunks = list(mc.local_chunks(params, key, slices.images, slices.train_roi))
  order = np.concatenate([ids for ids, _ in chunks])
  sizes = sliceset.roi_patch_count(slices.train_roi, config.data.patch_size)
  # Largest ROIs first, not index order; every slice once; encoders shorter than N.
  assert sorted(order.tolist()) == list(range(7)) and order.tolist() != list(range(7))
  assert (np.diff(sizes[order]) <= 0).all()
  assert max(keep for keep, _ in mc._mc) < model.num_patches and len(mc._mc) > 1
  ref = _direct(config, model, params, key, slices)
  for ids, maps in chunks:
    for name in ("eu", "mean"):
      np.testing.assert_allclose(maps[name], ref[name][ids], err_msg=name, **TOL)
    np.testing.assert_allclose(maps["au"], np.abs(slices.images[ids] - maps["mean"]), atol=1e-6)
    np.testing.assert_allclose(maps["patch_eu"],
                               patches.patch_sum(maps["eu"], config.data.patch_size), atol=1e-6)


def test_exchange_returns_every_slice_and_refuses_a_wrong_layout(setup):
  config, model, _, _ = setup
  mc = mc_maps.MonteCarloMaps(_apply(model), **_settings(
      config, slices_per_device=2, devices=jax.devices(), mode="shard_map"))
  ids = np.array([4, 0, 2, 1, 3])
  values = np.arange(10, dtype=np.float32).reshape(5, 2)
  flags = values > 4
  got = mc.exchange(5, ids, {"v": values, "f": flags})
  np.testing.assert_array_equal(got["v"][ids], values)
  np.testing.assert_array_equal(got["f"][ids], flags)
  assert got["f"].dtype == bool
  with pytest.raises(RuntimeError, match="expected each of 0..4 once"):
    mc.exchange(5, np.array([4, 0, 2, 1, 1]), {"v": values})
  with pytest.raises(ValueError, match="outputs must be"):
    mc_maps.MonteCarloMaps(_apply(model), outputs=("recon",), **_settings(config))

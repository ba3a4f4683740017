"""AU candidate selection and the shared threshold + connected-components operator."""

import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import candidates
from u2ad_jax import patches


def test_threshold_is_the_percentile_of_nonzero_roi_values():
  values = np.zeros((12, 12))
  roi = np.zeros((12, 12), bool)
  roi[1:11, 1:11] = True
  values[1:11, 1:11] = np.arange(1, 101).reshape(10, 10)  # row-major: 91..100 in the last row
  values[3, 3] = 0.0          # zeros in the ROI do not enter the percentile ...
  values[0, :] = 1000.0       # ... and values outside the ROI are ignored entirely
  nonzero = values[roi & (values > 0)]
  threshold = np.percentile(nonzero, 90)
  got = candidates.select_candidates(values, roi, percentile=90, min_size=1, top_k=None)
  np.testing.assert_array_equal(got, roi & (values >= threshold))
  assert got.sum() == 10 and got[10, 1:11].all() and not got[0].any()
  # A lower percentile takes more pixels (monotone in the percentile).
  lower = candidates.select_candidates(values, roi, percentile=50, min_size=1, top_k=None)
  assert lower.sum() > got.sum() and (lower | got == lower).all()


def _blobs():
  """Zero background, every non-zero pixel above the percentile-0 threshold.

  X: 4 pixels of 2.0 (total 8, mean 2 -> score 16)
  Y: 2 pixels of 3.5 (total 7, mean 3.5 -> score 24.5): smaller total but ranks FIRST
  Z: 9 pixels of 1.2 (total 10.8, mean 1.2 -> score 12.96): largest total, ranks last
  S: 1 pixel of 50 (size 1): dropped by min_size = 2 however bright
  """
  values = np.zeros((16, 16))
  values[1:3, 1:3] = 2.0
  values[6, 6:8] = 3.5
  values[10:13, 10:13] = 1.2
  values[14, 1] = 50.0
  masks = {name: np.zeros((16, 16), bool) for name in "XYZS"}
  masks["X"][1:3, 1:3] = True
  masks["Y"][6, 6:8] = True
  masks["Z"][10:13, 10:13] = True
  masks["S"][14, 1] = True
  return values, np.ones((16, 16), bool), masks


def test_min_size_and_top_k_ordering_by_mean_times_total():
  values, roi, m = _blobs()
  pick = lambda k: candidates.select_candidates(values, roi, percentile=0, min_size=2, top_k=k)
  np.testing.assert_array_equal(pick(1), m["Y"])
  np.testing.assert_array_equal(pick(2), m["Y"] | m["X"])
  np.testing.assert_array_equal(pick(3), m["Y"] | m["X"] | m["Z"])
  np.testing.assert_array_equal(pick(None), m["Y"] | m["X"] | m["Z"])
  # 0 has no meaning (neither "none" nor "all"): rejected, here and in postprocessing.
  with pytest.raises(ValueError, match="top_k must be a count >= 1, or None"):
    pick(0)
  # min_size = 1 lets the bright single pixel in, and it ranks first (50 * 50).
  single = candidates.select_candidates(values, roi, percentile=0, min_size=1, top_k=1)
  np.testing.assert_array_equal(single, m["S"])
  # min_size = 5 keeps Z only.
  np.testing.assert_array_equal(
      candidates.select_candidates(values, roi, percentile=0, min_size=5, top_k=3), m["Z"])


def test_diagonal_pixels_are_one_component():
  values = np.zeros((8, 8))
  values[2, 2] = 1.0
  values[3, 3] = 1.0   # touches (2, 2) only by a corner
  values[6, 0] = 0.9
  values[6, 1] = 0.9   # a 4-connected pair, lower score than the diagonal pair
  roi = np.ones((8, 8), bool)
  got = candidates.select_candidates(values, roi, percentile=0, min_size=2, top_k=1)
  want = np.zeros((8, 8), bool)
  want[2, 2] = want[3, 3] = True
  np.testing.assert_array_equal(got, want)  # with 4-connectivity both would be single pixels


def test_roi_restriction_and_empty_maps():
  values, _, m = _blobs()
  roi = np.zeros((16, 16), bool)
  roi[8:, 8:] = True  # only Z is inside the scoring ROI
  got = candidates.select_candidates(values, roi, percentile=0, min_size=2, top_k=3)
  np.testing.assert_array_equal(got, m["Z"])
  assert not candidates.select_candidates(np.zeros((16, 16)), np.ones((16, 16), bool)).any()
  assert not candidates.select_candidates(values, np.zeros((16, 16), bool)).any()
  nan_map = np.full((16, 16), np.nan)
  assert not candidates.select_candidates(nan_map, np.ones((16, 16), bool)).any()


def test_threshold_components_keeps_values_inside_components():
  values, roi, m = _blobs()
  out = candidates.threshold_components(values, roi, percentile=0, min_size=2, top_k=None)
  kept = m["X"] | m["Y"] | m["Z"]
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[kept], values[kept].astype(np.float32))
  assert (out[~kept] == 0).all()
  top1 = candidates.threshold_components(values, roi, percentile=0, min_size=2, top_k=1)
  np.testing.assert_array_equal(top1 > 0, m["Y"])


def test_default_parameters_on_a_noisy_map():
  # Smooth low background with a bright 3 x 3 blob: the default operator finds the blob.
  rng = np.random.default_rng(0)
  values = rng.uniform(0.0, 0.05, (32, 32))
  values[10:13, 20:23] = rng.uniform(0.8, 1.0, (3, 3))
  roi = np.zeros((32, 32), bool)
  roi[4:28, 12:26] = True
  got = candidates.select_candidates(values, roi)
  assert got[10:13, 20:23].all()
  assert not (got & ~roi).any()


def test_batch_helper_and_candidate_patches():
  values, roi, m = _blobs()
  batch_values = np.stack([values, values[::-1], np.zeros_like(values)])
  batch_roi = np.stack([roi, roi, roi])
  got = candidates.select_candidates_batch(batch_values, batch_roi, percentile=0, min_size=2,
                                           top_k=2)
  assert got.shape == (3, 16, 16) and got.dtype == bool
  for i in range(3):
    np.testing.assert_array_equal(
        got[i], candidates.select_candidates(batch_values[i], batch_roi[i], 0, 2, 2))
  cp = candidates.candidate_patches(got, 4)
  assert cp.shape == (3, 16) and cp.dtype == bool
  np.testing.assert_array_equal(cp, np.asarray(patches.patch_any(jnp.asarray(got), 4)))
  # Hand check on image 0: Y at row 6, cols 6-7 -> patch (1, 1) = 5; X rows/cols 1-2 -> patch 0.
  np.testing.assert_array_equal(np.flatnonzero(cp[0]), [0, 5])
  assert not cp[2].any()


def test_invalid_parameters_raise():
  values, roi, _ = _blobs()
  for kwargs in [dict(percentile=101), dict(percentile=-1), dict(percentile=float("nan")),
                 dict(min_size=0), dict(top_k=-1), dict(top_k=0), dict(top_k=1.5),
                 dict(top_k=True)]:
    with pytest.raises(ValueError):
      candidates.select_candidates(values, roi, **kwargs)
  with pytest.raises(ValueError):
    candidates.select_candidates(values, roi[:8])
  with pytest.raises(ValueError):
    candidates.candidate_patches(np.zeros((1, 10, 10), bool), 4)


def test_top_k_has_one_meaning_in_candidates_and_postprocessing():
  from u2ad_jax import errors
  from u2ad_jax.evaluation import postprocess
  values, roi, m = _blobs()
  cfg = {"percentile": 0.0, "min_size": 2, "top_k": None}
  params = postprocess.PostprocessParams.from_config(cfg)
  kept = postprocess.postprocess(values[None], roi[None], params)[0] > 0
  np.testing.assert_array_equal(
      kept, candidates.select_candidates(values, roi, percentile=0, min_size=2, top_k=None))
  np.testing.assert_array_equal(kept, m["Y"] | m["X"] | m["Z"])
  assert postprocess.PostprocessParams.from_config(dict(cfg, top_k=2)).top_k == 2
  for bad in (0, -1):
    with pytest.raises(errors.ConfigValueError, match=r"config\.postprocess: top_k must be"):
      postprocess.PostprocessParams.from_config(dict(cfg, top_k=bad))

"""Exact properties of the ROI masking policies (random, EU-guided, AU exclusion)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import masking

N = 24
DRAWS = 400


def _roi_batch(rng: np.random.Generator) -> np.ndarray:
  """[B, N] ROI patches with ROI sizes 0, 1, 2, 3, 7, 16 and N (scattered positions)."""
  sizes = [0, 1, 2, 3, 7, 16, N]
  roi = np.zeros((len(sizes), N), dtype=bool)
  for b, n in enumerate(sizes):
    roi[b, rng.permutation(N)[:n]] = True
  return roi


# One compiled draw per input shape, shared by the tests: ratio, w_eu and tau are traced.
_random_draws = jax.jit(jax.vmap(masking.random_mask, in_axes=(0, None, None)))
_guided_draws = jax.jit(jax.vmap(masking.guided_mask, in_axes=(0, None, None, None, None, None,
                                                               None)))


def _keys(num: int = DRAWS, seed: int = 0) -> jax.Array:
  return jax.random.split(jax.random.key(seed), num)


def random_draws(roi, ratio, num=DRAWS, seed=0) -> np.ndarray:
  """`num` independent random masks -> [num, B, N]."""
  return np.asarray(_random_draws(_keys(num, seed), jnp.asarray(roi), jnp.float32(ratio)))


def guided_draws(roi, ratio, u, w_eu, tau, exclude=None, num=DRAWS, seed=0) -> np.ndarray:
  """`num` independent guided masks -> [num, B, N] (no exclusion = an all-False exclude)."""
  roi = jnp.asarray(roi)
  exclude = jnp.zeros(roi.shape, bool) if exclude is None else jnp.asarray(exclude)
  return np.asarray(_guided_draws(_keys(num, seed), roi, jnp.float32(ratio),
                                  jnp.asarray(u, jnp.float32), jnp.float32(w_eu),
                                  jnp.float32(tau), exclude))


def _expected_count(roi: np.ndarray, ratio: float) -> np.ndarray:
  return np.floor(ratio * roi.sum(-1) + 0.5).astype(int)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3])
def test_random_mask_exact_count_and_roi_only(ratio):
  roi = _roi_batch(np.random.default_rng(1))
  masks = random_draws(roi, ratio)  # [D, B, N]
  np.testing.assert_array_equal(masks.sum(-1), np.broadcast_to(_expected_count(roi, ratio),
                                                               masks.shape[:2]))
  assert not (masks & ~roi[None]).any(), "a non-ROI patch was masked"
  assert masks.dtype == bool and masks.shape == (DRAWS,) + roi.shape


@pytest.mark.parametrize("w_eu,tau", [(0.0, 1.0), (1.0, 1.0), (5.0, 0.3)])
def test_guided_mask_exact_count_exclusion_and_roi_only(w_eu, tau):
  rng = np.random.default_rng(2)
  roi = _roi_batch(rng)
  u = jnp.asarray(rng.gamma(1.0, 1.0, size=roi.shape), jnp.float32)
  # A couple of candidate patches per image (inside and outside the ROI).
  exclude = np.zeros_like(roi)
  exclude[:, [0, 5, 11]] = True
  ratio = 0.75
  masks = guided_draws(roi, ratio, u, w_eu, tau, exclude)
  eligible = roi & ~exclude
  # Exact count m = round(r * n_roi) on the FULL ROI; all eligible masked when too few.
  want = np.minimum(_expected_count(roi, ratio), eligible.sum(-1))
  np.testing.assert_array_equal(masks.sum(-1), np.broadcast_to(want, masks.shape[:2]))
  assert not (masks & ~roi[None]).any(), "a non-ROI patch was masked"
  assert not (masks & exclude[None]).any(), "an AU candidate patch was masked"


def test_too_few_eligible_masks_all_eligible_and_empty_roi_masks_nothing():
  roi = np.zeros((3, 8), dtype=bool)
  roi[0, :4] = True          # n = 4, m = 3, but only 2 eligible -> exactly those 2
  roi[1, :] = True           # n = 8, m = 6, 6 eligible -> exactly those 6
  exclude = np.zeros_like(roi)
  exclude[0, :2] = True
  exclude[1, :2] = True
  # image 2: no ROI at all -> nothing masked, even with a large guidance weight.
  u = jnp.ones(roi.shape)
  masks = guided_draws(roi, 0.75, u, 3.0, 0.5, exclude, num=50)
  eligible = roi & ~exclude
  np.testing.assert_array_equal(masks[:, 0], np.broadcast_to(eligible[0], (50, 8)))
  np.testing.assert_array_equal(masks[:, 1], np.broadcast_to(eligible[1], (50, 8)))
  assert not masks[:, 2].any()
  assert not np.asarray(masking.random_mask(jax.random.key(0), jnp.zeros((2, 8), bool),
                                            0.75)).any()


def test_w_eu_zero_is_the_uniform_draw_key_for_key():
  rng = np.random.default_rng(3)
  roi = jnp.asarray(_roi_batch(rng))
  u = jnp.asarray(rng.gamma(0.5, 3.0, size=roi.shape), jnp.float32)
  uniform = random_draws(roi, 0.75, num=20, seed=12)
  for tau in (1.0, 0.0, np.inf):  # tau is irrelevant (and must not produce nan) at w_eu = 0
    guided = guided_draws(roi, 0.75, u, 0.0, tau, num=20, seed=12)
    np.testing.assert_array_equal(guided, uniform)
  # tau -> infinity also removes the guidance.
  np.testing.assert_array_equal(guided_draws(roi, 0.75, u, 2.0, np.inf, num=20, seed=12),
                                uniform)
  # And the un-vmapped, un-jitted call agrees with the batched one.
  key = _keys(20, 12)[3]
  np.testing.assert_array_equal(np.asarray(masking.guided_mask(key, roi, 0.75, u, 0.0, 1.0)),
                                uniform[3])


def test_w_eu_zero_statistics_are_uniform():
  # One image, 10 of 16 patches in the ROI, strongly varying uncertainty that must be ignored.
  roi = np.zeros((1, 16), dtype=bool)
  roi[0, 3:13] = True
  u = jnp.asarray(np.linspace(0.0, 50.0, 16)[None], jnp.float32)
  draws = 4000
  masks = guided_draws(roi, 0.75, u, 0.0, 1.0, num=draws, seed=7)[:, 0]
  m, n = 8, 10  # round(7.5) = 8
  freq = masks.mean(0)
  p = m / n
  tol = 5 * np.sqrt(p * (1 - p) / draws)  # 5 binomial standard deviations
  np.testing.assert_array_less(np.abs(freq[roi[0]] - p), tol)
  assert (freq[~roi[0]] == 0).all()


def test_single_draw_probabilities_are_the_softmax():
  # With m = 1 the Gumbel-top-k draw is a single categorical draw: P(i) = softmax(w*u_norm/tau).
  roi = jnp.ones((1, 4), bool)
  u = np.array([[1.0, 2.0, 3.0, 6.0]], np.float32)  # ROI mean 3 -> u_norm = u / 3
  w_eu, tau = 1.5, 0.5
  draws = 6000
  masks = guided_draws(roi, 0.25, u, w_eu, tau, num=draws, seed=11)[:, 0]
  assert (masks.sum(-1) == 1).all()
  logits = w_eu * (u[0] / u[0].mean()) / tau
  want = np.exp(logits - logits.max())
  want /= want.sum()
  freq = masks.mean(0)
  tol = 5 * np.sqrt(want * (1 - want) / draws)
  np.testing.assert_array_less(np.abs(freq - want), tol + 1e-3)


def test_masking_frequency_increases_with_uncertainty():
  n = 20
  roi = jnp.ones((1, n), bool)
  u = jnp.asarray(np.arange(1, n + 1, dtype=np.float32)[None])
  draws = 3000
  masks = guided_draws(roi, 0.5, u, 2.0, 1.0, num=draws, seed=5)
  freq = masks[:, 0].mean(0)
  # Spearman rank correlation between u and the masking frequency.
  ranks = np.argsort(np.argsort(freq))
  rho = np.corrcoef(ranks, np.arange(n))[0, 1]
  assert rho > 0.95, (rho, freq)
  # Chi-square against the uniform frequency m/n: far beyond any plausible fluctuation.
  expected = draws * 10 / n
  chi2 = ((masks[:, 0].sum(0) - expected) ** 2 / expected).sum()
  assert chi2 > 200.0, chi2  # chi2(19 dof) 99.9% quantile is ~43.8
  # And the extremes are clearly ordered.
  assert freq[-4:].mean() > freq[:4].mean() + 0.3


def test_uncertainty_scale_invariance():
  rng = np.random.default_rng(4)
  roi = jnp.asarray(_roi_batch(rng))
  u = jnp.asarray(rng.gamma(1.0, 1.0, size=roi.shape), jnp.float32)
  key = jax.random.key(9)
  a = masking.guided_mask(key, roi, 0.75, u, 2.0, 0.7)
  b = masking.guided_mask(key, roi, 0.75, u * 1000.0, 2.0, 0.7)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Uncertainty outside the ROI is ignored (it would otherwise shift the per-image mean).
  u_out = jnp.where(roi, u, 1e6)
  c = masking.guided_mask(key, roi, 0.75, u_out, 2.0, 0.7)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_normalize_patch_uncertainty_guards():
  roi = jnp.asarray([[True, True, False], [False, False, False], [True, True, True]])
  u = jnp.asarray([[1.0, 3.0, 100.0], [1.0, 2.0, 3.0], [0.0, 0.0, jnp.nan]])
  got = np.asarray(masking.normalize_patch_uncertainty(roi, u))
  np.testing.assert_allclose(got[0], [0.5, 1.5, 0.0])
  np.testing.assert_array_equal(got[1], [0.0, 0.0, 0.0])  # no ROI
  np.testing.assert_array_equal(got[2], [0.0, 0.0, 0.0])  # zero (and nan) uncertainty
  assert np.isfinite(got).all()


def test_same_key_same_mask_different_keys_differ():
  roi = jnp.asarray(_roi_batch(np.random.default_rng(6)))
  u = jnp.linspace(0.0, 1.0, roi.shape[0] * N).reshape(roi.shape)
  for fn in (lambda k: masking.random_mask(k, roi, 0.75),
             lambda k: masking.guided_mask(k, roi, 0.75, u, 1.0, 1.0)):
    a, b = fn(jax.random.key(1)), fn(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = fn(jax.random.key(2))
    assert (np.asarray(a) != np.asarray(c)).any()
  # Images of one batch use different keys: two identical ROIs do not get identical masks in
  # every draw.
  same = jnp.ones((2, N), bool)
  masks = random_draws(same, 0.5, num=20)
  assert (masks[:, 0] != masks[:, 1]).any(axis=-1).all()


def test_traced_guidance_scalars_do_not_retrace():
  roi = jnp.asarray(_roi_batch(np.random.default_rng(8)))
  u = jnp.ones(roi.shape)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def draw(key, w_eu, tau):
    return masking.guided_mask(key, roi, 0.75, u, w_eu, tau)

  for w_eu, tau in [(0.0, 1.0), (1.0, 0.5), (3.0, 2.0)]:
    mask = draw(jax.random.key(0), jnp.float32(w_eu), jnp.float32(tau))
    np.testing.assert_array_equal(np.asarray(mask).sum(-1),
                                  _expected_count(np.asarray(roi), 0.75))


def test_masks_feed_make_plan():
  roi = jnp.asarray(_roi_batch(np.random.default_rng(10)))
  mask = masking.random_mask(jax.random.key(3), roi, 0.75)
  plan = masking.make_plan(mask)
  visible = np.asarray(plan.keep_valid).sum(-1)
  np.testing.assert_array_equal(visible, N - np.asarray(mask).sum(-1))

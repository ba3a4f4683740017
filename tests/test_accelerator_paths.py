"""Accelerator code paths checked on CPU: the fused attention kernels, the per-platform choice
('auto') and bfloat16 compute.

The cuDNN kernel itself needs a GPU; its call is the one below with `implementation='cudnn'`, so
the CPU test runs the SAME call (key lengths instead of a dense mask) through XLA. The Pallas TPU
kernel runs on CPU in the Pallas TPU interpreter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from u2ad_jax import uncertainty
from u2ad_jax.masking import make_plan
from u2ad_jax.models import layers
from u2ad_jax.models import vit_mae
from u2ad_jax.train import settings
from u2ad_jax.train import state as state_lib


def _qkv_and_prefix_mask(seed=0, b=2, t=37, h=4, dh=8, lengths=(37, 20)):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, dh)).astype(np.float32)) for _ in range(3))
  key_valid = jnp.asarray(np.arange(t)[None, :] < np.asarray(lengths)[:, None])
  return q, k, v, key_valid


def _value_and_grads(attention, q, k, v, key_valid):
  # A fixed random cotangent so that every output element enters the gradients.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, key_valid) * weights)
  return attention(q, k, v, key_valid), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("with_mask", [True, False])
def test_cudnn_call_form_matches_dense(with_mask):
  q, k, v, key_valid = _qkv_and_prefix_mask()
  key_valid = key_valid if with_mask else None
  xla_form = functools.partial(layers.cudnn_attention, implementation="xla")
  out, grads = _value_and_grads(xla_form, q, k, v, key_valid)
  ref, ref_grads = _value_and_grads(layers.dense_attention, q, k, v, key_valid)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)
  if with_mask:  # the padded keys really are excluded: changing them changes nothing
    k2 = k.at[1, 20:].set(100.0)
    np.testing.assert_allclose(np.asarray(xla_form(q, k2, v, key_valid)), np.asarray(out),
                               atol=2e-6)


def test_tpu_flash_kernel_matches_dense_in_the_interpreter():
  q, k, v, key_valid = _qkv_and_prefix_mask(t=37)  # padded to one 128-row block inside
  with pltpu.force_tpu_interpret_mode():
    out, grads = _value_and_grads(layers.tpu_flash_attention, q, k, v, key_valid)
  ref, ref_grads = _value_and_grads(layers.dense_attention, q, k, v, key_valid)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


def test_auto_attention_per_platform_and_explicit_choice_wins():
  assert layers.resolve_attention("auto", jnp.float32, "cpu") == "blockwise"
  assert layers.resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert layers.resolve_attention("auto", jnp.float16, "gpu") == "cudnn"
  # cuDNN's fused kernel takes half precision only: a float32 GPU model uses XLA's attention.
  assert layers.resolve_attention("auto", jnp.float32, "gpu") == "dot_product"
  assert layers.resolve_attention("auto", jnp.bfloat16, "tpu") == "tpu_flash"
  assert layers.resolve_attention("auto") == "blockwise"  # this machine: CPU
  assert layers.resolve_attention("dense", jnp.bfloat16, "gpu") == "dense"
  with pytest.raises(ValueError, match="unknown attention 'flsh'"):
    layers.resolve_attention("flsh")
  assert vit_mae.build_model("mu").attention == "auto"


def test_compute_dtype_auto_is_bfloat16_on_accelerators_only():
  assert state_lib.resolve_compute_dtype("auto", "gpu") == jnp.bfloat16
  assert state_lib.resolve_compute_dtype("auto", "tpu") == jnp.bfloat16
  assert state_lib.resolve_compute_dtype("auto", "cpu") == jnp.float32
  assert state_lib.resolve_compute_dtype("float16", "gpu") == jnp.float16  # explicit wins


def _mc_maps(model, params, images, roi, key):
  apply_fn = lambda p, x, plan: model.apply({"params": p}, x, plan)
  fn = jax.jit(functools.partial(uncertainty.mc_uncertainty, apply_fn, patch_size=model.patch_size,
                                 ratio=0.75, num_samples=4))
  return fn(params, key, images, roi)


def test_bfloat16_monte_carlo_maps_stay_close_to_float32():
  """bf16 compute (float32 params, softmax and outputs): the mean reconstruction within a stated
  absolute tolerance and the EU map neither zero nor far from float32's."""
  f32 = vit_mae.build_model("mu", scan_layers=False, remat=False)
  bf16 = vit_mae.build_model("mu", scan_layers=False, remat=False, dtype=jnp.bfloat16)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.uniform(size=(2, 32, 32, 1)).astype(np.float32))
  roi = np.zeros((2, 32, 32), bool)
  roi[:, 4:28, 10:22] = True  # a cord-like vertical band of 3 x 6 patches
  roi = jnp.asarray(roi)
  plan = make_plan(jnp.zeros((2, f32.num_patches), bool))
  params = jax.jit(f32.init)(jax.random.PRNGKey(0), images, plan)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  key = jax.random.PRNGKey(5)
  ref = _mc_maps(f32, params, images, roi, key)
  out = _mc_maps(bf16, params, images, roi, key)
  for name in ("eu", "mean", "au"):
    assert out[name].dtype == jnp.float32, name
  np.testing.assert_array_equal(np.asarray(out["count"]), np.asarray(ref["count"]))
  np.testing.assert_allclose(np.asarray(out["mean"]), np.asarray(ref["mean"]), atol=2e-2)
  eu, eu_ref = np.asarray(out["eu"])[np.asarray(roi)], np.asarray(ref["eu"])[np.asarray(roi)]
  assert eu_ref.mean() > 0
  # An all-zero (or collapsed) bf16 EU fails here: same scale as float32 within 25 %, and the
  # same spatial pattern.
  assert abs(eu.mean() / eu_ref.mean() - 1.0) < 0.25
  assert np.corrcoef(eu, eu_ref)[0, 1] > 0.9


def test_paper_config_computes_in_bfloat16_on_accelerators_only():
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  base = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
  config = config_lib.sibling(str(base), "paper").get_config()
  assert config.model.overrides.dtype == "auto"
  assert settings.model_overrides(config)["dtype"] == jnp.float32  # this machine: CPU
  assert state_lib.resolve_compute_dtype(config.model.overrides.dtype, "gpu") == jnp.bfloat16

"""Accelerator code paths checked on CPU: the fused attention kernels, the per-platform choice
('auto') and its start-up check, and bfloat16 compute.

The cuDNN kernel itself needs a GPU. Two things are checked without one: (1) with
`implementation='cudnn'` and only cuDNN's version lookup stubbed, JAX's own trace-time rules
for the fused kernel (head width, sequence lengths of a training call) run on CPU, so tracing
forward and gradient shows that a GPU run would get past them; (2) the SAME padded call
(key lengths instead of a dense mask) runs through XLA and is compared with dense attention.
The Pallas TPU kernel runs on CPU in the Pallas TPU interpreter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.cudnn import fused_attention_stablehlo
from jax.experimental.pallas import tpu as pltpu

from u2ad_jax import parallel
from u2ad_jax import uncertainty
from u2ad_jax.masking import make_plan
from u2ad_jax.models import layers
from u2ad_jax.models import vit_mae
from u2ad_jax.train import settings
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib


@pytest.fixture
def cudnn_version_stub(monkeypatch):
  """cuDNN 9.8 as far as JAX's version lookup knows: the only GPU-specific call on the trace
  path of `implementation='cudnn'` (everything else, including the training-length rule that
  rejected odd lengths, is JAX's own Python and runs as on a GPU)."""
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


def _qkv_and_prefix_mask(seed=0, b=2, t=37, h=4, dh=8, lengths=(37, 20)):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, dh)).astype(np.float32)) for _ in range(3))
  key_valid = jnp.asarray(np.arange(t)[None, :] < np.asarray(lengths)[:, None])
  return q, k, v, key_valid


def _value_and_grads(attention, q, k, v, key_valid):
  # A fixed random cotangent so that every output element enters the gradients.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))

  @jax.jit  # one compiled program instead of op-by-op dispatch
  def run(q, k, v):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, key_valid) * weights)
    return attention(q, k, v, key_valid), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return run(q, k, v)


@pytest.mark.parametrize("t", [37, 36, 65])  # odd lengths are padded inside, even ones not
@pytest.mark.parametrize("with_mask", [True, False])
def test_cudnn_call_form_matches_dense(with_mask, t):
  q, k, v, key_valid = _qkv_and_prefix_mask(t=t, lengths=(t, 20))
  key_valid = key_valid if with_mask else None
  xla_form = functools.partial(layers.cudnn_attention, implementation="xla", scale=0.3)
  dense = functools.partial(layers.dense_attention, scale=0.3)
  out, grads = _value_and_grads(xla_form, q, k, v, key_valid)
  ref, ref_grads = _value_and_grads(dense, q, k, v, key_valid)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
  for g, r in zip(grads, ref_grads):
    assert g.shape == q.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)
  if with_mask:  # the padded keys really are excluded: changing them changes nothing
    k2 = k.at[1, 20:].set(100.0)
    np.testing.assert_allclose(np.asarray(xla_form(q, k2, v, key_valid)), np.asarray(out),
                               atol=2e-6)


def _model_attention_shapes(variant):
  """`(tokens, heads, head_dim)` of every attention a `variant` model runs: the encoder and the
  decoder at 1 + N tokens, and the encoder at the Monte-Carlo maps' lengths 1 + L
  (`uncertainty.mc_encoder_length`, rounded to 64 as the maps do, and exact) for cord-like ROIs
  of a few widths."""
  model = vit_mae.build_model(variant)
  h, p = model.image_size, model.patch_size
  encoder = (model.encoder_heads, model.encoder_width // model.encoder_heads)
  decoder = (model.decoder_heads, model.decoder_width // model.decoder_heads)
  shapes = {(1 + model.num_patches, *encoder), (1 + model.num_patches, *decoder)}
  for half_width in (p // 2, p, 3 * p):
    roi = np.zeros((1, h, h), bool)
    roi[:, :, h // 2 - half_width:h // 2 + half_width] = True
    for multiple in (64, 1):
      length = uncertainty.mc_encoder_length(roi, p, 0.75, multiple=multiple)
      shapes.add((1 + length, *encoder))
  return sorted(shapes)


@pytest.mark.parametrize("variant", ["mu", "cpu", "paper"])
def test_cudnn_attention_traces_forward_and_gradient_at_every_model_length(
    variant, cudnn_version_stub):
  """JAX's cuDNN rules reject a training call with an odd length ("Unsupported sequence length
  Q 1025, KV 1025"); every length of our models is odd (1 + patches)."""
  shapes = _model_attention_shapes(variant)
  assert any(t % 2 for t, _, _ in shapes)
  for t, heads, head_dim in shapes:
    spec = jax.ShapeDtypeStruct((2, t, heads, head_dim), jnp.bfloat16)
    key_valid = jnp.arange(t)[None, :] < jnp.array([t, t // 2])[:, None]
    attention = lambda q, k, v: layers.cudnn_attention(q, k, v, key_valid)
    out = jax.eval_shape(attention, spec, spec, spec)
    grads = jax.eval_shape(jax.grad(
        lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)),
        spec, spec, spec)
    assert out.shape == spec.shape and out.dtype == jnp.bfloat16, (t, heads, head_dim)
    assert all(g.shape == spec.shape for g in grads)


def test_paper_train_step_traces_and_differentiates_with_cudnn_in_bfloat16(cudnn_version_stub):
  """The train step of the paper-size model, bfloat16 compute and cuDNN attention, traced
  (forward, gradient, Adam) as a GPU would trace it; nothing is compiled or run."""
  model = vit_mae.build_model("paper", attention="cudnn", dtype=jnp.bfloat16)
  optimizer = optax.adam(1e-3)
  abstract_state = jax.eval_shape(
      lambda key: state_lib.create_state(state_lib.init_params(model, key), optimizer),
      jax.random.key(0))
  body = functools.partial(step_lib.train_step, apply_fn=model.apply, optimizer=optimizer,
                           settings=step_lib.StepSettings(patch_size=model.patch_size, ratio=0.75))
  wrapped = parallel.DataParallel(body, "shard_map", num_args=4, sharded=(1,), donate=(0,),
                                  devices=jax.devices()[:1])
  b, h = 2, model.image_size
  batch = {"image": jax.ShapeDtypeStruct((b, h, h, 1), jnp.float32),
           "train_roi": jax.ShapeDtypeStruct((b, h, h), jnp.bool_),
           "valid": jax.ShapeDtypeStruct((b,), jnp.bool_)}
  step_fn = wrapped._fn  # pylint: disable=protected-access  (the jitted shard_map, unplaced)
  new_state, metrics = jax.eval_shape(step_fn, abstract_state, batch, jax.random.key(1),
                                      step_lib.guidance_arrays())
  assert jax.tree.structure(new_state) == jax.tree.structure(abstract_state)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


def test_remat_keeps_the_cudnn_forward_instead_of_rerunning_it(cudnn_version_stub):
  """Under the default remat policy the gradient runs cuDNN's attention forward once per
  stack (encoder, decoder: scanned, one traced block each), not twice (forward + rerun)."""
  model = vit_mae.build_model("mu", attention="cudnn", dtype=jnp.bfloat16)
  assert model.remat and model.remat_policy == "recompute_elementwise"
  params = jax.eval_shape(lambda key: state_lib.init_params(vit_mae.build_model("mu"), key),
                          jax.random.key(0))
  images = jnp.zeros((2, 32, 32, 1))
  plan = make_plan(jnp.zeros((2, model.num_patches), bool).at[:, :10].set(True))
  loss = lambda p: model.apply({"params": p}, images, plan)[0].sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert jaxpr.count("dot_product_attention_fwd") == 2
  assert jaxpr.count("dot_product_attention_bwd") == 2


@pytest.mark.parametrize("t", [37, 200])  # one 128-row block; two blocks (padded to 256)
def test_tpu_flash_kernel_matches_dense_in_the_interpreter(t):
  q, k, v, key_valid = _qkv_and_prefix_mask(t=t, h=2, lengths=(t, 20))
  with pltpu.force_tpu_interpret_mode():
    out, grads = _value_and_grads(layers.tpu_flash_attention, q, k, v, key_valid)
  ref, ref_grads = _value_and_grads(layers.dense_attention, q, k, v, key_valid)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


def test_attention_gets_the_scale_and_unscaled_queries(monkeypatch):
  """q is not pre-scaled in the compute dtype: the kernel gets `scale = Dh ** -0.5` and applies
  it to float32 logits."""
  calls = []

  def spy(q, k, v, key_valid=None, *, scale=None):
    calls.append((q, scale))
    return layers.dense_attention(q, k, v, key_valid, scale=scale)

  monkeypatch.setitem(layers.ATTENTION_FNS, "spy", spy)
  attention = layers.MultiHeadAttention(num_heads=2, attention="spy")
  x = jax.random.normal(jax.random.key(0), (1, 5, 16))
  params = attention.init(jax.random.key(1), x, None)
  attention.apply(params, x, None)
  q, scale = calls[-1]
  assert scale == pytest.approx(8 ** -0.5)
  qkv = params["params"]["qkv"]
  expected_q = jnp.einsum("btd,dhe->bthe", x, qkv["kernel"][:, 0]) + qkv["bias"][0]
  np.testing.assert_allclose(np.asarray(q), np.asarray(expected_q), atol=1e-5)


def test_output_heads_compute_in_float32_under_bfloat16():
  """The heads take the bfloat16 decoder output and compute in float32: the reconstruction is
  exactly the float32 head applied to `aux['decoded']` (a bfloat16 head is off by ~1e-3)."""
  model = vit_mae.build_model("mu", dtype=jnp.bfloat16, scan_layers=False, remat=False)
  params = state_lib.init_params(model, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
  plan = make_plan(jnp.zeros((2, model.num_patches), bool).at[:, :20].set(True))
  recon, _, aux = jax.jit(model.apply)({"params": params}, images, plan)
  assert aux["decoded"].dtype == jnp.bfloat16 and recon.dtype == jnp.float32
  head = vit_mae.ImageHead(model.patch_size ** 2)
  patches_f32 = jax.jit(head.apply)({"params": params["image_head"]},
                                    aux["decoded"].astype(jnp.float32))
  from u2ad_jax import patches as patch_lib  # pylint: disable=g-import-not-at-top
  expected = patch_lib.unpatchify(patches_f32, model.patch_size, model.grid)
  np.testing.assert_allclose(np.asarray(recon), np.asarray(expected), atol=1e-6)


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


def test_auto_falls_back_once_with_one_warning_when_the_kernel_does_not_compile(capsys):
  """On this CPU the GPU's 'auto' choice (cuDNN) cannot compile: 'auto' takes 'dot_product'
  and says so in one line, once per process; an explicit 'cudnn' is not second-guessed."""
  shapes = ((2, 33, 2, 8),)
  assert layers.checked_attention("auto", jnp.bfloat16, shapes, platform="gpu") == "dot_product"
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "'cudnn'" in lines[0] and "'dot_product'" in lines[0], lines
  assert layers.checked_attention("auto", jnp.bfloat16, shapes, platform="gpu") == "dot_product"
  assert capsys.readouterr().err == ""  # checked once
  assert layers.checked_attention("cudnn", jnp.bfloat16, shapes, platform="gpu") == "cudnn"
  assert layers.checked_attention("auto", jnp.float32, shapes, platform="cpu") == "blockwise"
  model = vit_mae.build_model("mu", dtype=jnp.bfloat16)
  assert vit_mae.with_checked_attention(model, platform="gpu").attention == "dot_product"
  assert vit_mae.with_checked_attention(model).attention == "auto"  # CPU: blockwise works
  assert vit_mae.with_checked_attention(model.clone(attention="dense"), "gpu").attention == "dense"


def test_auto_keeps_a_platform_kernel_that_compiles_and_agrees(capsys):
  with pltpu.force_tpu_interpret_mode():
    assert layers.checked_attention("auto", jnp.float32, ((2, 37, 1, 8),),
                                    platform="tpu") == "tpu_flash"
  assert capsys.readouterr().err == ""


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

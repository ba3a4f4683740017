"""MaskedAutoencoderViT: shapes, masking semantics, padding invariance, option equivalence."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2ad_jax import patches as patch_lib
from u2ad_jax.masking import make_plan
from u2ad_jax.models import layers
from u2ad_jax.models import vit_mae

B = 3


def _random_mask(rng, n, b=B, counts=(20, 28, 36)):
  """Masks with a different masked count per image (as exact per-image ROI masking gives)."""
  mask = np.zeros((b, n), bool)
  for i in range(b):
    mask[i, rng.choice(n, size=counts[i % len(counts)], replace=False)] = True
  return jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _mu_setup(seed=0):
  model = vit_mae.build_model("mu")
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(size=(B, 32, 32, 1)).astype(np.float32))
  mask = _random_mask(rng, model.num_patches)
  plan = make_plan(mask)  # L = N: padded
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), images, plan)["params"]
  return model, params, images, mask


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  # One jitted function per model config, so tests sharing shapes share the compilation.
  return jax.jit(lambda p, x, pl: model.apply({"params": p}, x, pl))


def _apply(model, params, images, plan):
  return _jitted_apply(model)(params, images, plan)


def _loss(model, params, images, plan):
  outputs = model.apply({"params": params}, images, plan)
  recon, edge, aux = outputs
  return (recon ** 2).mean() + edge.mean() + aux["encoded"].astype(jnp.float32).mean(), outputs


@functools.lru_cache(maxsize=None)
def _jitted_outputs_and_grad(model):
  """(outputs, d loss / d params) in one compiled function per model config."""
  def fn(params, images, plan):
    grad, outputs = jax.grad(functools.partial(_loss, model), has_aux=True)(params, images, plan)
    return outputs, grad
  return jax.jit(fn)


# ------------------------------------------------------------------------------------------
# Shapes and attributes


@pytest.mark.parametrize("variant", sorted(vit_mae.VARIANTS))
def test_shapes_for_every_variant(variant):
  model = vit_mae.build_model(variant)
  size, p = model.image_size, model.patch_size
  n = model.num_patches
  assert n == (size // p) ** 2
  assert size == vit_mae.VARIANTS[variant]["image_size"]
  b, num_keep = 2, n - 5
  images = jax.ShapeDtypeStruct((b, size, size, 1), jnp.float32)
  plan = jax.eval_shape(lambda: make_plan(jnp.zeros((b, n), bool).at[:, :5].set(True), num_keep))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, plan)
  recon, edge, aux = jax.eval_shape(model.apply, variables, images, plan)
  assert recon.shape == edge.shape == (b, size, size, 1)
  assert recon.dtype == edge.dtype == jnp.float32
  assert aux["encoded"].shape == (b, 1 + num_keep, model.encoder_width)
  assert aux["decoded"].shape == (b, n, model.decoder_width)
  # Position embeddings are fixed, not parameters; cls and mask tokens are learned.
  names = set(variables["params"])
  assert {"cls_token", "mask_token"} <= names
  assert not any("pos" in name for name in names)


def test_paper_variant_matches_the_released_configuration():
  m = vit_mae.build_model("paper")
  assert (m.image_size, m.patch_size, m.num_patches) == (256, 8, 1024)
  assert (m.encoder_width, m.encoder_depth, m.encoder_heads) == (128, 12, 16)
  assert (m.decoder_width, m.decoder_depth, m.decoder_heads, m.mlp_ratio) == (64, 8, 8, 4.0)


def test_build_model_rejects_unknown_names():
  with pytest.raises(ValueError, match="variant"):
    vit_mae.build_model("huge")
  with pytest.raises(ValueError, match="fields"):
    vit_mae.build_model("mu", widht=3)


def test_outputs_in_unit_interval_and_encoder_sees_the_kept_tokens():
  model, params, images, mask = _mu_setup()
  n = model.num_patches
  num_keep = n - int(mask.sum(axis=1).min())  # the longest visible list of the batch
  plan = make_plan(mask, num_keep)
  recon, edge, aux = _apply(model, params, images, plan)
  for out in (recon, edge):
    out = np.asarray(out)
    assert ((out > 0) & (out < 1)).all()
  assert aux["encoded"].shape[1] == 1 + num_keep
  np.testing.assert_array_equal(np.asarray(plan.keep_valid).sum(1),
                                np.asarray(~mask).sum(1))


# ------------------------------------------------------------------------------------------
# Masking semantics


def test_padded_plan_equals_exact_plan():
  model, params, images, mask = _mu_setup()
  visible = np.asarray(~mask).sum(1)  # differs per image
  padded = _apply(model, params, images, make_plan(mask))  # L = N: lots of padding
  shortest = _apply(model, params, images, make_plan(mask, int(visible.max())))
  i = int(np.argmin(visible))  # the image with the most padding slots in `shortest` too
  exact = _apply(model, params, images[i:i + 1], make_plan(mask[i:i + 1], int(visible[i])))
  for other, j in ((shortest, slice(None)), (exact, slice(i, i + 1))):
    for name, a, b in (("recon", other[0], padded[0][j]), ("edge", other[1], padded[1][j]),
                       ("decoded", other[2]["decoded"], padded[2]["decoded"][j])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5,
                                 err_msg=name)
  # The valid encoder tokens (cls + visible) agree as well.
  np.testing.assert_allclose(np.asarray(exact[2]["encoded"][0]),
                             np.asarray(padded[2]["encoded"][i, :1 + visible[i]]),
                             atol=2e-6, rtol=1e-5)


def test_pixels_of_masked_patches_do_not_influence_the_output():
  model, params, images, mask = _mu_setup()
  plan = make_plan(mask)
  hidden = patch_lib.patch_to_pixels(mask.astype(jnp.float32), model.patch_size,
                                     model.grid)[..., None] > 0
  noise = jax.random.uniform(jax.random.PRNGKey(5), images.shape)
  changed = jnp.where(hidden, noise, images)
  nan_filled = jnp.where(hidden, jnp.nan, images)
  ref = _apply(model, params, images, plan)
  for other in (changed, nan_filled):
    out = _apply(model, params, other, plan)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Control: changing one visible patch does change the output.
  visible = ~hidden & (patch_lib.patch_to_pixels(
      jnp.zeros_like(mask, jnp.float32).at[:, int(jnp.argmin(mask[0]))].set(1.0),
      model.patch_size, model.grid)[..., None] > 0)
  out = _apply(model, params, jnp.where(visible, noise, images), plan)
  assert not np.allclose(np.asarray(out[0][0]), np.asarray(ref[0][0]))


def test_no_recompile_on_second_call_with_same_shapes():
  model, params, images, mask = _mu_setup()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, x, plan):
    return model.apply({"params": p}, x, plan)

  forward(params, images, make_plan(mask))
  other_mask = _random_mask(np.random.default_rng(9), model.num_patches)
  forward(params, images * 0.5, make_plan(other_mask))  # new values, same shapes


def test_vmap_over_mask_plans_matches_separate_calls():
  # Monte-Carlo uncertainty vmaps the model over passes (different plans, same images).
  model, params, images, mask = _mu_setup()
  other = _random_mask(np.random.default_rng(11), model.num_patches)
  plans = jax.tree.map(lambda *xs: jnp.stack(xs), make_plan(mask), make_plan(other))
  stacked = jax.jit(jax.vmap(lambda pl: model.apply({"params": params}, images, pl)[0]))(plans)
  for j, m in enumerate((mask, other)):
    np.testing.assert_allclose(np.asarray(stacked[j]),
                               np.asarray(_apply(model, params, images, make_plan(m))[0]),
                               atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Performance options compute the same function


@pytest.mark.parametrize("options", [
    dict(),  # the defaults: blockwise attention, remat 'recompute_elementwise', scanned layers
    dict(remat=False, scan_layers=False),
    dict(attention="dot_product", remat_policy="nothing_saveable"),
    dict(attention="per_head_remat", remat=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_options_agree_with_dense_float32_reference(options):
  _, params, images, mask = _mu_setup()
  plan = make_plan(mask)
  reference = vit_mae.build_model("mu", attention="dense", remat=False, scan_layers=False)
  model = vit_mae.build_model("mu", **options)
  ref_params = vit_mae.convert_block_layout(params, scanned=False)
  model_params = vit_mae.convert_block_layout(params, scanned=model.scan_layers)
  ref_out, ref_grad = _jitted_outputs_and_grad(reference)(ref_params, images, plan)
  out, grad = _jitted_outputs_and_grad(model)(model_params, images, plan)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
  grad = vit_mae.convert_block_layout(grad, scanned=False)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_convert_block_layout_round_trip():
  _, params, _, _ = _mu_setup()
  assert "blocks" in params["encoder"]  # default: scanned
  unscanned = vit_mae.convert_block_layout(params, scanned=False)
  assert set(unscanned["encoder"]) == {"block_0", "block_1"}
  back = vit_mae.convert_block_layout(unscanned, scanned=True)
  chex.assert_trees_all_equal(back, params)


def test_bfloat16_compute_stays_close_to_float32():
  model, params, images, mask = _mu_setup()
  plan = make_plan(mask)
  ref = _apply(model, params, images, plan)
  # Unscanned / no remat keeps this test's compile cheap; dtype handling is the same code.
  bf16_model = vit_mae.build_model("mu", dtype=jnp.bfloat16, scan_layers=False, remat=False)
  out, grad = _jitted_outputs_and_grad(bf16_model)(
      vit_mae.convert_block_layout(params, scanned=False), images, plan)
  assert out[0].dtype == jnp.float32 and out[2]["encoded"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=3e-2)
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(ref[1]), atol=3e-2)
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("with_mask", [True, False])
def test_blockwise_attention_with_several_query_blocks_matches_dense(with_mask):
  # 37 tokens in blocks of 8 rows: 5 blocks, 3 padded query rows; keys partly invalid.
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k, v = (jax.random.normal(kk, (2, 37, 3, 4)) for kk in keys[:3])
  key_valid = None
  if with_mask:
    key_valid = jax.random.uniform(keys[3], (2, 37)) < 0.7
    key_valid = key_valid.at[:, 0].set(True)
  blockwise = functools.partial(layers.blockwise_attention, block_size=8)

  @jax.jit
  def outputs_and_grads(q, k, v):
    results = []
    for f in (blockwise, layers.dense_attention):
      loss = lambda a, b, c, f=f: (f(a, b, c, key_valid) * v).sum()
      results.append((f(q, k, v, key_valid), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
    return results

  for scale in (1.0, 6.0):  # large logits exercise the max subtraction
    (out, grads), (ref_out, ref_grads) = outputs_and_grads(q * scale, k * scale, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-4, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)

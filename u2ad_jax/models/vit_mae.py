"""Masked-autoencoder ViT with an image head and a Sobel-edge head (U2AD's reconstruction model).

Masking lives outside the module: `__call__` takes a `masking.MaskPlan` (which patches are
hidden, which indices the encoder gathers, which gathered slots are padding).

Data flow for images `[B, H, W, 1]`, patch p, N = (H/p)(W/p) patches, plan length L:
  1. Patchify to `[B, N, p*p]`, gather the plan's `[B, L]` patches (padding slots zeroed, so a
     masked patch's pixels never enter the model), linear patch embedding + fixed 2D sin-cos
     position embedding, prepend the cls token -> `[B, 1 + L, D_enc]`.
  2. Encoder: pre-LN transformer blocks; padding slots are excluded as attention keys, so a
     padded plan computes exactly what the unpadded visible tokens would; final LayerNorm.
  3. Decoder: Dense to D_dec; each patch takes its encoder token when visible (`~plan.mask`) and
     the learned mask token when masked; decoder sin-cos position embedding; transformer blocks
     over `[B, 1 + N, D_dec]` (cls kept as in MAE). With a context band (`plan.ids_active`,
     `masking.context_band`) only the plan's `M` active patches are decoded (`[B, 1 + M, D_dec]`,
     padding slots excluded as keys like the encoder's).
  4. Two heads on the decoder tokens (cls dropped): LayerNorm -> Dense(p*p) -> sigmoid, one for
     the image and one for its Sobel edge map; unpatchified to `[B, H, W, 1]`. Patches outside
     a context band are not predicted: both outputs are 0 there.

Decision: no shared LayerNorm between the decoder blocks and the heads. Each head starts with
its own LayerNorm (as in the original release), so a shared one would only re-normalise twice.

The performance options (attention implementation, per-block remat, layer scan, compute dtype)
are module fields and do not change the function the model computes (tested against the dense
float32 reference). Note that `scan_layers` changes the parameter tree (stacked blocks);
`convert_block_layout` converts between the two layouts.

Measured train-step speed and memory of these options: benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2ad_jax import patches as patch_lib
from u2ad_jax.masking import MaskPlan
from u2ad_jax.models import layers


# Sizes in one place. "mu": unit tests. "cpu": demo size, 0.57 M params (configs/cpu.py runs it at
# 256 px with 8-px patches over a band around the canal: 60 - 200 tokens; its speed:
# benchmarks/README.md). "paper": the released code's configuration
# (docs/method.md, section 3): 2.8 M params, 41 GFLOP per training image with ~930 encoder tokens.
VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(image_size=32, patch_size=4, encoder_width=32, encoder_depth=2, encoder_heads=2,
               decoder_width=32, decoder_depth=1, decoder_heads=2, mlp_ratio=4.0),
    "cpu": dict(image_size=128, patch_size=8, encoder_width=96, encoder_depth=4,
                encoder_heads=6, decoder_width=64, decoder_depth=2, decoder_heads=4,
                mlp_ratio=4.0),
    "paper": dict(image_size=256, patch_size=8, encoder_width=128, encoder_depth=12,
                  encoder_heads=16, decoder_width=64, decoder_depth=8, decoder_heads=8,
                  mlp_ratio=4.0),
}


class ImageHead(nn.Module):
  """LayerNorm -> Dense(p*p) -> sigmoid: `[B, N, D]` -> `[B, N, p*p]` in (0, 1), float32.

  Always computed in float32, whatever the model's compute dtype: a bfloat16 logit has 8
  mantissa bits, a quantisation step of ~1e-3 after the sigmoid, which would floor the
  reconstructions and the EU variance (of order 1e-4 and below) built from them. The head is
  ~0.1% of the model's FLOPs.
  """
  patch_pixels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPS, dtype=jnp.float32, name="norm")(x)
    x = nn.Dense(self.patch_pixels, dtype=jnp.float32, kernel_init=layers.dense_init,
                 name="pred")(x)
    return jax.nn.sigmoid(x)


class MaskedAutoencoderViT(nn.Module):
  """U2AD's MAE. See the module docstring for the data flow.

  Attributes:
    image_size, patch_size: square input side and patch side (pixels).
    encoder_width/depth/heads, decoder_width/depth/heads, mlp_ratio: transformer sizes.
    attention: 'auto' (default: per platform, `layers.AUTO_ATTENTION`: 'blockwise' on CPU,
      fastest measured there and O(T) memory; cuDNN flash attention 'cudnn' on GPUs for bf16 /
      fp16 compute; the Pallas kernel 'tpu_flash' on TPUs), or one of them explicitly, or
      'dense', 'dot_product' (jax.nn.dot_product_attention through XLA), 'per_head_remat'.
    remat: rematerialise each transformer block in the backward pass (default on: with the
      default policy 'recompute_elementwise' only LayerNorm / GELU / transposes are recomputed,
      which cost no measurable time and cut the paper-size batch-10 peak RSS from 3.5 to 1.9 GB).
      remat_policy: 'recompute_elementwise' or a `jax.checkpoint_policies` member name.
    scan_layers: `nn.scan` over blocks (default on: faster compile, and XLA CPU only honours
      the remat memory savings for scanned blocks). Params of a stack are then stacked under
      '<stack>/blocks' with a leading depth axis; `convert_block_layout` converts checkpoints.
    dtype: compute dtype of the transformer (e.g. jnp.bfloat16 on accelerators); params stay
      float32 and the two output heads compute in float32 (`ImageHead`).
  """
  image_size: int = 256
  patch_size: int = 8
  encoder_width: int = 128
  encoder_depth: int = 12
  encoder_heads: int = 16
  decoder_width: int = 64
  decoder_depth: int = 8
  decoder_heads: int = 8
  mlp_ratio: float = 4.0
  attention: str = "auto"
  remat: bool = True
  remat_policy: str = "recompute_elementwise"
  scan_layers: bool = True
  dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    return patch_lib.grid_shape(self.image_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  def _stack(self, depth: int, heads: int, name: str) -> layers.TransformerStack:
    return layers.TransformerStack(
        depth=depth, num_heads=heads, mlp_ratio=self.mlp_ratio, attention=self.attention,
        dtype=self.dtype, remat=self.remat, remat_policy=self.remat_policy,
        scan=self.scan_layers, name=name)

  @nn.compact
  def __call__(self, images: jnp.ndarray, plan: MaskPlan
               ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
    """images `[B, H, W, 1]` float32, plan with mask `[B, N]` and ids_keep/keep_valid `[B, L]`.

    Returns:
      recon `[B, H, W, 1]` and edge `[B, H, W, 1]`, float32 in (0, 1), predicted for EVERY
      patch, or for every active patch of a band plan (0 elsewhere; the loss and the uncertainty
      use the masked ones, which are always active); aux with
      'encoded' `[B, 1 + L, D_enc]` (encoder output after its LayerNorm, cls first) and
      'decoded' `[B, N, D_dec]` (decoder output without cls; `[B, M, D_dec]`, in the order of
      `plan.ids_active`, for a band plan).
    """
    b, h, w, c = images.shape
    if (h, w) != (self.image_size, self.image_size) or c != 1:
      raise ValueError(f"expected images [B, {self.image_size}, {self.image_size}, 1], "
                       f"got {images.shape}")
    n = self.num_patches
    if plan.mask.shape != (b, n):
      raise ValueError(f"plan.mask must be [{b}, {n}], got {plan.mask.shape}")
    ids_keep = plan.ids_keep.astype(jnp.int32)
    keep_valid = plan.keep_valid

    # --- encoder input: only the plan's patches; padding slots zeroed so masked pixels never
    # reach the model (a NaN hidden under the mask cannot leak through 0 * NaN either).
    pixels = patch_lib.patchify(images, self.patch_size)  # [B, N, p*p]
    kept = jnp.take_along_axis(pixels, ids_keep[..., None], axis=1)  # [B, L, p*p]
    kept = jnp.where(keep_valid[..., None], kept, 0.0).astype(self.dtype)
    tokens = nn.Dense(self.encoder_width, dtype=self.dtype, kernel_init=layers.dense_init,
                      name="patch_embed")(kept)
    enc_pos = jnp.asarray(layers.sincos_2d(self.encoder_width, self.grid))  # [N, D]
    tokens = tokens + enc_pos[ids_keep].astype(tokens.dtype)
    # The cls token's position embedding is zero in MAE, so it is just the learned token.
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.encoder_width))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls, (b, 1, self.encoder_width)).astype(tokens.dtype), tokens], 1)
    enc_valid = jnp.concatenate([jnp.ones((b, 1), bool), keep_valid], axis=1)  # [B, 1+L]

    x = self._stack(self.encoder_depth, self.encoder_heads, "encoder")(tokens, enc_valid)
    encoded = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPS, dtype=self.dtype,
                           name="encoder_norm")(x)  # [B, 1+L, D_enc]

    # --- decoder: visible patches take their encoder token, masked ones the mask token.
    x = nn.Dense(self.decoder_width, dtype=self.dtype, kernel_init=layers.dense_init,
                 name="decoder_embed")(encoded)
    cls_dec, slots = x[:, :1], x[:, 1:]  # [B, 1, D], [B, L, D]
    # slot_of_patch[n] = the plan slot holding patch n (only valid slots write; the value for
    # masked patches is irrelevant because the mask token replaces them below).
    scatter_ids = jnp.where(keep_valid, ids_keep, n)  # n = out of range -> dropped
    slot_of_patch = jax.vmap(
        lambda ids: jnp.zeros((n,), jnp.int32).at[ids].set(
            jnp.arange(ids.shape[0], dtype=jnp.int32), mode="drop"))(scatter_ids)
    patch_tokens = jnp.take_along_axis(slots, slot_of_patch[..., None], axis=1)  # [B, N, D]
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (1, 1, self.decoder_width))
    patch_tokens = jnp.where(plan.mask[..., None], mask_token.astype(patch_tokens.dtype),
                             patch_tokens)
    dec_pos = jnp.asarray(layers.sincos_2d(self.decoder_width, self.grid))
    patch_tokens = patch_tokens + dec_pos.astype(patch_tokens.dtype)
    dec_valid = None
    if plan.ids_active is not None:  # context band: decode the active patches only
      patch_tokens = jnp.take_along_axis(
          patch_tokens, plan.ids_active.astype(jnp.int32)[..., None], axis=1)  # [B, M, D]
      dec_valid = jnp.concatenate([jnp.ones((b, 1), bool), plan.active_valid], axis=1)
    x = jnp.concatenate([cls_dec, patch_tokens], axis=1)  # [B, 1+N or 1+M, D_dec]
    x = self._stack(self.decoder_depth, self.decoder_heads, "decoder")(x, dec_valid)
    decoded = x[:, 1:]  # [B, N or M, D_dec]

    p2 = self.patch_size * self.patch_size
    recon = ImageHead(p2, name="image_head")(decoded)
    edge = ImageHead(p2, name="edge_head")(decoded)
    if plan.ids_active is not None:
      recon, edge = (_scatter_patches(y, plan.ids_active, plan.active_valid, n)
                     for y in (recon, edge))
    recon = patch_lib.unpatchify(recon, self.patch_size, self.grid)
    edge = patch_lib.unpatchify(edge, self.patch_size, self.grid)
    aux = {"encoded": encoded, "decoded": decoded}
    return recon, edge, aux


def _scatter_patches(values: jnp.ndarray, ids: jnp.ndarray, valid: jnp.ndarray,
                     num_patches: int) -> jnp.ndarray:
  """`[B, M, P]` values of patches `ids [B, M]` -> `[B, N, P]`, 0 where no valid slot writes."""
  target = jnp.where(valid, ids.astype(jnp.int32), num_patches)  # out of range -> dropped
  return jax.vmap(lambda v, t: jnp.zeros((num_patches,) + v.shape[1:], v.dtype).at[t].set(
      v, mode="drop"))(values, target)


def convert_block_layout(params: dict, scanned: bool) -> dict:
  """Converts a param tree between unscanned ('block_0', 'block_1', ...) and scanned
  ('blocks' with a leading depth axis) transformer stacks; already-converted stacks pass through.
  """
  params = dict(params)
  for stack in ("encoder", "decoder"):
    blocks = params[stack]
    if scanned and "blocks" not in blocks:
      layers_ = [blocks[f"block_{i}"] for i in range(len(blocks))]
      params[stack] = {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers_)}
    elif not scanned and "blocks" in blocks:
      stacked = blocks["blocks"]
      depth = jax.tree.leaves(stacked)[0].shape[0]
      params[stack] = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                       for i in range(depth)}
  return params


def attention_shapes(model: MaskedAutoencoderViT, batch: int = 2
                     ) -> tuple[tuple[int, int, int, int], ...]:
  """`(batch, tokens, heads, head_dim)` of the encoder's and the decoder's attention at the
  full sequence (1 + N tokens: cls and every patch), the longest either runs."""
  tokens = model.num_patches + 1
  return ((batch, tokens, model.encoder_heads, model.encoder_width // model.encoder_heads),
          (batch, tokens, model.decoder_heads, model.decoder_width // model.decoder_heads))


def with_checked_attention(model: MaskedAutoencoderViT,
                           platform: str | None = None) -> MaskedAutoencoderViT:
  """The model, or a copy with `attention='dot_product'` when `'auto'`'s platform kernel does
  not compile / run here for its shapes (`layers.checked_attention`: checked once per process,
  one warning line). Call it at start-up, before the first step is traced."""
  if model.attention != "auto":
    return model
  choice = layers.checked_attention("auto", model.dtype, attention_shapes(model), platform)
  if choice == layers.resolve_attention("auto", model.dtype, platform):
    return model  # the platform's kernel works: keep 'auto'
  return model.clone(attention=choice)


def build_model(variant: str, **overrides: Any) -> MaskedAutoencoderViT:
  """`MaskedAutoencoderViT` of a named size (VARIANTS) with field overrides.

  e.g. build_model('paper', attention='dense', remat=True, dtype=jnp.bfloat16).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown model variant {variant!r}; choose one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(MaskedAutoencoderViT)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown model fields {sorted(unknown)}")
  return MaskedAutoencoderViT(**{**VARIANTS[variant], **overrides})

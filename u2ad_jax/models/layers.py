"""Transformer building blocks for the masked-autoencoder ViT, with interchangeable attention.

Longer than the other modules (about 600 lines) because the attention implementations are one
family with one signature, tested against each other; splitting them would scatter that contract.

Every attention implementation has the same signature

    attention(q, k, v, key_valid=None, *, scale=None) -> out

with `q, k, v, out` of shape `[B, T, H, Dh]`, `key_valid` `[B, T]` bool or None (None = all keys
valid) and `scale` the logit scale (None = `Dh ** -0.5`). The scale is applied to the float32
logits (or handed to the fused kernel), not to low-precision queries: pre-scaling q in bfloat16
rounds every query element a second time. Invalid keys (the padding slots of a MaskPlan) get
zero attention weight, so a padded sequence attends exactly like the unpadded one. Every
implementation accepts a mask of any length T; the fused kernels need it to be a prefix (valid
keys first, as MaskPlans lay them out).

Why several implementations: at the paper size (about 1000 tokens, 16 heads of width 8) the
attention logits are `B * 16 * 1000 * 1000` floats per layer, far bigger than the token
activations (`B * 1000 * 128`). The score matrix of a width-8 head costs 16 FLOPs per element to
compute but is written, read by the softmax and read again by the value product, so on a CPU the
dense formulation is limited by memory traffic and its backward pass by keeping those matrices.
`blockwise` (what 'auto' runs on CPU) is a memory-efficient attention with a hand-written VJP: it walks over
(example x head x query block) tiles small enough to stay in the L2 cache and stores only the
output and the log-sum-exp for the backward pass, which recomputes the tile's probabilities
(the FlashAttention recurrence, without the online softmax because a whole key row fits a tile).

The kernels' measured speed and memory on CPU: benchmarks/README.md, "Attention kernels and
train-step variants".

On accelerators the fused flash kernels that ship with JAX do the same job in one kernel:
`cudnn` (GPU, half precision) and `tpu_flash` (Pallas, TPU); `attention='auto'` picks per
platform (`resolve_attention`), and a run checks that choice once at start-up
(`checked_attention`: compiled, run and compared with XLA's attention, else 'dot_product').
Their internal residuals carry no names, so the remat policy keeps the cuDNN forward's outputs
by primitive (`FUSED_ATTENTION_FORWARD`): otherwise the backward pass would rerun the attention
forward, ~1/3 of the attention's time at width-8 heads, which the exponential units bound
(benchmarks/README.md, the H100 / H200 estimate). The Pallas TPU kernel's forward is still rerun.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

AttentionFn = Callable[..., jnp.ndarray]  # (q, k, v, key_valid=None, *, scale=None) -> out

# Logit given to invalid keys. Finite, so that exp(bias - max) is exactly 0 without inf - inf
# NaNs; every row has at least one valid key (the cls token), so the max is a valid logit.
_INVALID_LOGIT = -1e30


def _logit_scale(q: jnp.ndarray, scale: float | None) -> float:
  """The softmax temperature: `scale`, or `Dh ** -0.5` for q `[..., Dh]`."""
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _key_bias(key_valid: jnp.ndarray | None, dtype=jnp.float32) -> jnp.ndarray | None:
  """`[B, T]` bool -> `[B, T]` additive logit bias (0 valid, -1e30 invalid), or None."""
  if key_valid is None:
    return None
  return jnp.where(key_valid, 0.0, _INVALID_LOGIT).astype(dtype)


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    key_valid: jnp.ndarray | None = None, *,
                    scale: float | None = None) -> jnp.ndarray:
  """Reference softmax attention; materialises the `[B, H, T, T]` probabilities.

  Logits, scale and softmax in float32 whatever the input dtype. Autodiff keeps the
  probabilities for the backward pass (about 64 MB per example per paper-size encoder layer).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * _logit_scale(q, scale)
  bias = _key_bias(key_valid)
  if bias is not None:
    logits = logits + bias[:, None, None, :]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          key_valid: jnp.ndarray | None = None, *,
                          scale: float | None = None) -> jnp.ndarray:
  """`jax.nn.dot_product_attention` through XLA on every platform (its default implementation
  in JAX 0.10): the fallback that compiles wherever JAX does."""
  mask = None if key_valid is None else key_valid[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=_logit_scale(q, scale))


def per_head_remat_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                             key_valid: jnp.ndarray | None = None, *,
                             scale: float | None = None) -> jnp.ndarray:
  """Dense attention looped over heads, each head under `jax.checkpoint`.

  Peak temporaries shrink by the head count (one `[B, T, T]` at a time) and the backward pass
  recomputes one head's probabilities instead of storing all of them.
  """
  bias = _key_bias(key_valid)
  scale = _logit_scale(q, scale)

  @jax.checkpoint
  def one_head(qh, kh, vh):  # [B, T, Dh] each
    logits = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32) * scale
    if bias is not None:
      logits = logits + bias[:, None, :]
    probs = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    return jnp.einsum("bqk,bkd->bqd", probs, vh)

  heads = [one_head(q[:, :, h], k[:, :, h], v[:, :, h]) for h in range(q.shape[2])]
  return jnp.stack(heads, axis=2)


# ------------------------------------------------------------------------------------------
# Blockwise attention with a custom VJP.
#
# Layout inside: G = B * H independent (example, head) problems, queries split into `nq` blocks
# of `tq` rows. One loop iteration handles one (g, query block) tile: its logits are
# `tq x T` floats (about 2 MB at tq = 500, T = 1000), so the softmax passes and the value
# products run from cache instead of main memory (the tile size was chosen by measurement:
# benchmarks/README.md).


def _tile_forward(q_tile, k, v, bias, scale):
  """q_tile `[tq, Dh]`, k/v `[T, Dh]`, bias `[T]` or None, scale (float) -> (out `[tq, Dh]`,
  lse `[tq]` f32 of the scaled logits)."""
  logits = jnp.einsum("qd,kd->qk", q_tile, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias[None, :]
  row_max = logits.max(axis=-1)
  unnormalised = jnp.exp(logits - row_max[:, None])
  row_sum = unnormalised.sum(axis=-1)
  # Normalising after the value product touches tq x Dh numbers instead of tq x T.
  out = jnp.einsum("qk,kd->qd", unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / row_sum[:, None]
  return out.astype(q_tile.dtype), row_max + jnp.log(row_sum)


def _tile_backward(q_tile, k, v, bias, out_tile, lse_tile, dout_tile, scale):
  """Gradients of one tile: dq `[tq, Dh]` and this tile's share of dk^T, dv^T `[Dh, T]`.

  dk and dv are produced transposed (`[Dh, T]`) because contracting over the query axis in that
  orientation is a plain row-major GEMM; the `[T, Dh]` orientation made XLA's CPU dot several
  times slower. The caller sums the shares over query blocks and transposes once.
  """
  f32 = jnp.float32
  logits = jnp.einsum("qd,kd->qk", q_tile, k, preferred_element_type=f32) * scale
  if bias is not None:
    logits = logits + bias[None, :]
  probs = jnp.exp(logits - lse_tile[:, None])
  dprobs = jnp.einsum("qd,kd->qk", dout_tile, v, preferred_element_type=f32)
  # Softmax backward: dlogits = p * (dp - sum_k p dp), and sum_k p dp = <dout, out> per row;
  # times `scale` for the raw product q.k the gradients of q and k flow through.
  row_dot = (dout_tile.astype(f32) * out_tile.astype(f32)).sum(axis=-1)
  dlogits = probs * (dprobs - row_dot[:, None]) * scale
  dq = jnp.einsum("qk,kd->qd", dlogits.astype(k.dtype), k, preferred_element_type=f32)
  dk_t = jnp.einsum("qd,qk->dk", q_tile, dlogits.astype(q_tile.dtype),
                    preferred_element_type=f32)
  dv_t = jnp.einsum("qd,qk->dk", dout_tile, probs.astype(dout_tile.dtype),
                    preferred_element_type=f32)
  return dq, dk_t, dv_t


def _query_blocks(num_tokens: int, block_size: int) -> tuple[int, int]:
  """(number of query blocks, rows per block) with as little padding as possible."""
  num_blocks = max(1, math.ceil(num_tokens / block_size))
  return num_blocks, math.ceil(num_tokens / num_blocks)


def _pad_rows(x: jnp.ndarray, rows: int) -> jnp.ndarray:
  pad = rows - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _map_tiles(tile_fn, num_blocks, tile_rows, per_problem, per_query, scale):
  """Runs `tile_fn` over every (problem g, query block i) tile with `lax.map`.

  per_problem: arrays `[G, ...]` passed whole for problem g (keys, values, bias or None).
  per_query: arrays `[G, nq * tq, ...]` passed as the rows of block i.
  scale: the logit scale, passed last.
  Returns the stacked tile outputs with a leading `G * nq` axis.
  """
  def body(tile_index):
    g, i = tile_index // num_blocks, tile_index % num_blocks
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x[g], i * tile_rows, tile_rows, axis=0)
    whole = [None if x is None else x[g] for x in per_problem]
    return tile_fn(rows(per_query[0]), *whole, *[rows(x) for x in per_query[1:]], scale)
  num_problems = per_problem[0].shape[0]
  return jax.lax.map(body, jnp.arange(num_problems * num_blocks, dtype=jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_core(q, k, v, bias, block_size, scale):
  """q/k/v `[G, T, Dh]`, bias `[G, T]` or None (all keys valid), python floats block_size and
  scale -> out `[G, T, Dh]`."""
  return _blockwise_core_fwd(q, k, v, bias, block_size, scale)[0]


def _blockwise_core_fwd(q, k, v, bias, block_size, scale):
  num_problems, num_tokens, head_dim = q.shape
  num_blocks, tile_rows = _query_blocks(num_tokens, block_size)
  q_padded = _pad_rows(q, num_blocks * tile_rows)
  out, lse = _map_tiles(_tile_forward, num_blocks, tile_rows, (k, v, bias), (q_padded,), scale)
  out = out.reshape(num_problems, num_blocks * tile_rows, head_dim)[:, :num_tokens]
  lse = lse.reshape(num_problems, num_blocks * tile_rows)[:, :num_tokens]
  # Named so that a rematerialised block can keep them (policy 'recompute_elementwise')
  # instead of re-running the whole attention forward in the backward pass.
  out = checkpoint_name(out, "attn_out")
  lse = checkpoint_name(lse, "attn_lse")
  return out, (q, k, v, bias, out, lse)


def _blockwise_core_bwd(block_size, scale, residuals, dout):
  q, k, v, bias, out, lse = residuals
  num_problems, num_tokens, head_dim = q.shape
  num_blocks, tile_rows = _query_blocks(num_tokens, block_size)
  padded = num_blocks * tile_rows
  # Padded query rows have zero dout, so they contribute nothing to dk / dv.
  dq, dk_t, dv_t = _map_tiles(
      _tile_backward, num_blocks, tile_rows, (k, v, bias),
      (_pad_rows(q, padded), _pad_rows(out, padded), _pad_rows(lse, padded),
       _pad_rows(dout, padded)), scale)
  dq = dq.reshape(num_problems, padded, head_dim)[:, :num_tokens].astype(q.dtype)
  dk = dk_t.reshape(num_problems, num_blocks, head_dim, num_tokens).sum(axis=1)
  dv = dv_t.reshape(num_problems, num_blocks, head_dim, num_tokens).sum(axis=1)
  dk = jnp.swapaxes(dk, 1, 2).astype(k.dtype)
  dv = jnp.swapaxes(dv, 1, 2).astype(v.dtype)
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def blockwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                        key_valid: jnp.ndarray | None = None, *, scale: float | None = None,
                        block_size: int = 512) -> jnp.ndarray:
  """Memory-efficient exact attention (custom VJP, tiles of `block_size` query rows).

  Saves only `out` and the per-row log-sum-exp for the backward pass: O(T) memory per head
  instead of O(T^2). Logits and softmax in float32.
  """
  b, t, h, dh = q.shape
  to_problems = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t, dh)
  bias = None  # no key mask (decoder): skip the bias add altogether
  if key_valid is not None:
    bias = jnp.broadcast_to(_key_bias(key_valid)[:, None, :], (b, h, t)).reshape(b * h, t)
  out = _blockwise_core(to_problems(q), to_problems(k), to_problems(v), bias, block_size,
                        _logit_scale(q, scale))
  return jnp.transpose(out.reshape(b, h, t, dh), (0, 2, 1, 3))


# ------------------------------------------------------------------------------------------
# Fused kernels for accelerators. Both rely on the MaskPlan layout: the encoder's valid keys
# (cls, then the visible patches) come FIRST and padding slots last, so `key_valid` is a prefix
# of each row and a per-example key length describes it exactly.


def _prefix_lengths(key_valid: jnp.ndarray | None, batch: int, num_keys: int) -> jnp.ndarray:
  """`[B, T]` prefix mask (or None) -> `[B]` int32 number of valid keys."""
  if key_valid is None:
    return jnp.full((batch,), num_keys, jnp.int32)
  return jnp.sum(key_valid, axis=-1, dtype=jnp.int32)


# cuDNN's fused kernel is built by JAX with an (empty) bias operand, and JAX's check for a
# TRAINING call with a bias (`check_is_flash_attention` in jax/_src/cudnn/
# fused_attention_stablehlo.py, JAX 0.10-0.11) rejects odd query or key lengths: "Unsupported
# sequence length Q 1025, KV 1025". Our sequences are 1 + (patches) tokens, odd at every model
# size, so `cudnn_attention` pads both to this multiple; the padded keys lie beyond the key
# lengths (excluded) and the padded query rows are sliced off.
CUDNN_SEQUENCE_MULTIPLE = 2


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    key_valid: jnp.ndarray | None = None, *, scale: float | None = None,
                    implementation: str | None = "cudnn") -> jnp.ndarray:
  """cuDNN flash attention behind `jax.nn.dot_product_attention` (GPU, bf16 / fp16 inputs).

  q, k, v `[B, T, H, Dh]` -> `[B, T, H, Dh]`, any T: the sequence is padded to a multiple of
  `CUDNN_SEQUENCE_MULTIPLE` inside (forward and backward then trace at every length) and the
  output sliced back. The key padding is passed as key lengths (cuDNN's padding mask), not as a
  dense `[B, 1, 1, T]` mask, which the fused kernel does not take; this is exact because
  `key_valid` is a prefix, and the lengths count only the caller's valid keys, never the rows
  added here. `implementation='xla'` runs the same padded call through XLA: the CPU tests check
  it against the dense reference that way.
  """
  b, t = q.shape[:2]
  lengths = _prefix_lengths(key_valid, b, t)
  padded = -(-t // CUDNN_SEQUENCE_MULTIPLE) * CUDNN_SEQUENCE_MULTIPLE
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))) if padded > t else x
  # Query lengths stay full (the padded length): every query row, the caller's padding slots
  # and the rows added here included, attends to the valid keys, so no row of the kernel's
  # output is undefined; the extra rows are sliced off and get no gradient.
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), key_value_seq_lengths=lengths,
                                     scale=_logit_scale(q, scale),
                                     implementation=implementation)
  return out[:, :t]


# Block rows of the TPU kernel: sequences are padded to a multiple (the kernel tiles by blocks).
_TPU_FLASH_BLOCK = 128


def tpu_flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                        key_valid: jnp.ndarray | None = None, *,
                        scale: float | None = None) -> jnp.ndarray:
  """The Pallas TPU flash-attention kernel shipped with JAX
  (`jax.experimental.pallas.ops.tpu.flash_attention`).

  Invalid keys (and the rows added to reach a block multiple) get segment id 0, every query
  segment id 1, so a query never attends to them. Runs on CPU only under
  `pltpu.force_tpu_interpret_mode()` (the tests' equivalence check).
  """
  # Imported lazily: the Pallas TPU module is not needed (and slower to import) elsewhere.
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # pylint: disable=g-import-not-at-top
  b, t, h, dh = q.shape
  padded = -(-t // _TPU_FLASH_BLOCK) * _TPU_FLASH_BLOCK
  valid = jnp.ones((b, t), bool) if key_valid is None else key_valid
  valid = jnp.pad(valid, ((0, 0), (0, padded - t)))
  to_heads = lambda x: jnp.pad(jnp.transpose(x, (0, 2, 1, 3)),
                               ((0, 0), (0, 0), (0, padded - t), (0, 0)))  # [B, H, T', Dh]
  segments = tpu_flash.SegmentIds(q=jnp.ones((b, padded), jnp.int32),
                                  kv=valid.astype(jnp.int32))
  block = min(_TPU_FLASH_BLOCK, padded)
  sizes = tpu_flash.BlockSizes(
      block_q=block, block_k_major=block, block_k=block, block_b=1,
      block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
      block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
  out = tpu_flash.flash_attention(to_heads(q), to_heads(k), to_heads(v), segment_ids=segments,
                                  sm_scale=_logit_scale(q, scale), block_sizes=sizes)
  return jnp.transpose(out[:, :, :t], (0, 2, 1, 3))


ATTENTION_FNS: dict[str, AttentionFn] = {
    "dense": dense_attention,
    "dot_product": dot_product_attention,
    "per_head_remat": per_head_remat_attention,
    "blockwise": blockwise_attention,
    "cudnn": cudnn_attention,
    "tpu_flash": tpu_flash_attention,
}

# What `attention='auto'` (the default) runs on each platform: the fused flash kernels on
# accelerators, and on CPU the blockwise kernel, fastest there (module docstring). cuDNN's
# kernel takes only half-precision inputs, so a float32 GPU model runs XLA's attention instead.
AUTO_ATTENTION = {"cpu": "blockwise", "gpu": "cudnn", "tpu": "tpu_flash"}
_HALF_PRECISION = (jnp.bfloat16, jnp.float16)


def resolve_attention(name: str, dtype: jnp.dtype = jnp.float32,
                      platform: str | None = None) -> str:
  """'auto' -> the implementation for `platform` (default: JAX's default backend) and compute
  `dtype`; any other name is returned as given (an explicit choice always wins)."""
  if name != "auto":
    get_attention_fn(name)  # fail early on a typo
    return name
  platform = platform or jax.default_backend()
  choice = AUTO_ATTENTION.get(platform, "dot_product")
  if choice == "cudnn" and jnp.dtype(dtype) not in [jnp.dtype(d) for d in _HALF_PRECISION]:
    choice = "dot_product"
  return choice


def get_attention_fn(name: str) -> AttentionFn:
  if name not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {name!r}; choose one of "
                     f"{sorted(ATTENTION_FNS) + ['auto']}")
  return ATTENTION_FNS[name]


# The kernels that exist on one platform only: 'auto' picks them, so 'auto' checks them
# (`checked_attention`); 'dot_product' is what it falls back to (XLA: compiles wherever JAX does).
PLATFORM_KERNELS = ("cudnn", "tpu_flash")
FALLBACK_ATTENTION = "dot_product"


def checked_attention(name: str, dtype: jnp.dtype, shapes: tuple[tuple[int, int, int, int], ...],
                      platform: str | None = None) -> str:
  """`resolve_attention`, plus a start-up check of the platform kernel that 'auto' picks.

  A fused kernel can refuse a run at trace or compile time (a head width, a length, an old GPU
  or cuDNN) or fail when it first runs; the Monte-Carlo maps compile their first graph only at
  adaptation, hours in. So for 'auto' the chosen kernel is compiled and run ONCE per process
  for the run's attention shapes (forward and gradient, with a key-length mask, checked against
  the XLA attention on the same inputs), and if anything fails 'auto' becomes 'dot_product' with
  one warning line on stderr. An explicit name is returned as given: a deliberate choice fails
  loudly instead.

  Args:
    name: 'auto' or an implementation name.
    dtype: the model's compute dtype.
    shapes: `(batch, tokens, heads, head_dim)` of every attention the model runs.
    platform: default JAX's default backend.

  Returns:
    The implementation to run.
  """
  choice = resolve_attention(name, dtype, platform)
  if name != "auto" or choice not in PLATFORM_KERNELS:
    return choice
  problem = _kernel_problem(choice, jnp.dtype(dtype).name, tuple(map(tuple, shapes)),
                            platform or jax.default_backend())
  return choice if problem is None else FALLBACK_ATTENTION


@functools.lru_cache(maxsize=None)
def _kernel_problem(kernel: str, dtype: str, shapes: tuple, platform: str) -> str | None:
  """None when `kernel` compiles, runs and agrees with XLA at every shape; else the reason
  (printed once: this function is cached per process)."""
  del platform  # part of the cache key only
  try:
    for shape in shapes:
      _probe_kernel(kernel, jnp.dtype(dtype), *shape)
  except Exception as e:  # pylint: disable=broad-except  (any failure means: do not use it)
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    problem = f"{type(e).__name__}: {lines[0][:200]}"
    print(f"[u2ad] WARNING: attention 'auto' cannot use {kernel!r} here ({problem}); "
          f"using {FALLBACK_ATTENTION!r}", file=sys.stderr, flush=True)
    return problem
  return None


def _probe_kernel(kernel: str, dtype: jnp.dtype, batch: int, tokens: int, heads: int,
                  head_dim: int) -> None:
  """Compiles and runs `kernel`'s forward and gradient at one shape, with a prefix key mask
  (row 0 all keys, the others about half), against `dot_product_attention`; raises on failure."""
  attention = get_attention_fn(kernel)
  lengths = np.full((batch,), tokens, np.int32)
  lengths[1:] = tokens // 2 + 1
  key_valid = jnp.asarray(np.arange(tokens)[None, :] < lengths[:, None])

  def outputs_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, key_valid).astype(jnp.float32) * v)
    return fn(q, k, v, key_valid), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  q, k, v = (jax.random.normal(jax.random.key(i), (batch, tokens, heads, head_dim), dtype)
             for i in range(3))
  got = jax.jit(functools.partial(outputs_and_grads, attention))(q, k, v)
  want = jax.jit(functools.partial(outputs_and_grads, dot_product_attention))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # Half-precision outputs of O(1) values agree to ~1e-2; a wrong mask is off by O(1).
    if not np.all(np.isfinite(a)) or np.max(np.abs(a - b)) > 0.1 * (1.0 + np.max(np.abs(b))):
      raise ArithmeticError(f"{kernel} disagrees with XLA's attention at shape "
                            f"{(batch, tokens, heads, head_dim)}")


# ------------------------------------------------------------------------------------------
# Position embeddings


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """`[M]` positions -> `[M, dim]`: sin of the first half of the frequencies, cos of the second."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
  """Fixed 2D sin-cos embedding of a row-major patch grid: `[gh * gw, dim]` float32.

  The first half of the channels encodes the patch row, the second half the column.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)
  return emb.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Blocks

# PyTorch / timm defaults of the original release: LayerNorm eps 1e-6, exact (erf) GELU,
# xavier-uniform linear weights with zero biases.
dense_init = nn.initializers.xavier_uniform()
LAYER_NORM_EPS = 1e-6


class MultiHeadAttention(nn.Module):
  """Self-attention with a fused qkv projection. `[B, T, D]` -> `[B, T, D]`."""
  num_heads: int
  attention: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_valid: jnp.ndarray | None) -> jnp.ndarray:
    b, t, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype,
                          kernel_init=dense_init, name="qkv")(x)  # [B, T, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k, v = (checkpoint_name(a, n) for a, n in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")))
    attention = resolve_attention(self.attention, self.dtype)
    # The 1/sqrt(Dh) scale goes to the kernel, which applies it to float32 logits.
    out = get_attention_fn(attention)(q, k, v, key_valid, scale=head_dim ** -0.5)  # [B,T,H,Dh]
    if attention != "blockwise":  # blockwise names its own residual output
      out = checkpoint_name(out, "attn_out")
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=dense_init,
                           name="proj")(out)


class MlpBlock(nn.Module):
  """Dense(mlp_ratio * D) -> GELU -> Dense(D)."""
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    h = nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, kernel_init=dense_init,
                 name="fc1")(x)
    h = checkpoint_name(h, "mlp_hidden")
    h = nn.gelu(h, approximate=False)
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name="fc2")(h)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). `[B, T, D]`.

  The call signature `(x, key_valid) -> (x, None)` fits `nn.scan` directly.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_valid: jnp.ndarray | None):
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm1")(x)
    x = x + MultiHeadAttention(self.num_heads, self.attention, self.dtype, name="attn")(
        y, key_valid)
    x = checkpoint_name(x, "block_mid")
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm2")(x)
    x = x + MlpBlock(self.mlp_ratio, self.dtype, name="mlp")(y)
    return x, None


# Remat policy that keeps what is expensive to recompute (attention inputs, output and
# log-sum-exp, the MLP pre-activation, the residual stream between the two halves) and recomputes
# only elementwise work (LayerNorms, GELU, transposes) in the backward pass. Per paper-size
# encoder block at batch 10 it keeps ~48 MB instead of ~200 MB without remat.
RECOMPUTE_ELEMENTWISE_NAMES = ("attn_q", "attn_k", "attn_v", "attn_out", "attn_lse",
                               "mlp_hidden", "block_mid")
# The fused cuDNN attention's forward primitive: its outputs (the attention output and the
# softmax statistics, the residuals of its backward) carry no name, so a names-only policy
# would rerun the whole attention forward in the backward pass; at width-8 heads that is a third
# of the attention's exponentials, its bound (benchmarks/README.md). Kept: B x H x T float32
# statistics per layer beside the output that 'attn_out' keeps anyway.
FUSED_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper",)


@dataclasses.dataclass(frozen=True)
class _SaveNamesAndFusedAttention:
  """Remat policy: save the values named `names` and the fused attention forward's outputs."""
  names: frozenset

  def __call__(self, prim, *args, **params) -> bool:
    if prim.name in FUSED_ATTENTION_FORWARD:
      return True
    return jax.checkpoint_policies.save_only_these_names(*self.names)(prim, *args, **params)


def remat_policy_by_name(name: str):
  """'recompute_elementwise' or any `jax.checkpoint_policies` member name."""
  if name == "recompute_elementwise":
    return _SaveNamesAndFusedAttention(frozenset(RECOMPUTE_ELEMENTWISE_NAMES))
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"unknown remat policy {name!r}")
  return policy


class TransformerStack(nn.Module):
  """`depth` TransformerBlocks, optionally rematerialised and/or scanned. `[B, T, D]`.

  remat: recompute block activations in the backward pass. remat_policy: 'recompute_elementwise'
    (above; keeps attention results, recomputes only cheap elementwise work) or a
    `jax.checkpoint_policies` member name such as 'nothing_saveable' (least memory; re-runs
    the attention forward too).
  scan: one traced block applied with `nn.scan` (params stacked along a leading `depth` axis):
    compile time independent of depth. Param trees of scanned and unscanned stacks differ.
    On XLA CPU remat lowers peak memory only together with scan: with unrolled blocks the
    scheduler hoists the recomputation (benchmarks/README.md).
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "recompute_elementwise"
  scan: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_valid: jnp.ndarray | None) -> jnp.ndarray:
    block_cls = TransformerBlock
    if self.remat:
      policy = remat_policy_by_name(self.remat_policy)
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.scan)
    kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  attention=self.attention, dtype=self.dtype)
    if self.scan:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=self.depth)
      x, _ = scanned(**kwargs, name="blocks")(x, key_valid)
      return x
    for i in range(self.depth):
      x, _ = block_cls(**kwargs, name=f"block_{i}")(x, key_valid)
    return x

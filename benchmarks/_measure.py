"""One benchmark measurement per process (run by benchmarks/run.py, one subprocess each).

Each measurement runs in a fresh interpreter so that its peak resident memory (`ru_maxrss`) is
its own and compilation caches do not leak between measurements. Usage:

  python benchmarks/_measure.py '<json spec>'

prints one line `RESULT <json>` with the measurement's numbers plus `peak_rss_gb` (and
`peak_device_gb` on a GPU / TPU). Times are
medians over `repeats` calls after one warm-up call (whose time, compilation included, is
reported separately as `first_call_s`); CPU seconds (`time.process_time`, all threads of this
process) are reported next to wall seconds because other processes share the machine.

Specs (`kind` plus arguments):
  matmul:   n, repeats, dtype               -> gflops ([n,n] @ [n,n], float32 by default)
  flops:    size, image_size, num_samples   -> XLA cost analysis per image of the train step and of
            one forward pass (unrolled, dense attention, no remat: the model's own FLOPs; loops
            such as `nn.scan` or the blockwise tiles would be counted once by the analysis)
  train:    size, image_size, batch, steps, overrides -> images/s of `step.make_train_step`
  mc:       size, image_size, batch, num_samples, pass_chunk, repeats, overrides
            -> s/image of `uncertainty.mc_uncertainty` (jitted)
  attention: size, batch, repeats -> forward + backward time of one encoder layer's attention,
            per implementation in `layers.ATTENTION_FNS`
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from u2ad_jax import masking
from u2ad_jax import patches
from u2ad_jax import uncertainty
from u2ad_jax.models import layers
from u2ad_jax.models import vit_mae
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib

RATIO = 0.75
MIN_ROI = 4  # configs/base.py data.min_roi_patches
# The paper's optimizer (configs/base.py optim).
OPTIM = state_lib.OptimizerSettings(lr=3e-3, b1=0.9, b2=0.95, decay_every_epochs=50,
                                    decay_factor=0.1)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def timed(fn: Callable[[int], Any], repeats: int) -> dict[str, float]:
  """Calls `fn(i)` (which must block on its result) once to warm up, then `repeats` times."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn(-1)
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
  walls, cpus = [], []
  for i in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn(i)
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return {"first_call_s": first, "first_call_cpu_s": first_cpu,
          "median_s": statistics.median(walls), "min_s": min(walls),
          "median_cpu_s": statistics.median(cpus), "repeats": repeats}


def build(size: str, image_size: int | None, overrides: dict | None = None):
  overrides = dict(overrides or {})
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if image_size:
    overrides["image_size"] = int(image_size)
  return vit_mae.build_model(size, **overrides)


def synthetic_inputs(model, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images `[B, H, W, 1]` in [0, 1] and a cord-like train ROI `[B, H, W]`.

  The ROI is a vertical band of 1/8 of the width over the full height: 128 of the 1024 patches
  at the paper size (about what a sagittal cord ROI touches), 96 masked per training step, so
  ~930 valid encoder tokens. It scales with the image size like a real ROI would.
  """
  h = model.image_size
  rng = np.random.RandomState(seed)
  images = rng.rand(batch, h, h, 1).astype(np.float32)
  roi = np.zeros((batch, h, h), bool)
  half = max(model.patch_size, h // 16)
  roi[:, :, h // 2 - half:h // 2 + half] = True
  return images, roi


# ------------------------------------------------------------------------------ measurements


def peak_device_gb() -> float | None:
  """Peak bytes in use on the first device (GPU / TPU allocators); None where not reported."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


def measure_matmul(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(lambda x, y: x @ y)
  # Several products per timed call so a call lasts long enough to time.
  reps = max(1, int(2e10 // (2 * n ** 3)))
  t = timed(lambda i: [matmul(a, b).block_until_ready() for _ in range(reps)], repeats)
  flop = 2.0 * n ** 3 * reps
  return {"n": n, "dtype": dtype, "gflops": flop / t["median_s"] / 1e9, "gflops_best": flop / t["min_s"] / 1e9,
          "gflops_per_cpu_s": flop / t["median_cpu_s"] / 1e9, **t}


def _cost_flops(lowered) -> float:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (older jax: only compiled has it)
    cost = None
  if not cost:
    cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def measure_flops(size: str, image_size: int | None = None, num_samples: int = 10,
                  batch: int = 2) -> dict:
  # Unrolled blocks and dense attention: XLA's cost analysis counts a loop body once, so the
  # scanned stacks and the blockwise attention's tile loop would be under-counted. Without remat:
  # recomputation is not model work.
  model = build(size, image_size, dict(scan_layers=False, remat=False, attention="dense"))
  images, roi = synthetic_inputs(model, batch)
  params = state_lib.init_params(model, jax.random.key(0))
  settings = step_lib.StepSettings(patch_size=model.patch_size, ratio=RATIO)
  optimizer = state_lib.make_optimizer(OPTIM, 100)
  train = step_lib.make_train_step(model, optimizer, settings, "pmap", [jax.devices()[0]])
  state = train.replicate(state_lib.create_state(params, optimizer))
  host_batch = {"image": images[None], "train_roi": roi[None], "valid": np.ones((1, batch), bool)}
  lowered = train._fn.lower(state, host_batch, jax.random.key(0),  # pylint: disable=protected-access
                            step_lib.guidance_arrays())
  train_flops = _cost_flops(lowered) / batch

  mask = np.zeros((batch, model.num_patches), bool)
  plan = masking.make_plan(jnp.asarray(mask))
  fwd = jax.jit(lambda p, x, pl: model.apply({"params": p}, x, pl))
  forward_flops = _cost_flops(fwd.lower(params, images, plan)) / batch
  passes = uncertainty.num_passes(num_samples, RATIO, model.num_patches, min_roi=MIN_ROI)
  return {"train_gflop_per_image": train_flops / 1e9,
          "forward_gflop_per_image": forward_flops / 1e9,
          "mc_passes": passes, "mc_gflop_per_image": passes * forward_flops / 1e9,
          "num_patches": model.num_patches,
          "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6}


def measure_train(size: str, image_size: int | None = None, batch: int = 10, steps: int = 3,
                  overrides: dict | None = None) -> dict:
  """The library's step (`step.make_train_step`, pmap over one device, state donated)."""
  model = build(size, image_size, overrides)
  images, roi = synthetic_inputs(model, batch)
  params = state_lib.init_params(model, jax.random.key(0))
  settings = step_lib.StepSettings(patch_size=model.patch_size, ratio=RATIO)
  optimizer = state_lib.make_optimizer(OPTIM, 100)
  train = step_lib.make_train_step(model, optimizer, settings, "pmap", [jax.devices()[0]])
  holder = {"state": train.replicate(state_lib.create_state(params, optimizer))}
  host_batch = {"image": images[None], "train_roi": roi[None], "valid": np.ones((1, batch), bool)}
  key, guidance = jax.random.key(0), step_lib.guidance_arrays()
  losses = []

  def one(_):
    holder["state"], metrics = train(holder["state"], host_batch, key, guidance)
    losses.append(float(metrics["loss"]))  # blocks on the step

  t = timed(one, steps)
  return {"batch": batch, "image_size": model.image_size, "tokens": model.num_patches + 1,
          "dtype": str(model.dtype), "attention": layers.resolve_attention(model.attention,
                                                                          model.dtype),
          "images_per_s": batch / t["median_s"], "images_per_cpu_s": batch / t["median_cpu_s"],
          "loss_finite": bool(np.all(np.isfinite(losses))), **t}


def measure_mc(size: str, image_size: int | None = None, batch: int = 2, num_samples: int = 10,
               pass_chunk: int | None = None, repeats: int = 3,
               overrides: dict | None = None, exact_num_keep: bool = False) -> dict:
  """`uncertainty.mc_uncertainty` (jitted) with the real model; s per image.

  exact_num_keep: encoder length `L = N - masked` of the synthetic ROI (every image and pass
    masks the same count) instead of `L = N`: what a caller that knows its ROI sizes could save.
  """
  model = build(size, image_size, overrides)
  images, roi = synthetic_inputs(model, batch)
  params = state_lib.init_params(model, jax.random.key(0))

  def apply_fn(p, x, plan):
    return model.apply({"params": p}, x, plan)

  fn = jax.jit(functools.partial(
      uncertainty.mc_uncertainty, apply_fn, patch_size=model.patch_size, ratio=RATIO,
      num_samples=num_samples, pass_chunk=pass_chunk, min_roi=MIN_ROI,
      num_keep=(uncertainty.mc_encoder_length(roi, model.patch_size, RATIO, multiple=1)
                if exact_num_keep else None)))
  key = jax.random.key(0)
  images_dev, roi_dev = jnp.asarray(images), jnp.asarray(roi)
  t = timed(lambda i: jax.block_until_ready(
      fn(params, jax.random.fold_in(key, i + 1), images_dev, roi_dev)), repeats)
  passes = uncertainty.num_passes(num_samples, RATIO, model.num_patches, min_roi=MIN_ROI)
  return {"batch": batch, "num_samples": num_samples, "passes": passes,
          "pass_chunk": pass_chunk, "dtype": str((overrides or {}).get("dtype", "float32")),
          "exact_num_keep": exact_num_keep, "image_size": model.image_size,
          "s_per_image": t["median_s"] / batch, "cpu_s_per_image": t["median_cpu_s"] / batch,
          "s_per_pass_image": t["median_s"] / batch / passes,
          "roi_patches": int(patches.patch_any(roi_dev, model.patch_size)[0].sum()), **t}


def measure_attention(size: str, batch: int = 4, repeats: int = 3,
                      names: tuple[str, ...] = ("dense", "dot_product", "blockwise")) -> dict:
  """Forward + backward of one encoder layer's attention (`[B, T, H, Dh]`, ~10% padded keys)."""
  model = build(size, None)
  heads, width = model.encoder_heads, model.encoder_width
  tokens = model.num_patches + 1
  shape = (batch, tokens, heads, width // heads)
  q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32) * (0.3 if i == 0 else 1.0)
             for i in range(3))
  valid = jnp.arange(tokens)[None, :] < int(tokens * 0.9)
  valid = jnp.broadcast_to(valid, (batch, tokens))
  out = {"batch": batch, "tokens": tokens, "heads": heads}
  for name in names:
    attn = layers.get_attention_fn(name)
    grad = jax.jit(jax.grad(lambda q_, k_, v_: (attn(q_, k_, v_, valid) ** 2).sum(),
                            argnums=(0, 1, 2)))
    fwd = jax.jit(lambda q_, k_, v_: attn(q_, k_, v_, valid))
    tg = timed(lambda i: jax.block_until_ready(grad(q, k, v)), repeats)
    tf = timed(lambda i: jax.block_until_ready(fwd(q, k, v)), repeats)
    out[name] = {"fwd_bwd_s": tg["median_s"], "fwd_bwd_cpu_s": tg["median_cpu_s"],
                 "fwd_s": tf["median_s"], "fwd_cpu_s": tf["median_cpu_s"]}
  base = out["blockwise"]["fwd_bwd_s"] if "blockwise" in out else None
  if base:
    for name in names:
      out[name]["fwd_bwd_vs_blockwise"] = out[name]["fwd_bwd_s"] / base
      out[name]["fwd_vs_blockwise"] = out[name]["fwd_s"] / out["blockwise"]["fwd_s"]
  return out


MEASUREMENTS = {"matmul": measure_matmul, "flops": measure_flops, "train": measure_train,
                "mc": measure_mc, "attention": measure_attention}


def main(argv: list[str]) -> None:
  spec = json.loads(argv[1])
  kind = spec.pop("kind")
  result = MEASUREMENTS[kind](**spec)
  result["peak_rss_gb"] = peak_rss_gb()
  result["peak_device_gb"] = peak_device_gb()
  result["kind"] = kind
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  main(sys.argv)

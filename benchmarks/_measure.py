"""One benchmark measurement per process (run by benchmarks/run.py, one subprocess each).

Each measurement runs in a fresh interpreter so that its peak memory (`ru_maxrss`, and the
device's `peak_bytes_in_use`) is its own and an out-of-memory failure cannot take the run down.
Usage (from a bare checkout: the repository root is put on `sys.path` first, so the
`u2ad_jax` next to this file is the one imported, installed or not):

  python benchmarks/_measure.py '<json spec>'

prints one line `RESULT <json>` with the measurement's numbers plus `peak_rss_gb`,
`peak_device_gb` (GPU / TPU) and `u2ad_jax_file` (which library was measured), or, when the
measurement raised, `RESULT {"error": ..., "error_kind": "oom" | "error"}` and exit status 1
(`oom` = the allocator's RESOURCE_EXHAUSTED / out of memory). Times are medians over `repeats`
calls after one warm-up call (whose time, compilation included, is reported separately as
`first_call_s`); CPU seconds (`time.process_time`, all threads of this process) are reported
next to wall seconds because other processes share the machine. With U2AD_BENCH_CACHE_DIR set,
compiled programs go to (and come from) JAX's persistent compilation cache there, so a rerun
after a cut-off window skips the compilations already done.

Specs (`kind` plus arguments):
  matmul:   n, repeats, dtype               -> gflops ([n,n] @ [n,n], float32 by default)
  flops:    size, image_size, num_samples   -> XLA cost analysis per image of the train step and of
            one forward pass (unrolled, dense attention, no remat: the model's own FLOPs; loops
            such as `nn.scan` or the blockwise tiles would be counted once by the analysis)
  train:    size, image_size, batch, steps, overrides, cohort_slices -> images/s of the trainer's
            own path: `step.make_train_step` with the cohort on the device
            (`step.device_cohort`), index-only host batches (`BatchIterator(with_examples=False)`)
            and augmentation in the step; also the host's share of a step (`host_fraction`)
  mc:       size, image_size, batch, num_samples, pass_chunk, repeats, overrides
            -> s/image of `uncertainty.mc_uncertainty` (jitted)
  attention: size, batch, repeats -> forward + backward time of one encoder layer's attention,
            per implementation in `layers.ATTENTION_FNS`
  attention_probe: size, batch, repeats, overrides -> the attention the model would run
            (`overrides.attention`, 'auto' resolved for this platform and dtype) against XLA's
            `dot_product` at the paper encoder's shape: compiles, runs forward and gradient,
            agrees; times of both
  input:    size, batch, steps, image_size -> the host side of a step: the old host pipeline
            (`BatchIterator` building augmented images, one thread) vs the trainer's index-only
            batches, images/s per host core
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Callable

# Import shim: the library beside this file, before any installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

import u2ad_jax  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax import masking  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax import patches  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax import uncertainty  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.data import sliceset  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.models import layers  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.models import vit_mae  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import maps as maps_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import state as state_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import step as step_lib  # noqa: E402  pylint: disable=g-import-not-at-top

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


def build(size: str, image_size: int | None, overrides: dict | None = None,
          checked: bool = False):
  """The `size` model with `overrides`; `checked`: 'auto' attention checked for this platform
  as the trainer and the evaluation check it (`vit_mae.with_checked_attention`)."""
  overrides = dict(overrides or {})
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if image_size:
    overrides["image_size"] = int(image_size)
  model = vit_mae.build_model(size, **overrides)
  return vit_mae.with_checked_attention(model) if checked else model


def attention_of(model) -> str:
  """The implementation the model's attention layers run here."""
  return layers.resolve_attention(model.attention, model.dtype)


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
                            step_lib.guidance_arrays(), None)
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


def synthetic_cohort(model, num_slices: int) -> sliceset.SliceSet:
  """`num_slices` synthetic slices (`synthetic_inputs`) as a SliceSet (labels left empty)."""
  images, roi = synthetic_inputs(model, num_slices)
  zeros = np.broadcast_to(np.zeros((), np.uint8), roi.shape)  # never read: no memory
  ids = [f"s{i}" for i in range(num_slices)]
  return sliceset.SliceSet(images=images[..., 0], train_roi=roi, score_roi=roi, labels=zeros,
                           vertebrae=zeros, subject_ids=ids, slice_index=np.zeros(num_slices),
                           geometries={i: None for i in ids})


def measure_train(size: str, image_size: int | None = None, batch: int = 10, steps: int = 3,
                  overrides: dict | None = None, cohort_slices: int | None = None,
                  augment: bool = True) -> dict:
  """The trainer's own path: `step.make_train_step` (pmap over one device, state donated), the
  cohort on the device, index-only host batches and augmentation inside the step, metrics read
  once after the timed steps (the trainer reads them at log boundaries).

  images_per_s: timed steps run back to back. host_input_s_per_step: the host's part of a step
  (the next index batch and its feed, `maps.step_feed`), which runs while the device computes;
  host_fraction = that / the step time (< 1: the device, not the host, bounds training).
  """
  model = build(size, image_size, overrides, checked=True)
  slices = synthetic_cohort(model, cohort_slices or batch)
  params = state_lib.init_params(model, jax.random.key(0))
  settings = step_lib.StepSettings(patch_size=model.patch_size, ratio=RATIO, augment=augment)
  optimizer = state_lib.make_optimizer(OPTIM, 100)
  train = step_lib.make_train_step(model, optimizer, settings, "pmap", [jax.devices()[0]])
  state = train.replicate(state_lib.create_state(params, optimizer))
  cohort = step_lib.device_cohort(train, slices.images, slices.train_roi)
  iterator = pipeline.BatchIterator(slices, global_batch=batch, num_devices=1, seed=0,
                                    augment=False, with_examples=False, drop_remainder=False)

  def host_batches():
    epoch = 0
    while True:
      for b in iterator.epoch(epoch):
        yield maps_lib.step_feed(b, None, False, model.num_patches)
      epoch += 1

  feeds = host_batches()
  key, guidance = jax.random.key(0), step_lib.guidance_arrays()
  t0, c0 = time.perf_counter(), time.process_time()
  state, metrics = train(state, next(feeds), key, guidance, cohort)
  jax.block_until_ready(metrics)
  first, first_cpu = time.perf_counter() - t0, time.process_time() - c0

  host_s, dispatch_s, pending = 0.0, 0.0, []
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    h0 = time.perf_counter()
    feed = next(feeds)
    h1 = time.perf_counter()
    state, metrics = train(state, feed, key, guidance, cohort)
    host_s += h1 - h0
    dispatch_s += time.perf_counter() - h1
    pending.append(metrics)
  losses = [float(m["loss"]) for m in jax.device_get(pending)]
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  step_s = wall / steps
  return {"batch": batch, "image_size": model.image_size, "tokens": model.num_patches + 1,
          "dtype": jnp.dtype(model.dtype).name, "attention": attention_of(model),
          "augment": augment,
          "images_per_s": batch * steps / wall, "images_per_cpu_s": batch * steps / cpu,
          "step_s": step_s, "median_s": step_s, "steps": steps,
          "host_input_s_per_step": host_s / steps, "host_fraction": host_s / steps / step_s,
          "dispatch_s_per_step": dispatch_s / steps,
          "first_call_s": first, "first_call_cpu_s": first_cpu,
          "loss_finite": bool(np.all(np.isfinite(losses))),
          "device_bytes_limit_gb": _device_bytes_limit_gb()}


def _device_bytes_limit_gb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return None if limit is None else limit / 1e9


def measure_input(size: str, batch: int = 256, steps: int = 3,
                  image_size: int | None = None) -> dict:
  """The host side of a training step, on this process's one thread (per host core).

  old: `BatchIterator` building the batch's augmented images on the host (the path before the
  augmentation moved into the step). new: the trainer's index-only batch and its feed; guided:
  the same plus the per-patch EU / exclusion rows of a guided stage (`maps.gather_guidance`).
  Each as images/s and as the share of a step at the 3,000 images/s target
  (`target_step_fraction`, < 1 = one core keeps up).
  """
  model = build(size, image_size)
  slices = synthetic_cohort(model, batch)
  n = model.num_patches
  rng = np.random.default_rng(0)
  maps = {"patch_eu": rng.random((batch, n), dtype=np.float32),
          "exclude": rng.random((batch, n)) < 0.05}
  target_step_s = batch / 3000.0

  def rate(with_examples: bool, guided: bool) -> dict[str, float]:
    iterator = pipeline.BatchIterator(slices, global_batch=batch, num_devices=1, seed=0,
                                      augment=with_examples, with_examples=with_examples,
                                      drop_remainder=False)
    def one(epoch):
      for b in iterator.epoch(epoch + 1):  # one step per epoch (the cohort is one batch)
        if not with_examples:  # what the trainer sends the step
          maps_lib.step_feed(b, maps if guided else None, guided, n)
    reps = steps if with_examples else max(steps, 200)  # the light path takes microseconds
    t = timed(one, reps)
    return {"images_per_s": batch / t["median_s"], "images_per_cpu_s": batch / t["median_cpu_s"],
            "s_per_step": t["median_s"], "target_step_fraction": t["median_s"] / target_step_s}

  return {"batch": batch, "image_size": model.image_size, "target_step_s": target_step_s,
          "old_host_augment": rate(True, False), "new_index_feed": rate(False, False),
          "new_index_feed_guided": rate(False, True)}


def measure_attention_probe(size: str, batch: int = 8, repeats: int = 3,
                            overrides: dict | None = None) -> dict:
  """The attention the model would run here (its `attention`, 'auto' resolved for this platform
  and dtype, NOT checked: this is the check) against XLA's `dot_product` at the encoder's shape
  `[batch, 1 + N, H, Dh]`, key lengths 0.9 T and T / 2: compile, forward and gradient times, and
  agreement. Raises (an error RESULT: the plan stops) when the kernel fails or disagrees."""
  model = build(size, None, overrides)
  name = attention_of(model)
  heads, width = model.encoder_heads, model.encoder_width
  tokens, head_dim = model.num_patches + 1, width // heads
  shape = (batch, tokens, heads, head_dim)
  q, k, v = (jax.random.normal(jax.random.key(i), shape, model.dtype) for i in range(3))
  lengths = np.where(np.arange(batch) % 2 == 0, int(tokens * 0.9), tokens // 2)
  valid = jnp.asarray(np.arange(tokens)[None, :] < lengths[:, None])
  weights = jax.random.normal(jax.random.key(3), shape, jnp.float32)
  out: dict[str, Any] = {"attention": name, "shape": list(shape),
                         "dtype": jnp.dtype(model.dtype).name}
  results = {}
  for impl in dict.fromkeys([name, "dot_product"]):
    attn = functools.partial(layers.get_attention_fn(impl), scale=head_dim ** -0.5)
    loss = lambda q_, k_, v_, attn=attn: jnp.sum(attn(q_, k_, v_, valid).astype(jnp.float32)
                                                  * weights)
    fwd = jax.jit(lambda q_, k_, v_, attn=attn: attn(q_, k_, v_, valid))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    tf = timed(lambda i: jax.block_until_ready(fwd(q, k, v)), repeats)
    tg = timed(lambda i: jax.block_until_ready(grad(q, k, v)), repeats)
    results[impl] = (np.asarray(fwd(q, k, v), np.float32),
                     [np.asarray(g, np.float32) for g in grad(q, k, v)])
    out[impl] = {"fwd_s": tf["median_s"], "fwd_bwd_s": tg["median_s"],
                 "first_call_s": tf["first_call_s"] + tg["first_call_s"]}
  (o, grads), (o_ref, grads_ref) = results[name], results["dot_product"]
  out["max_abs_diff_out"] = float(np.max(np.abs(o - o_ref)))
  out["max_rel_diff_grads"] = max(float(np.max(np.abs(g - r)) / (np.max(np.abs(r)) + 1e-30))
                                  for g, r in zip(grads, grads_ref))
  out["fwd_bwd_speedup_vs_dot_product"] = out["dot_product"]["fwd_bwd_s"] / out[name]["fwd_bwd_s"]
  finite = all(np.all(np.isfinite(x)) for x in [o, *grads])
  # Half precision of O(1) values: ~1e-2; a wrong key mask is off by O(1).
  out["agrees"] = bool(finite and out["max_abs_diff_out"] < 0.1
                       and out["max_rel_diff_grads"] < 0.1)
  if not out["agrees"]:
    raise ArithmeticError(f"attention {name!r} disagrees with dot_product: max abs diff of "
                          f"the outputs {out['max_abs_diff_out']:.3g}, max relative diff of the "
                          f"gradients {out['max_rel_diff_grads']:.3g}")
  return out


def measure_mc(size: str, image_size: int | None = None, batch: int = 2, num_samples: int = 10,
               pass_chunk: int | None = None, repeats: int = 3,
               overrides: dict | None = None, exact_num_keep: bool = False) -> dict:
  """`uncertainty.mc_uncertainty` (jitted) with the real model; s per image.

  exact_num_keep: encoder length `L = N - masked` of the synthetic ROI (every image and pass
    masks the same count) instead of `L = N`: what a caller that knows its ROI sizes could save.
  """
  model = build(size, image_size, overrides, checked=True)
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
          "pass_chunk": pass_chunk, "dtype": jnp.dtype(model.dtype).name,
          "attention": attention_of(model),
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
                "mc": measure_mc, "attention": measure_attention,
                "attention_probe": measure_attention_probe, "input": measure_input}

# What the allocators say when a computation does not fit (XLA's status code; the GPU / TPU
# messages name it, the CPU allocator says "out of memory").
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def error_kind(text: str) -> str:
  """'oom' for an allocation failure, else 'error'."""
  return "oom" if any(marker in text for marker in OOM_MARKERS) else "error"


def _use_compilation_cache() -> str | None:
  directory = os.environ.get("U2AD_BENCH_CACHE_DIR")
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program this script compiles is worth keeping (the defaults skip those under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


def main(argv: list[str]) -> int:
  spec = json.loads(argv[1])
  kind = spec.pop("kind")
  header = {"kind": kind, "u2ad_jax_file": u2ad_jax.__file__,
            "compilation_cache_dir": _use_compilation_cache(), "backend": jax.default_backend()}
  try:
    result = MEASUREMENTS[kind](**spec)
  except Exception as e:  # pylint: disable=broad-except  (reported, the caller goes on)
    text = f"{type(e).__name__}: {e}"
    traceback.print_exc()
    print("RESULT " + json.dumps({**header, "error": text[-2000:], "error_kind": error_kind(text),
                                  "peak_device_gb": peak_device_gb()}), flush=True)
    return 1
  result.update(header)
  result["peak_rss_gb"] = peak_rss_gb()
  result["peak_device_gb"] = peak_device_gb()
  print("RESULT " + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(main(sys.argv))

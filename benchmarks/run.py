"""Benchmarks of u2ad_jax against the machine's limits, in ONE run.

  python benchmarks/run.py [--size paper|cpu|mu] [--json OUT] [--quick]

Measures (each in a fresh subprocess, `benchmarks/_measure.py`, so peak memory is per
measurement): the float32 matmul rate, the model's FLOPs per image (XLA cost analysis of an
unrolled build), train throughput at batch 10 with the library's step (`step.make_train_step`,
pmap on one device) and its model-FLOP utilisation, Monte-Carlo uncertainty time per image for
K = 10 (`uncertainty.mc_uncertainty`, jitted), peak RSS of each, scaling with K, image size
(token count) and batch size, and the attention implementations as ratios. Warm-up calls are
excluded from the medians and reported as `first_call_s` (compilation included).

`--quick` shrinks repeats and scaling points to a smoke test (`--size mu --quick` takes seconds
of compute plus process start-up; tests/test_benchmarks.py runs it).

On a GPU or TPU (`--platform auto` finds it; `--platform accelerator` forces the plan) the run
measures what accelerator users need instead, in bfloat16 compute with the platform's attention
('auto'): the bf16 matmul rate, training images/s at global batch 10, 256 and the largest batch
that fits (doubling from 512 until the allocator fails), Monte-Carlo K = 10 time per image, peak
device memory of each, and the model-FLOP utilisation against the chip's datasheet peak
(`CHIP_PEAK_TFLOPS`) and against the measured bf16 matmul rate. About 5-8 minutes at the paper
size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

# The parent process only reads device names: no GPU memory preallocation here, or the measuring
# subprocesses would find three quarters of the GPU taken.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
MEASURE = os.path.join(HERE, "_measure.py")

# The original PyTorch release on a 2-core CPU like this one (issue 6), paper size, batch 10.
REFERENCE = {"train_images_per_s": 0.21, "train_peak_rss_gb": 12.6,
             "mc_s_per_image_k10": (13.6, 21.8)}
# The targets on this 2-core CPU at the paper size.
TARGETS = {"train_images_per_s": 1.0, "train_mfu": 0.22, "mc_s_per_image_k10": 2.5,
           "train_peak_rss_gb": 3.0}


def plan(size: str, quick: bool) -> dict[str, Any]:
  """What to measure for `size`; `quick` keeps one or two points per scaling axis."""
  native = {"paper": 256, "cpu": 128, "mu": 32}[size]
  image_sizes = {"paper": [128, 192, 256], "cpu": [64, 96, 128], "mu": [16, 32]}[size]
  if quick:
    image_sizes = [native]
  return dict(
      native=native,
      matmul=dict(n=512 if quick else 2048, repeats=2 if quick else 5),
      train_batch=10, train_steps=2 if quick else 3,
      mc_batch=2, mc_repeats=1 if quick else 3, num_samples=10,
      ks=[2, 10] if quick else [2, 5, 10],
      batches=[10] if quick else [2, 5, 10],
      image_sizes=image_sizes,
      attention=dict(batch=1 if quick else 4, repeats=1 if quick else 3),
  )


# Dense bf16 peak of the chips users train on (vendor datasheets, TFLOP/s, no sparsity), by
# `device_kind` prefix; utilisation against the measured bf16 matmul rate is reported as well.
CHIP_PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
                    "NVIDIA L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0, "TPU v6 lite": 918.0}
ACCEL_OVERRIDES = {"dtype": "bfloat16"}  # attention stays 'auto': cuDNN / Pallas flash


def accelerator_plan(size: str, quick: bool) -> dict[str, Any]:
  """What to measure on a GPU / TPU; `quick` is a smoke test of the same code path (on CPU)."""
  native = {"paper": 256, "cpu": 128, "mu": 32}[size]
  return dict(native=native, matmul=dict(n=512 if quick else 8192, repeats=2 if quick else 5,
                                         dtype="bfloat16"),
              train_steps=2 if quick else 5, batches=[10, 32] if quick else [10, 256],
              largest_from=64 if quick else 512, largest_max=64 if quick else 8192,
              mc_batch=4 if quick else 64, mc_repeats=1 if quick else 3, num_samples=10)


def run_one(spec: dict[str, Any], log) -> dict[str, Any]:
  """Runs one measurement in a fresh interpreter; returns its RESULT dict (or an 'error')."""
  t0 = time.perf_counter()
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  # Each measurement owns its device: let it use nearly all of the memory, on demand.
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  # One real device per measurement: drop fake host devices (tests/conftest.py sets 4).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, MEASURE, json.dumps(spec)], capture_output=True,
                        text=True, env=env)
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
  if result is None:
    result = {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
  result["process_s"] = time.perf_counter() - t0
  log(f"  {json.dumps(spec)}: {time.perf_counter() - t0:.1f} s"
      + ("" if "error" not in result else "  ERROR " + result["error"].splitlines()[-1]))
  return result


def machine() -> dict[str, Any]:
  info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                          "logical_cpus": os.cpu_count()}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    info["jax"] = jax.__version__
    import jaxlib  # pylint: disable=g-import-not-at-top
    info["jaxlib"] = jaxlib.__version__
    info["devices"] = [str(d) for d in jax.devices()]
  except Exception as e:  # pylint: disable=broad-except
    info["jax"] = f"unavailable: {e}"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        info["cpu_model"] = line.split(":", 1)[1].strip()
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      info["ram_gb"] = int(f.readline().split()[1]) / 1e6
    info["load_average_at_start"] = os.getloadavg()
  except OSError:
    pass
  return info


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("paper", "cpu", "mu"), default="paper")
  parser.add_argument("--json", default=None, help="write all results to this file")
  parser.add_argument("--quick", action="store_true", help="smoke-test sizes and repeats")
  parser.add_argument("--platform", choices=("auto", "cpu", "accelerator"), default="auto",
                      help="which plan: auto = accelerator on a GPU / TPU, else cpu")
  args = parser.parse_args(argv)
  if args.platform == "accelerator" or (args.platform == "auto" and _backend() != "cpu"):
    return accelerator_main(args, argv)
  p = plan(args.size, args.quick)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  out: dict[str, Any] = {"command": "python benchmarks/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv), "size": args.size, "quick": args.quick,
      "machine": machine(), "reference_pytorch": REFERENCE, "targets": TARGETS}
  log(f"benchmarks: size={args.size} quick={args.quick}")

  size = args.size
  out["matmul"] = run_one({"kind": "matmul", **p["matmul"]}, log)
  rate = out["matmul"].get("gflops", float("nan"))

  flops = {s: run_one({"kind": "flops", "size": size, "image_size": s,
                       "num_samples": p["num_samples"]}, log) for s in p["image_sizes"]}
  out["flops"] = flops[p["native"]]

  def train(batch: int, image_size: int) -> dict[str, Any]:
    r = run_one({"kind": "train", "size": size, "image_size": image_size, "batch": batch,
                 "steps": p["train_steps"]}, log)
    gflop = flops[image_size].get("train_gflop_per_image", float("nan"))
    if "images_per_s" in r:
      r["gflop_per_s"] = r["images_per_s"] * gflop
      r["mfu"] = r["gflop_per_s"] / rate
    return r

  def mc(num_samples: int, image_size: int, batch: int | None = None,
         **options: Any) -> dict[str, Any]:
    r = run_one({"kind": "mc", "size": size, "image_size": image_size,
                 "batch": batch or p["mc_batch"], "num_samples": num_samples,
                 "repeats": p["mc_repeats"], **options}, log)
    fwd = flops[image_size].get("forward_gflop_per_image", float("nan"))
    if "s_per_image" in r:
      r["gflop_per_image"] = r["passes"] * fwd
      r["gflop_per_s"] = r["gflop_per_image"] / r["s_per_image"]
      r["mfu"] = r["gflop_per_s"] / rate
      # FLOP floor: every pass's forward FLOPs at the measured matmul rate.
      r["floor_s_per_image"] = r["gflop_per_image"] / rate
    return r

  native = p["native"]
  out["train"] = train(p["train_batch"], native)
  out["mc"] = mc(p["num_samples"], native)

  out["scaling"] = {
      "num_samples": [out["mc"] if k == p["num_samples"] else mc(k, native) for k in p["ks"]],
      "train_batch": [out["train"] if b == p["train_batch"] else train(b, native)
                      for b in p["batches"]],
      "image_size_train": [out["train"] if s == native else train(p["train_batch"], s)
                           for s in p["image_sizes"]],
      "image_size_mc": [out["mc"] if s == native else mc(p["num_samples"], s)
                        for s in p["image_sizes"]],
  }
  # MC options at K = 10: pass chunks (memory bound), exact encoder length, bfloat16 compute.
  out["mc_variants"] = [] if args.quick else [
      mc(p["num_samples"], native, pass_chunk=2),
      mc(p["num_samples"], native, pass_chunk=7),
      mc(p["num_samples"], native, exact_num_keep=True),
      mc(p["num_samples"], native, pass_chunk=2, exact_num_keep=True),
      mc(p["num_samples"], native, overrides={"dtype": "bfloat16"}),
  ]
  out["attention"] = run_one({"kind": "attention", "size": size, **p["attention"]}, log)

  summary = {
      "matmul_gflops": rate,
      "train_gflop_per_image": out["flops"].get("train_gflop_per_image"),
      "forward_gflop_per_image": out["flops"].get("forward_gflop_per_image"),
      "train_images_per_s": out["train"].get("images_per_s"),
      "train_mfu": out["train"].get("mfu"),
      "train_peak_rss_gb": out["train"].get("peak_rss_gb"),
      "train_compile_s": out["train"].get("first_call_s"),
      "mc_s_per_image_k10": out["mc"].get("s_per_image"),
      "mc_cpu_s_per_image_k10": out["mc"].get("cpu_s_per_image"),
      "mc_floor_s_per_image_k10": out["mc"].get("floor_s_per_image"),
      "mc_passes_k10": out["mc"].get("passes"),
      "mc_peak_rss_gb": out["mc"].get("peak_rss_gb"),
      "attention_fwd_bwd_vs_blockwise": {
          name: out["attention"].get(name, {}).get("fwd_bwd_vs_blockwise")
          for name in ("dense", "dot_product", "blockwise")},
  }
  # Attention floor of one MC image: the measured blockwise attention forward of one encoder
  # layer (per image) for the 12 encoder layers, plus the decoder layers at half the heads.
  attn_fwd = out["attention"].get("blockwise", {}).get("fwd_s")
  model_depths = {"paper": (12, 8, 0.5), "cpu": (4, 2, 4 / 6), "mu": (2, 1, 1.0)}[size]
  if attn_fwd and "passes" in out["mc"]:
    enc_depth, dec_depth, dec_heads_ratio = model_depths
    per_pass = attn_fwd / out["attention"]["batch"] * (enc_depth + dec_depth * dec_heads_ratio)
    summary["mc_attention_s_per_image_k10"] = per_pass * out["mc"]["passes"]
  out["summary"] = summary
  out["total_s"] = time.perf_counter() - t_start
  out["errors"] = _errors(out)

  text = json.dumps(out, indent=1, sort_keys=True)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text)
  log(_table(out))
  return out


def _backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend()


def chip_peak_tflops() -> tuple[str, float | None]:
  """(device kind, its dense bf16 datasheet peak or None when not in CHIP_PEAK_TFLOPS)."""
  import jax  # pylint: disable=g-import-not-at-top
  kind = jax.devices()[0].device_kind
  for prefix, peak in CHIP_PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return kind, peak
  return kind, None


def accelerator_main(args, argv) -> dict[str, Any]:
  """The accelerator plan (module docstring): bf16 training at several global batches, the
  largest batch that fits, MC K = 10, peak device memory and utilisation."""
  p = accelerator_plan(args.size, args.quick)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  kind, peak_tflops = chip_peak_tflops()
  out: dict[str, Any] = {"command": "python benchmarks/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv), "size": args.size, "quick": args.quick,
      "plan": "accelerator", "machine": machine(), "device_kind": kind,
      "chip_peak_tflops_bf16": peak_tflops, "overrides": ACCEL_OVERRIDES}
  log(f"benchmarks (accelerator plan): size={args.size} on {kind}")
  size, native = args.size, p["native"]
  out["matmul"] = run_one({"kind": "matmul", **p["matmul"]}, log)
  out["flops"] = run_one({"kind": "flops", "size": size, "image_size": native,
                          "num_samples": p["num_samples"]}, log)
  gflop = out["flops"].get("train_gflop_per_image", float("nan"))
  rate = out["matmul"].get("gflops", float("nan"))

  def train(batch: int) -> dict[str, Any]:
    r = run_one({"kind": "train", "size": size, "image_size": native, "batch": batch,
                 "steps": p["train_steps"], "overrides": ACCEL_OVERRIDES}, log)
    if "images_per_s" in r:
      r["tflop_per_s"] = r["images_per_s"] * gflop / 1e3
      r["util_vs_matmul"] = r["tflop_per_s"] * 1e3 / rate
      r["util_vs_chip_peak"] = None if peak_tflops is None else r["tflop_per_s"] / peak_tflops
    return r

  out["train"] = [train(b) for b in p["batches"]]
  # The largest global batch that fits: double until a step fails (allocator out of memory).
  largest, batch = None, p["largest_from"]
  while batch <= p["largest_max"]:
    r = train(batch)
    if "error" in r:
      out["largest_failed"] = {"batch": batch, "error": r["error"].splitlines()[-1:]}
      break
    largest, batch = r, batch * 2
  out["train_largest"] = largest
  mc = run_one({"kind": "mc", "size": size, "image_size": native, "batch": p["mc_batch"],
                "num_samples": p["num_samples"], "repeats": p["mc_repeats"],
                "overrides": ACCEL_OVERRIDES}, log)
  out["mc"] = mc
  rows = [*out["train"], *([largest] if largest else [])]
  out["summary"] = {
      "device_kind": kind,
      "matmul_tflops_bf16": rate / 1e3,
      "train": [{k: r.get(k) for k in ("batch", "images_per_s", "tflop_per_s", "util_vs_matmul",
                                       "util_vs_chip_peak", "peak_device_gb", "attention")}
                for r in rows],
      "largest_batch": None if largest is None else largest["batch"],
      "mc_ms_per_image_k10": None if "s_per_image" not in mc else 1e3 * mc["s_per_image"],
      "mc_peak_device_gb": mc.get("peak_device_gb"),
  }
  out["total_s"] = time.perf_counter() - t_start
  # A failed doubling step is the expected end of the search, not an error of the run.
  out["errors"] = [e for e in _errors(out) if not e.startswith("/largest_failed")]
  if args.json:
    with open(args.json, "w") as f:
      f.write(json.dumps(out, indent=1, sort_keys=True))
  s = out["summary"]
  lines = [f"{kind}: size={size}, bf16 matmul {_fmt(s['matmul_tflops_bf16'])} TFLOP/s, "
           f"total {out['total_s']:.0f} s"]
  for r in s["train"]:
    lines.append(f"train b={r['batch']}: {_fmt(r['images_per_s'])} images/s, "
                 f"{_fmt(r['tflop_per_s'])} TFLOP/s (vs matmul {_fmt(r['util_vs_matmul'])}, "
                 f"vs chip peak {_fmt(r['util_vs_chip_peak'])}), peak device "
                 f"{_fmt(r['peak_device_gb'])} GB, attention {r['attention']}")
  lines.append(f"largest batch that fits: {s['largest_batch']}")
  lines.append(f"MC K=10: {_fmt(s['mc_ms_per_image_k10'])} ms/image, peak device "
               f"{_fmt(s['mc_peak_device_gb'])} GB")
  if out["errors"]:
    lines.append("ERRORS in: " + ", ".join(out["errors"]))
  log("\n".join(lines))
  return out


def _errors(tree: Any, path: str = "") -> list[str]:
  found = []
  if isinstance(tree, dict):
    if "error" in tree:
      found.append(path or "/")
    for k, v in tree.items():
      found += _errors(v, f"{path}/{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      found += _errors(v, f"{path}[{i}]")
  return found


def _fmt(x: Any, digits: int = 3) -> str:
  if isinstance(x, (int, float)) and math.isfinite(x):
    return f"{x:.{digits}g}"
  return str(x)


def _table(out: dict[str, Any]) -> str:
  s = out["summary"]
  lines = [f"size={out['size']} quick={out['quick']} total {out['total_s']:.0f} s",
           f"matmul {_fmt(s['matmul_gflops'])} GFLOP/s float32",
           f"FLOPs/image: train {_fmt(s['train_gflop_per_image'])} GFLOP, "
           f"forward {_fmt(s['forward_gflop_per_image'])} GFLOP",
           f"train b=10: {_fmt(s['train_images_per_s'])} images/s, "
           f"MFU {_fmt(100 * (s['train_mfu'] or float('nan')))}%, "
           f"peak RSS {_fmt(s['train_peak_rss_gb'])} GB",
           f"MC K=10 ({s['mc_passes_k10']} passes): {_fmt(s['mc_s_per_image_k10'])} s/image "
           f"(FLOP floor {_fmt(s['mc_floor_s_per_image_k10'])} s), "
           f"peak RSS {_fmt(s['mc_peak_rss_gb'])} GB"]
  for axis, rows in out["scaling"].items():
    cells = []
    for r in rows:
      label = {"num_samples": "K", "train_batch": "b"}.get(axis, "px")
      value = r.get("num_samples") if axis == "num_samples" else (
          r.get("batch") if axis == "train_batch" else r.get("image_size"))
      metric = r.get("images_per_s") if axis.endswith("train") or axis == "train_batch" \
          else r.get("s_per_image")
      cells.append(f"{label}={value}: {_fmt(metric)}")
    lines.append(f"scaling {axis}: " + ", ".join(cells))
  for r in out.get("mc_variants", []):
    lines.append(f"MC variant pass_chunk={r.get('pass_chunk')} dtype={r.get('dtype')} "
                 f"exact_num_keep={r.get('exact_num_keep')}: {_fmt(r.get('s_per_image'))} s/image "
                 f"({_fmt(r.get('cpu_s_per_image'))} CPU s), peak RSS {_fmt(r.get('peak_rss_gb'))} GB")
  lines.append("attention fwd+bwd vs blockwise: " + ", ".join(
      f"{k} {_fmt(v)}" for k, v in s["attention_fwd_bwd_vs_blockwise"].items()))
  if out["errors"]:
    lines.append("ERRORS in: " + ", ".join(out["errors"]))
  return "\n".join(lines)


if __name__ == "__main__":
  main()

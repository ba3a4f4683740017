"""Benchmarks of u2ad_jax against the machine's limits, in ONE run, from a bare checkout.

  python benchmarks/run.py [--size paper|cpu|mu] [--json OUT] [--quick]
      [--platform auto|cpu|accelerator] [--attention NAME] [--budget-s S] [--cache-dir DIR]

The size defaults to paper, and to mu with --quick (a smoke test of the script).

No install step: this script and `_measure.py` put the repository they live in first on the
import path (and the measuring subprocesses' PYTHONPATH), so a fresh clone runs as it is and
measures ITS `u2ad_jax`, whatever else is installed; every result records `u2ad_jax_file`.
Each measurement runs in a fresh subprocess (`_measure.py`: peak memory per measurement, an
out-of-memory failure contained) and, as soon as it ends, is printed on stdout as one line
`RESULT {"name": ..., ...}` and written into the --json file (rewritten after every
measurement), so a run cut off by a time limit keeps everything measured so far. A failure is
recorded with `error_kind`: 'oom' (the allocator's RESOURCE_EXHAUSTED / out of memory),
'timeout', 'skipped' (no budget left) or 'error'. Compiled programs go to JAX's persistent
compilation cache (--cache-dir), so a rerun skips the compilations already done.

CPU plan (`--platform cpu`, or auto on a CPU): the float32 matmul rate, the model's FLOPs per
image (XLA cost analysis of an unrolled build), train throughput at batch 10 with the trainer's
own path (`step.make_train_step` with the cohort on the device and augmentation in the step,
pmap on one device) and its model-FLOP utilisation, Monte-Carlo uncertainty time per image for
K = 10 (`uncertainty.mc_uncertainty`, jitted), peak RSS of each, scaling with K, image size
(token count) and batch size, the attention implementations as ratios, and the host's input
pipeline (`input`). Warm-up calls are excluded from the medians and reported as
`first_call_s` (compilation included). `--quick` shrinks repeats and scaling points to a smoke
test (`--size mu --quick`; tests/test_benchmarks.py runs it).

Accelerator plan (`--platform accelerator`, or auto on a GPU / TPU): sized for a first device
window of ~10 minutes (budget 8 minutes by default) at the paper size, in bfloat16 compute:
the bf16 matmul rate; an attention probe (the attention the model will run, cuDNN on a GPU,
against XLA's dot_product at the paper encoder's shape, forward + gradient: it must compile,
run and agree, or the plan stops there and says what to rerun); training images/s at global
batch 256 and at the largest batch that fits (predicted from the batch-256 peak memory, then
tried; once more smaller after an OOM); Monte-Carlo K = 10 time per image; peak device memory
of each; the model-FLOP utilisation against the chip's datasheet peak (`CHIP_PEAK_TFLOPS`) and
against the measured bf16 matmul rate; the host's share of a step. FLOPs per image and the host
input pipeline are measured on the host CPU in the background meanwhile. `--quick` runs the
same code path at a small size (on a CPU too: a smoke test of the script, not a number).
benchmarks/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

# The parent process only reads device names: no GPU memory preallocation here, or the measuring
# subprocesses would find three quarters of the GPU taken.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEASURE = os.path.join(HERE, "_measure.py")

# The original PyTorch release on a 2-core CPU like this one (issue 6), paper size, batch 10.
REFERENCE = {"train_images_per_s": 0.21, "train_peak_rss_gb": 12.6,
             "mc_s_per_image_k10": (13.6, 21.8)}
# The targets on this 2-core CPU at the paper size.
TARGETS = {"train_images_per_s": 1.0, "train_mfu": 0.22, "mc_s_per_image_k10": 2.5,
           "train_peak_rss_gb": 3.0}
# The accelerator targets (issue 13), paper size on one H100 / H200-class GPU.
ACCELERATOR_TARGETS = {"train_images_per_s_b256": 3000.0, "mc_ms_per_image_k10": 5.0}


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
      input=dict(batch=10, steps=2 if quick else 3),
  )


# Dense bf16 peak of the chips users train on (vendor datasheets, TFLOP/s, no sparsity), by
# `device_kind` prefix; utilisation against the measured bf16 matmul rate is reported as well.
CHIP_PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
                    "NVIDIA L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def accelerator_plan(size: str, quick: bool) -> dict[str, Any]:
  """What to measure on a GPU / TPU; `quick` is a smoke test of the same code path (on CPU).

  Budget at the paper size on an H100 / H200 (estimates: ~5 s interpreter start and JAX
  import per subprocess, 20-60 s per train-step compilation): matmul ~15 s, probe ~20 s,
  train b=256 ~60 s, largest batch 1-2 tries ~60-120 s, MC ~60 s: 4-5 minutes, leaving room
  inside the 8-minute budget for one OOM retry and slow compiles.
  """
  native = {"paper": 256, "cpu": 128, "mu": 32}[size]
  return dict(native=native,
              matmul=dict(n=512 if quick else 8192, repeats=2 if quick else 5, dtype="bfloat16"),
              probe=dict(batch=2 if quick else 64, repeats=1 if quick else 5),
              train_steps=2 if quick else 10, batch=32 if quick else 256,
              largest_max=64 if quick else 16384,
              mc_batch=4 if quick else 64, mc_repeats=1 if quick else 3, num_samples=10,
              input=dict(batch=32 if quick else 256, steps=2 if quick else 3))


class Recorder:
  """The run's results: each measurement printed as a `RESULT {...}` line on stdout when it
  ends and the whole JSON rewritten then (atomically), so nothing measured is lost to a kill."""

  def __init__(self, out: dict[str, Any], json_path: str | None):
    self.out = out
    self.json_path = json_path

  def add(self, name: str, result: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Stores `result` under `where` (default `name`) and publishes it."""
    self.out[where or name] = result
    print("RESULT " + json.dumps({"name": name, **result}, default=str), flush=True)
    self.write()
    return result

  def write(self) -> None:
    if not self.json_path:
      return
    self.out["errors"] = _errors(self.out)
    partial = self.json_path + ".partial"
    with open(partial, "w") as f:
      f.write(json.dumps(self.out, indent=1, sort_keys=True, default=str))
    os.replace(partial, self.json_path)


def subprocess_env(cache_dir: str | None, cpu_only: bool = False) -> dict[str, str]:
  """The measuring subprocesses' environment: this repository first on PYTHONPATH, the
  compilation cache, one real device (no fake host devices), nearly all of it on demand."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  if cache_dir:
    env["U2AD_BENCH_CACHE_DIR"] = cache_dir
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.pop("JAX_NUM_CPU_DEVICES", None)
  if cpu_only:
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _result_of(stdout: str, stderr: str, returncode: int | None) -> dict[str, Any]:
  result = None
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
  if result is None:  # died without reporting (killed, crashed in the runtime)
    text = (stderr or stdout)[-2000:]
    result = {"error": text or f"exit status {returncode}", "returncode": returncode,
              "error_kind": _error_kind(text)}
  return result


def _error_kind(text: str) -> str:
  # The same rule as `_measure.error_kind` (not imported: this process stays free of jax).
  markers = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")
  return "oom" if any(m in text for m in markers) else "error"


class Runner:
  """Runs measurements in subprocesses within a time budget."""

  def __init__(self, log, cache_dir: str | None, budget_s: float | None):
    self.log = log
    self.cache_dir = cache_dir
    self.deadline = None if budget_s is None else time.monotonic() + budget_s
    self.background: list[tuple[str, dict[str, Any], subprocess.Popen, float]] = []

  def remaining(self) -> float | None:
    return None if self.deadline is None else self.deadline - time.monotonic()

  def run(self, spec: dict[str, Any], min_s: float = 15.0) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its RESULT dict (or an error / skip record)."""
    remaining = self.remaining()
    if remaining is not None and remaining < min_s:
      self.log(f"  {json.dumps(spec)}: skipped ({remaining:.0f} s of budget left)")
      return {"error": "skipped: time budget used up", "error_kind": "skipped", "spec": spec}
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, MEASURE, json.dumps(spec)], capture_output=True,
                            text=True, env=subprocess_env(self.cache_dir), timeout=remaining)
      result = _result_of(proc.stdout, proc.stderr, proc.returncode)
    except subprocess.TimeoutExpired as e:
      result = {"error": f"timeout after {remaining:.0f} s (budget)", "error_kind": "timeout",
                "stderr_tail": (e.stderr or b"")[-1000:].decode(errors="replace")
                if isinstance(e.stderr, bytes) else str(e.stderr or "")[-1000:]}
    result["process_s"] = time.perf_counter() - t0
    result.setdefault("spec", spec)
    self.log(f"  {json.dumps(spec)}: {result['process_s']:.1f} s"
             + ("" if "error" not in result else
                f"  {result['error_kind'].upper()} " + _last_line(result["error"])))
    return result

  def start_background(self, name: str, spec: dict[str, Any]) -> None:
    """Starts a host-only measurement (JAX on the CPU) that runs beside the device's."""
    proc = subprocess.Popen([sys.executable, MEASURE, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(self.cache_dir, cpu_only=True))
    self.background.append((name, spec, proc, time.perf_counter()))

  def collect(self, name: str, timeout: float | None = None) -> dict[str, Any]:
    """Waits for the background measurement `name` (at most `timeout` s)."""
    for i, (bg_name, spec, proc, t0) in enumerate(self.background):
      if bg_name == name:
        del self.background[i]
        try:
          stdout, stderr = proc.communicate(timeout=timeout)
          result = _result_of(stdout, stderr, proc.returncode)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.communicate()
          result = {"error": "timeout (budget)", "error_kind": "timeout"}
        result["process_s"] = time.perf_counter() - t0
        result.setdefault("spec", spec)
        self.log(f"  {json.dumps(spec)} (host, background): {result['process_s']:.1f} s"
                 + ("" if "error" not in result else "  " + _last_line(result["error"])))
        return result
    raise KeyError(name)


def _last_line(text: str) -> str:
  lines = [line for line in str(text).splitlines() if line.strip()]
  return lines[-1][:300] if lines else ""


def _library_check(result: dict[str, Any]) -> None:
  """Every measurement must have imported the library of this checkout."""
  where = result.get("u2ad_jax_file")
  if where and not os.path.realpath(where).startswith(os.path.realpath(ROOT) + os.sep):
    raise RuntimeError(f"measured the u2ad_jax at {where}, not the one of this checkout "
                       f"({ROOT}); check PYTHONPATH")


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


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("paper", "cpu", "mu"), default=None,
                      help="model size (default: paper; mu with --quick)")
  parser.add_argument("--json", default=None,
                      help="results file, rewritten after every measurement")
  parser.add_argument("--quick", action="store_true", help="smoke-test sizes and repeats")
  parser.add_argument("--platform", choices=("auto", "cpu", "accelerator"), default="auto",
                      help="which plan: auto = accelerator on a GPU / TPU, else cpu")
  parser.add_argument("--attention", default="auto",
                      help="the model's attention (layers.ATTENTION_FNS or auto, the default: "
                           "the platform's kernel, checked at start-up)")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="time budget of the run; measurements that would start after it "
                           "are skipped (default: 480 s for the accelerator plan, none on CPU)")
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                          "u2ad_jax_compilation_cache"),
                      help="JAX persistent compilation cache ('' = off)")
  return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.size is None:
    args.size = "mu" if args.quick else "paper"
  if args.platform == "accelerator" or (args.platform == "auto" and _backend() != "cpu"):
    return accelerator_main(args, argv)
  return cpu_main(args, argv)


def cpu_main(args, argv) -> dict[str, Any]:
  """The CPU plan (module docstring)."""
  p = plan(args.size, args.quick)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  out: dict[str, Any] = {"command": "python benchmarks/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv), "size": args.size, "quick": args.quick,
      "machine": machine(), "reference_pytorch": REFERENCE, "targets": TARGETS,
      "attention_override": args.attention}
  log(f"benchmarks: size={args.size} quick={args.quick}")
  recorder = Recorder(out, args.json)
  runner = Runner(log, args.cache_dir or None, args.budget_s)
  model_overrides = {} if args.attention == "auto" else {"attention": args.attention}

  def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    if model_overrides and spec["kind"] in ("train", "mc"):
      spec = {**spec, "overrides": {**model_overrides, **spec.get("overrides", {})}}
    r = runner.run(spec)
    _library_check(r)
    return r

  def publish(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """The RESULT line of a finished measurement; the JSON rewritten with it."""
    print("RESULT " + json.dumps({"name": name, **r}, default=str), flush=True)
    recorder.write()
    return r

  size = args.size
  out["matmul"] = publish("matmul", run_one({"kind": "matmul", **p["matmul"]}))
  rate = out["matmul"].get("gflops", float("nan"))

  flops = {}
  for s in p["image_sizes"]:
    flops[s] = publish(f"flops_{s}px", run_one({"kind": "flops", "size": size, "image_size": s,
                                                "num_samples": p["num_samples"]}))
  out["flops"] = flops[p["native"]]

  def train(batch: int, image_size: int) -> dict[str, Any]:
    r = run_one({"kind": "train", "size": size, "image_size": image_size, "batch": batch,
                 "steps": p["train_steps"]})
    gflop = flops[image_size].get("train_gflop_per_image", float("nan"))
    if "images_per_s" in r:
      r["gflop_per_s"] = r["images_per_s"] * gflop
      r["mfu"] = r["gflop_per_s"] / rate
    return publish(f"train_b{batch}_{image_size}px", r)

  def mc(num_samples: int, image_size: int, batch: int | None = None,
         **options: Any) -> dict[str, Any]:
    r = run_one({"kind": "mc", "size": size, "image_size": image_size,
                 "batch": batch or p["mc_batch"], "num_samples": num_samples,
                 "repeats": p["mc_repeats"], **options})
    fwd = flops[image_size].get("forward_gflop_per_image", float("nan"))
    if "s_per_image" in r:
      r["gflop_per_image"] = r["passes"] * fwd
      r["gflop_per_s"] = r["gflop_per_image"] / r["s_per_image"]
      r["mfu"] = r["gflop_per_s"] / rate
      # FLOP floor: every pass's forward FLOPs at the measured matmul rate.
      r["floor_s_per_image"] = r["gflop_per_image"] / rate
    return publish(f"mc_k{num_samples}_{image_size}px" + "".join(f"_{k}" for k in options), r)

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
  out["attention"] = publish("attention",
                             run_one({"kind": "attention", "size": size, **p["attention"]}))
  out["input"] = publish("input", run_one({"kind": "input", "size": size, **p["input"]}))

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
      "train_host_fraction": out["train"].get("host_fraction"),
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
  recorder.write()
  out["errors"] = _errors(out)
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


def largest_batch_guess(row: dict[str, Any], maximum: int) -> int | None:
  """The largest global batch predicted to fit, from a train row's peak device memory and the
  device's limit (memory grows linearly in the batch: activations per image; the fixed part,
  parameters, optimizer state and the cohort, is counted at full size). A multiple of 256
  (of 32 below 256); None where the device reports no memory figures (CPU)."""
  peak, limit, batch = row.get("peak_device_gb"), row.get("device_bytes_limit_gb"), row["batch"]
  if not peak or not limit:
    return None
  per_image = peak / batch  # an upper bound: the fixed part is counted per image too
  guess = int(0.9 * limit / per_image)
  step = 256 if guess >= 512 else 32
  return max(step, min(maximum, guess // step * step))


def accelerator_main(args, argv) -> dict[str, Any]:
  """The accelerator plan (module docstring): the matmul rate, the attention probe (the plan
  stops if it fails), bf16 training at global batch 256 and the largest that fits, MC K = 10;
  FLOPs and the host input pipeline measured on the host meanwhile."""
  p = accelerator_plan(args.size, args.quick)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  budget = 480.0 if args.budget_s is None else args.budget_s
  kind, peak_tflops = chip_peak_tflops()
  overrides = {"dtype": "bfloat16", "attention": args.attention}
  out: dict[str, Any] = {"command": "python benchmarks/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv), "size": args.size, "quick": args.quick,
      "plan": "accelerator", "machine": machine(), "device_kind": kind,
      "chip_peak_tflops_bf16": peak_tflops, "overrides": overrides, "budget_s": budget,
      "targets": ACCELERATOR_TARGETS}
  recorder = Recorder(out, args.json)
  runner = Runner(log, args.cache_dir or None, budget)
  log(f"benchmarks (accelerator plan): size={args.size} on {kind}, budget {budget:.0f} s, "
      f"compilation cache {args.cache_dir or 'off'}")
  size, native = args.size, p["native"]

  def record(name: str, result: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    _library_check(result)
    return recorder.add(name, result, where)

  # Host-only measurements beside the device's: FLOPs (platform independent: XLA's count of the
  # same program) and the input pipeline (the host's per-core cost of a step).
  runner.start_background("flops", {"kind": "flops", "size": size, "image_size": native,
                                    "num_samples": p["num_samples"]})
  runner.start_background("input", {"kind": "input", "size": size, **p["input"]})

  rate = record("matmul", runner.run({"kind": "matmul", **p["matmul"]})).get(
      "gflops", float("nan"))
  probe = record("attention_probe", runner.run(
      {"kind": "attention_probe", "size": size, "overrides": overrides, **p["probe"]}))
  if "error" in probe:
    out["stopped"] = ("the attention probe failed: every later measurement would use the same "
                      "attention. Rerun with another one, e.g. --attention dot_product")
    log(f"STOPPED: {out['stopped']}")
  else:
    def train(batch: int, name: str) -> dict[str, Any]:
      return record(name, runner.run({"kind": "train", "size": size, "image_size": native,
                                      "batch": batch, "steps": p["train_steps"],
                                      "overrides": overrides}))

    base = train(p["batch"], f"train_b{p['batch']}")
    guess = largest_batch_guess(base, p["largest_max"]) if "error" not in base else None
    if guess is None and "error" not in base:  # no memory figures (CPU): one doubling
      guess = min(p["largest_max"], 2 * p["batch"])
    if guess is not None and guess > p["batch"]:
      largest = train(guess, "train_largest")
      if largest.get("error_kind") == "oom":  # the estimate was optimistic: once smaller
        smaller = max(p["batch"], int(guess * 0.7) // 32 * 32)
        if smaller > p["batch"]:
          largest = train(smaller, "train_largest")
    record("mc", runner.run({"kind": "mc", "size": size, "image_size": native,
                             "batch": p["mc_batch"], "num_samples": p["num_samples"],
                             "repeats": p["mc_repeats"], "overrides": overrides}))
  for name in ("flops", "input"):
    remaining = max(5.0, budget - (time.perf_counter() - t_start))
    record(name, runner.collect(name, timeout=remaining))

  out["summary"] = accelerator_summary(out, rate, peak_tflops)
  out["total_s"] = time.perf_counter() - t_start
  recorder.add("summary", out["summary"])
  log(_accelerator_table(out))
  return out


def accelerator_summary(out: dict[str, Any], rate_gflops: float,
                        peak_tflops: float | None) -> dict[str, Any]:
  """The numbers benchmarks/README.md reports, derived from the rows."""
  gflop = out.get("flops", {}).get("train_gflop_per_image", float("nan"))
  fwd = out.get("flops", {}).get("forward_gflop_per_image", float("nan"))
  rows = []
  for name in sorted(k for k in out if k.startswith("train_")):
    r = out[name]
    row = {"name": name, **{k: r.get(k) for k in (
        "batch", "images_per_s", "peak_device_gb", "attention", "host_fraction", "error_kind",
        "first_call_s")}}
    if "images_per_s" in r:
      row["tflop_per_s"] = r["images_per_s"] * gflop / 1e3
      row["util_vs_matmul"] = row["tflop_per_s"] * 1e3 / rate_gflops
      row["util_vs_chip_peak"] = None if peak_tflops is None else row["tflop_per_s"] / peak_tflops
    rows.append(row)
  mc = out.get("mc", {})
  probe = out.get("attention_probe", {})
  host = out.get("input", {})
  return {
      "device_kind": out["device_kind"],
      "matmul_tflops_bf16": rate_gflops / 1e3,
      "attention": probe.get("attention") or out["overrides"].get("attention"),
      "attention_probe_agrees": probe.get("agrees"),
      "attention_fwd_bwd_speedup_vs_dot_product": probe.get("fwd_bwd_speedup_vs_dot_product"),
      "train_gflop_per_image": gflop,
      "train": rows,
      "mc_ms_per_image_k10": None if "s_per_image" not in mc else 1e3 * mc["s_per_image"],
      "mc_gflop_per_image": None if "passes" not in mc else mc["passes"] * fwd,
      "mc_peak_device_gb": mc.get("peak_device_gb"),
      "host_old_augment_images_per_core_s": host.get("old_host_augment", {}).get(
          "images_per_cpu_s"),
      "host_new_feed_images_per_core_s": host.get("new_index_feed_guided", {}).get(
          "images_per_cpu_s"),
      "stopped": out.get("stopped"),
      "errors": _errors(out),
  }


def _accelerator_table(out: dict[str, Any]) -> str:
  s = out["summary"]
  lines = [f"{s['device_kind']}: size={out['size']}, bf16 matmul "
           f"{_fmt(s['matmul_tflops_bf16'])} TFLOP/s, total {out['total_s']:.0f} s",
           f"attention {s['attention']}: agrees with dot_product {s['attention_probe_agrees']}, "
           f"fwd+bwd {_fmt(s['attention_fwd_bwd_speedup_vs_dot_product'])}x faster"]
  for r in s["train"]:
    lines.append(f"{r['name']} b={r['batch']}: {_fmt(r.get('images_per_s'))} images/s, "
                 f"{_fmt(r.get('tflop_per_s'))} TFLOP/s (vs matmul "
                 f"{_fmt(r.get('util_vs_matmul'))}, vs chip peak "
                 f"{_fmt(r.get('util_vs_chip_peak'))}), peak device "
                 f"{_fmt(r.get('peak_device_gb'))} GB, host share of a step "
                 f"{_fmt(r.get('host_fraction'))}"
                 + (f" [{r['error_kind']}]" if r.get("error_kind") else ""))
  lines.append(f"MC K=10: {_fmt(s['mc_ms_per_image_k10'])} ms/image, peak device "
               f"{_fmt(s['mc_peak_device_gb'])} GB")
  lines.append(f"host input: old augmenting pipeline "
               f"{_fmt(s['host_old_augment_images_per_core_s'])} images/s per core, the "
               f"trainer's index feed {_fmt(s['host_new_feed_images_per_core_s'])}")
  if s["stopped"]:
    lines.append("STOPPED: " + s["stopped"])
  if s["errors"]:
    lines.append("ERRORS in: " + ", ".join(s["errors"]))
  return "\n".join(lines)


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
  host = out.get("input", {})
  lines.append(f"host input per core: old augmenting pipeline "
               f"{_fmt(host.get('old_host_augment', {}).get('images_per_cpu_s'))} images/s, "
               f"the trainer's index feed "
               f"{_fmt(host.get('new_index_feed_guided', {}).get('images_per_cpu_s'))}; "
               f"host share of a train step {_fmt(s['train_host_fraction'])}")
  if out["errors"]:
    lines.append("ERRORS in: " + ", ".join(out["errors"]))
  return "\n".join(lines)


if __name__ == "__main__":
  main()

"""Training-time map refresh, seconds per slice: an earlier revision's `train/maps.py` vs this one.

  python benchmarks/refresh.py --data COHORT --before REV [--config cpu.py] [--slices 32]
      [--repeats 5] [--json OUT]

Loads the cohort's slices with the config's preprocessing, builds the config's model (random
parameters: the refresh costs the same for any weights) and times one full refresh
(`MapGenerator(model, config, config.parallel)(params, key, slices)`: Monte-Carlo maps, AU
candidates, the per-patch guidance arrays) with

- before: `u2ad_jax/train/maps.py` as it was at git revision REV (read with `git show`, imported
  as a module beside the current library; the library keeps no old code), and
- after: the current `u2ad_jax.train.maps`,

after one warm-up call each (compilation), in interleaved pairs (before, after, before, ...)
with a new key per pair, so both see the same machine load. Prints the medians per slice (wall
and CPU seconds of this process), their ratio, and how far the two refreshes' maps differ for the
same key (the refresh must not change them beyond float rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from u2ad_jax import config_files  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.data import preprocess  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import maps as maps_after  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import settings as settings_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from u2ad_jax.train import state as state_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def load_before(rev: str):
  """`u2ad_jax/train/maps.py` of git revision `rev`, imported as module `maps_before`."""
  source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:u2ad_jax/train/maps.py"],
                          check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(prefix="u2ad-refresh-"), "maps_before.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("maps_before", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # as an import would (dataclasses look their module up)
  spec.loader.exec_module(module)
  return module


def timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="a cohort directory (`u2ad synth` layout)")
  parser.add_argument("--before", required=True, help="git revision of the 'before' maps.py")
  parser.add_argument("--config", default="cpu.py", help="config file[:args] (default cpu.py)")
  parser.add_argument("--slices", type=int, default=32, help="first N slices of the cohort")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  config = config_files.load(args.config)
  slices = preprocess.load_cohort(args.data, config.data, progress=False)
  if args.slices and args.slices < len(slices):
    slices = slices.subset(np.arange(args.slices))
  model = settings_lib.build_model(config)
  params = state_lib.init_params(model, jax.random.key(0))
  devices = jax.devices()
  before_module = load_before(args.before)
  generators = {"before": before_module.MapGenerator(model, config, config.parallel, devices),
                "after": maps_after.MapGenerator(model, config, config.parallel, devices)}
  key = jax.random.key(int(config.seed))
  num = len(slices)
  result = {"config": args.config, "before": args.before, "slices": num,
            "image_size": int(config.data.image_size), "patch_size": int(config.data.patch_size),
            "num_samples": int(config.uncertainty.num_samples),
            "slices_per_device": int(config.uncertainty.slices_per_device),
            "devices": len(devices), "parallel": config.parallel, "repeats": args.repeats}
  maps = {}
  for name, gen in generators.items():
    maps[name], wall, cpu = timed(lambda gen=gen: gen(params, key, slices))
    result[f"{name}_first_call_s"] = wall
    print(f"{name}: first call (compile included) {wall:.1f} s", flush=True)
  result["max_abs_patch_eu_diff"] = float(np.abs(maps["before"]["patch_eu"]
                                                 - maps["after"]["patch_eu"]).max())
  result["max_patch_eu"] = float(np.abs(maps["before"]["patch_eu"]).max())
  result["exclude_equal"] = bool(np.array_equal(maps["before"]["exclude"],
                                                maps["after"]["exclude"]))
  walls = {name: [] for name in generators}
  cpus = {name: [] for name in generators}
  for r in range(args.repeats):
    for name, gen in generators.items():
      _, wall, cpu = timed(lambda gen=gen: gen(params, jax.random.fold_in(key, r + 1), slices))
      walls[name].append(wall / num)
      cpus[name].append(cpu / num)
    print(f"repeat {r}: before {walls['before'][-1]:.3f} s/slice, after "
          f"{walls['after'][-1]:.3f} s/slice", flush=True)
  for name in generators:
    result[f"{name}_s_per_slice"] = statistics.median(walls[name])
    result[f"{name}_cpu_s_per_slice"] = statistics.median(cpus[name])
    result[f"{name}_all_s_per_slice"] = walls[name]
  result["speedup_wall"] = result["before_s_per_slice"] / result["after_s_per_slice"]
  result["speedup_cpu"] = result["before_cpu_s_per_slice"] / result["after_cpu_s_per_slice"]
  print(json.dumps({k: v for k, v in result.items() if not k.endswith("all_s_per_slice")},
                   indent=1))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

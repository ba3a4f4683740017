"""Generation speed of the synthetic cohort: seconds per sagittal slice, per scanner profile.

  python benchmarks/bench_phantom.py [--subjects 5] [--seed 0]

Times `generator.generate_subject` (anatomy, rendering with through-plane partial volume,
acquisition, lesion contrast solve, truth) on one core, median over a few subjects, and prints a
Markdown table row per profile plus the command that produced it. File writing (gzip NIfTI) is
timed separately as `write_subject`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import generator


def bench(profile: str, subjects: int, seed: int) -> dict[str, float]:
  per_slice, write_per_slice, slices = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(subjects):
      start = time.perf_counter()
      subject = generator.generate_subject(f"sub-{i:03d}", profile,
                                           cohort_writer.subject_seed(seed, i, profile))
      seconds = time.perf_counter() - start
      start = time.perf_counter()
      cohort_writer.write_subject(tmp, subject)
      write = time.perf_counter() - start
      per_slice.append(seconds / subject.num_slices)
      write_per_slice.append(write / subject.num_slices)
      slices.append(subject.num_slices)
      shape = subject.image.shape
  return dict(median=float(np.median(per_slice)), max=float(np.max(per_slice)),
              write=float(np.median(write_per_slice)), slices=float(np.median(slices)),
              shape=shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subjects", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"command: python benchmarks/bench_phantom.py --subjects {args.subjects} --seed {args.seed}")
  print(f"machine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, "
        f"numpy {np.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
  print()
  print("| profile | subjects | slices / subject | last volume [X, Y, Z] | s / slice (median) "
        "| s / slice (max) | write s / slice |")
  print("|---|---|---|---|---|---|---|")
  for profile in ("public", "clinical"):
    r = bench(profile, args.subjects, args.seed)
    print(f"| {profile} | {args.subjects} | {r['slices']:.0f} | {list(r['shape'])} | {r['median']:.3f} "
          f"| {r['max']:.3f} | {r['write']:.3f} |")


if __name__ == "__main__":
  main()

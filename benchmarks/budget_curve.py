"""Budget curve: does uncertainty guidance help more as the model learns the anatomy?

  python benchmarks/budget_curve.py --out runs/budget [--src SAMPLES_DIR] [--seeds 2]
      [--first_seed 100] [--multipliers 1,2,4] [--json budget_curve.json]
      [--figure budget_curve.png] [--smoke]

For each budget multiplier m, `u2ad study` trains the baseline (random masking) and U2AD (EU + AU
guidance) on the same development cohorts with every stage's epochs x m (pretraining, EU and
EU + AU adaptation) and the map refresh interval x m (the same number of refreshes per stage, so
a larger budget buys optimizer steps, not maps). The study's paired differences U2AD - baseline
and U2AD - intensity (patient AUROC, segment F1; mean over cohorts with the hierarchical-bootstrap
95 % interval) are plotted against m.

Development seeds only (100 ... by default): a choice made on this curve is made on them. The
studies are resumable (`u2ad study` reuses finished seeds), so an interrupted curve continues.
`--smoke` runs the smoke study size (`configs/smoke.py`, 5 patients) to check the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (difference, metric) pairs drawn, from study.json's "differences".
PANELS = (("eu_au - baseline", "patient_auroc"), ("eu_au - baseline", "segment_f1"),
          ("eu_au - intensity", "patient_auroc"), ("eu_au - intensity", "segment_f1"))
SCALED_EPOCHS = ("stage_epochs.pretrain", "stage_epochs.adapt_eu", "stage_epochs.adapt_eu_au",
                 "uncertainty.refresh_epochs")


def scaled_overrides(config, multiplier: int) -> list[str]:
  """`--set` overrides giving `config` (a ConfigDict) `multiplier` x its epochs and refresh
  interval."""
  overrides = []
  for dotted in SCALED_EPOCHS:
    section, key = dotted.split(".")
    overrides.append(f"{dotted}={int(config[section][key]) * multiplier}")
  return overrides


def study_command(out: str, multiplier: int, config, args: argparse.Namespace) -> list[str]:
  command = [sys.executable, "-m", "u2ad_jax.cli", "study", "--out",
             os.path.join(out, f"x{multiplier}"), "--seeds", str(args.seeds),
             "--first_seed", str(args.first_seed), "--methods", "baseline,eu_au"]
  if args.src:
    command += ["--from-slices", args.src]
  if args.smoke:
    command.append("--smoke")
  for override in scaled_overrides(config, multiplier):
    command += ["--set", override]
  return command


def collect(out: str, multipliers: list[int]) -> dict:
  """{'multipliers': [...], 'curves': {'<difference>: <metric>': [{mean, lo, hi} per m]}, ...}."""
  curves: dict[str, list[dict]] = {f"{d}: {m}": [] for d, m in PANELS}
  ssim: dict[str, list[float]] = {"baseline": [], "eu_au": []}
  for multiplier in multipliers:
    with open(os.path.join(out, f"x{multiplier}", "study.json"), encoding="utf-8") as f:
      study = json.load(f)
    for difference, metric in PANELS:
      cell = study["differences"][difference][metric]
      curves[f"{difference}: {metric}"].append(
          {k: float(cell[k]) for k in ("mean", "lo", "hi")})
    for rung in ssim:
      ssim[rung].append(float(study["rungs"][rung]["ssim_normal_cord"]["mean"]))
  return {"multipliers": multipliers, "curves": curves, "ssim_normal_cord": ssim}


def write_figure(results: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  m = results["multipliers"]
  fig, axes = plt.subplots(1, len(PANELS), figsize=(3.4 * len(PANELS), 3.2), sharex=True)
  for ax, (name, points) in zip(axes, results["curves"].items()):
    mean = [p["mean"] for p in points]
    err = [[p["mean"] - p["lo"] for p in points], [p["hi"] - p["mean"] for p in points]]
    ax.errorbar(m, mean, yerr=err, marker="o", capsize=3)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(m, [f"{x}x" for x in m])
    ax.set_title(name.replace("eu_au", "U2AD"), fontsize=9)
    ax.set_xlabel("budget (x the recipe's epochs)")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="working folder (one study per multiplier)")
  parser.add_argument("--src", help="labelled real slices: real-anatomy cohorts (else phantom)")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--first_seed", type=int, default=100)
  parser.add_argument("--multipliers", default="1,2,4")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--json", help="write the curves here")
  parser.add_argument("--figure", help="write the figure here (PNG)")
  args = parser.parse_args()
  if args.first_seed >= 200:
    parser.error("seeds 200 and up are report seeds: choose development seeds (100 ...)")
  multipliers = [int(x) for x in args.multipliers.split(",") if x]
  sys.path.insert(0, ROOT)
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load(os.path.join(ROOT, "configs",
                                          "smoke.py" if args.smoke else "cpu.py"))
  os.makedirs(args.out, exist_ok=True)
  for multiplier in multipliers:
    command = study_command(args.out, multiplier, config, args)
    print("$ " + " ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
  results = collect(args.out, multipliers)
  results["cohorts"] = {"source": "real-anatomy" if args.src else "phantom",
                        "seeds": list(range(args.first_seed, args.first_seed + args.seeds))}
  for name, points in results["curves"].items():
    print(f"{name:36s} " + "  ".join(
        f"{m}x {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"
        for m, p in zip(multipliers, points)))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if args.figure:
    write_figure(results, args.figure,
                 f"{results['cohorts']['source']} development seeds "
                 f"{results['cohorts']['seeds']}: paired differences, 95 % intervals")


if __name__ == "__main__":
  main()

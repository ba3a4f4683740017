"""Reconstruction learning curve: how fast a recipe learns NORMAL anatomy, per CPU second.

  python benchmarks/learning_curve.py --out runs/learning_curve [--src SAMPLES_DIR]
      [--variants before,after] [--json benchmarks/results/learning_curve.json]
      [--figure benchmarks/results/learning_curve.png]

What it measures. Each variant (a recipe: config overrides of configs/cpu.py, table VARIANTS)
trains the baseline (pretraining stage only: random ROI masking) on a development cohort with
`u2ad train`, validating every few steps on held-out NORMAL slices it never trains on
(`train/validation.py`: SSIM, PSNR and reconstruction-image correlation of the Monte-Carlo mean
reconstruction on normal cord, K = 4), and records them against the run's training CPU time
(`train_cpu_s`: user + system CPU of the training process, validation excluded, compilation
included). CPU time rather than wall time, and all variants in one invocation, because the
machine is shared: the ratio between variants is the result, not the absolute seconds.

The cohorts (fixed in advance, development seeds only):
- with `--src` (labelled real slices, e.g. the original release's sample slices): training =
  real-anatomy pseudo-patients `--from-slices SRC --seed 100` (24 subjects, half with lesions);
  held out = pseudo-healthy `--seed 150` (8 subjects);
- without: the phantom (clinical profile), seed 100 (24 subjects) and healthy seed 150 (8).

Outputs: per variant its workdir (metrics.jsonl, validation/step_*.png); the JSON (curves and
the table at fixed CPU marks), the curve figure and one reconstruction figure per variant
(`<figure stem>_<variant>.png`: the validation figures closest to the CPU marks, top to bottom).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Recipes, as overrides of configs/cpu.py. 'before' is configs/cpu.py as it was at 3a8236c
# (12 pretraining epochs, 16-px patches over the whole image, step decay every 8 epochs); 'after'
# is configs/cpu.py as it is, its whole step budget (pretraining + adaptation: 20 + 200 + 60
# epochs of the demo cohorts, ~5,000 steps; 300 epochs = 4,500 steps here) spent in the one stage
# trained here; 'before_long' keeps the old geometry (whole image, 16-px patches) with the new
# schedule and steps: it separates what the geometry buys from what the steps buy.
VARIANTS = {
    "before": ["data.patch_size=16", "model.context_patches=None", "optim.schedule='step'",
               "optim.decay_every_epochs=8", "optim.warmup_epochs=0.0", "optim.lr=0.002",
               "stage_epochs.pretrain=12"],
    "after": ["stage_epochs.pretrain=300"],
    "before_long": ["data.patch_size=16", "model.context_patches=None",
                    "stage_epochs.pretrain=300"],
}
VARIANT_CONFIG = '''"""learning_curve.py variant {name}: configs/cpu.py with {overrides!r}."""
from u2ad_jax import config_files
from u2ad_jax import config_lib


def get_config(arg=None):
  return config_lib.apply_overrides(config_files.load({cpu!r}), {overrides!r})
'''
# Validations per run (the curve's points) and the CPU marks of the table.
POINTS = 12
MARKS_S = (60, 150, 300, 600, 1200, 2400)


def _u2ad(*args: str, env: dict | None = None) -> None:
  command = [sys.executable, "-m", "u2ad_jax.cli", *args]
  print("$ u2ad " + " ".join(args), file=sys.stderr, flush=True)
  subprocess.run(command, check=True, cwd=ROOT, env=env)


def make_cohorts(out: str, src: str | None) -> tuple[str, str, str]:
  """(training cohort, held-out normal cohort, description); generated once, then reused."""
  train, val = os.path.join(out, "data", "train"), os.path.join(out, "data", "val")
  if src:
    if not os.path.isdir(train):
      _u2ad("synth", "--out", train, "--from-slices", src, "--subjects", "24", "--seed", "100",
            "--lesion-fraction", "0.5")
    if not os.path.isdir(val):
      _u2ad("synth", "--out", val, "--from-slices", src, "--subjects", "8", "--seed", "150",
            "--healthy")
    return train, val, "real-anatomy pseudo-patients (seed 100; held out: healthy seed 150)"
  if not os.path.isdir(train):
    _u2ad("synth", "--out", train, "--subjects", "24", "--profile", "clinical", "--seed", "100")
  if not os.path.isdir(val):
    _u2ad("synth", "--out", val, "--subjects", "8", "--profile", "clinical", "--seed", "150",
          "--lesion-fraction", "0")
  return train, val, "phantom, clinical profile (seed 100; held out: healthy seed 150)"


def _config(overrides: list[str]):
  sys.path.insert(0, ROOT)
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top
  from u2ad_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_files.load(os.path.join(ROOT, "configs", "cpu.py"))
  config_lib.apply_overrides(config, overrides)
  return config


def _num_slices(cohort_dir: str, overrides: list[str]) -> int:
  from u2ad_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  return len(preprocess.load_cohort(cohort_dir, _config(overrides).data, progress=False))


def run_variant(name: str, out: str, train: str, val: str) -> list[dict]:
  """Trains one variant (or reads its finished run) and returns its validation records."""
  overrides = VARIANTS[name]
  config = _config(overrides)
  steps = config.stage_epochs.pretrain * math.ceil(_num_slices(train, overrides)
                                                    / config.batch_size)
  every = max(1, steps // POINTS)
  workdir = os.path.join(out, "runs", name)
  # The variant as a config file of its own: `--config.x=` flags cannot set a field to None
  # (model.context_patches=None, the whole image); `config_lib.apply_overrides` can.
  config_path = os.path.join(out, "runs", f"{name}_config.py")
  os.makedirs(os.path.dirname(config_path), exist_ok=True)
  with open(config_path, "w", encoding="utf-8") as f:
    f.write(VARIANT_CONFIG.format(name=name, cpu=os.path.join(ROOT, "configs", "cpu.py"),
                                  overrides=overrides))
  args = ["train", "--config", config_path, "--workdir", workdir,
          f"--config.data.public_dir={train}", "--config.stages=('pretrain',)",
          f"--config.validation.every_steps={every}", f"--config.validation.data_dir={val}",
          "--config.validation.num_samples=4", "--config.validation.max_slices=12",
          "--config.validation.figures=True", "--config.checkpoint.every_steps=0"]
  t0 = time.monotonic()
  _u2ad(*args)
  print(f"[learning_curve] {name}: {steps} steps in {time.monotonic() - t0:.0f} s wall",
        file=sys.stderr, flush=True)
  records = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record.get("event") == "validation":
        records.append(record)
  return records


def at_marks(records: list[dict]) -> list[dict | None]:
  """Per CPU mark, the last validation at or before it (None before the first), with
  'ended' True when the run had finished before the mark (its final value carries over)."""
  rows = []
  for mark in MARKS_S:
    done = [r for r in records if r["train_cpu_s"] <= mark]
    rows.append(None if not done else {**done[-1],
                                       "ended": records[-1]["train_cpu_s"] < mark})
  return rows


def write_figures(results: dict, figure: str, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import image as mpimg  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for name, records in results["curves"].items():
    cpu = [r["train_cpu_s"] for r in records]
    for ax, key, title in zip(axes, ("val_ssim", "val_psnr", "val_corr"),
                              ("normal-cord SSIM", "normal-cord PSNR (dB)",
                               "reconstruction-image correlation")):
      ax.plot(cpu, [r[key] for r in records], marker="o", markersize=3, label=name)
      ax.set_title(title, fontsize=10)
      ax.set_xlabel("training CPU seconds")
      ax.set_xscale("log")
      ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  axes[0].legend(fontsize=8)
  fig.suptitle(f"held-out normal slices, {results['cohort']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(figure, dpi=90)
  plt.close(fig)
  stem, ext = os.path.splitext(figure)
  for name, records in results["curves"].items():
    chosen = []
    for mark in MARKS_S:
      done = [r for r in records if r["train_cpu_s"] <= mark]
      if done and done[-1] not in chosen:
        chosen.append(done[-1])
    if records and records[-1] not in chosen:
      chosen.append(records[-1])
    pictures = [os.path.join(out, "runs", name, "validation", f"step_{r['step']:07d}.png")
                for r in chosen]
    pictures = [(r, p) for r, p in zip(chosen, pictures) if os.path.exists(p)]
    if not pictures:
      continue
    fig, axes = plt.subplots(len(pictures), 1, figsize=(7, 4.6 * len(pictures)), squeeze=False)
    for ax, (record, path) in zip(axes[:, 0], pictures):
      ax.imshow(mpimg.imread(path))
      ax.set_axis_off()
      ax.set_title(f"{name}: {record['train_cpu_s']:.0f} CPU s, step {record['step']}",
                   fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{stem}_{name}{ext}", dpi=80)
    plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="working folder (cohorts, runs)")
  parser.add_argument("--src", help="labelled real slices for the real-anatomy cohorts")
  parser.add_argument("--variants", default="before,after",
                      help=f"comma-separated, of {sorted(VARIANTS)}")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--figure", help="write the curve figure here (PNG)")
  args = parser.parse_args()
  names = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  os.makedirs(args.out, exist_ok=True)
  train, val, cohort = make_cohorts(args.out, args.src)
  results = {"cohort": cohort, "marks_cpu_s": list(MARKS_S),
             "variants": {n: VARIANTS[n] for n in names}, "curves": {}, "table": {}}
  for name in names:
    records = run_variant(name, args.out, train, val)
    results["curves"][name] = [
        {k: r[k] for k in ("step", "train_cpu_s", "train_wall_s", "val_loss", "val_ssim",
                           "val_psnr", "val_corr")} for r in records]
    results["table"][name] = [None if r is None else {
        "step": r["step"], "ssim": round(r["val_ssim"], 3), "psnr": round(r["val_psnr"], 2),
        "corr": round(r["val_corr"], 3), "ended": r["ended"]} for r in at_marks(records)]
  print("variant      " + "  ".join(f"{m:>6d}s" for m in MARKS_S)
        + "   (normal-cord SSIM; * = the run had ended)")
  for name, row in results["table"].items():
    print(f"{name:12s} " + "  ".join(
        "      -" if c is None else f"{c['ssim']:6.3f}" + ("*" if c["ended"] else " ")
        for c in row))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if args.figure:
    write_figures(results, args.figure, args.out)


if __name__ == "__main__":
  main()

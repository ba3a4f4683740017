"""A checkpoint sweep: `u2ad evaluate --steps all|latest|N,M,...` scores kept checkpoints of a run.

Which checkpoint is the best one, and is the model still improving? Each requested checkpoint is
evaluated on the cohort exactly as `u2ad evaluate --step N` would (the same rung, scoring and
outputs), with the cohort loaded once and the Monte-Carlo functions compiled once for all
steps (`ModelRung.at_step` shares them). A run keeps checkpoints to sweep with
`config.checkpoint.keep_every_steps` (besides the newest `max_to_keep`).

Layout of `--out`:
  step_0000200/ ...   one complete `u2ad evaluate` output per step (report.md, metrics.json, ...);
  sweep.csv           one row per step (CSV_HEADER): patient / segment AUROC and F1 (cohorts
                      with truth), normal-cord SSIM and correlation of the mean reconstruction,
                      the threshold, patients flagged, seconds;
  sweep.png           those against the step, stage boundaries marked;
  sweep.json          what is swept (run, cohort, scoring overrides; checked on resume) and the
                      seconds each step took.

Resuming: each step's folder is written through a staged swap (`output_guard`), so a folder at
its final name is complete; running the same command again (after a kill, or with more steps)
scores only the steps without one. sweep.csv / sweep.png are rewritten after every step, so a
sweep in progress can be watched. `--out` holding a sweep of another run, cohort or scoring
settings is refused; `--overwrite` starts that folder's sweep over (its step folders, which the
sweep wrote, are removed first). The folder follows the output rule of every command
(`output_guard`: written into, like `u2ad study`; marked `evaluate --steps`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Sequence

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax import output_guard

# The marker's command: a sweep folder is neither a single evaluation's output nor replaced whole.
COMMAND = "evaluate --steps"
RECORD_FILE = "sweep.json"
CSV_FILE = "sweep.csv"
FIGURE_FILE = "sweep.png"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
CSV_HEADER = ("step", "stage", "patient_auroc", "patient_f1", "segment_auroc", "segment_f1",
              "ssim_normal_cord", "corr_normal_cord", "threshold", "flagged_patients",
              "num_patients", "seconds")


def step_dir_name(step: int) -> str:
  return f"step_{int(step):07d}"


def parse_steps(text: str) -> str | tuple[int, ...]:
  """`--steps` -> 'all', 'latest' or the ascending distinct step numbers.

  Raises:
    UsageError: anything else (one line naming the bad part).
  """
  value = (text or "").strip()
  if value in ("all", "latest"):
    return value
  parts = [p.strip() for p in value.split(",")]
  bad = [p for p in parts if not p.isdigit()]
  if not value or bad:
    what = f"{bad[0]!r} is not a step number" if bad and bad[0] else "an empty step"
    raise errors.UsageError(f"--steps {text}: {what}; use all, latest or step numbers N,M,...")
  return tuple(sorted({int(p) for p in parts}))


def resolve_steps(spec: str | tuple[int, ...], kept: Sequence[int], directory: str) -> list[int]:
  """The checkpoint steps `spec` (`parse_steps`) names among the `kept` ones of `directory`.

  Raises:
    UsageError: no checkpoint kept, or a requested step that is not kept (the kept ones named).
  """
  kept = sorted(int(s) for s in kept)
  if not kept:
    raise errors.UsageError(f"--steps: {directory} holds no checkpoint yet")
  if spec == "all":
    return kept
  if spec == "latest":
    return kept[-1:]
  missing = [s for s in spec if s not in kept]
  if missing:
    raise errors.UsageError(
        f"--steps: no checkpoint at step{'s' if len(missing) > 1 else ''} "
        f"{', '.join(map(str, missing))} in {directory} (kept: {', '.join(map(str, kept))}; "
        "keep more with config.checkpoint.keep_every_steps)")
  return list(spec)


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """What `run_sweep` returns: the out directory, the rows of sweep.csv (dicts keyed by
  CSV_HEADER, metrics None where unknown) and the steps scored now (not reused)."""
  out_dir: str
  rows: list[dict[str, Any]]
  computed: list[int]


def _record(workdir: str, data_dir: str, overrides: Sequence[str]) -> dict[str, Any]:
  """What identifies a sweep: the run, the cohort and the scoring overrides."""
  return {"workdir": workdir, "data": os.path.realpath(os.fspath(data_dir)),
          "overrides": list(overrides)}


def _read_json(path: str) -> Any:
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _finished(folder: str, step: int, workdir: str) -> bool:
  """Whether `folder` is a complete evaluation of checkpoint `step` of `workdir` (a staged
  `u2ad evaluate` output: present under its final name only once complete)."""
  from u2ad_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  marker = output_guard.read_marker(folder) if os.path.isdir(folder) else None
  if marker is None or marker.get("command") != "evaluate" or "written" not in marker:
    return False
  summary = _read_json(os.path.join(folder, "summary.json")) or {}
  model = summary.get("model") or {}
  return (summary.get("checkpoint_step") == int(step) and isinstance(model.get("workdir"), str)
          and workdir_lib.same(model["workdir"], workdir))


def _number(value: Any) -> float | None:
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def step_row(folder: str, step: int, stage: str, seconds: float | None) -> dict[str, Any]:
  """sweep.csv's row of one finished step folder (its metrics.json and summary.json)."""
  metrics = _read_json(os.path.join(folder, "metrics.json")) or {}
  summary = _read_json(os.path.join(folder, "summary.json")) or {}
  patient, segment = metrics.get("patient") or {}, metrics.get("segment") or {}
  recon = metrics.get("reconstruction") or {}
  patients = summary.get("patients") or {}
  return {
      "step": int(step), "stage": stage,
      "patient_auroc": _number(patient.get("auroc")), "patient_f1": _number(patient.get("f1")),
      "segment_auroc": _number(segment.get("auroc")), "segment_f1": _number(segment.get("f1")),
      "ssim_normal_cord": _number(recon.get("ssim_normal_cord")),
      "corr_normal_cord": _number(recon.get("corr_normal_cord")),
      "threshold": _number((summary.get("threshold") or {}).get("value")),
      "flagged_patients": sum(bool(p.get("flagged")) for p in patients.values()),
      "num_patients": len(patients), "seconds": _number(seconds)}


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.6g}"
  return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A plain-text table of the sweep (stdout)."""
  columns = ("step", "stage", "patient_auroc", "segment_auroc", "patient_f1", "segment_f1",
             "ssim_normal_cord")
  table = [list(columns)] + [[_cell(r[c]) or "-" for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
  return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def write_outputs(out_dir: str, rows: Sequence[dict[str, Any]], title: str) -> None:
  """sweep.csv and sweep.png (both atomic)."""
  io_utils.write_csv(os.path.join(out_dir, CSV_FILE),
                     [[_cell(r[c]) for c in CSV_HEADER] for r in rows], header=CSV_HEADER)
  plot(os.path.join(out_dir, FIGURE_FILE), rows, title)


def plot(path: str, rows: Sequence[dict[str, Any]], title: str) -> None:
  """Detection (patient / segment AUROC and F1) and normal-cord reconstruction (SSIM,
  correlation) against the checkpoint step; dotted lines where the stage changes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [("detection", [("patient_auroc", "patient AUROC", "-o"),
                           ("segment_auroc", "segment AUROC", "-s"),
                           ("patient_f1", "patient F1", "--o"),
                           ("segment_f1", "segment F1", "--s")]),
            ("normal-cord reconstruction", [("ssim_normal_cord", "SSIM", "-o"),
                                            ("corr_normal_cord", "correlation", "--s")])]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  steps = [r["step"] for r in rows]
  for ax, (name, series) in zip(axes, panels):
    lowest = 0.0
    for key, label, style in series:
      points = [(r["step"], r[key]) for r in rows if r[key] is not None]
      if points:
        ax.plot(*zip(*points), style, label=label, linewidth=1.2, markersize=4)
        lowest = min(lowest, min(v for _, v in points))
    drawn = bool(ax.lines)
    if not drawn:
      ax.text(0.5, 0.5, "no truth in this cohort:\nnothing to measure", ha="center",
              va="center", transform=ax.transAxes, color="grey")
    # The scores live in [0, 1]; a correlation may go negative and must stay in view.
    ax.set_ylim(lowest - 0.03, 1.03)
    if lowest < 0:
      ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("checkpoint step")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    if drawn:
      ax.legend(fontsize=7, loc="best")
    if steps:
      ax.set_xticks(steps)
      ax.tick_params(axis="x", labelsize=7, labelrotation=45 if len(steps) > 8 else 0)
    for previous, row in zip(rows, rows[1:]):
      if row["stage"] != previous["stage"]:
        ax.axvline((previous["step"] + row["step"]) / 2, color="grey", linestyle=":",
                   linewidth=0.8)
        ax.text((previous["step"] + row["step"]) / 2, 1.0, f" {row['stage']}", fontsize=7,
                color="grey", va="top", transform=ax.get_xaxis_transform())
  fig.suptitle(title, fontsize=9)
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.86, wspace=0.18)
  try:
    with io_utils.naming(path), io_utils.atomic_path(path, suffix=".png") as tmp:
      fig.savefig(tmp, dpi=100, format="png")
  finally:
    plt.close(fig)


def _prepare_out(out_dir: str, record: dict[str, Any], overwrite: bool) -> None:
  """Makes `out_dir` this sweep's folder: new, resumed (same record) or, with `overwrite`,
  started over (the step folders and files the earlier sweep wrote are removed)."""
  os.makedirs(out_dir, exist_ok=True)
  previous = _read_json(os.path.join(out_dir, RECORD_FILE))
  if previous is not None and not overwrite:
    differ = [k for k in record if previous.get(k) != record[k]]
    if differ:
      was = ", ".join(f"{k} {previous.get(k)!r}" for k in differ)
      raise errors.InputError(out_dir, f"holds a sweep of another {' / '.join(differ)} ({was});"
                                       " pass --overwrite to start it over, or choose another "
                                       "--out")
  if overwrite:
    for name in sorted(os.listdir(out_dir)):
      path = os.path.join(out_dir, name)
      if STEP_DIR.match(name) and os.path.isdir(path) and not os.path.islink(path):
        output_guard.remove_output(path, "evaluate")
      elif name in (CSV_FILE, FIGURE_FILE, RECORD_FILE) and os.path.isfile(path):
        os.remove(path)
    previous = None
  output_guard.write_marker(out_dir, COMMAND)
  io_utils.write_json(os.path.join(out_dir, RECORD_FILE),
                      {**record, "seconds": (previous or {}).get("seconds", {})})


def run_sweep(workdir: str | os.PathLike, data_dir: str | os.PathLike,
              out_dir: str | os.PathLike, steps: str | tuple[int, ...], *,
              overrides: Sequence[str] = (), batch_size: int | None = None,
              overwrite: bool = False,
              log: Callable[[str], None] | None = None) -> SweepResult:
  """Scores the checkpoints `steps` (`parse_steps`) of `workdir` on the cohort `data_dir` into
  `out_dir` (see the module docstring); one process.

  Raises:
    UsageError: bad `steps`, a step that is not kept, or a multi-process job; or an `out_dir`
      that may not be written (`output_guard`).
    InputError: `out_dir` holds something else (another sweep without `overwrite`).
    CheckpointError, LabelError, ...: as `u2ad evaluate` (nothing is written before the run,
      its checkpoints and the cohort are checked).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from u2ad_jax.evaluation import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from u2ad_jax.evaluation.rungs import base  # pylint: disable=g-import-not-at-top
  from u2ad_jax.evaluation.rungs import model as model_rung  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    raise errors.UsageError("--steps runs in one process; sweep a run's checkpoints without "
                            "--distributed")
  spec = parse_steps(steps) if isinstance(steps, str) else tuple(steps)
  workdir = workdir_lib.resolve(workdir)
  protected = {"--workdir": workdir, "--data": os.fspath(data_dir)}
  out_dir = output_guard.check_output_dir(out_dir, COMMAND, overwrite=True, swapped=False,
                                          protected=protected)
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpts:
    todo = resolve_steps(spec, ckpts.all_steps(), ckpts.directory)
    stages = {s: str(ckpts.restore_meta(s).get("stage", "")) for s in todo}
  options = {} if batch_size is None else {"batch_size": int(batch_size)}
  rung = model_rung.ModelRung.restore(workdir, step=todo[0], overrides=overrides, log=log,
                                      **options)
  prepared = base.prepare_cohort(data_dir, rung.config.data, progress=log is not None)
  settings = settings_lib.EvalSettings.from_config(rung.config)
  model_rung.check_image_size(prepared.slice_set, rung.model, prepared.root)
  # ---- everything is checked; from here on out_dir is written.
  record = _record(workdir, data_dir, overrides)
  _prepare_out(out_dir, record, overwrite)
  seconds = dict((_read_json(os.path.join(out_dir, RECORD_FILE)) or {}).get("seconds", {}))
  # AUROC and F1 of a few patients move in large steps: the title says how many there are.
  title = (f"{workdir_lib.name(workdir)} on {os.path.basename(os.path.realpath(data_dir))} "
           f"({{patients}} patients): {len(todo)} checkpoint{'s' if len(todo) > 1 else ''}, "
           f"K = {settings.mc_samples}")
  rows, computed = [], []
  for i, step in enumerate(todo):
    folder = os.path.join(out_dir, step_dir_name(step))
    if _finished(folder, step, workdir):
      if log:
        log(f"step {step}: reusing {folder} ({i + 1}/{len(todo)})")
    else:
      t0 = time.monotonic()
      at = rung if step == rung.step else rung.at_step(step)
      base.evaluate(at, prepared, settings, folder, overwrite=True, protected=protected,
                    log=log)
      seconds[str(step)] = time.monotonic() - t0
      computed.append(step)
      io_utils.write_json(os.path.join(out_dir, RECORD_FILE), {**record, "seconds": seconds})
      if log:
        log(f"step {step}: scored in {seconds[str(step)]:.1f} s ({i + 1}/{len(todo)})")
    rows.append(step_row(folder, step, stages[step], seconds.get(str(step))))
    write_outputs(out_dir, rows, title.format(patients=rows[0]["num_patients"]))
  return SweepResult(out_dir=out_dir, rows=rows, computed=computed)

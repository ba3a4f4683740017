"""The workdir's metric log (JSON lines) and its training-curve figure.

`workdir/metrics.jsonl`: one JSON object per line, appended as training goes. Every record
carries the global `"step"`; stage starts / ends and map refreshes also carry `"event"`. On resume
from the checkpoint of step s, the records that the resumed run writes again are dropped first
(everything after s, and the stage-start / map-refresh events at s, which are logged after the
checkpoint of s), so the log reads as one uninterrupted run.

`workdir/train_curves.png`: loss terms, gradient norm and learning rate against the step, with
stage boundaries, and the validation records (`train/validation.py`: loss, normal-cord SSIM
and correlation) when there are any; written atomically at the end of every stage.

Both are written by process 0 only. In a URI workdir (`gs://...`, through etils epath) objects
cannot be appended to: the log is kept in memory and the whole object rewritten per record, and
the figure is one object write.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Iterable

import numpy as np

from etils import epath

from u2ad_jax import io_utils
from u2ad_jax.train import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "train_curves.png"
# Events logged right after the checkpoint of their step, hence again by a run resuming there.
RELOGGED_EVENTS = ("stage_start", "maps")


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / Infinity; keep it readable
  return value


class MetricsLog:
  """Append-only JSONL log. Only the writing process (process 0) should create one."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = workdir_lib.join(workdir, METRICS_FILE)
    self._uri = workdir_lib.is_uri(workdir)
    self._cached: str | None = None  # URI: the object's text as last written

  def _write_all(self, text: str) -> None:
    with io_utils.naming(self.path):
      if self._uri:
        epath.Path(self.path).write_text(text)
        self._cached = text
      else:
        io_utils.write_text(self.path, text)

  def truncate_for_resume(self, step: int) -> None:
    """Prepares the log for a run resuming from the checkpoint of `step` (atomic rewrite)."""
    if not epath.Path(self.path).exists():
      return
    step = int(step)

    def keep(r):
      s = int(r.get("step", 0))
      return s < step or (s == step and r.get("event") not in RELOGGED_EVENTS)
    kept = [r for r in self.read() if keep(r)]
    self._write_all("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, record: dict[str, Any]) -> None:
    line = json.dumps({k: _plain(v) for k, v in record.items()}) + "\n"
    if self._uri:
      if self._cached is None:
        target = epath.Path(self.path)
        self._cached = target.read_text() if target.exists() else ""
      self._write_all(self._cached + line)
      return
    # A full disk raises here (in write or at close); the trainer reports it in one line.
    with io_utils.naming(self.path), open(self.path, "a", encoding="utf-8") as f:
      f.write(line)

  def read(self) -> list[dict[str, Any]]:
    """All complete records (a torn last line from a kill is skipped)."""
    target = epath.Path(self.path)
    if not target.exists():
      return []
    records = []
    for line in target.read_text(encoding="utf-8").splitlines():
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
    return records


def _series(records: Iterable[dict[str, Any]], name: str,
            event: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `name` in the step records (`event` None) or in one event's records."""
  pairs = [(r["step"], float(r[name])) for r in records
           if r.get("event") == event and isinstance(r.get(name), (int, float))]
  if not pairs:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
  """Writes the training-curve PNG (matplotlib Agg; atomic replace)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  # (title, [(record name, event or None for the step records, label)], log scale)
  panels = [("loss", [("loss", None, "loss"), ("image", None, "image"), ("edge", None, "edge"),
                      ("val_loss", "validation", "validation loss")], True),
            ("gradient norm", [("grad_norm", None, "grad_norm")], True),
            ("learning rate", [("lr", None, "lr")], True),
            ("EU weight", [("w_eu", None, "w_eu")], False)]
  if any(r.get("event") == "validation" for r in records):
    panels.append(("validation: normal cord", [("val_ssim", "validation", "SSIM"),
                                               ("val_corr", "validation", "correlation")], False))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  boundaries = [(r["step"], r["stage"]) for r in records if r.get("event") == "stage_start"]
  for ax, (title, names, log_scale) in zip(axes, panels):
    for name, event, label in names:
      steps, values = _series(records, name, event)
      if steps.size:
        ax.plot(steps, values, label=label, linewidth=1, marker="o" if event else None,
                markersize=3)
        if log_scale and np.all(values > 0):
          ax.set_yscale("log")
    for step, stage in boundaries:
      ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
      ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=7,
              va="top", color="grey")
    ax.set_title(title)
    ax.set_xlabel("step")
    if len(names) > 1:
      ax.legend(fontsize=7)
  # Fixed margins: tight_layout measures every text object and cost more than the rest of the
  # figure (seconds per stage end on a small CPU); these margins fit the titles and labels.
  fig.subplots_adjust(left=0.04, right=0.99, bottom=0.15, top=0.9, wspace=0.22)
  try:
    with io_utils.naming(path):
      if workdir_lib.is_uri(path):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=90, format="png")
        epath.Path(path).write_bytes(buffer.getvalue())  # one object write
      else:
        with io_utils.atomic_path(path, suffix=".png") as tmp:
          fig.savefig(tmp, dpi=90, format="png")
  finally:
    plt.close(fig)

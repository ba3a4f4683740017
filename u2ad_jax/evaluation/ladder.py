"""The comparison ladder: every rung through the same scoring code.

Rungs: (a) cord-intensity threshold (no learning), (b) MAE with random masking ("baseline"),
(c) + EU guidance, (d) + AU guidance, (e) EU + AU = U2AD. Each rung is a `CohortResult` from
`analysis.analyse` on the same cohort; this module only tabulates and plots them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from u2ad_jax import io_utils
from u2ad_jax import stages
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import figures

# The ladder's order: the no-learning rung, then the ablation methods (stages.ABLATION_METHODS).
RUNGS = ("intensity",) + stages.ABLATION_METHODS
RUNG_TITLES = {
    "intensity": "(a) cord-intensity threshold",
    "baseline": "(b) MAE, random masking",
    "eu": "(c) + EU guidance",
    "au": "(d) + AU guidance",
    "eu_au": "(e) EU + AU (U2AD)",
}
# (section, metric, column title) of the comparison table.
COLUMNS = (
    ("patient", "f1", "patient F1"),
    ("patient", "precision", "patient precision"),
    ("patient", "recall", "patient recall"),
    ("patient", "specificity", "patient specificity"),
    ("patient", "auroc", "patient AUROC"),
    ("patient", "ap", "patient AP"),
    ("segment", "f1", "segment F1"),
    ("segment", "auroc", "segment AUROC"),
    ("segment", "ap", "segment AP"),
    ("pixel", "auroc", "pixel AUROC"),
    ("pixel", "ap", "pixel AP"),
    ("pixel", "best_dice", "pixel best Dice"),
    ("reconstruction", "ssim_normal_cord", "SSIM normal cord"),
)


def metric_value(result: analysis.CohortResult, section: str, name: str) -> float | None:
  """One metric of a result (None when absent: no truth, or no reconstruction)."""
  if result.metrics is None or section not in result.metrics:
    return None
  value = result.metrics[section].get(name)
  return None if value is None else float(value)


def comparison_rows(results: Mapping[str, analysis.CohortResult]) -> list[list[Any]]:
  """Rows `[rung, title, threshold, metric ...]` in ladder order (unknown rungs last)."""
  order = [r for r in RUNGS if r in results] + [r for r in results if r not in RUNGS]
  rows = []
  for rung in order:
    res = results[rung]
    rows.append([rung, RUNG_TITLES.get(rung, rung), res.decisions.threshold]
                + [metric_value(res, s, m) for s, m, _ in COLUMNS])
  return rows


def _cell(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def write_comparison(out_dir: str | os.PathLike, results: Mapping[str, analysis.CohortResult],
                     header_lines: Sequence[str] = ()) -> str:
  """comparison.csv, comparison.md and figures/roc_ladder.png; returns the Markdown path."""
  out_dir = os.fspath(out_dir)
  rows = comparison_rows(results)
  header = ["rung", "method", "threshold"] + [title for _, _, title in COLUMNS]
  io_utils.write_csv(os.path.join(out_dir, "comparison.csv"),
                     [[("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                       for v in row] for row in rows], header)
  lines = ["# Comparison ladder", ""] + list(header_lines) + [""]
  lines.append("| " + " | ".join(header[1:]) + " |")
  lines.append("|" + "---|" * (len(header) - 1))
  for row in rows:
    lines.append("| " + " | ".join(_cell(v) for v in row[1:]) + " |")
  lines += ["", "Every rung goes through the same postprocessing, curves, vertebral levels, "
            "segment / patient scores and unsupervised threshold (no labels); only the anomaly "
            "map differs.", ""]
  with_truth = {k: r for k, r in results.items() if r.truth is not None}
  if with_truth:
    truth = next(iter(with_truth.values())).truth
    if truth.patient.any() and not truth.patient.all():
      figures.roc_plot(os.path.join(out_dir, "figures", "roc_ladder.png"), [
          ("patient level", {k: (r.patient_scores, r.truth.patient) for k, r in with_truth.items()}),
          # Scored segments with known truth only (n/a: out of view, or n/a in the table).
          ("segment level", {k: (r.segment_scores[r.truth.segment_cells(r.segment_scores)],
                                 r.truth.segments[r.truth.segment_cells(r.segment_scores)])
                             for k, r in with_truth.items()}),
      ])
      lines.append("![ROC curves of the ladder](figures/roc_ladder.png)")
  path = os.path.join(out_dir, "comparison.md")
  io_utils.write_text(path, "\n".join(lines) + "\n")
  return path

"""Tables, metrics JSON, figures and the one-page Markdown report of a `CohortResult`.

Files written into an output directory (all atomically):
  patients.csv      one row per patient: score, decision, peak segment, the peak's voxel (i, j, k)
                    in the input NIfTI and its model-grid slice / row, truth.
  segments.csv      one row per (patient, segment): score, decision, peak voxel, truth.
  metrics.json      patient / segment / pixel metrics and the reconstruction SSIM (with truth).
  figures/roc.png, figures/scores.png, figures/<subject>_slice.png, figures/<subject>_curve.png
  report.md         summary, threshold rule, metrics, patient table, links to the figures.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from u2ad_jax import io_utils
from u2ad_jax import labels as label_values
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import figures

# peak_i / peak_j / peak_k: the peak's voxel in the INPUT NIfTI as stored (empty for inputs
# without a NIfTI geometry); model_slice / model_row: the same peak on the model grid (canonical
# RAS x index of the slice, row of the resampled model slice).
PATIENT_HEADER = ("subject_id", "patient_score", "flagged", "peak_segment", "peak_i", "peak_j",
                  "peak_k", "model_slice", "model_row", "flagged_segments", "truth_has_lesion",
                  "truth_segments")
SEGMENT_HEADER = ("subject_id", "segment", "score", "flagged", "peak_i", "peak_j", "peak_k",
                  "model_slice", "model_row", "truth")
Voxels = dict[str, dict[str, Any]]


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.{digits}g}"
  return str(value)


def finite_or_none(value: Any) -> float | None:
  """A score for JSON: None for n/a (NaN: a segment outside the field of view)."""
  value = float(value)
  return value if math.isfinite(value) else None


def _peak_slice_index(result: analysis.CohortResult, slice_index: np.ndarray, subject: int,
                      position: int) -> int:
  return int(slice_index[result.scores[subject].positions[position]])


def _ijk(voxels: Voxels | None, subject_id: str, segment: int | None) -> list[Any]:
  """The peak voxel (i, j, k) as three cells ('' when unknown)."""
  entry = (voxels or {}).get(subject_id)
  value = None if entry is None else (entry["patient"] if segment is None
                                      else entry["segments"][segment])
  return ["", "", ""] if value is None else [int(v) for v in value]


def patient_rows(result: analysis.CohortResult, slice_index: np.ndarray,
                 voxels: Voxels | None = None) -> list[list[Any]]:
  """Rows of patients.csv (see PATIENT_HEADER); truth columns empty without truth.
  `voxels`: `outputs.peak_positions` (peak voxels of the input NIfTI)."""
  rows = []
  for i, s in enumerate(result.scores):
    flagged_segments = [n for n, f in zip(label_values.SEGMENT_NAMES,
                                          result.decisions.segment_flags[i]) if f]
    truth_has, truth_segs = "", ""
    if result.truth is not None:
      truth_has = int(result.truth.patient[i])
      truth_segs = ";".join(n for n, t in zip(label_values.SEGMENT_NAMES,
                                              result.truth.segments[i]) if t)
    rows.append([s.subject_id, f"{s.patient_score:.6g}", int(result.decisions.patient_flags[i]),
                 label_values.SEGMENT_NAMES[s.peak_segment],
                 *_ijk(voxels, s.subject_id, None),
                 _peak_slice_index(result, slice_index, i, s.peak_slice), s.peak_row,
                 ";".join(flagged_segments), truth_has, truth_segs])
  return rows


def _segment_truth_cell(truth: analysis.Truth | None, patient: int, segment: int) -> Any:
  """segments.csv's truth cell: '' without truth, 'n/a' where the table says n/a, else 0 / 1."""
  if truth is None:
    return ""
  if not truth.segments_known[patient, segment]:
    return "n/a"
  return int(truth.segments[patient, segment])


def segment_rows(result: analysis.CohortResult, slice_index: np.ndarray,
                 voxels: Voxels | None = None) -> list[list[Any]]:
  """Rows of segments.csv (see SEGMENT_HEADER)."""
  rows = []
  for i, s in enumerate(result.scores):
    for k, name in enumerate(label_values.SEGMENT_NAMES):
      truth = _segment_truth_cell(result.truth, i, k)
      if not np.isfinite(s.segment_scores[k]):  # outside the field of view: no score, no peak
        # Every row has the header's fields, so the truth stays in its column.
        rows.append([s.subject_id, name, "n/a", "n/a", "", "", "", "", "", truth])
        continue
      rows.append([s.subject_id, name, f"{s.segment_scores[k]:.6g}",
                   int(result.decisions.segment_flags[i, k]), *_ijk(voxels, s.subject_id, k),
                   _peak_slice_index(result, slice_index, i, int(s.segment_peak_slices[k])),
                   int(s.segment_peak_rows[k]), truth])
  return rows


def write_tables(out_dir: str, result: analysis.CohortResult, slice_index: np.ndarray,
                 voxels: Voxels | None = None) -> None:
  io_utils.write_csv(os.path.join(out_dir, "patients.csv"),
                     patient_rows(result, slice_index, voxels), PATIENT_HEADER)
  io_utils.write_csv(os.path.join(out_dir, "segments.csv"),
                     segment_rows(result, slice_index, voxels), SEGMENT_HEADER)


def threshold_summary(result: analysis.CohortResult) -> dict[str, Any]:
  """The threshold as summary.json / metrics.json / sidecars record it. `num_patients`: the
  patients whose scores it was computed from (a recorded one: there)."""
  d = result.decisions
  out = {"value": d.threshold, "rule": d.rule.name, "k": d.rule.k, "pool": d.rule.pool,
         "median": d.median, "sigma": d.sigma, "description": d.rule.describe(),
         "num_patients": len(result.scores), "degenerate": d.sigma == 0.0}
  if getattr(d.rule, "source", None):  # a recorded threshold (--threshold-from)
    out["recorded_by"] = d.rule.source
    out["num_patients"] = d.rule.num_patients
  return out


def write_metrics(out_dir: str, result: analysis.CohortResult) -> None:
  """metrics.json: the metrics (when truth exists), the threshold and the rung's provenance."""
  if result.metrics is None:
    return
  payload = {"name": result.name, "threshold": threshold_summary(result),
             "num_patients": len(result.scores), **result.metrics, "info": result.info}
  io_utils.write_json(os.path.join(out_dir, "metrics.json"), payload)


# Cohorts up to this size, and every cohort without truth, get a figure of every patient (a
# single new scan must be looked at); larger ones only of the flagged patients (at most
# MAX_FIGURE_PATIENTS), and the report says so.
ALL_FIGURES_MAX_PATIENTS = 10
MAX_FIGURE_PATIENTS = 50


def figure_selection(result: analysis.CohortResult) -> tuple[list[int], str]:
  """The patients (result order) that get a slice panel and curve, and a sentence for the report
  saying which."""
  num = len(result.scores)
  if result.truth is None or num <= ALL_FIGURES_MAX_PATIENTS:
    why = "no truth" if result.truth is None else f"{num} patient(s)"
    return list(range(num)), f"Every patient ({why}): slice with the highest score; anomaly curve."
  flagged = [i for i in range(num) if result.decisions.patient_flags[i]][:MAX_FIGURE_PATIENTS]
  return flagged, (f"Flagged patients only ({len(flagged)} of {num}: a cohort of more than "
                   f"{ALL_FIGURES_MAX_PATIENTS} patients with truth; every patient's maps are in "
                   f"`subjects/<id>/`): slice with the highest score; anomaly curve.")


def write_figures(out_dir: str, result: analysis.CohortResult, images: np.ndarray,
                  slice_index: np.ndarray, crops: dict[str, figures.Crop] | None = None
                  ) -> dict[str, Any]:
  """All figures; returns {'roc': rel path or None, 'scores': ..., 'patients': {id: (slice,
  curve)}, 'selection': sentence}. Slice panels and curves: `figure_selection`'s patients,
  cropped to `crops[id]` (the scan's field of view on the model grid) where given."""
  fig_dir = os.path.join(out_dir, "figures")
  out: dict[str, Any] = {"roc": None, "scores": "figures/scores.png", "patients": {}}
  truth = result.truth
  # Segments: the scored ones (finite), split by truth only where it is known.
  cells = (np.isfinite(result.segment_scores) if truth is None
           else truth.segment_cells(result.segment_scores))
  figures.score_distributions(
      os.path.join(fig_dir, "scores.png"), result.patient_scores, result.segment_scores[cells],
      result.decisions.threshold,
      patient_truth=None if truth is None else truth.patient,
      segment_truth=None if truth is None else truth.segments[cells],
      title=f"{result.name}: scores (threshold dashed)")
  if truth is not None and truth.patient.any() and not truth.patient.all():
    figures.roc_plot(os.path.join(fig_dir, "roc.png"), [
        ("patient level", {result.name: (result.patient_scores, truth.patient)}),
        ("segment level", {result.name: (result.segment_scores[cells], truth.segments[cells])}),
    ])
    out["roc"] = "figures/roc.png"
  selected, out["selection"] = figure_selection(result)
  for i in selected:
    s = result.scores[i]
    pos = int(s.positions[s.peak_slice])
    crop = (crops or {}).get(s.subject_id)
    slice_rel = f"figures/{s.subject_id}_slice.png"
    curve_rel = f"figures/{s.subject_id}_curve.png"
    figures.slice_panels(
        os.path.join(out_dir, slice_rel), images[pos], result.postprocessed[pos], s.levels,
        recon=None if result.recon is None else result.recon[pos],
        eu=None if result.eu is None else result.eu[pos], peak_row=s.peak_row, crop=crop,
        title=f"{s.subject_id} slice {int(slice_index[pos])}: score {s.patient_score:.3g} "
              f"({label_values.SEGMENT_NAMES[s.peak_segment]})"
              + (" - flagged" if result.decisions.patient_flags[i] else ""))
    not_in_view = [n for n, v in zip(label_values.SEGMENT_NAMES, s.segment_scores)
                   if not np.isfinite(v)]
    figures.curve_plot(
        # Level-normalised scores are z-scores, not curve units: no threshold line then.
        os.path.join(out_dir, curve_rel), s,
        None if s.level_normalised else result.decisions.threshold,
        truth_segments=None if truth is None else truth.segments[i],
        segment_flags=result.decisions.segment_flags[i],
        rows=None if crop is None else (crop[0], crop[1]),
        title=f"{s.subject_id}: anomaly curve along the cord"
              + ("" if truth is None else " (orange: lesion segments)")
              + (f"; n/a (out of view): {', '.join(not_in_view)}" if not_in_view else ""))
    out["patients"][s.subject_id] = (slice_rel, curve_rel)
  return out


def _metrics_table(m: dict[str, Any]) -> list[str]:
  lines = ["| level | precision | recall | specificity | F1 | AUROC | AP |",
           "|---|---|---|---|---|---|---|"]
  for level in ("patient", "segment"):
    v = m[level]
    lines.append(f"| {level} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | "
                 f"{_fmt(v['specificity'])} | {_fmt(v['f1'])} | {_fmt(v['auroc'])} | "
                 f"{_fmt(v['ap'])} |")
  if m.get("segment_model_grid"):
    v = m["segment_model_grid"]
    lines.append(f"| segment, truth from the label maps on the model grid | "
                 f"{_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['specificity'])} | "
                 f"{_fmt(v['f1'])} | {_fmt(v['auroc'])} | {_fmt(v['ap'])} |")
  lines.append("")
  p, q = m["pixel"], m["pixel_postprocessed"]
  lines.append(f"Pixel level inside the scoring ROI (raw anomaly map): AUROC {_fmt(p['auroc'])}, "
               f"AP {_fmt(p['ap'])}, best Dice {_fmt(p['best_dice'])}; postprocessed map: "
               f"AUROC {_fmt(q['auroc'])}, AP {_fmt(q['ap'])}, best Dice {_fmt(q['best_dice'])}.")
  if "reconstruction" in m:
    lines.append(f"Reconstruction SSIM on normal cord: "
                 f"{_fmt(m['reconstruction']['ssim_normal_cord'])}.")
  lines.append(f"Truth from: {m['truth_source']}.")
  return lines


def markdown_report(result: analysis.CohortResult, slice_index: np.ndarray,
                    figure_paths: dict[str, Any], header_lines: Sequence[str] = ()) -> str:
  """The one-page report (Markdown)."""
  d = result.decisions
  lines = [f"# U2AD evaluation: {result.name}", ""]
  if result.warnings:
    lines += ["**Warnings** (where these numbers cannot be fully trusted):", ""]
    lines += [f"- {w}" for w in result.warnings] + [""]
  lines += list(header_lines)
  num_flagged = int(d.patient_flags.sum())
  lines += [
      f"- Patients: {len(result.scores)}; flagged: {num_flagged}; flagged segments: "
      f"{int(d.segment_flags.sum())} of {d.segment_flags.size}.",
      f"- Decision threshold: **{d.threshold:.4g}** = {d.rule.describe()} "
      f"(median {d.median:.4g}, sigma {d.sigma:.4g}).",
      "- Scores: " + result.info.get("anomaly_map", "anomaly = the rung's own map") + " -> "
      "percentile + connected-component postprocessing -> curve along the cord (" +
      result.info.get("curve", "per-row reduction across the width") + ", max over slices) -> "
      "segment score = max of the curve between adjacent vertebral centroids; patient score = "
      "max over segments.",
      "- Tables: [patients.csv](patients.csv), [segments.csv](segments.csv)"
      + (", metrics: [metrics.json](metrics.json)" if result.metrics is not None else "") + ".",
      "",
  ]
  if result.metrics is not None:
    lines += ["## Metrics", ""] + _metrics_table(result.metrics) + [""]
  else:
    lines += ["No truth for this cohort (no participants.tsv truth columns and no lesion label): "
              "decisions only, no metrics.", ""]
  lines += ["## Patients", "",
            "| patient | score | flagged | flagged segments | peak | truth |",
            "|---|---|---|---|---|---|"]
  for row in patient_rows(result, slice_index):
    sid, score, flagged, peak_seg, _, _, _, peak_slice, _, segs, truth_has, truth_segs = row
    truth = "" if truth_has == "" else ("lesion " + (truth_segs or "?") if truth_has else "none")
    lines.append(f"| {sid} | {score} | {'**yes**' if flagged else 'no'} | {segs or '-'} | "
                 f"{peak_seg}, slice {peak_slice} | {truth or 'n/a'} |")
  lines += ["", "## Figures", ""]
  if figure_paths.get("roc"):
    lines.append(f"![ROC]({figure_paths['roc']})")
  lines.append(f"![scores]({figure_paths['scores']})")
  lines.append("")
  if figure_paths["patients"]:
    lines.append(figure_paths.get("selection", ""))
    lines.append("")
    for sid, (slice_rel, curve_rel) in figure_paths["patients"].items():
      lines += [f"### {sid}", "", f"![{sid}: slice]({slice_rel})", "",
                f"![{sid}: anomaly curve]({curve_rel})", ""]
  else:
    lines.append("No patient exceeds the threshold "
                 f"({figure_paths.get('selection', 'figures of flagged patients only')}).")
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, result: analysis.CohortResult, images: np.ndarray,
                 slice_index: np.ndarray, header_lines: Sequence[str] = (), *,
                 voxels: Voxels | None = None,
                 crops: dict[str, figures.Crop] | None = None) -> str:
  """Tables, metrics, figures and report.md into `out_dir`; returns the report's path.
  `voxels`: peak voxels of the input NIfTI (`outputs.peak_positions`) for the tables; `crops`:
  each patient's field of view on the model grid, for the figures (`outputs.field_of_view`)."""
  os.makedirs(out_dir, exist_ok=True)
  write_tables(out_dir, result, slice_index, voxels)
  write_metrics(out_dir, result)
  figure_paths = write_figures(out_dir, result, images, slice_index, crops)
  path = os.path.join(out_dir, "report.md")
  io_utils.write_text(path, markdown_report(result, slice_index, figure_paths, header_lines))
  return path


def format_table(result: analysis.CohortResult) -> str:
  """Plain-text patient / segment table for the terminal."""
  names = label_values.SEGMENT_NAMES
  head = f"{'patient':<10} {'score':>8} {'flag':>4}  " + " ".join(f"{n:>6}" for n in names)
  head += "  truth" if result.truth is not None else ""
  lines = [head, "-" * len(head)]
  for i, s in enumerate(result.scores):
    cells = []
    for k in range(len(names)):
      mark = "*" if result.decisions.segment_flags[i, k] else " "
      cells.append(f"{_fmt(s.segment_scores[k], 3):>5}{mark}")
    line = (f"{s.subject_id:<10} {s.patient_score:>8.4g} "
            f"{'YES' if result.decisions.patient_flags[i] else 'no':>4}  " + " ".join(cells))
    if result.truth is not None:
      segs = [n for n, t in zip(names, result.truth.segments[i]) if t]
      line += "  " + (",".join(segs) if segs else ("lesion" if result.truth.patient[i] else "-"))
    lines.append(line)
  lines.append(f"threshold {result.decisions.threshold:.4g} ({result.decisions.rule.describe()}); "
               f"* = flagged segment")
  m = result.metrics
  if m is not None:
    p, g = m["patient"], m["segment"]
    lines.append(f"patient: F1 {_fmt(p['f1'], 3)} AUROC {_fmt(p['auroc'], 3)} "
                 f"precision {_fmt(p['precision'], 3)} recall {_fmt(p['recall'], 3)} "
                 f"specificity {_fmt(p['specificity'], 3)} | segment: F1 {_fmt(g['f1'], 3)} "
                 f"AUROC {_fmt(g['auroc'], 3)}")
  return "\n".join(lines)

"""What an evaluation writes: per-subject NIfTI maps and JSON sidecars, tables, report.

Everything goes into a staging directory beside `--out` (`staged_directory`), which replaces
`--out` only once complete: an error at any point leaves no partial report.

Per-subject outputs (subjects/<id>/): `<id>_anomaly.nii.gz` (the anomaly map),
`<id>_anomaly_postprocessed.nii.gz`, `<id>_eu.nii.gz`, `<id>_recon.nii.gz` (mean reconstruction,
in the input's intensity units) on the input's own voxel grid with its affine and header, and
`<id>_scores.json` (model, checkpoint step, threshold, scores, decisions, levels). The cohort's
tables, metrics, figures and report.md are `report.py`'s; summary.json is written here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

import numpy as np

from u2ad_jax import io_utils
from u2ad_jax import labels as label_values
from u2ad_jax import output_guard
from u2ad_jax.evaluation import analysis
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import report


def staged_directory(out_dir: str | os.PathLike,
                     command: str = "evaluate") -> contextlib.AbstractContextManager[str]:
  """`output_guard.staged_directory`: a staging directory beside `out_dir` that replaces it only
  when complete, and only when `out_dir` is missing, empty or a previous `command` output."""
  return output_guard.staged_directory(out_dir, command)


def _denormalise(recon: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
  lo, hi = intensity_range
  return recon * (hi - lo) + lo


def write_subject_outputs(out_dir: str, result: analysis.CohortResult, slice_set: Any,
                          provenance: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """Per-subject NIfTI maps on the input grid and the JSON sidecar; returns written files."""
  from u2ad_jax.data import nifti  # pylint: disable=g-import-not-at-top
  from u2ad_jax.data import slice_geometry  # pylint: disable=g-import-not-at-top

  written = {}
  voxels = peak_positions(result, slice_set)
  for i, s in enumerate(result.scores):
    sid = s.subject_id
    subject_dir = os.path.join(out_dir, "subjects", sid)
    geometry = slice_set.geometries.get(sid)
    pos = s.positions
    slice_index = slice_set.slice_index[pos]
    files = {}
    if geometry is not None:
      volumes = {"anomaly": result.anomaly[pos],
                 "anomaly_postprocessed": result.postprocessed[pos]}
      if result.eu is not None:
        volumes["eu"] = result.eu[pos]
      if result.recon is not None:
        volumes["recon"] = _denormalise(result.recon[pos], geometry.intensity_range)
      for name, maps in volumes.items():
        volume = slice_geometry.slices_to_volume(maps.astype(np.float32), slice_index, geometry)
        rel = f"{sid}_{name}.nii.gz"
        nifti.write_like(os.path.join(subject_dir, rel), volume, geometry)
        files[name] = rel
    sidecar = {
        "subject_id": sid,
        **dict(provenance),
        "threshold": report.threshold_summary(result),
        "patient": {
            "score": s.patient_score,
            "flagged": bool(result.decisions.patient_flags[i]),
            "peak_segment": label_values.SEGMENT_NAMES[s.peak_segment],
            "peak_voxel": voxels[sid]["patient"],
            "peak_slice_index": int(slice_set.slice_index[pos[s.peak_slice]]),
            "peak_row": s.peak_row,
        },
        "segments": {
            name: {"score": report.finite_or_none(s.segment_scores[k]),  # None = n/a
                   "flagged": bool(result.decisions.segment_flags[i, k]),
                   "peak_voxel": voxels[sid]["segments"][k],
                   "peak_slice_index": int(slice_set.slice_index[pos[s.segment_peak_slices[k]]]),
                   "peak_row": int(s.segment_peak_rows[k])}
            for k, name in enumerate(label_values.SEGMENT_NAMES)},
        "levels": {
            "centroid_rows": {n: report.finite_or_none(r) for n, r in
                              zip(label_values.VERTEBRA_NAMES, s.levels.centroid_rows)},
            "method": s.levels.method,
            "reference_slice_index": int(slice_set.slice_index[pos[s.levels.reference_slice]]),
            "frame": "model slice frame: rows superior -> inferior, columns anterior -> "
                     "posterior, slice index = canonical RAS x index; peak_voxel = (i, j, k) "
                     "of the input NIfTI's stored grid",
        },
        "slices_scored": [int(v) for v in slice_index],
        "files": files,
        "maps": (provenance.get("anomaly_map", "anomaly = the rung's anomaly map") +
                 "; recon = mean reconstruction in the input's intensity units; voxels of "
                 "slices that were not scored are 0"),
    }
    if result.truth is not None:
      sidecar["truth"] = {
          "has_lesion": bool(result.truth.patient[i]),
          "segments": [n for n, t in zip(label_values.SEGMENT_NAMES, result.truth.segments[i])
                       if t],
          "segments_unknown": [n for n, k in zip(label_values.SEGMENT_NAMES,
                                                 result.truth.segments_known[i]) if not k],
          "source": result.truth.source,
      }
    rel = f"{sid}_scores.json"
    io_utils.write_json(os.path.join(subject_dir, rel), sidecar)
    files["scores"] = rel
    written[sid] = files
  return written


def model_to_voxel(geometry: Any, slice_index: int, row: int, column: int) -> tuple[int, int, int]:
  """Model-frame pixel (row, column) of the slice at canonical x `slice_index` -> the nearest
  voxel `(i, j, k)` of the INPUT file's stored grid (`slice_geometry.SliceGeometry`: model pixel
  (r, c) is grid index m_y = S-1-c, m_z = S-1-r at canonical voxel `scale * m + offset`; the
  canonical axes are the stored ones permuted and flipped, `geometry.orientation.ornt`)."""
  s = int(geometry.image_size)
  canonical_shape = geometry.orientation.canonical_shape
  sy, sz = geometry.scale
  oy, oz = geometry.offset
  canonical = (int(slice_index),
               int(round(sy * (s - 1 - int(column)) + oy)),
               int(round(sz * (s - 1 - int(row)) + oz)))
  canonical = tuple(min(max(v, 0), n - 1) for v, n in zip(canonical, canonical_shape))
  ornt = np.asarray(geometry.orientation.ornt)
  stored = []
  for axis, (target, flip) in enumerate(ornt):
    v = canonical[int(target)]
    stored.append(int(geometry.orientation.shape[axis]) - 1 - v if flip < 0 else v)
  return stored[0], stored[1], stored[2]


def peak_positions(result: analysis.CohortResult, slice_set: Any) -> dict[str, dict[str, Any]]:
  """Where each patient's and each segment's peak lies, in the INPUT NIfTI's voxel indices.

  The curves sum across the cord width, so a peak is a (slice, row); its column is the row's
  maximum of the postprocessed map (else the raw anomaly map, else the middle of the scoring
  ROI on that row). Returns {subject: {"patient": (i, j, k) | None, "segments": [(i, j, k) |
  None] * 6}}; None where the subject has no input geometry (e.g. `.npy` slices).
  """
  out = {}
  for s in result.scores:
    geometry = slice_set.geometries.get(s.subject_id) if slice_set.geometries else None

    def voxel(position: int, row: int) -> tuple[int, int, int] | None:
      if geometry is None:
        return None
      pos = int(s.positions[position])
      column = None
      for maps in (result.postprocessed, result.anomaly):
        line = np.asarray(maps[pos][row])
        if line.max() > 0:
          column = int(np.argmax(line))
          break
      if column is None:
        roi_columns = np.flatnonzero(slice_set.score_roi[pos][row])
        column = int(roi_columns.mean()) if roi_columns.size else slice_set.images.shape[-1] // 2
      return model_to_voxel(geometry, int(slice_set.slice_index[pos]), row, column)

    out[s.subject_id] = {
        "patient": voxel(s.peak_slice, s.peak_row),
        "segments": [voxel(int(s.segment_peak_slices[k]), int(s.segment_peak_rows[k]))
                     for k in range(len(label_values.SEGMENT_NAMES))]}
  return out


def write_all(out_dir: str, result: analysis.CohortResult, slice_set: Any,
              provenance: Mapping[str, Any], header_lines: list[str]) -> str:
  """Report, tables, metrics, figures and per-subject files into `out_dir` (a staging dir)."""
  write_subject_outputs(out_dir, result, slice_set, provenance)
  lines = list(header_lines) + [
      f"- Vertebral levels: {levels_lib.describe({s.subject_id: s.levels for s in result.scores})}.",
      "- Per-subject maps (NIfTI on the input grid: anomaly, postprocessed anomaly, EU, "
      "reconstruction) and score sidecars: `subjects/<id>/`."]
  io_utils.write_json(os.path.join(out_dir, "summary.json"), {
      "name": result.name, **dict(provenance), "threshold": report.threshold_summary(result),
      "warnings": list(result.warnings),
      "patients": {s.subject_id: {"score": s.patient_score,
                                  "flagged": bool(result.decisions.patient_flags[i])}
                   for i, s in enumerate(result.scores)}})
  return report.write_report(out_dir, result, slice_set.images, slice_set.slice_index, lines,
                             voxels=peak_positions(result, slice_set),
                             crops=field_of_view(slice_set))


def field_of_view(slice_set: Any, margin: int = 2) -> dict[str, tuple[int, int, int, int]]:
  """Each subject's acquired field of view on the model grid, as (first row, end row, first
  column, end column) with `margin` pixels around it: what the figures show. Subjects without
  a NIfTI geometry are left out (shown whole)."""
  from u2ad_jax.data import slice_geometry  # pylint: disable=g-import-not-at-top

  out = {}
  for sid, geometry in (slice_set.geometries or {}).items():
    if geometry is None:
      continue
    inside = slice_geometry.model_inside(geometry)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0 or cols.size == 0:
      continue
    size = inside.shape[0]
    out[sid] = (max(0, int(rows.min()) - margin), min(size, int(rows.max()) + 1 + margin),
                max(0, int(cols.min()) - margin), min(size, int(cols.max()) + 1 + margin))
  return out

"""Segment and patient scores from per-slice anomaly maps (the same code for every ladder rung).

Per subject: find the vertebral levels (levels.py), turn each slice's postprocessed anomaly map
into a curve along the cord (curves.py), take the row-wise maximum over the subject's slices, and
score each segment C2-3 ... C7-T1 by the maximum of that curve over its rows. The patient score is
the maximum over segments (hence over slices), so a patient is flagged exactly when one of its
segments is.

Segment normalisation (`SEGMENT_NORMS`, config.evaluation.segment_norm):
- 'none': the segment score is the curve maximum (the anomaly map's own units).
- 'level_z': each segment score becomes a robust z against the cohort's patients AT THAT LEVEL,
  (score - median over patients) / (1.4826 MAD over patients) (the same robust scale as the
  threshold, thresholds.robust_location_scale). Normative modelling's answer to level-specific
  anatomy: a level whose normal residual is large for anatomical reasons (cord width, partial
  volume, CSF pulsation near C2-3) no longer wins every patient's maximum. It needs the cohort's
  own statistics (several patients; no labels), so it cannot score a lone later scan.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from u2ad_jax import labels as label_values
from u2ad_jax.evaluation import curves
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import thresholds

SEGMENT_NORMS = ("none", "level_z")


@dataclasses.dataclass(frozen=True)
class SubjectScores:
  """Scores of one subject.

  Attributes:
    subject_id: the participant id.
    positions: `[S_subj]` int, positions of the subject's slices in the cohort's slice arrays.
    levels: the subject's vertebral levels.
    slice_curves: `[S_subj, H]` per-slice anomaly curves.
    curve: `[H]` subject curve (row-wise max over slices).
    segment_scores: `[6]` max of the curve over each segment (C2-3 ... C7-T1); NaN = n/a.
    segment_peak_rows: `[6]` int, row of each segment's maximum.
    segment_peak_slices: `[6]` int, position (within the subject) of the slice holding that peak.
    patient_score: max over segments.
    peak_segment: index of the segment holding the patient score.
    reference: mean of the curve between C2 and T1 (the mean-error reference line).
    level_normalised: True when segment_scores (and so patient_score) are per-level robust z
      (normalise_levels); the curves stay in the anomaly map's units.
  """
  subject_id: str
  positions: np.ndarray
  levels: levels_lib.VertebralLevels
  slice_curves: np.ndarray
  curve: np.ndarray
  segment_scores: np.ndarray
  segment_peak_rows: np.ndarray
  segment_peak_slices: np.ndarray
  patient_score: float
  peak_segment: int
  reference: float
  level_normalised: bool = False

  @property
  def peak_slice(self) -> int:
    """Position, within the subject's slices, of the slice holding the patient score."""
    return int(self.segment_peak_slices[self.peak_segment])

  @property
  def peak_row(self) -> int:
    return int(self.segment_peak_rows[self.peak_segment])


def score_subject(subject_id: str, maps: np.ndarray, levels: levels_lib.VertebralLevels,
                  positions: np.ndarray | None = None, reduction: str = "sum",
                  window: int = 1) -> SubjectScores:
  """Scores of one subject from its postprocessed maps `[S_subj, H, W]` (>= 0); `reduction`
  and `window` (rows) shape the curve (curves.anomaly_curve)."""
  maps = np.asarray(maps, dtype=np.float64)
  slice_curves = curves.anomaly_curve(maps, reduction, window)
  curve = slice_curves.max(axis=0)
  seg_scores, peak_rows = curves.segment_maxima(curve, levels)
  peak_slices = np.argmax(slice_curves[:, peak_rows], axis=0).astype(np.int64)
  # n/a segments (NaN, outside the field of view) never hold the patient score.
  peak_segment = int(np.nanargmax(seg_scores))
  return SubjectScores(
      subject_id=subject_id,
      positions=np.arange(maps.shape[0]) if positions is None else np.asarray(positions),
      levels=levels,
      slice_curves=slice_curves,
      curve=curve,
      segment_scores=seg_scores,
      segment_peak_rows=peak_rows,
      segment_peak_slices=peak_slices,
      patient_score=float(seg_scores[peak_segment]),
      peak_segment=peak_segment,
      reference=curves.cord_reference(curve, levels),
  )


def subject_positions(subject_ids: Sequence[str]) -> dict[str, np.ndarray]:
  """Slice positions of each subject, subjects in first-appearance order."""
  out: dict[str, list[int]] = {}
  for i, sid in enumerate(subject_ids):
    out.setdefault(sid, []).append(i)
  return {sid: np.asarray(p, dtype=np.int64) for sid, p in out.items()}


def cohort_levels(label_slices: np.ndarray, score_roi: np.ndarray, subject_ids: Sequence[str],
                  sources: Mapping[str, str] | None = None,
                  vertebrae: np.ndarray | None = None
                  ) -> dict[str, levels_lib.VertebralLevels]:
  """Vertebral levels of every subject (raises LabelError naming the first bad subject's file).

  Args:
    label_slices: `[S, H, W]` label maps of the cohort's slices.
    score_roi: `[S, H, W]` bool scoring ROI (its area picks the midline slice).
    subject_ids: `S` subject ids.
    sources: subject id -> label file path, for error messages.
    vertebrae: `[S, H, W]` vertebra instance ids (levels by identity where non-zero) or None.
  """
  out = {}
  for sid, pos in subject_positions(subject_ids).items():
    out[sid] = levels_lib.find_levels(
        label_slices[pos], np.asarray(score_roi[pos]).sum(axis=(1, 2)),
        vertebrae=None if vertebrae is None else vertebrae[pos],
        source=None if sources is None else sources.get(sid), subject_id=sid)
  return out


def score_cohort(maps: np.ndarray, subject_ids: Sequence[str],
                 levels: Mapping[str, levels_lib.VertebralLevels],
                 reduction: str = "sum", window: int = 1) -> list[SubjectScores]:
  """Scores of every subject from the cohort's postprocessed maps `[S, H, W]`."""
  return [
      score_subject(sid, maps[pos], levels[sid], pos, reduction, window)
      for sid, pos in subject_positions(subject_ids).items()
  ]


def normalise_levels(scores: Sequence[SubjectScores], mode: str = "level_z"
                     ) -> list[SubjectScores]:
  """Segment scores as robust z per level across the cohort's patients (module docstring).

  Column j of the `[P, 6]` segment matrix becomes (x - median_j) / sigma_j over its finite
  entries (n/a segments stay NaN); a level where every patient scores the same (sigma 0) gives
  z = 0. The patient score and peak segment are recomputed from the z-scores; curves, peak rows
  and peak slices within each segment are unchanged. `mode` 'none' returns the scores as given.
  """
  if mode not in SEGMENT_NORMS:
    raise ValueError(f"unknown segment normalisation {mode!r}; expected one of {SEGMENT_NORMS}")
  scores = list(scores)
  if mode == "none" or not scores:
    return scores
  raw = segment_matrix(scores)
  z = np.full_like(raw, np.nan)
  for j in range(raw.shape[1]):
    finite = np.isfinite(raw[:, j])
    if not finite.any():
      continue
    med, sigma = thresholds.robust_location_scale(raw[finite, j])
    z[finite, j] = (raw[finite, j] - med) / (sigma if sigma > 0 else 1.0)
  out = []
  for s, row in zip(scores, z):
    peak = int(np.nanargmax(row))
    out.append(dataclasses.replace(s, segment_scores=row, patient_score=float(row[peak]),
                                   peak_segment=peak, level_normalised=True))
  return out


def segment_matrix(scores: Sequence[SubjectScores]) -> np.ndarray:
  """`[P, 6]` segment scores, patients in the order of `scores`."""
  return np.stack([s.segment_scores for s in scores]).reshape(-1, levels_lib.NUM_SEGMENTS)


def patient_vector(scores: Sequence[SubjectScores]) -> np.ndarray:
  """`[P]` patient scores."""
  return np.asarray([s.patient_score for s in scores], dtype=np.float64)


def segment_names() -> tuple[str, ...]:
  return label_values.SEGMENT_NAMES

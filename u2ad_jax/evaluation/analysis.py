"""From per-slice anomaly maps to decisions and metrics: the scoring code every rung shares.

`analyse` takes the cohort's slices and one anomaly map per slice (the model's AU, or the
intensity rung's relative intensity) and returns a `CohortResult`: postprocessed maps, vertebral
levels, curves, segment and patient scores, the unsupervised threshold and its decisions, and,
when truth is available, the metrics. Truth only enters the metrics, after the decisions.

Truth, in order of preference:
- patient: `has_lesion` of participants.tsv; else whether any loaded slice carries label 6.
- segment: the per-segment 0/1 columns (C2-3 ... C7-T1) of participants.tsv; else whether the
  lesion label overlaps the segment's rows (levels.segment_truth_from_labels). In a table with
  segment columns, `n/a` (or empty, or a missing column) makes THAT segment's truth unknown: it
  stays out of the segment metrics, and the patient's other segments keep the table's truth (the
  label maps are not consulted: a prepared cohort has no lesion label, so they would say 0).
  When the table is used, the metrics also report `segment_model_grid`: the same decisions
  against the label maps as scored (the model grid, loaded slices only). The two differ where a
  lesion reaches past a vertebral centroid by less than a model pixel, or only on slices that
  were not loaded.
- pixel: label 6 inside the scoring ROI.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from u2ad_jax import labels as label_values
from u2ad_jax import recon_quality
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import metric_registry
from u2ad_jax.evaluation import postprocess as postprocess_lib
from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import thresholds



@dataclasses.dataclass(frozen=True)
class Truth:
  """Reference labels; `source` says where from.

  Attributes:
    patient: `[P]` bool.
    segments: `[P, 6]` bool (False where unknown).
    source: e.g. "participants.tsv + label maps".
    segments_known: `[P, 6]` bool, False where the table says n/a (default: all known).
  """
  patient: np.ndarray
  segments: np.ndarray
  source: str
  segments_known: np.ndarray | None = None

  def __post_init__(self):
    if self.segments_known is None:
      object.__setattr__(self, "segments_known", np.ones(np.shape(self.segments), bool))

  def segment_cells(self, segment_scores: np.ndarray) -> np.ndarray:
    """`[P, 6]` bool: the (patient, segment) cells that count in segment metrics: scored (a
    finite score: both levels in view) and with known truth."""
    return np.isfinite(np.asarray(segment_scores, np.float64)) & self.segments_known


@dataclasses.dataclass
class CohortResult:
  """Everything one rung produces on one cohort (maps are `[S, H, W]`, S = cohort slices).

  Attributes:
    name: the rung / model name.
    subject_ids: `[P]` subjects, in the order of `scores`.
    anomaly: raw anomaly maps inside the scoring ROI.
    postprocessed: postprocessed anomaly maps (what the curves are built from).
    scores: per-subject scores.
    decisions: the unsupervised threshold and flags.
    truth: reference labels or None.
    metrics: nested dict of metrics (None without truth).
    eu, recon: epistemic-uncertainty and mean-reconstruction maps (None for the intensity rung).
    info: free-form provenance (model, checkpoint step, parameters) for sidecars and the report.
    warnings: one-line warnings about what cannot be trusted (`trust.py`; set by the driver).
  """
  name: str
  subject_ids: list[str]
  anomaly: np.ndarray
  postprocessed: np.ndarray
  scores: list[scoring.SubjectScores]
  decisions: thresholds.Decisions
  truth: Truth | None
  metrics: dict[str, Any] | None
  eu: np.ndarray | None = None
  recon: np.ndarray | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def patient_scores(self) -> np.ndarray:
    return scoring.patient_vector(self.scores)

  @property
  def segment_scores(self) -> np.ndarray:
    return scoring.segment_matrix(self.scores)


def cohort_truth(subject_ids: Sequence[str], labels: np.ndarray,
                 slice_subjects: Sequence[str],
                 levels: Mapping[str, levels_lib.VertebralLevels],
                 participants: Mapping[str, Mapping[str, Any]] | None) -> Truth | None:
  """Patient and segment truth (see the module docstring); None when nothing is known.

  Args:
    subject_ids: `[P]` subjects in result order.
    labels: `[S, H, W]` label maps of the cohort's slices.
    slice_subjects: `S` subject id per slice.
    levels: the subjects' vertebral levels.
    participants: participants.tsv rows by id ({} or None when absent).
  """
  participants = participants or {}
  positions = scoring.subject_positions(slice_subjects)
  patient = np.zeros(len(subject_ids), dtype=bool)
  segments = np.zeros((len(subject_ids), levels_lib.NUM_SEGMENTS), dtype=bool)
  known = np.ones_like(segments)
  sources = set()
  for i, sid in enumerate(subject_ids):
    row = participants.get(sid, {})
    subject_labels = labels[positions[sid]]
    if any(name in row for name in label_values.SEGMENT_NAMES):
      # Per segment: 0 / 1 from the table; n/a, empty or a missing column -> unknown.
      seg_values = [row.get(name) for name in label_values.SEGMENT_NAMES]
      known[i] = [v is not None for v in seg_values]
      segments[i] = [bool(v) for v in seg_values]
      if known[i].any():
        sources.add("participants.tsv")
    else:
      segments[i] = levels_lib.segment_truth_from_labels(subject_labels, levels[sid])
      sources.add("label maps")
    if row.get("has_lesion") is not None:
      patient[i] = bool(row["has_lesion"])
      sources.add("participants.tsv")
    else:
      # A lesion segment in the table makes a lesion patient even without has_lesion.
      patient[i] = bool((subject_labels == label_values.LESION).any() or segments[i].any())
      sources.add("label maps")
  has_lesion_label = bool((np.asarray(labels) == label_values.LESION).any())
  if "participants.tsv" not in sources and not has_lesion_label:
    # Neither a truth table nor a lesion label: nothing says which patients are ill, so the
    # cohort is unlabelled (not "all healthy").
    return None
  return Truth(patient=patient, segments=segments, source=" + ".join(sorted(sources)),
               segments_known=known)


def _nan_to_none(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, float) and math.isnan(obj):
    return None
  return obj


def pixel_metrics(maps: np.ndarray, labels: np.ndarray, score_roi: np.ndarray) -> dict[str, float]:
  """AUROC, AP and best Dice of a `[S, H, W]` map over the scoring-ROI pixels (truth = label 6)."""
  roi = np.asarray(score_roi, dtype=bool)
  scores = np.asarray(maps, dtype=np.float64)[roi]
  truth = (np.asarray(labels) == label_values.LESION)[roi]
  return metric_registry.level_metrics("pixel", scores, truth)


def reconstruction_ssim(images: np.ndarray, recon: np.ndarray, labels: np.ndarray,
                        score_roi: np.ndarray) -> dict[str, float]:
  """Quality of the mean reconstruction on NORMAL cord (scoring ROI minus the lesion label):
  SSIM, PSNR and correlation, means over the slices with normal cord
  (`recon_quality.normal_cord_quality`)."""
  quality = recon_quality.normal_cord_quality(images, recon, score_roi, labels)
  return {"ssim_normal_cord": quality["ssim"], "psnr_normal_cord": quality["psnr"],
          "corr_normal_cord": quality["corr"], "num_slices": quality["num_slices"]}


def compute_metrics(result_scores: Sequence[scoring.SubjectScores],
                    decisions: thresholds.Decisions, truth: Truth, *, anomaly: np.ndarray,
                    postprocessed: np.ndarray, images: np.ndarray, labels: np.ndarray,
                    score_roi: np.ndarray, recon: np.ndarray | None,
                    grid_truth: Truth | None = None) -> dict[str, Any]:
  """The metrics JSON content (NaN -> None so the JSON is standard).

  `grid_truth`: label-map truth on the model grid, reported as `segment_model_grid` (see the
  module docstring) when given.
  """
  patient_scores = scoring.patient_vector(result_scores)
  segment_scores = scoring.segment_matrix(result_scores)
  # n/a segments (outside the field of view, or truth n/a in the table) are not counted.
  scored = truth.segment_cells(segment_scores)
  out = {
      "patient": metric_registry.level_metrics("patient", patient_scores, truth.patient,
                                               decisions.patient_flags),
      "segment": metric_registry.level_metrics("segment", segment_scores[scored],
                                               truth.segments[scored],
                                               decisions.segment_flags[scored]),
      "pixel": pixel_metrics(anomaly, labels, score_roi),
      "pixel_postprocessed": pixel_metrics(postprocessed, labels, score_roi),
      "truth_source": truth.source,
  }
  if grid_truth is not None:
    on_grid = grid_truth.segment_cells(segment_scores)
    out["segment_model_grid"] = metric_registry.level_metrics(
        "segment", segment_scores[on_grid], grid_truth.segments[on_grid],
        decisions.segment_flags[on_grid])
  if recon is not None:
    out["reconstruction"] = reconstruction_ssim(images, recon, labels, score_roi)
  return _nan_to_none(out)


def analyse(name: str, *, images: np.ndarray, labels: np.ndarray, score_roi: np.ndarray,
            slice_subjects: Sequence[str], anomaly: np.ndarray,
            postprocess_params: postprocess_lib.PostprocessParams,
            rule: thresholds.ThresholdRule, reduction: str = "sum", curve_window: int = 1,
            segment_norm: str = "none",
            participants: Mapping[str, Mapping[str, Any]] | None = None,
            levels: Mapping[str, levels_lib.VertebralLevels] | None = None,
            label_sources: Mapping[str, str] | None = None,
            eu: np.ndarray | None = None, recon: np.ndarray | None = None,
            info: dict[str, Any] | None = None) -> CohortResult:
  """Scores, decisions and (with truth) metrics of one rung on one cohort.

  Args:
    name: rung / model name.
    images, labels, score_roi: `[S, H, W]` cohort slices (float32 in [0, 1], uint8, bool).
    slice_subjects: `S` subject id per slice.
    anomaly: `[S, H, W]` anomaly maps (restricted to the scoring ROI here).
    postprocess_params, rule, reduction, curve_window: postprocessing, threshold rule, curve
      reduction across the width and window along the cord (rows, odd).
    segment_norm: 'none' or 'level_z' (segment scores as robust z per level across the
      cohort's patients, before the threshold and the patient maximum; scoring.py).
    participants: participants.tsv rows (truth) or None.
    levels: precomputed vertebral levels (computed here when None).
    label_sources: subject id -> label file, named in level errors.
    eu, recon: optional `[S, H, W]` maps kept for outputs and the SSIM.
    info: provenance.
  """
  anomaly = postprocess_lib.restrict_to_roi(anomaly, score_roi)
  if levels is None:
    levels = scoring.cohort_levels(labels, score_roi, slice_subjects, label_sources)
  processed = postprocess_lib.postprocess(anomaly, score_roi, postprocess_params)
  subject_scores = scoring.score_cohort(processed, slice_subjects, levels, reduction,
                                        curve_window)
  subject_scores = scoring.normalise_levels(subject_scores, segment_norm)
  subject_ids = [s.subject_id for s in subject_scores]
  decisions = thresholds.decide(scoring.patient_vector(subject_scores),
                                scoring.segment_matrix(subject_scores), rule)
  truth = cohort_truth(subject_ids, labels, slice_subjects, levels, participants)
  result_metrics = None
  if truth is not None:
    grid_truth = None
    if "participants.tsv" in truth.source:
      grid_truth = cohort_truth(subject_ids, labels, slice_subjects, levels, None)
    result_metrics = compute_metrics(subject_scores, decisions, truth, anomaly=anomaly,
                                     postprocessed=processed, images=images, labels=labels,
                                     score_roi=score_roi, recon=recon, grid_truth=grid_truth)
  return CohortResult(name=name, subject_ids=subject_ids, anomaly=anomaly, postprocessed=processed,
                      scores=subject_scores, decisions=decisions, truth=truth,
                      metrics=result_metrics, eu=eu, recon=recon, info=dict(info or {}))

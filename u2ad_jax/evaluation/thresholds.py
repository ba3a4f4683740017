"""The unsupervised decision threshold (no labels: deployment has none).

Rule 'mad' (default): t = median(x) + k * sigma, with the robust scale sigma = 1.4826 * MAD(x)
(MAD = median absolute deviation from the median; 1.4826 makes it the standard deviation of a
normal distribution). x is the pool of scores the threshold is learnt from:
- pool 'segments' (default): every (patient, segment) score of the cohort. Lesions occupy a few
  of the six segments of some patients, so this pool is dominated by normal segments even in a
  cohort where half of the patients are ill, which is what a robust outlier rule needs.
- pool 'patients': the patient scores (suitable when most patients are expected to be normal).
A segment is flagged when its score exceeds t and a patient when its score (the max over its
segments) exceeds t, so a patient is flagged exactly when at least one of its segments is.

When more than half of the pool is tied (e.g. many segments scoring exactly 0 after
postprocessing), the MAD is 0; sigma then falls back to 1.2533 * mean absolute deviation from the
median (the same normal-consistent scale from the first absolute moment), and to 0 when every
score is equal (nothing exceeds the median then). Such a degenerate threshold is reported with a
warning (`trust.py`) and `load_recorded` refuses to reuse it: applied to a later scan it would
flag every score above that one value.

The threshold depends only on the scores; the truth never enters (a test permutes the labels).

A recorded threshold (`u2ad evaluate --threshold-from EVAL_DIR`, `RecordedThreshold`): a scan that
arrives after its cohort was evaluated has no cohort statistics of its own (one patient's six
segment scores give no robust median and sigma), so the threshold the earlier evaluation chose is
applied unchanged. It is read from that evaluation's `summary.json` (always written by `u2ad
evaluate`), which must come from the same checkpoint (workdir and step) with the same scoring
settings (anomaly map, curve, MC samples, postprocessing): a threshold is a number on one model's
score scale and means nothing on another's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from u2ad_jax import errors
from u2ad_jax.train import workdir as workdir_lib

RULES = ("mad",)
POOLS = ("segments", "patients")
MAD_TO_SIGMA = 1.4826
MEAN_AD_TO_SIGMA = 1.2533


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
  """How the threshold is chosen. `k`: robust standard deviations above the median."""
  name: str = "mad"
  k: float = 3.0
  pool: str = "segments"

  def __post_init__(self):
    if self.name not in RULES:
      raise ValueError(f"unknown threshold rule {self.name!r}; expected one of {RULES}")
    if self.pool not in POOLS:
      raise ValueError(f"unknown threshold pool {self.pool!r}; expected one of {POOLS}")

  def describe(self) -> str:
    return (f"median + {self.k:g} x robust sigma (1.4826 MAD) of the cohort's "
            f"{'(patient, segment)' if self.pool == 'segments' else 'patient'} scores; "
            f"a score above it is flagged; no labels are used")


@dataclasses.dataclass(frozen=True)
class RecordedThreshold(ThresholdRule):
  """A threshold chosen by an earlier evaluation, applied as is (see the module docstring).

  Attributes (besides the original rule's name / k / pool): value, the original median and
  sigma (reported, not used), source (the earlier evaluation's directory), and what the
  threshold was computed on there (for warnings, `trust.threshold_warnings`): num_patients (0:
  not recorded), cohort_kind and roi ("" when not recorded).
  """
  value: float = 0.0
  median: float = 0.0
  sigma: float = 0.0
  source: str = ""
  num_patients: int = 0
  cohort_kind: str = ""
  roi: str = ""

  def describe(self) -> str:
    return (f"threshold recorded by the earlier evaluation {self.source} (there: "
            f"{super().describe()}), applied unchanged; not recomputed from this cohort")


# Provenance entries of summary.json that must match for a recorded threshold to apply.
COMPATIBILITY_KEYS = ("checkpoint_step", "num_samples", "anomaly_map", "curve", "postprocess",
                      "segment_scores")
# What an evaluation that predates an entry recorded implicitly.
LEGACY_PROVENANCE = {"segment_scores": "max of the curve over the segment's rows"}


def load_recorded(eval_dir: str | os.PathLike, provenance: Mapping[str, Any]) -> RecordedThreshold:
  """Reads the threshold an earlier `u2ad evaluate` recorded in `eval_dir/summary.json`.

  Args:
    eval_dir: that evaluation's --out directory.
    provenance: this evaluation's provenance (the model rung's: model.workdir, checkpoint_step,
      num_samples, anomaly_map, curve, postprocess).

  Raises:
    InputError / CorruptFileError naming the file: no summary.json, not a u2ad evaluation, or
    a different checkpoint or scoring configuration.
  """
  eval_dir = os.fspath(eval_dir)
  path = os.path.join(eval_dir, "summary.json")
  if not os.path.isfile(path):
    raise errors.InputError(path, "not a u2ad evaluation directory (no summary.json)")
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    threshold = summary["threshold"]
    value = float(threshold["value"])
    model = summary["model"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.CorruptFileError(path, f"not a u2ad evaluation summary ({type(e).__name__}: "
                                        f"{e})") from e
  if not np.isfinite(value):
    raise errors.CorruptFileError(path, f"recorded threshold {value} is not finite")
  if threshold.get("sigma") == 0.0 and "recorded_by" not in threshold:
    # Every pooled score was equal there: the value is that score, and any later scan scoring
    # above it would be flagged, whatever its size.
    raise errors.InputError(path, f"the recorded threshold is degenerate (every pooled score "
                                  f"was {value:.4g}, robust sigma 0) and would flag any higher "
                                  f"score; record one on a cohort whose scores vary")
  if not isinstance(model, dict) or not model.get("workdir"):
    raise errors.InputError(path, "not an evaluation of a trained checkpoint (no model workdir; "
                                  "the intensity rung?)")
  theirs, ours = str(model["workdir"]), str(provenance["model"]["workdir"])
  # URIs compared as given, local paths by their real path (os.path would mangle gs://...).
  if not workdir_lib.same(theirs, ours):
    raise errors.InputError(path, f"threshold recorded for the model in {theirs}, not {ours}")
  for key in COMPATIBILITY_KEYS:
    if key in summary or key in provenance:
      recorded = summary.get(key, LEGACY_PROVENANCE.get(key))
      if recorded != _plain(provenance.get(key)):
        raise errors.InputError(path, f"recorded with {key} = {recorded!r}, this "
                                      f"evaluation uses {_plain(provenance.get(key))!r}; "
                                      f"the threshold does not apply")
  try:
    return RecordedThreshold(name=str(threshold.get("rule", "mad")),
                             k=float(threshold.get("k", 0.0)),
                             pool=str(threshold.get("pool", "segments")), value=value,
                             median=float(threshold.get("median", float("nan"))),
                             sigma=float(threshold.get("sigma", float("nan"))),
                             source=os.path.abspath(eval_dir),
                             num_patients=int(threshold.get("num_patients", 0)),
                             cohort_kind=str(summary.get("cohort_kind", "")),
                             roi=str(summary.get("roi", "")))
  except (ValueError, TypeError) as e:
    raise errors.CorruptFileError(path, f"threshold entry does not parse ({e})") from e


def _plain(value: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists, NumPy scalars numbers)."""
  return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


@dataclasses.dataclass(frozen=True)
class Decisions:
  """The threshold and the flags it gives. patient_flags `[P]`, segment_flags `[P, 6]` bool."""
  threshold: float
  median: float
  sigma: float
  patient_flags: np.ndarray
  segment_flags: np.ndarray
  rule: ThresholdRule


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
  """(median, robust sigma) of a 1-D sample (see the module docstring for the fallbacks)."""
  values = np.asarray(values, dtype=np.float64).ravel()
  if values.size == 0:
    raise ValueError("cannot choose a threshold from an empty set of scores")
  med = float(np.median(values))
  dev = np.abs(values - med)
  sigma = MAD_TO_SIGMA * float(np.median(dev))
  if sigma == 0.0:
    sigma = MEAN_AD_TO_SIGMA * float(np.mean(dev))
  return med, sigma


def robust_threshold(values: np.ndarray, k: float) -> float:
  """median + k * robust sigma of `values`."""
  med, sigma = robust_location_scale(values)
  return med + k * sigma


def decide(patient_scores: np.ndarray, segment_scores: np.ndarray,
           rule: ThresholdRule = ThresholdRule()) -> Decisions:
  """Threshold and flags from `[P]` patient and `[P, 6]` segment scores (no labels); NaN
  (n/a) segment scores stay out of the pool and are never flagged."""
  patient_scores = np.asarray(patient_scores, dtype=np.float64)
  segment_scores = np.asarray(segment_scores, dtype=np.float64)
  if isinstance(rule, RecordedThreshold):
    med, sigma, threshold = rule.median, rule.sigma, rule.value
  else:
    pool = segment_scores if rule.pool == "segments" else patient_scores
    med, sigma = robust_location_scale(pool[np.isfinite(pool)])  # n/a segments are NaN
    threshold = med + rule.k * sigma
  return Decisions(
      threshold=float(threshold),
      median=med,
      sigma=sigma,
      patient_flags=patient_scores > threshold,
      segment_flags=segment_scores > threshold,
      rule=rule,
  )

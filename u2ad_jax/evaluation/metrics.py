"""Detection metrics (pure NumPy, no labels leave this module); reconstruction quality (SSIM,
PSNR, correlation) is `u2ad_jax.recon_quality`.

Conventions:
- `scores` are real-valued, higher = more anomalous; `truth` is boolean (True = positive).
- A ratio whose denominator is zero is undefined and returned as NaN (recall without positives,
  specificity without negatives, AUROC / AP with a single class), except precision with no
  predicted positive, which is 0 (scikit-learn's `zero_division=0`), so a detector that flags
  nothing scores precision 0 and F1 0 rather than "undefined".
- AUROC is the Mann-Whitney statistic with average ranks, so tied scores count one half.
- AP is the step-wise sum `sum_n (R_n - R_{n-1}) P_n` over distinct score thresholds, the same
  definition as `sklearn.metrics.average_precision_score` (no interpolation).
- Dice is maximised exactly over every distinct threshold, not over a coarse grid.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def _as_pair(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, dtype=np.float64).ravel()
  truth = np.asarray(truth).astype(bool).ravel()
  if scores.shape != truth.shape:
    raise ValueError(f"scores {scores.shape} and truth {truth.shape} differ in size")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or Inf")
  return scores, truth


def _ratio(num: float, den: float) -> float:
  return float(num) / float(den) if den else math.nan


def confusion(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
  """Counts of a binary decision. `pred`, `truth`: same shape, bool. Returns tp, fp, tn, fn."""
  pred = np.asarray(pred).astype(bool).ravel()
  truth = np.asarray(truth).astype(bool).ravel()
  if pred.shape != truth.shape:
    raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in size")
  return {
      "tp": int(np.sum(pred & truth)),
      "fp": int(np.sum(pred & ~truth)),
      "tn": int(np.sum(~pred & ~truth)),
      "fn": int(np.sum(~pred & truth)),
  }


def binary_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Precision, recall (sensitivity), specificity, F1 and accuracy of a decision, plus counts."""
  c = confusion(pred, truth)
  tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = _ratio(tp, tp + fn)
  out = {
      "precision": float(precision),
      "recall": recall,
      "specificity": _ratio(tn, tn + fp),
      # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall whenever both
      # are defined, and stays defined (0) when nothing is flagged but positives exist.
      "f1": _ratio(2 * tp, 2 * tp + fp + fn),
      "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
  }
  out.update({k: float(v) for k, v in c.items()})
  return out


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
  """Area under the ROC curve by average ranks (ties count 1/2); NaN with a single class."""
  scores, truth = _as_pair(scores, truth)
  num_pos = int(truth.sum())
  num_neg = truth.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return math.nan
  ranks = stats.rankdata(scores, method="average")
  rank_sum = float(ranks[truth].sum())
  return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def _threshold_groups(scores: np.ndarray, truth: np.ndarray):
  """Cumulative counts at each distinct threshold, from the highest score down.

  Returns (thresholds [T] descending, tp [T], predicted_positive [T]) where entry t counts the
  examples with score >= thresholds[t].
  """
  order = np.argsort(-scores, kind="stable")
  sorted_scores = scores[order]
  cum_tp = np.cumsum(truth[order])
  # The last index of each run of equal scores: ties enter together.
  last_of_group = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
  return sorted_scores[last_of_group], cum_tp[last_of_group], last_of_group + 1


def roc_curve(scores: np.ndarray,
              truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr [T+1], tpr [T+1], thresholds [T+1]) starting at (0, 0) with threshold +inf."""
  scores, truth = _as_pair(scores, truth)
  num_pos = int(truth.sum())
  num_neg = truth.size - num_pos
  thresholds, tp, predicted = _threshold_groups(scores, truth)
  fp = predicted - tp
  tpr = np.r_[0.0, tp / num_pos] if num_pos else np.full(thresholds.size + 1, np.nan)
  fpr = np.r_[0.0, fp / num_neg] if num_neg else np.full(thresholds.size + 1, np.nan)
  return fpr, tpr, np.r_[np.inf, thresholds]


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
  """Step-wise average precision (scikit-learn's definition); NaN without positives."""
  scores, truth = _as_pair(scores, truth)
  num_pos = int(truth.sum())
  if num_pos == 0:
    return math.nan
  _, tp, predicted = _threshold_groups(scores, truth)
  precision = tp / predicted
  recall = tp / num_pos
  recall_step = np.diff(np.r_[0.0, recall])
  return float(np.sum(recall_step * precision))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
  """2|A & B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty (perfect agreement)."""
  pred = np.asarray(pred).astype(bool)
  truth = np.asarray(truth).astype(bool)
  denom = int(pred.sum()) + int(truth.sum())
  if denom == 0:
    return 1.0
  return 2.0 * int(np.sum(pred & truth)) / denom


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
  """Best Dice of `scores >= t` over every distinct threshold t. Returns (dice, t).

  NaN (and t = NaN) without positives: the best threshold would be "flag nothing", which says
  nothing about localisation.
  """
  scores, truth = _as_pair(scores, truth)
  num_pos = int(truth.sum())
  if num_pos == 0:
    return math.nan, math.nan
  thresholds, tp, predicted = _threshold_groups(scores, truth)
  dices = 2.0 * tp / (predicted + num_pos)
  best = int(np.argmax(dices))
  return float(dices[best]), float(thresholds[best])


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Threshold-free metrics of a score: AUROC and AP, plus the class counts."""
  scores, truth = _as_pair(scores, truth)
  return {
      "auroc": roc_auc(scores, truth),
      "ap": average_precision(scores, truth),
      "num_positive": float(truth.sum()),
      "num_negative": float(truth.size - truth.sum()),
  }

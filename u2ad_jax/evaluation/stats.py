"""Results with their uncertainty: hierarchical bootstrap over cohorts and patients (pure NumPy).

One cohort's detection numbers rest on a few dozen patients and a dozen lesions, and the ranking
of the learned rungs moves from cohort to cohort; a number without its interval invites choosing
on noise. This module turns per-patient results of several cohorts into, per metric, the mean
over cohorts and a 95 % percentile-bootstrap interval, and the same for paired differences
between rungs.

Resampling (two levels, as the data were produced): draw C cohorts with replacement from the C
cohorts (skipped when C = 1), then, within each drawn cohort, its P patients with replacement;
the metric is computed per drawn cohort and averaged. The interval is the 2.5 / 97.5 percentiles
of the replicates.
- Paired differences use the SAME drawn cohorts and patients for both rungs (the rungs score the
  same patients), so shared patient difficulty cancels; that is why a difference can be certain
  when each rung's own interval is wide.
- Decisions (flags) are kept as made on the whole cohort: the unsupervised threshold is part of
  the detector as evaluated, not re-fitted per replicate. Resampling keeps each patient's six
  segments together (segments of one patient are not independent).
- A replicate cohort whose metric is undefined (e.g. AUROC of a resample without a lesion
  patient) is left out of that replicate's mean; a replicate with no defined cohort is dropped.

Per-patient inputs are `PatientTable`s; every function here is deterministic given its seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from u2ad_jax.evaluation import metrics as metrics_lib

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class PatientTable:
  """Per-patient results of one rung on one cohort (P patients, 6 segments).

  Attributes:
    patient_scores, patient_flags, patient_truth: `[P]` float / bool / bool.
    segment_scores, segment_flags, segment_truth: `[P, 6]`.
    ssim_sum, ssim_count: `[P]` sum and number of per-slice normal-cord SSIM values (zeros for a
      rung without reconstructions), so the cohort SSIM is the mean over slices as in the metrics.
    segment_known: `[P, 6]` bool, False where the segment's truth is n/a (default: all known).
      Segment metrics count the cells with a finite score (both levels in view) and known truth,
      as the evaluator's do; the others stay out of F1 and AUROC.
  """
  patient_scores: np.ndarray
  patient_flags: np.ndarray
  patient_truth: np.ndarray
  segment_scores: np.ndarray
  segment_flags: np.ndarray
  segment_truth: np.ndarray
  ssim_sum: np.ndarray
  ssim_count: np.ndarray
  segment_known: np.ndarray | None = None

  def __post_init__(self):
    if self.segment_known is None:
      object.__setattr__(self, "segment_known", np.ones(np.shape(self.segment_truth), bool))

  def segment_cells(self, index: np.ndarray) -> np.ndarray:
    """`[n, 6]` bool of the patients `index`: the segment cells that count (see above)."""
    scores = np.asarray(self.segment_scores, np.float64)[index]
    return np.isfinite(scores) & np.asarray(self.segment_known, bool)[index]

  def __len__(self) -> int:
    return int(np.asarray(self.patient_scores).shape[0])

  def to_json(self) -> dict[str, Any]:
    return {f.name: np.asarray(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "PatientTable":
    kinds = dict(patient_flags=bool, patient_truth=bool, segment_flags=bool, segment_truth=bool,
                 segment_known=bool)
    # Tables written before `segment_known` existed knew every segment's truth; NaN scores
    # (out-of-view segments) come back from JSON's null.
    return cls(**{f.name: np.asarray(_nan_for_none(data[f.name]),
                                     dtype=kinds.get(f.name, np.float64))
                  for f in dataclasses.fields(cls) if data.get(f.name) is not None})


def _nan_for_none(value: Any) -> Any:
  """JSON null (how an undefined score is written) -> NaN, in nested lists."""
  if value is None:
    return math.nan
  if isinstance(value, list):
    return [_nan_for_none(v) for v in value]
  return value


# ----------------------------------------------------------------------------- metrics


def _f1(flags: np.ndarray, truth: np.ndarray) -> float:
  return metrics_lib.binary_metrics(flags, truth)["f1"]


def _auroc(scores: np.ndarray, truth: np.ndarray) -> float:
  return metrics_lib.roc_auc(scores, truth)


def _ssim(table: PatientTable, index: np.ndarray) -> float:
  count = float(table.ssim_count[index].sum())
  return float(table.ssim_sum[index].sum()) / count if count else math.nan


# name -> (title, metric(table, patient index) -> float). Same definitions as the evaluator's.
METRICS: dict[str, tuple[str, Callable[[PatientTable, np.ndarray], float]]] = {
    "patient_f1": ("patient F1", lambda t, i: _f1(t.patient_flags[i], t.patient_truth[i])),
    "patient_auroc": ("patient AUROC", lambda t, i: _auroc(t.patient_scores[i], t.patient_truth[i])),
    "segment_f1": ("segment F1", lambda t, i: _f1(t.segment_flags[i][t.segment_cells(i)],
                                                  t.segment_truth[i][t.segment_cells(i)])),
    "segment_auroc": ("segment AUROC", lambda t, i: _auroc(t.segment_scores[i][t.segment_cells(i)],
                                                        t.segment_truth[i][t.segment_cells(i)])),
    "ssim_normal_cord": ("SSIM normal cord", _ssim),
}


# ----------------------------------------------------------------------------- bootstrap


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
  """Central `level` percentile interval of the finite samples (linear interpolation); NaNs when
  none is finite."""
  values = np.asarray(samples, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return math.nan, math.nan
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(values, (tail, 100.0 - tail))
  return float(lo), float(hi)


def draw_indices(sizes: Sequence[int], num_resamples: int, seed: int
                 ) -> list[list[tuple[int, np.ndarray]]]:
  """The resampling plan: per replicate, a list of (cohort, patient indices) draws.

  Cohorts are drawn with replacement when there are several; patients with replacement within
  each drawn cohort. One plan serves every rung and metric (paired comparisons).
  """
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2718]))
  num_cohorts = len(sizes)
  plan = []
  for _ in range(int(num_resamples)):
    cohorts = rng.integers(num_cohorts, size=num_cohorts) if num_cohorts > 1 else np.zeros(1, int)
    plan.append([(int(c), rng.integers(sizes[c], size=sizes[c])) for c in cohorts])
  return plan


def bootstrap(statistic: Callable[[int, np.ndarray], float], sizes: Sequence[int],
              plan: Sequence[Sequence[tuple[int, np.ndarray]]]) -> tuple[float, np.ndarray, list[float]]:
  """Point estimate, bootstrap replicates and per-cohort values of a cohort-level statistic.

  Args:
    statistic: (cohort index, patient indices) -> value (NaN when undefined).
    sizes: patients per cohort.
    plan: `draw_indices`' output.

  Returns:
    (mean over cohorts of the full-cohort values (NaNs ignored), `[B]` replicates (NaN when no
    drawn cohort is defined), per-cohort full values).
  """
  per_cohort = [float(statistic(c, np.arange(n))) for c, n in enumerate(sizes)]
  finite = [v for v in per_cohort if math.isfinite(v)]
  point = float(np.mean(finite)) if finite else math.nan
  replicates = np.full(len(plan), math.nan)
  for b, draws in enumerate(plan):
    values = [float(statistic(c, idx)) for c, idx in draws]
    values = [v for v in values if math.isfinite(v)]
    if values:
      replicates[b] = float(np.mean(values))
  return point, replicates, per_cohort


def summarize(tables: Mapping[str, Sequence[PatientTable]], *,
              pairs: Sequence[tuple[str, str]] = (("eu_au", "baseline"), ("eu_au", "intensity")),
              metric_names: Sequence[str] | None = None, num_resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any]:
  """Per rung and metric: mean, interval, per-cohort values; the same for paired differences.

  Args:
    tables: rung -> one PatientTable per cohort (same cohorts, same order, for every rung).
    pairs: (a, b) differences a - b to report (skipped when a rung is missing).
    metric_names: subset of METRICS (default all).
    num_resamples, level, seed: bootstrap settings.

  Returns:
    {"rungs": {rung: {metric: {mean, lo, hi, per_cohort}}}, "differences": {"a - b": {metric:
    ...}}, "num_cohorts", "patients_per_cohort", "num_resamples", "level", "seed"}.
  """
  metric_names = list(metric_names or METRICS)
  rungs = list(tables)
  if not rungs:
    raise ValueError("no rung to summarise")
  sizes = [len(t) for t in tables[rungs[0]]]
  for rung in rungs:
    if [len(t) for t in tables[rung]] != sizes:
      raise ValueError(f"rung {rung!r} has cohorts of other sizes than {rungs[0]!r}")
  plan = draw_indices(sizes, num_resamples, seed)

  def entry(point, replicates, per_cohort):
    lo, hi = percentile_interval(replicates, level)
    return {"mean": point, "lo": lo, "hi": hi, "per_cohort": per_cohort,
            "num_replicates": int(np.isfinite(replicates).sum())}

  out_rungs: dict[str, Any] = {}
  for rung in rungs:
    out_rungs[rung] = {}
    for name in metric_names:
      fn = METRICS[name][1]
      if name == "ssim_normal_cord" and not any(float(t.ssim_count.sum()) for t in tables[rung]):
        continue  # no reconstruction (the intensity rung)
      out_rungs[rung][name] = entry(*bootstrap(lambda c, i, r=rung, f=fn: f(tables[r][c], i),
                                               sizes, plan))
  out_diffs: dict[str, Any] = {}
  for a, b in pairs:
    if a not in tables or b not in tables:
      continue
    key = f"{a} - {b}"
    out_diffs[key] = {}
    for name in metric_names:
      if name not in out_rungs[a] or name not in out_rungs[b]:
        continue
      fn = METRICS[name][1]
      out_diffs[key][name] = entry(*bootstrap(
          lambda c, i, f=fn: f(tables[a][c], i) - f(tables[b][c], i), sizes, plan))
  return {"rungs": out_rungs, "differences": out_diffs, "num_cohorts": len(sizes),
          "patients_per_cohort": sizes, "num_resamples": int(num_resamples), "level": float(level),
          "seed": int(seed)}


# ----------------------------------------------------------------------------- cohort-level metrics

# name -> (title, key in an evaluation's metrics.json "pixel" section). A pixel metric pools the
# pixels of a whole cohort (AP and the best Dice are not means over patients), so it exists once
# per cohort and its interval resamples cohorts only (`summarize_cohort_values`).
PIXEL_METRICS: dict[str, tuple[str, str]] = {
    "pixel_ap": ("pixel AP", "ap"),
    "pixel_best_dice": ("pixel best Dice", "best_dice"),
}


def summarize_cohort_values(values: Mapping[str, Mapping[str, Sequence[float]]], *,
                            pairs: Sequence[tuple[str, str]] = (),
                            num_resamples: int = DEFAULT_RESAMPLES,
                            level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any]:
  """Per rung and metric, from one value per cohort: mean over cohorts and a percentile interval
  from resampling the cohorts with replacement (the same draws for every rung, so differences
  are paired). One cohort gives the value without an interval (NaN bounds); NaN values (metric
  undefined on that cohort) are left out of the means.

  Args:
    values: rung -> metric -> `[C]` per-cohort values (same cohorts, same order, every rung).
    pairs: (a, b) differences a - b (skipped when a rung is missing).

  Returns:
    {"rungs": {rung: {metric: {mean, lo, hi, per_cohort, num_replicates}}}, "differences":
    {"a - b": {metric: ...}}} in `summarize`'s entry format.
  """
  rungs = list(values)
  counts = {len(v) for by_metric in values.values() for v in by_metric.values()}
  if len(counts) > 1:
    raise ValueError(f"rungs have values for different numbers of cohorts: {sorted(counts)}")
  num_cohorts = counts.pop() if counts else 0
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3141]))
  draws = rng.integers(num_cohorts, size=(int(num_resamples), num_cohorts)) if num_cohorts else None

  def entry(per_cohort: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(per_cohort, np.float64)
    finite = v[np.isfinite(v)]
    point = float(finite.mean()) if finite.size else math.nan
    replicates = np.full(int(num_resamples), math.nan)
    if num_cohorts > 1:
      drawn = v[draws]
      defined = np.isfinite(drawn).any(axis=1)
      replicates[defined] = np.nanmean(drawn[defined], axis=1)
    lo, hi = percentile_interval(replicates, level)
    return {"mean": point, "lo": lo, "hi": hi, "per_cohort": [float(x) for x in v],
            "num_replicates": int(np.isfinite(replicates).sum())}

  out_rungs = {rung: {name: entry(v) for name, v in values[rung].items()} for rung in rungs}
  out_diffs: dict[str, Any] = {}
  for a, b in pairs:
    if a not in values or b not in values:
      continue
    shared = [n for n in values[a] if n in values[b]]
    out_diffs[f"{a} - {b}"] = {
        n: entry(np.asarray(values[a][n], np.float64) - np.asarray(values[b][n], np.float64))
        for n in shared}
  return {"rungs": out_rungs, "differences": out_diffs}

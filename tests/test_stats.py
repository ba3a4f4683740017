"""The study statistics against hand-computed cases (u2ad_jax/evaluation/stats.py)."""

import math

import numpy as np
import pytest

from u2ad_jax.evaluation import stats


def _table(scores, flags, truth, seg_flags=None, seg_truth=None, ssim=None):
  p = len(scores)
  seg_flags = np.zeros((p, 6), bool) if seg_flags is None else np.asarray(seg_flags, bool)
  seg_truth = np.zeros((p, 6), bool) if seg_truth is None else np.asarray(seg_truth, bool)
  ssim = np.zeros(p) if ssim is None else np.asarray(ssim, float)
  return stats.PatientTable(
      patient_scores=np.asarray(scores, float), patient_flags=np.asarray(flags, bool),
      patient_truth=np.asarray(truth, bool), segment_scores=seg_flags.astype(float),
      segment_flags=seg_flags, segment_truth=seg_truth, ssim_sum=ssim,
      ssim_count=np.ones(p) if ssim.any() else np.zeros(p))


def test_percentile_interval_of_a_known_sample():
  assert stats.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
  assert stats.percentile_interval(np.array([np.nan, 1.0, np.nan]), 0.9) == (1.0, 1.0)
  assert all(math.isnan(v) for v in stats.percentile_interval(np.array([np.nan])))


def test_two_patient_bootstrap_has_the_binomial_distribution():
  # One cohort, values 0 and 1, statistic = mean: a replicate is 0, 0.5 or 1 with probability
  # 1/4, 1/2, 1/4; the 95 % interval is (0, 1) and the point estimate 0.5.
  values = np.array([0.0, 1.0])
  plan = stats.draw_indices([2], 4000, seed=3)
  point, reps, per_cohort = stats.bootstrap(lambda c, i: values[i].mean(), [2], plan)
  assert point == 0.5 and per_cohort == [0.5]
  freq = [np.mean(reps == v) for v in (0.0, 0.5, 1.0)]
  np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.03)
  assert stats.percentile_interval(reps) == (0.0, 1.0)


def test_bootstrap_standard_error_of_a_mean():
  # The bootstrap sd of a sample mean is the plug-in standard error sd_pop / sqrt(n).
  values = np.random.default_rng(0).normal(size=40)
  plan = stats.draw_indices([40], 3000, seed=1)
  _, reps, _ = stats.bootstrap(lambda c, i: values[i].mean(), [40], plan)
  assert reps.std() == pytest.approx(values.std() / np.sqrt(40), rel=0.06)


def test_over_cohorts_with_constant_patients():
  # Cohort values 0.2 and 0.6 (every patient alike): replicates are means of two cohorts drawn
  # with replacement, 0.2 / 0.4 / 0.6 with probability 1/4 / 1/2 / 1/4.
  values = [np.full(3, 0.2), np.full(5, 0.6)]
  plan = stats.draw_indices([3, 5], 4000, seed=2)
  point, reps, per_cohort = stats.bootstrap(lambda c, i: values[c][i].mean(), [3, 5], plan)
  assert point == pytest.approx(0.4) and per_cohort == pytest.approx([0.2, 0.6])
  np.testing.assert_allclose([np.mean(np.isclose(reps, v)) for v in (0.2, 0.4, 0.6)],
                             [0.25, 0.5, 0.25], atol=0.03)
  assert stats.percentile_interval(reps) == pytest.approx((0.2, 0.6))


def test_undefined_cohorts_are_left_out():
  plan = [[(0, np.array([0, 0])), (1, np.array([0, 1]))], [(0, np.array([0, 0]))] * 2]
  values = [np.array([np.nan, np.nan]), np.array([1.0, 3.0])]
  point, reps, _ = stats.bootstrap(lambda c, i: values[c][i].mean(), [2, 2], plan)
  assert point == 2.0
  assert reps[0] == 2.0 and math.isnan(reps[1])


def test_metrics_on_hand_cases():
  # Patient F1: flags [1, 1, 0, 0] vs truth [1, 0, 1, 0] -> TP 1, FP 1, FN 1 -> F1 = 2/4.
  # AUROC of scores [4, 3, 2, 1] with truth [1, 0, 1, 0]: pairs (4>3, 4>1, 2<3, 2>1) -> 3/4.
  table = _table([4, 3, 2, 1], [1, 1, 0, 0], [1, 0, 1, 0], ssim=[0.2, 0.4, 0.6, 0.8])
  full = np.arange(4)
  assert stats.METRICS["patient_f1"][1](table, full) == 0.5
  assert stats.METRICS["patient_auroc"][1](table, full) == 0.75
  assert stats.METRICS["ssim_normal_cord"][1](table, full) == pytest.approx(0.5)
  # Resampled patients count as often as drawn: [0, 0, 3] -> SSIM (0.2 + 0.2 + 0.8) / 3.
  assert stats.METRICS["ssim_normal_cord"][1](table, np.array([0, 0, 3])) == pytest.approx(0.4)
  # Segments: the six segments of a patient move together.
  seg_truth = np.zeros((2, 6), bool)
  seg_truth[0, 2] = True
  seg_flags = seg_truth.copy()
  seg_flags[1, 0] = True  # one false positive -> F1 = 2 / (2 + 1)
  table = _table([1, 0], [1, 1], [1, 0], seg_flags, seg_truth)
  assert stats.METRICS["segment_f1"][1](table, np.arange(2)) == pytest.approx(2 / 3)
  assert stats.METRICS["segment_f1"][1](table, np.array([0, 0])) == 1.0


def test_paired_differences_cancel_shared_noise():
  rng = np.random.default_rng(4)
  cohorts = []
  for size in (20, 30, 25):
    truth = rng.random(size) < 0.5
    truth[:2] = [True, False]
    base = rng.normal(size=size) + truth
    cohorts.append((base, truth))
  # Rung "a" = rung "b" with every score raised by 10: identical ranking -> AUROC difference
  # exactly 0 in every replicate, and a F1 difference from flags set on every patient.
  tables = {
      "b": [_table(s, s > 0.5, t, ssim=np.full(len(s), 0.5)) for s, t in cohorts],
      "a": [_table(s + 10, np.ones(len(s), bool), t, ssim=np.full(len(s), 0.6)) for s, t in cohorts],
  }
  out = stats.summarize(tables, pairs=[("a", "b"), ("a", "missing")], num_resamples=300, seed=0)
  assert set(out["differences"]) == {"a - b"}
  diff = out["differences"]["a - b"]
  assert diff["patient_auroc"]["mean"] == 0 and diff["patient_auroc"]["lo"] == 0 == diff["patient_auroc"]["hi"]
  assert diff["ssim_normal_cord"]["lo"] == pytest.approx(0.1) == diff["ssim_normal_cord"]["hi"]
  # Each rung's own AUROC interval is wide (different patients per replicate) ...
  auroc = out["rungs"]["a"]["patient_auroc"]
  assert auroc["hi"] - auroc["lo"] > 0.05
  assert auroc["lo"] <= auroc["mean"] <= auroc["hi"]
  # ... and the point estimate is the mean of the cohorts' own values.
  per = [stats.METRICS["patient_auroc"][1](t, np.arange(len(t))) for t in tables["a"]]
  assert auroc["per_cohort"] == pytest.approx(per) and auroc["mean"] == pytest.approx(np.mean(per))
  # F1 of flag-everything: 2P / (2P + N) per cohort.
  f1 = [2 * t.sum() / (2 * t.sum() + (~t).sum()) for _, t in cohorts]
  assert out["rungs"]["a"]["patient_f1"]["mean"] == pytest.approx(np.mean(f1))
  assert out["num_cohorts"] == 3 and out["patients_per_cohort"] == [20, 30, 25]


def test_summarize_is_deterministic_and_round_trips():
  t = _table([3, 2, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0])
  again = stats.PatientTable.from_json(t.to_json())
  assert again.patient_truth.dtype == bool and np.array_equal(again.segment_scores, t.segment_scores)
  one = stats.summarize({"intensity": [t]}, num_resamples=200, seed=5)
  two = stats.summarize({"intensity": [again]}, num_resamples=200, seed=5)
  assert one == two
  assert "ssim_normal_cord" not in one["rungs"]["intensity"]  # no reconstruction
  with pytest.raises(ValueError, match="other sizes"):
    stats.summarize({"a": [t], "b": [_table([1], [1], [1])]})


def test_cohort_values_resample_cohorts_only_and_pair_the_differences():
  # Per-cohort values 0.2 and 0.6: replicates are means of two cohorts drawn with replacement,
  # 0.2 / 0.4 / 0.6 with probability 1/4 / 1/2 / 1/4, so the 95 % interval is (0.2, 0.6).
  out = stats.summarize_cohort_values(
      {"a": {"pixel_ap": [0.2, 0.6]}, "b": {"pixel_ap": [0.1, 0.5]}}, pairs=[("a", "b"), ("a", "c")],
      num_resamples=4000, seed=1)
  e = out["rungs"]["a"]["pixel_ap"]
  assert e["mean"] == pytest.approx(0.4) and e["per_cohort"] == pytest.approx([0.2, 0.6])
  assert (e["lo"], e["hi"]) == pytest.approx((0.2, 0.6))
  # b is a shifted by 0.1 on every cohort: paired, the difference is exactly 0.1 in every draw.
  d = out["differences"]["a - b"]["pixel_ap"]
  assert (d["mean"], d["lo"], d["hi"]) == pytest.approx((0.1, 0.1, 0.1))
  assert list(out["differences"]) == ["a - b"]
  # One cohort: its value, no interval; an undefined cohort is left out of the mean.
  one = stats.summarize_cohort_values({"a": {"pixel_ap": [0.3]}}, num_resamples=200)
  assert one["rungs"]["a"]["pixel_ap"]["mean"] == 0.3
  assert math.isnan(one["rungs"]["a"]["pixel_ap"]["lo"])
  undefined = stats.summarize_cohort_values({"a": {"pixel_ap": [math.nan, 0.5]}}, num_resamples=500)
  assert undefined["rungs"]["a"]["pixel_ap"]["mean"] == 0.5
  with pytest.raises(ValueError, match="different numbers of cohorts"):
    stats.summarize_cohort_values({"a": {"pixel_ap": [0.1]}, "b": {"pixel_ap": [0.1, 0.2]}})

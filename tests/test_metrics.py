"""Metrics against hand-computed small cases and brute-force definitions."""

import itertools
import math

import numpy as np
import pytest

from u2ad_jax import recon_quality
from u2ad_jax.evaluation import metric_registry
from u2ad_jax.evaluation import metrics



def test_binary_metrics_hand_case():
  pred = np.array([1, 1, 0, 0, 1], bool)
  truth = np.array([1, 0, 0, 1, 1], bool)
  m = metrics.binary_metrics(pred, truth)
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["recall"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(1 / 2)
  assert m["f1"] == pytest.approx(2 / 3)
  assert m["accuracy"] == pytest.approx(3 / 5)


def test_binary_metrics_degenerate_cases():
  # Nothing flagged: precision 0 by convention, F1 0, recall 0, specificity 1.
  m = metrics.binary_metrics(np.zeros(4, bool), np.array([1, 0, 0, 1], bool))
  assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["recall"] == 0.0
  assert m["specificity"] == 1.0
  # No positives at all: recall undefined.
  m = metrics.binary_metrics(np.array([1, 0], bool), np.zeros(2, bool))
  assert math.isnan(m["recall"]) and m["specificity"] == 0.5


def test_auroc_hand_cases_with_ties():
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  # Pairs (pos, neg): (2,1)=1, (2,2)=1/2, (3,1)=1, (3,2)=1 -> 3.5 / 4.
  assert metrics.roc_auc([1, 2, 2, 3], [0, 0, 1, 1]) == pytest.approx(0.875)
  assert metrics.roc_auc([5, 5, 5], [0, 1, 1]) == pytest.approx(0.5)
  assert math.isnan(metrics.roc_auc([1, 2], [1, 1]))


def test_average_precision_hand_cases():
  # Ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-): 0.5 * 1 + 0.5 * 2/3.
  assert metrics.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
  # A tie enters together: {3}(+) then {2,2}(+,-): 0.5 * 1 + 0.5 * 2/3.
  assert metrics.average_precision([3, 2, 2, 1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
  assert metrics.average_precision([1, 2, 3], [0, 0, 1]) == pytest.approx(1.0)
  assert math.isnan(metrics.average_precision([1, 2], [0, 0]))


def _brute_auroc(scores, truth):
  pos = [s for s, t in zip(scores, truth) if t]
  neg = [s for s, t in zip(scores, truth) if not t]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


def _brute_ap(scores, truth):
  scores, truth = np.asarray(scores), np.asarray(truth, bool)
  ap, prev_recall = 0.0, 0.0
  for t in sorted(set(scores.tolist()), reverse=True):
    pred = scores >= t
    tp = np.sum(pred & truth)
    recall = tp / truth.sum()
    ap += (recall - prev_recall) * tp / pred.sum()
    prev_recall = recall
  return ap


@pytest.mark.parametrize("seed", range(5))
def test_ranking_metrics_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, size=30).astype(float)  # many ties on purpose
  truth = rng.random(30) < 0.4
  truth[:2] = [True, False]
  assert metrics.roc_auc(scores, truth) == pytest.approx(_brute_auroc(scores, truth))
  assert metrics.average_precision(scores, truth) == pytest.approx(_brute_ap(scores, truth))
  fpr, tpr, thr = metrics.roc_curve(scores, truth)
  assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  # The trapezoidal area of the curve equals the rank statistic (ties = diagonal steps).
  area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  assert area == pytest.approx(metrics.roc_auc(scores, truth))


def test_dice_and_best_dice():
  assert metrics.dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
  assert metrics.dice([0, 0], [0, 0]) == 1.0
  # t = 0.3 flags {0.9, 0.8, 0.3}: 2 * 2 / (3 + 2) = 0.8, better than every other threshold.
  best, t = metrics.best_dice([0.9, 0.8, 0.3, 0.2], [1, 0, 1, 0])
  assert best == pytest.approx(0.8) and t == pytest.approx(0.3)
  rng = np.random.default_rng(0)
  scores, truth = rng.random(40), rng.random(40) < 0.3
  brute = max(metrics.dice(scores >= t, truth) for t in scores)
  assert metrics.best_dice(scores, truth)[0] == pytest.approx(brute)
  assert math.isnan(metrics.best_dice([1, 2], [0, 0])[0])


def test_ssim_properties():
  rng = np.random.default_rng(1)
  img = rng.random((48, 40))
  assert recon_quality.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
  assert recon_quality.ssim(img, img, window=7) == pytest.approx(1.0, abs=1e-12)
  noisy = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1)
  s = recon_quality.ssim(img, noisy)
  assert 0 < s < 0.95
  assert recon_quality.ssim(noisy, img) == pytest.approx(s)
  # Restricted to a mask: the damage is only inside the left half.
  half = img.copy()
  half[:, :20] = noisy[:, :20]
  mask = np.zeros(img.shape, bool)
  mask[:, 30:] = True
  assert recon_quality.ssim(img, half, mask) == pytest.approx(1.0, abs=1e-9)
  assert recon_quality.ssim(img, half, ~mask) < 0.95
  # A constant brightness shift of a constant image: luminance term only.
  a, b = np.full((20, 20), 0.5), np.full((20, 20), 0.6)
  c1 = 0.01**2
  assert recon_quality.ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))


def test_metric_registry_levels_and_order():
  """Each level reports the metrics registered for it, in registration order (the keys and
  order of metrics.json)."""
  scores = np.array([0.9, 0.1, 0.8, 0.3, 0.6])
  truth = np.array([1, 0, 0, 1, 1], bool)
  flags = scores > 0.5
  patient = metric_registry.level_metrics("patient", scores, truth, flags)
  want = {**metrics.binary_metrics(flags, truth), **metrics.ranking_metrics(scores, truth)}
  assert list(patient) == list(want) and patient == want
  assert metric_registry.level_metrics("segment", scores, truth, flags) == want
  pixel = metric_registry.level_metrics("pixel", scores, truth)
  assert list(pixel) == ["auroc", "ap", "num_positive", "num_negative", "best_dice",
                         "best_dice_threshold"]
  assert (pixel["best_dice"], pixel["best_dice_threshold"]) == metrics.best_dice(scores, truth)
  with pytest.raises(ValueError, match="unknown metric level 'voxel'"):
    metric_registry.level_metrics("voxel", scores, truth)


def test_a_registered_metric_reaches_its_levels_only(monkeypatch):
  """Adding a metric is one entry in METRICS: it appears at the levels it names."""
  def num_flagged(scores, flags, truth):
    del scores, truth
    return {"num_flagged": float(flags.sum())}

  monkeypatch.setitem(metric_registry.METRICS, "num_flagged", (("patient",), num_flagged))
  scores = np.array([0.9, 0.1, 0.8])
  truth = np.array([1, 0, 0], bool)
  flags = scores > 0.5
  assert metric_registry.level_metrics("patient", scores, truth, flags)["num_flagged"] == 2.0
  assert "num_flagged" not in metric_registry.level_metrics("segment", scores, truth, flags)


def test_a_metric_in_its_own_module_is_one_registration_line(tmp_path, monkeypatch):
  """A metric module of its own is registered by its import path and imported when used."""
  (tmp_path / "balanced_accuracy_metric.py").write_text(
      "import numpy as np\n"
      "def balanced_accuracy(scores, flags, truth):\n"
      "  del scores\n"
      "  tpr = (flags & truth).sum() / truth.sum()\n"
      "  tnr = (~flags & ~truth).sum() / (~truth).sum()\n"
      "  return {'balanced_accuracy': float((tpr + tnr) / 2)}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(metric_registry.METRICS, "balanced_accuracy",
                      (("patient", "segment"), "balanced_accuracy_metric:balanced_accuracy"))
  scores = np.array([0.9, 0.1, 0.8, 0.2])
  truth = np.array([1, 0, 0, 1], bool)
  flags = scores > 0.5  # tp 1, fn 1, fp 1, tn 1
  got = metric_registry.level_metrics("patient", scores, truth, flags)
  assert got["balanced_accuracy"] == 0.5
  assert got["f1"] == 0.5  # the built-in metrics are still there
  assert "balanced_accuracy" not in metric_registry.level_metrics("pixel", scores, truth)


def test_normal_cord_quality_sees_a_flat_band():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 0.9, size=(3, 32, 32))
  roi = np.zeros((3, 32, 32), bool)
  roi[:, 4:28, 12:20] = True
  labels = np.zeros((3, 32, 32), np.uint8)
  labels[2] = 6  # slice 2 is all lesion: no normal cord, not counted
  perfect = recon_quality.normal_cord_quality(images, images, roi, labels)
  assert perfect["ssim"] == pytest.approx(1.0) and perfect["corr"] == pytest.approx(1.0)
  assert perfect["psnr"] == pytest.approx(120.0) and perfect["num_slices"] == 2
  # The flat band: the ROI's mean level everywhere. Correlation 0, PSNR = the ROI variance's.
  flat = np.where(roi, images[roi].mean(), images)
  band = recon_quality.normal_cord_quality(images, flat, roi)
  assert band["corr"] == 0.0 and band["ssim"] < 0.5 and band["num_slices"] == 3
  expected = np.mean([10 * np.log10(1 / np.mean((im[r] - images[roi].mean()) ** 2))
                      for im, r in zip(images, roi)])
  assert band["psnr"] == pytest.approx(expected)
  # Half the error everywhere: + 6.02 dB.
  half = images + 0.5 * (flat - images)
  assert recon_quality.normal_cord_quality(images, half, roi)["psnr"] == pytest.approx(
      expected + 20 * np.log10(2), abs=1e-6)
  empty = recon_quality.normal_cord_quality(images, images, np.zeros_like(roi))
  assert math.isnan(empty["ssim"]) and empty["num_slices"] == 0

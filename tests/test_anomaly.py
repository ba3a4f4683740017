"""The anomaly map from the residual (u2ad_jax/anomaly.py) and evaluation-time overrides."""

import json

import ml_collections
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import anomaly
from u2ad_jax.evaluation import settings as eval_settings


def _cohort():
  """Two subjects x 2 slices of 8 x 8; the cord ROI is columns 3-4.

  Subject a: reconstruction 0.10 too DARK everywhere (x = 0.30, recon = 0.20) and one lesion
  pixel 0.25 brighter than its cord. Subject b: reconstruction 0.05 too BRIGHT and one pixel the
  model over-predicts by a further 0.3 (a reconstruction failure, darker than expected).
  """
  images = np.full((4, 8, 8), 0.3, np.float32)
  recon = np.empty_like(images)
  recon[:2] = 0.2
  recon[2:] = 0.35
  roi = np.zeros(images.shape, bool)
  roi[:, :, 3:5] = True
  images[1, 4, 3] = 0.55          # lesion of subject a
  recon[3, 2, 4] = 0.65           # dark failure of subject b
  images[0, 0, 0] = 0.9           # bright pixel OUTSIDE the ROI: never scored
  return images, recon, roi, ["sub-a", "sub-a", "sub-b", "sub-b"]


def test_absolute_is_the_methods_au_inside_the_roi():
  images, recon, roi, ids = _cohort()
  out = anomaly.anomaly_maps(images, recon, roi, ids, "absolute")
  np.testing.assert_allclose(out, np.where(roi, np.abs(images - recon), 0), atol=1e-7)
  assert out[0, 0, 0] == 0.0
  assert out[3, 2, 4] == pytest.approx(0.35)  # the dark failure scores highest under |r|


def test_positive_keeps_only_hyperintense_residuals():
  images, recon, roi, ids = _cohort()
  out = anomaly.anomaly_maps(images, recon, roi, ids, "positive")
  assert out[3].max() == 0.0                     # subject b is never brighter than expected
  assert out[1, 4, 3] == pytest.approx(0.35)     # lesion: 0.55 - 0.20
  assert out[0, 4, 4] == pytest.approx(0.10)     # subject a's offset still counts


def test_centered_positive_removes_each_subjects_offset():
  images, recon, roi, ids = _cohort()
  np.testing.assert_allclose(anomaly.subject_offsets(images - recon, roi, ids),
                             [0.1, 0.1, -0.05, -0.05], atol=1e-6)
  out = anomaly.anomaly_maps(images, recon, roi, ids, "centered_positive")
  assert out[1, 4, 3] == pytest.approx(0.25)     # the lesion's excess over its own cord
  lesion = np.zeros(out.shape, bool)
  lesion[1, 4, 3] = True
  assert np.abs(out[~lesion]).max() < 1e-6       # normal cord of both subjects: 0
  assert out.min() >= 0 and out.dtype == np.float32


def test_subject_without_roi_and_bad_arguments():
  images, recon, roi, ids = _cohort()
  roi[2:] = False
  out = anomaly.anomaly_maps(images, recon, roi, ids, "centered_positive")
  assert out[2:].max() == 0.0
  with pytest.raises(ValueError, match="unknown anomaly residual"):
    anomaly.anomaly_maps(images, recon, roi, ids, "signed")
  with pytest.raises(ValueError, match="subject ids"):
    anomaly.anomaly_maps(images, recon, roi, ids[:3])
  with pytest.raises(ValueError, match="same"):
    anomaly.anomaly_maps(images, recon[:, :4], roi, ids)
  for name in anomaly.RESIDUALS:
    assert anomaly.describe(name).startswith("anomaly = ")


def _recorded_config():
  """A config as `restore_for_eval` returns it: read back from config.json."""
  config = ml_collections.ConfigDict({
      "evaluation": {"threshold": "mad", "mad_k": 3.0, "curve_reduction": "sum"},
      "postprocess": {"percentile": 90.0, "min_size": 2, "top_k": None},
      "model": {"variant": "cpu"}})
  return ml_collections.ConfigDict(json.loads(config.to_json()))


def test_scoring_overrides_change_the_settings():
  config = eval_settings.apply_scoring_overrides(_recorded_config(), [
      "evaluation.residual=absolute", "evaluation.num_samples=12", "postprocess.percentile=95",
      "postprocess.top_k=3", "evaluation.curve_reduction='max'", "evaluation.mad_k=2"])
  settings = eval_settings.EvalSettings.from_config(config)
  assert settings.residual == "absolute" and settings.num_samples == 12
  assert settings.postprocess.percentile == 95.0 and settings.postprocess.top_k == 3
  assert settings.reduction == "max" and settings.rule.k == 2.0
  # A recorded config without the newer keys gets the defaults.
  default = eval_settings.EvalSettings.from_config(_recorded_config())
  assert default.residual == anomaly.DEFAULT_RESIDUAL and default.num_samples is None
  assert default.curve_window == 11  # 8 mm at the default 200 mm / 256 px
  per_row = eval_settings.apply_scoring_overrides(_recorded_config(),
                                                  ["evaluation.curve_window_mm=0"])
  assert eval_settings.EvalSettings.from_config(per_row).curve_window == 1


@pytest.mark.parametrize("override, message", [
    ("model.variant=paper", "fixed by the checkpoint"),
    ("evaluation.residul=absolute", "unknown evaluation setting 'residul'"),
    ("evaluation.residual=signed", "expected one of"),
    ("evaluation.num_samples=0", ">= 1"),
    ("postprocess.percentile=high", "percentile"),
    ("evaluation.curve_window_mm=-4", "curve window"),
    ("percentile=95", "section.key=value"),
])
def test_bad_scoring_overrides_fail_clearly(override, message):
  with pytest.raises(errors.UsageError, match=message):
    eval_settings.apply_scoring_overrides(_recorded_config(), [override])


def test_distinct_ids_centre_each_slice_alone():
  """Training candidates centre per slice: one id per slice."""
  images, recon, roi, _ = _cohort()
  recon[1] -= 0.05  # slice 1 of subject a is reconstructed darker than slice 0
  per_slice = anomaly.subject_offsets(images - recon, roi, [0, 1, 2, 3])
  np.testing.assert_allclose(per_slice, [0.1, 0.15, -0.05, -0.05], atol=1e-6)
  out = anomaly.anomaly_maps(images, recon, roi, [0, 1, 2, 3], "centered_positive")
  assert out[1, 4, 3] == pytest.approx(0.25) and out[0].max() < 1e-6

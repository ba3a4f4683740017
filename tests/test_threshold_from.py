"""`u2ad evaluate --threshold-from EVAL_DIR`: a new patient is decided with the threshold an earlier
evaluation of the same checkpoint recorded, never with one computed from its own scores.

The model is replaced by a fixed reconstruction (the threshold logic does not depend on it), so
these tests run in seconds; the training + evaluation path itself is covered by test_train_e2e.
"""

import json
import os
import shutil
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_evaluate as te  # noqa: E402  (its tiny NIfTI cohort writer)

from u2ad_jax import errors  # noqa: E402
from u2ad_jax import labels as L  # noqa: E402
from u2ad_jax.evaluation.rungs import model as model_rung  # noqa: E402
from u2ad_jax.evaluation import thresholds  # noqa: E402
from u2ad_jax.train import checkpoint  # noqa: E402


class _Model:
  image_size = te.S


@pytest.fixture()
def fake_model(monkeypatch):
  """restore_for_eval / model_maps stand-ins; `state["step"]` is the restored step."""
  state = {"step": 7}
  config = ml_collections.ConfigDict({
      "data": te.data_config().to_dict(), "model": {"variant": "mu"},
      "evaluation": {"mad_k": 2.5, "num_samples": 2}, "postprocess": {"percentile": 90.0},
      "uncertainty": {"num_samples": 2}})

  def restore(workdir, step=None):
    if not os.path.isdir(workdir):
      raise errors.CheckpointError(workdir, "no workdir")
    return _Model(), None, ml_collections.ConfigDict(config.to_dict()), state["step"]

  def maps(model, params, config, images, train_roi, **kwargs):
    # A reconstruction that misses bright spots: the residual is the lesion.
    mean = np.minimum(images, 0.35).astype(np.float32)
    return {"mean": mean, "eu": np.zeros_like(mean)}

  monkeypatch.setattr(checkpoint, "restore_for_eval", restore)
  monkeypatch.setattr(model_rung, "model_maps", maps)
  return state


def _cohorts(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  full, one = str(tmp_path / "cohort"), str(tmp_path / "new")
  te.write_cohort(full, num_subjects=4)
  te.write_cohort(one, num_subjects=2)
  # The new scan: the cohort's second subject alone, without any truth.
  shutil.rmtree(os.path.join(one, "sub-001"))
  shutil.rmtree(os.path.join(one, "derivatives", "labels", "sub-001"))
  os.remove(os.path.join(one, "participants.tsv"))
  # A real new scan has no lesion label either (the tools segment cord, not lesions).
  label = os.path.join(one, "derivatives", "labels", "sub-002", "anat", "sub-002_T2w_label.nii.gz")
  img = nib.load(label)
  data = np.asarray(img.dataobj)
  nib.save(nib.Nifti1Image(np.where(data == L.LESION, L.CORD, data).astype(np.uint8), img.affine),
           label)
  return str(workdir), full, one


def test_new_patient_uses_the_recorded_threshold(tmp_path, fake_model):
  workdir, full, one = _cohorts(tmp_path)
  first = model_rung.evaluate_checkpoint(workdir, full, str(tmp_path / "eval"), verbose=False)
  alone = model_rung.evaluate_checkpoint(workdir, one, str(tmp_path / "eval_new"), verbose=False,
                                         threshold_from=str(tmp_path / "eval"))
  assert alone.decisions.threshold == pytest.approx(first.decisions.threshold)
  # Its own statistics would give another threshold (one patient: six segment scores).
  own = model_rung.evaluate_checkpoint(workdir, one, None, verbose=False)
  assert own.decisions.threshold != pytest.approx(first.decisions.threshold)
  # Same subject, same scores, same threshold -> the same decisions as in the cohort.
  k = first.subject_ids.index("sub-002")
  np.testing.assert_allclose(alone.segment_scores[0], first.segment_scores[k])
  assert alone.decisions.segment_flags[0].tolist() == first.decisions.segment_flags[k].tolist()
  assert bool(alone.decisions.patient_flags[0]) == bool(first.decisions.patient_flags[k])
  # The report says which threshold and where it came from, and that there is no truth.
  report = (tmp_path / "eval_new" / "report.md").read_text()
  assert f"**{first.decisions.threshold:.4g}**" in report
  assert f"recorded by the earlier evaluation {tmp_path / 'eval'}" in report
  assert "No truth for this cohort" in report
  assert alone.truth is None and not (tmp_path / "eval_new" / "metrics.json").exists()
  summary = json.loads((tmp_path / "eval_new" / "summary.json").read_text())
  assert summary["threshold"]["recorded_by"] == str(tmp_path / "eval")


def test_incompatible_or_foreign_directories_are_refused(tmp_path, fake_model):
  workdir, full, one = _cohorts(tmp_path)
  model_rung.evaluate_checkpoint(workdir, full, str(tmp_path / "eval"), verbose=False)
  summary = str(tmp_path / "eval" / "summary.json")
  out = str(tmp_path / "eval_new")

  fake_model["step"] = 8  # another checkpoint of the same run
  with pytest.raises(errors.InputError, match="checkpoint_step = 7") as e:
    model_rung.evaluate_checkpoint(workdir, one, out, verbose=False,
                                   threshold_from=str(tmp_path / "eval"))
  assert e.value.path == summary and "\n" not in str(e.value)
  fake_model["step"] = 7
  with pytest.raises(errors.InputError, match="postprocess"):
    model_rung.evaluate_checkpoint(workdir, one, out, verbose=False, overrides=[
        "postprocess.percentile=95"], threshold_from=str(tmp_path / "eval"))
  # Per-level z needs the cohort's own statistics: refused before any work.
  with pytest.raises(errors.UsageError, match="segment_norm"):
    model_rung.evaluate_checkpoint(workdir, one, out, verbose=False, overrides=[
        "evaluation.segment_norm=level_z"], threshold_from=str(tmp_path / "eval"))
  # An evaluation from before segment scores were recorded scored them raw: still compatible.
  with open(summary) as f:
    recorded = json.load(f)
  assert recorded.pop("segment_scores") == "max of the curve over the segment's rows"
  with open(summary, "w") as f:
    json.dump(recorded, f)
  model_rung.evaluate_checkpoint(workdir, one, out, verbose=False,
                                 threshold_from=str(tmp_path / "eval"))
  shutil.rmtree(out)
  other = tmp_path / "other_run"
  other.mkdir()
  with pytest.raises(errors.InputError, match="threshold recorded for the model in"):
    model_rung.evaluate_checkpoint(str(other), one, out, verbose=False,
                                   threshold_from=str(tmp_path / "eval"))
  with pytest.raises(errors.InputError, match="not a u2ad evaluation directory"):
    model_rung.evaluate_checkpoint(workdir, one, out, verbose=False, threshold_from=full)
  with open(summary, "w") as f:
    f.write("{\"name\": \"x\"}\n")
  with pytest.raises(errors.CorruptFileError, match="not a u2ad evaluation summary"):
    model_rung.evaluate_checkpoint(workdir, one, out, verbose=False,
                                   threshold_from=str(tmp_path / "eval"))
  assert not os.path.exists(out)


def test_recorded_threshold_decides_without_pooling():
  rule = thresholds.RecordedThreshold(k=2.5, value=0.5, median=0.1, sigma=0.2, source="/e")
  d = thresholds.decide(np.array([0.6, 0.4]), np.array([[0.6, 0.1], [0.4, np.nan]]), rule)
  assert d.threshold == 0.5 and (d.median, d.sigma) == (0.1, 0.2)
  assert d.segment_flags.tolist() == [[True, False], [False, False]]
  assert d.patient_flags.tolist() == [True, False]
  assert "recorded by the earlier evaluation /e" in rule.describe()
  # The cohort rule leaves n/a (NaN) segments out of its pool.
  pooled = thresholds.decide(np.array([1.0]), np.array([[1.0, 2.0, 3.0, np.nan]]),
                             thresholds.ThresholdRule(k=0.0))
  assert pooled.threshold == pytest.approx(2.0)

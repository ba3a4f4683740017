"""`u2ad demo --smoke` end to end (5 patients, tiny model), and evaluation of its run.

The demo runs once (about a minute on 2 cores) and the checks below reuse its cohort and training
run: re-evaluation is deterministic, and a damaged checkpoint or a cohort without vertebral labels
fails with a clear message and leaves no report behind. Everything is one test function so that
pytest-xdist never runs the demo twice (a module fixture would run once per worker).
"""

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax import anomaly
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.train import checkpoint
from u2ad_jax.workflows import demo as demo_workflow


def test_smoke_demo_end_to_end(tmp_path):
  demo = demo_workflow.run_demo(tmp_path / "demo", smoke=True, verbose=False)
  check_report(demo)
  check_output_rule(demo)
  check_re_evaluation(demo, tmp_path / "reeval")
  check_corrupt_checkpoint(demo, tmp_path / "corrupt")
  check_cohort_without_vertebral_labels(demo, tmp_path / "novertebrae")
  check_cohort_disagreeing_with_its_table(demo, tmp_path / "disagree")


def _links(markdown):
  return [part.split(")")[0] for part in markdown.split("](")[1:]]


def check_report(demo):
  out = demo.out_dir
  report_md = open(os.path.join(out, "report.md")).read()
  assert "U2AD demo" in report_md and "Ladder on this cohort" in report_md
  for link in _links(report_md):
    assert os.path.isfile(os.path.join(out, link)), link
  ev = os.path.join(out, "evaluation")
  rows = list(csv.DictReader(open(os.path.join(ev, "patients.csv"))))
  assert len(rows) == demo_workflow.SMOKE_SIZE.num_clinical
  assert len(list(csv.DictReader(open(os.path.join(ev, "segments.csv"))))) == 6 * len(rows)
  metrics = json.load(open(os.path.join(ev, "metrics.json")))
  for level in ("patient", "segment"):
    assert set(metrics[level]) >= {"precision", "recall", "specificity", "f1", "auroc", "ap"}
  assert 0 <= metrics["pixel"]["auroc"] <= 1 and 0 <= metrics["pixel"]["best_dice"] <= 1
  assert -1 <= metrics["reconstruction"]["ssim_normal_cord"] <= 1
  # The truth of the phantom cohort reached the metrics (the smoke cohort has lesions).
  assert metrics["patient"]["num_positive"] >= 1 and metrics["patient"]["num_negative"] >= 1
  comparison = open(os.path.join(out, "comparison.csv")).read()
  assert comparison.count("\n") == 3 and "intensity" in comparison and "eu_au" in comparison
  # Per-patient maps overlay the input volume.
  sid = rows[0]["subject_id"]
  source = nib.load(os.path.join(out, "data", "clinical", sid, "anat", f"{sid}_T2w.nii.gz"))
  for name in ("anomaly", "eu", "recon"):
    img = nib.load(os.path.join(ev, "subjects", sid, f"{sid}_{name}.nii.gz"))
    assert img.shape == source.shape
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
  sidecar = json.load(open(os.path.join(ev, "subjects", sid, f"{sid}_scores.json")))
  assert sidecar["checkpoint_step"] == demo.u2ad.info["checkpoint_step"]
  assert sidecar["threshold"]["value"] == pytest.approx(demo.u2ad.decisions.threshold)
  assert set(sidecar["segments"]) == set(L.SEGMENT_NAMES)


def check_output_rule(demo):
  """A second demo into the same directory needs --overwrite; nothing is touched without it."""
  from u2ad_jax import output_guard
  assert output_guard.read_marker(demo.out_dir)["command"] == "demo"
  assert output_guard.read_marker(os.path.join(demo.out_dir, "evaluation"))["command"] == "evaluate"
  clinical = os.path.join(demo.out_dir, "data", "clinical")
  assert output_guard.read_marker(clinical)["command"] == "synth"
  before = sorted(os.listdir(demo.out_dir))
  with pytest.raises(errors.InputError, match="pass --overwrite"):
    demo_workflow.run_demo(demo.out_dir, smoke=True, verbose=False)
  assert sorted(os.listdir(demo.out_dir)) == before
  # Positions in the tables are voxels of the input NIfTI.
  ev = os.path.join(demo.out_dir, "evaluation")
  for row in csv.DictReader(open(os.path.join(ev, "patients.csv"))):
    sid = row["subject_id"]
    shape = nib.load(os.path.join(demo.out_dir, "data", "clinical", sid, "anat",
                                  f"{sid}_T2w.nii.gz")).shape
    ijk = [int(row[k]) for k in ("peak_i", "peak_j", "peak_k")]
    assert all(0 <= v < n for v, n in zip(ijk, shape)), (ijk, shape)


def check_re_evaluation(demo, tmp_path):
  tmp_path.mkdir()
  run = os.path.join(demo.out_dir, "run")
  clinical = os.path.join(demo.out_dir, "data", "clinical")
  again = model_rung.evaluate_checkpoint(run, clinical, None, verbose=False)
  np.testing.assert_allclose(again.segment_scores, demo.u2ad.segment_scores, rtol=1e-5,
                             atol=1e-7)
  # The default anomaly map is the centred positive residual of the mean reconstruction; an
  # evaluation-time override switches to the method's |x - mean| without retraining.
  cohort = rung_base.prepare_cohort(clinical, checkpoint.read_config(run).data,
                                    progress=False).slice_set
  absolute = model_rung.evaluate_checkpoint(
      run, clinical, None, overrides=["evaluation.residual=absolute"], verbose=False)
  np.testing.assert_allclose(absolute.recon, demo.u2ad.recon, atol=1e-6)
  residual = cohort.images - demo.u2ad.recon
  np.testing.assert_allclose(absolute.anomaly, np.where(cohort.score_roi, np.abs(residual), 0),
                             atol=1e-6)
  expected = anomaly.anomaly_maps(cohort.images, demo.u2ad.recon, cohort.score_roi,
                                  cohort.subject_ids, "centered_positive")
  np.testing.assert_allclose(demo.u2ad.anomaly, expected, atol=1e-6)
  assert absolute.info["anomaly_map"].startswith("anomaly = |x - mean")
  with pytest.raises(errors.UsageError, match="model"):
    model_rung.evaluate_checkpoint(run, clinical, None, overrides=["model.variant=paper"],
                                   verbose=False)
  with pytest.raises(errors.CheckpointError, match="no checkpoint at step 99999"):
    model_rung.evaluate_checkpoint(run, clinical, tmp_path / "out", step=99999, verbose=False)
  assert not (tmp_path / "out").exists()


def check_corrupt_checkpoint(demo, tmp_path):
  tmp_path.mkdir()
  run = tmp_path / "run"
  shutil.copytree(os.path.join(demo.out_dir, "run"), run)
  latest = max(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
  for directory, _, files in os.walk(run / "checkpoints" / str(latest) / "state"):
    for name in files:
      with open(os.path.join(directory, name), "wb") as f:
        f.write(b"\x00garbage")
  out = tmp_path / "out"
  with pytest.raises(errors.CheckpointError) as info:
    model_rung.evaluate_checkpoint(run, os.path.join(demo.out_dir, "data", "clinical"), out,
                                   verbose=False)
  assert str(latest) in str(info.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def check_cohort_without_vertebral_labels(demo, tmp_path):
  tmp_path.mkdir()
  cohort = tmp_path / "clinical"
  shutil.copytree(os.path.join(demo.out_dir, "data", "clinical"), cohort)
  label_dir = cohort / "derivatives" / "labels" / "sub-002" / "anat"
  label_path = label_dir / "sub-002_T2w_label.nii.gz"
  img = nib.load(label_path)
  data = np.asarray(img.dataobj).copy()
  data[data == L.VERTEBRA] = L.BACKGROUND
  nib.save(nib.Nifti1Image(data, img.affine, img.header), label_path)
  os.remove(label_dir / "sub-002_T2w_vertebrae.nii.gz")
  out = tmp_path / "out"
  with pytest.raises(errors.LabelError) as info:
    model_rung.evaluate_checkpoint(os.path.join(demo.out_dir, "run"), cohort, out, verbose=False)
  assert "sub-002_T2w_label.nii.gz" in str(info.value) and "vertebra" in str(info.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["clinical"]


def check_cohort_disagreeing_with_its_table(demo, tmp_path):
  """Folders and participants.tsv of a cohort disagree: one error naming the subject, no output."""
  tmp_path.mkdir()
  cohort = tmp_path / "clinical"
  shutil.copytree(os.path.join(demo.out_dir, "data", "clinical"), cohort)
  table = (cohort / "participants.tsv").read_text().splitlines()
  (cohort / "participants.tsv").write_text("\n".join(l for l in table
                                                     if not l.startswith("sub-003")) + "\n")
  out = tmp_path / "out"
  with pytest.raises(errors.InputError, match="sub-003 has a folder but no row"):
    model_rung.evaluate_checkpoint(os.path.join(demo.out_dir, "run"), cohort, out, verbose=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["clinical"]

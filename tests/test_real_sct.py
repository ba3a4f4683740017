"""Real scans with real Spinal Cord Toolbox labels (tests/data/sct, MIT): prepare, evaluate, and
the mistakes a researcher's first real scan meets.

`t2.nii.gz` is a real cervical T2w volume stored PSR (int16, 1 mm), its cord labelled C2 ... C5
the way `sct_label_vertebrae` writes it; `t2_seg-manual.nii.gz` is the plain binary cord mask
(`sct_deepseg_sc`'s form); `t2_fake_lesion*` a second real volume with an inserted lesion, its
lesion mask and a binary cord mask without levels. Everything runs on CPU in seconds: the
intensity rung needs no model, and the model rung uses a freshly initialised `mu` ViT.
"""

import csv
import json
import os
import pathlib
import shutil

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.commands import prepare
from u2ad_jax.evaluation import settings as eval_settings
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import registry

SCT = pathlib.Path(__file__).resolve().parent / "data" / "sct"
# 1 mm model pixels over 64 mm: the cropped SCT volumes (55-80 mm) keep their resolution.
IMAGE_SIZE = 64


def data_config():
  return ml_collections.ConfigDict(dict(
      image_size=IMAGE_SIZE, fov_mm=float(IMAGE_SIZE), pixel_mm=1.0,
      clip_percentiles=(0.2, 99.8), min_roi_patches=4, patch_size=8))


def eval_settings_for_tests():
  return eval_settings.EvalSettings.from_config(ml_collections.ConfigDict(
      {"data": data_config().to_dict(), "evaluation": {"mad_k": 2.5}}))


def sct_inputs(root, seg="t2_seg-manual_labeled.nii.gz", scan="t2.nii.gz", stem="t2"):
  """images/<stem>.nii.gz + segs/<stem>_seg_labeled.nii.gz (the names `sct_label_vertebrae`
  gives) from the test files; returns (images, segs)."""
  images, segs = os.path.join(root, "images"), os.path.join(root, "segs")
  os.makedirs(images, exist_ok=True)
  os.makedirs(segs, exist_ok=True)
  shutil.copyfile(SCT / scan, os.path.join(images, f"{stem}.nii.gz"))
  if seg is not None:
    shutil.copyfile(SCT / seg, os.path.join(segs, f"{stem}_seg_labeled.nii.gz"))
  return images, segs


@pytest.fixture(scope="module")
def sct_cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("sct")
  images, segs = sct_inputs(str(root))
  out = str(root / "cohort")
  records = prepare.prepare_cohort("sct", images, segs, out)
  return out, records


def level_centroids_si():
  """Stored-grid S-I index (axis 1 of the PSR file) of each level's cord-stretch centre."""
  labelled = np.asarray(nib.load(SCT / "t2_seg-manual_labeled.nii.gz").dataobj)
  assert nib.aff2axcodes(nib.load(SCT / "t2.nii.gz").affine) == ("P", "S", "R")
  return {name: float(np.argwhere(np.rint(labelled) == level)[:, 1].mean())
          for name, level in (("C2", 2), ("C3", 3), ("C4", 4), ("C5", 5))}


# ----------------------------------------------------------------------------- prepare


def test_prepare_real_sct_scan_levels_by_identity(sct_cohort):
  out, records = sct_cohort
  assert records[0]["participant_id"] == "sub-t2"
  assert records[0]["levels_in_view"] == "C2;C3;C4;C5"
  prepared = rung_base.prepare_cohort(out, data_config(), progress=False)
  lv = prepared.levels["sub-t2"]
  assert lv.method == "identity"
  assert np.isfinite(lv.centroid_rows[:4]).all() and np.isnan(lv.centroid_rows[4:]).all()
  assert lv.segments_present.tolist() == [True, True, True, False, False, False]
  # The scan itself is copied byte for byte; the label maps are on its grid and affine.
  scan = nib.load(os.path.join(out, "sub-t2", "anat", "sub-t2_T2w.nii.gz"))
  label = nib.load(os.path.join(out, "derivatives", "labels", "sub-t2", "anat",
                                "sub-t2_T2w_label.nii.gz"))
  assert label.shape == scan.shape == (60, 55, 52)
  np.testing.assert_allclose(label.affine, scan.affine)


# ----------------------------------------------------------------------------- truth


def _write_participants(cohort_dir, text):
  with open(os.path.join(cohort_dir, "participants.tsv"), "w", encoding="utf-8") as f:
    f.write(text)


def test_na_in_the_truth_table_keeps_the_other_segments(sct_cohort, tmp_path):
  """One n/a (C5-6: out of view) must not drop the patient's other segment truth: the lesion
  given at C3-4 stays truth 1, and segments.csv keeps every truth in its column."""
  src, _ = sct_cohort
  cohort_dir = str(tmp_path / "cohort")
  shutil.copytree(src, cohort_dir)
  _write_participants(cohort_dir, "participant_id\thas_lesion\tC2-3\tC3-4\tC4-5\tC5-6\tC6-7\t"
                                  "C7-T1\nsub-t2\t1\t0\t1\t0\tn/a\tn/a\tn/a\n")
  prepared = rung_base.prepare_cohort(cohort_dir, data_config(), progress=False)
  out = tmp_path / "eval"
  result = rung_base.evaluate(registry.get("intensity")(), prepared, eval_settings_for_tests(),
                              str(out))
  assert result.truth.segments[0].tolist() == [False, True, False, False, False, False]
  assert result.truth.segments_known[0].tolist() == [True, True, True, False, False, False]
  # segments.csv: every row has the header's fields and the truth in the truth column.
  with open(out / "segments.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert all(len(r) == len(rows[0]) for r in rows), rows
  table = [dict(zip(rows[0], r)) for r in rows[1:]]
  assert [r["truth"] for r in table] == ["0", "1", "0", "n/a", "n/a", "n/a"]
  assert [r["score"] == "n/a" for r in table] == [False] * 3 + [True] * 3
  # The metrics count the three known, scored segments (one lesion segment).
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["segment"]["num_positive"] + metrics["segment"]["num_negative"] == 3
  assert metrics["segment"]["num_positive"] == 1
  sidecar = json.loads((out / "subjects" / "sub-t2" / "sub-t2_scores.json").read_text())
  assert sidecar["truth"]["segments"] == ["C3-4"]
  assert sidecar["truth"]["segments_unknown"] == ["C5-6", "C6-7", "C7-T1"]


def test_study_statistics_take_out_of_view_segments_and_na_truth(sct_cohort, tmp_path):
  """`u2ad study`'s per-patient tables and bootstrap (stats.py) on a cohort with segments out of
  view (NaN scores) and n/a truth: no crash, and the segment metrics count the same cells as
  the evaluator's metrics."""
  from u2ad_jax.evaluation import stats  # pylint: disable=import-outside-toplevel
  from u2ad_jax.workflows import study  # pylint: disable=import-outside-toplevel

  src, _ = sct_cohort
  cohort_dir = str(tmp_path / "cohort")
  shutil.copytree(src, cohort_dir)
  _write_participants(cohort_dir, "participant_id\thas_lesion\tC2-3\tC3-4\tC4-5\tC5-6\tC6-7\t"
                                  "C7-T1\nsub-t2\t1\t0\t1\tn/a\tn/a\tn/a\tn/a\n")
  prepared = rung_base.prepare_cohort(cohort_dir, data_config(), progress=False)
  result = rung_base.evaluate(registry.get("intensity")(), prepared, eval_settings_for_tests())
  table = study.patient_table(result, prepared.slice_set)
  assert np.isnan(table.segment_scores[0, 3:]).all()
  # Through tables.json and back, as a resumed study reads it.
  table = stats.PatientTable.from_json(json.loads(json.dumps(table.to_json())))
  assert table.segment_known[0].tolist() == [True, True, False, False, False, False]
  summary = stats.summarize({"intensity": [table, table]}, pairs=(), num_resamples=50)
  seg_f1 = summary["rungs"]["intensity"]["segment_f1"]["mean"]
  # The evaluator's segment F1 over the same two known cells (C2-3 negative, C3-4 positive).
  want = result.metrics["segment"]["f1"]
  assert seg_f1 == pytest.approx(want) if np.isfinite(want) else np.isnan(seg_f1)
  assert "segment_auroc" in summary["rungs"]["intensity"]

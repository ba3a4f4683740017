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

import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import test_evaluate as te  # its tiny NIfTI cohort writer
from u2ad_jax import config_lib
from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.commands import prepare
from u2ad_jax.evaluation import postprocess
from u2ad_jax.evaluation import settings as eval_settings
from u2ad_jax.evaluation import stats
from u2ad_jax.evaluation import thresholds
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.evaluation.rungs import registry
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.train import checkpoint
from u2ad_jax.train import settings as train_settings
from u2ad_jax.train import state as state_lib
from u2ad_jax.workflows import study

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


# ----------------------------------------------------------------------------- evaluate


def _tiny_workdir(root, trained_on):
  """A `u2ad train` workdir holding a freshly initialised `mu` ViT at 64 px, recorded as trained
  on the cohort `trained_on`, its checkpoint taken in the pretraining stage."""

  config = config_lib.sibling(str(SCT.parents[2] / "configs" / "base.py"),
                              "base").get_config("runlocal")
  config.data.update(data_config().to_dict())
  config.data.clinical_dir = str(trained_on)
  config.data.public_dir = str(trained_on)
  model = train_settings.build_model(config)
  optimizer = state_lib.make_optimizer(train_settings.optimizer_settings(config.optim), 1)
  state = state_lib.create_state(state_lib.init_params(model, jax.random.key(0)), optimizer, 2)
  os.makedirs(root)
  checkpoint.write_config(root, config)
  with checkpoint.Checkpoints(root) as ckpts:
    ckpts.save(2, jax.device_get(state), {"stage": "pretrain", "stage_index": 0, "epoch": 0,
                                          "batch": 2, "step": 2})
    ckpts.wait()
  return root


@pytest.fixture(scope="module")
def evaluated(sct_cohort, tmp_path_factory):
  """The real scan evaluated end to end by a tiny model (trained on a phantom, in name)."""

  root = tmp_path_factory.mktemp("eval")
  phantom = root / "phantom"
  cohort_writer.write_cohort(phantom, 1, "clinical", seed=2, num_slices=3)
  workdir = _tiny_workdir(str(root / "run"), phantom)
  out = root / "out"
  result = model_rung.evaluate_checkpoint(workdir, sct_cohort[0], str(out), batch_size=16,
                                          verbose=False)
  return result, out, workdir


def test_real_scan_evaluated_end_to_end_on_its_own_grid(evaluated):
  result, out, _ = evaluated
  scan = nib.load(SCT / "t2.nii.gz")
  for name in ("anomaly", "anomaly_postprocessed", "eu", "recon"):
    written = nib.load(out / "subjects" / "sub-t2" / f"sub-t2_{name}.nii.gz")
    assert written.shape == scan.shape
    np.testing.assert_allclose(written.affine, scan.affine, atol=1e-5)
  assert (np.asarray(nib.load(out / "subjects" / "sub-t2" / "sub-t2_anomaly.nii.gz").dataobj)
          > 0).any()
  # Each scored segment's peak lies between its two levels' centres along S-I (stored axis 1
  # of the PSR file), as the SCT label file has them (1 voxel of rounding).
  centres = level_centroids_si()
  with open(out / "segments.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  scored = [r for r in rows if r["score"] != "n/a"]
  assert [r["segment"] for r in scored] == ["C2-3", "C3-4", "C4-5"]
  for r in scored:
    upper, lower = r["segment"].split("-")
    lower = lower if lower.startswith(("C", "T")) else "C" + lower
    lo, hi = sorted((centres[upper], centres[lower]))
    assert lo - 1 <= int(r["peak_j"]) <= hi + 1, (r, centres)
  assert np.isnan(result.segment_scores[0, 3:]).all()


def test_every_patient_of_a_small_cohort_gets_its_figures(evaluated):
  _, out, _ = evaluated
  report = (out / "report.md").read_text()
  for name in ("sub-t2_slice.png", "sub-t2_curve.png"):
    assert (out / "figures" / name).stat().st_size > 5000, name
    assert f"](figures/{name})" in report  # embedded, not only linked
    assert f"![sub-t2" in report
  assert "Every patient (no truth)" in report


def test_warnings_say_where_the_numbers_cannot_be_trusted(evaluated):
  result, out, _ = evaluated
  report = (out / "report.md").read_text()
  summary = json.loads((out / "summary.json").read_text())
  expected = {
      "levels cut by the field of view": "partial level",
      "computed from this cohort's 1 patient(s), fewer than 10": "few patients",
      "checkpoint step 2 is from stage pretrain": "checkpoint before the final stage",
      "trained on a phantom cohort": "another kind of cohort",
      "masking ROI differs from training": "another ROI",
  }
  assert any(w.endswith(": sub-t2 C2/C5") for w in result.warnings), result.warnings
  for needle, what in expected.items():
    hits = [w for w in result.warnings if needle in w]
    assert len(hits) == 1, (what, result.warnings)
    assert "\n" not in hits[0]
    assert f"- {hits[0]}" in report and hits[0] in summary["warnings"], what
  assert summary["cohort_kind"] == "real scans (sct)"
  assert summary["roi"].startswith("cord only")
  assert summary["threshold"]["num_patients"] == 1


def test_recorded_threshold_of_another_kind_of_cohort_is_warned_and_a_degenerate_one_refused(
    evaluated, sct_cohort, tmp_path):

  _, out, workdir = evaluated
  # The earlier evaluation as if run on the phantom (its cohort kind and ROI as recorded).
  earlier = tmp_path / "earlier"
  shutil.copytree(out, earlier)
  summary = json.loads((earlier / "summary.json").read_text())
  summary.update(cohort_kind="phantom", roi="cord + CSF, dilated")
  (earlier / "summary.json").write_text(json.dumps(summary))
  result = model_rung.evaluate_checkpoint(workdir, sct_cohort[0], None, batch_size=16,
                                          verbose=False, threshold_from=str(earlier))
  assert result.decisions.threshold == pytest.approx(summary["threshold"]["value"])
  text = "\n".join(result.warnings)
  assert "the threshold was recorded on a phantom cohort" in text
  assert "recorded with the masking ROI 'cord + CSF, dilated'" in text
  assert "recorded threshold" in text and "computed from 1 patient(s)" in text
  # A degenerate recorded threshold (every pooled score equal: sigma 0) is refused, one line.
  summary["threshold"]["sigma"] = 0.0
  (earlier / "summary.json").write_text(json.dumps(summary))
  with pytest.raises(errors.InputError, match="degenerate") as info:
    model_rung.evaluate_checkpoint(workdir, sct_cohort[0], None, verbose=False,
                                   threshold_from=str(earlier))
  assert "\n" not in str(info.value)


def test_degenerate_threshold_is_warned():
  from u2ad_jax.evaluation import trust  # pylint: disable=import-outside-toplevel  (new module)


  # Postprocessing left every segment at 0: the robust sigma is 0, the threshold the median.
  decisions = thresholds.decide(np.zeros(12), np.zeros((12, 6)), thresholds.ThresholdRule(k=2.5))
  assert decisions.sigma == 0.0 and not decisions.patient_flags.any()
  warnings = trust.threshold_warnings(decisions, 12)
  assert len(warnings) == 1 and warnings[0].startswith("degenerate threshold")
  assert trust.threshold_warnings(thresholds.decide(
      np.arange(12.0), np.arange(72.0).reshape(12, 6), thresholds.ThresholdRule()), 12) == []


# ----------------------------------------------------------------------------- mistakes


def _prepare_error(tmp_path, seg, scan="t2.nii.gz", stem="t2", segs_name=None, lesions=None):
  images, segs = sct_inputs(str(tmp_path), seg=None, scan=scan, stem=stem)
  if seg is not None:
    shutil.copyfile(SCT / seg, os.path.join(segs, segs_name or f"{stem}_seg_labeled.nii.gz"))
  out = tmp_path / "cohort"
  with pytest.raises(errors.InputError) as info:
    prepare.prepare_cohort("sct", images, segs, str(out),
                           **({} if lesions is None else {"lesions_dir": lesions}))
  assert not out.exists() and "\n" not in str(info.value)
  return str(info.value)


def test_binary_cord_mask_instead_of_the_labelled_one(tmp_path):
  message = _prepare_error(tmp_path, "t2_seg-manual.nii.gz")
  assert "plain binary cord mask" in message
  assert "sct_label_vertebrae -i t2.nii.gz -s t2_seg.nii.gz -c t2" in message
  assert "vertebrae in view" not in message


def test_sparse_point_labels_are_not_a_cord(tmp_path):
  message = _prepare_error(tmp_path, "labels.nii.gz")
  assert "sparse labels (C3: 1 mm^3, C5: 1 mm^3)" in message and "not a cord" in message


def test_fake_lesion_volume_says_what_is_missing_and_how_to_get_it(tmp_path):
  """The fake-lesion volume has a binary cord mask and a lesion mask, no vertebral levels: it
  stops with one line naming the missing file and the SCT command that makes it."""
  lesions = tmp_path / "lesions"
  lesions.mkdir()
  shutil.copyfile(SCT / "t2_fake_lesion_lesion_seg.nii.gz",
                  lesions / "t2_fake_lesion_lesion_seg.nii.gz")
  message = _prepare_error(tmp_path, "t2_fake_lesion_sc_seg.nii.gz", scan="t2_fake_lesion.nii.gz",
                           stem="t2_fake_lesion", segs_name="t2_fake_lesion_sc_seg.nii.gz",
                           lesions=str(lesions))
  assert "t2_fake_lesion_seg_labeled.nii.gz" in message  # what is missing
  assert ("sct_label_vertebrae -i t2_fake_lesion.nii.gz -s t2_fake_lesion_sc_seg.nii.gz -c t2"
          in message)  # how to get it
  assert "t2_fake_lesion_sc_seg_labeled.nii.gz" in message  # what that command writes


def _fake_levels(cord_mask_path, out_path, levels=(3, 4, 5, 6)):
  """The binary cord of the fake-lesion volume valued by made-up levels (equal S-I thirds):
  what sct_label_vertebrae would give, for testing the lesion path only."""
  img = nib.load(cord_mask_path)
  cord = np.asarray(img.dataobj) > 0
  si = np.argwhere(cord)[:, 1]  # stored PSR: axis 1 is S-I (superior = larger index)
  edges = np.linspace(si.max() + 1, si.min(), len(levels) + 1)
  labelled = np.zeros(cord.shape, np.uint8)
  index = np.indices(cord.shape)[1]
  for level, top, bottom in zip(levels, edges[:-1], edges[1:]):
    labelled[cord & (index < top) & (index >= bottom)] = level
  nib.save(nib.Nifti1Image(labelled, img.affine), out_path)


def test_lesion_masks_give_real_scans_pixel_truth(tmp_path):
  """`prepare --lesions DIR`: the real fake-lesion volume (its cord given levels here) goes
  through with its lesion mask as truth: label 6 in the cord, has_lesion, pixel metrics; the
  cord-intensity map lights the real inserted lesion up."""
  images, segs = sct_inputs(str(tmp_path), seg=None, scan="t2_fake_lesion.nii.gz",
                            stem="t2_fake_lesion")
  _fake_levels(SCT / "t2_fake_lesion_sc_seg.nii.gz",
               os.path.join(segs, "t2_fake_lesion_seg_labeled.nii.gz"))
  lesions = tmp_path / "lesions"
  lesions.mkdir()
  shutil.copyfile(SCT / "t2_fake_lesion_lesion_seg.nii.gz",
                  lesions / "t2_fake_lesion_lesion_seg.nii.gz")
  out = str(tmp_path / "cohort")
  records = prepare.prepare_cohort("sct", images, segs, out, lesions_dir=str(lesions))
  assert records[0]["has_lesion"] == "1" and records[0]["lesion_voxels"] == "163"
  label = np.asarray(nib.load(os.path.join(out, "derivatives", "labels", "sub-t2fakelesion",
                                           "anat", "sub-t2fakelesion_T2w_label.nii.gz")).dataobj)
  mask = np.asarray(nib.load(SCT / "t2_fake_lesion_lesion_seg.nii.gz").dataobj) > 0
  assert np.array_equal(label == L.LESION, mask)  # all 163 voxels lie in the cord
  config = data_config()
  config.image_size, config.fov_mm = 96, 96.0  # the 0.8 mm volume spans 79 mm
  prepared = rung_base.prepare_cohort(out, config, progress=False)
  settings = eval_settings.EvalSettings.from_config(ml_collections.ConfigDict(
      {"data": config.to_dict(), "evaluation": {"mad_k": 2.5}}))
  result = rung_base.evaluate(registry.get("intensity")(), prepared, settings,
                              str(tmp_path / "eval"))
  assert result.truth is not None and result.truth.patient.tolist() == [True]
  pixel = result.metrics["pixel"]
  # Measured: AUROC 0.85, AP 0.73 against a prevalence of 0.036 (105 of 2937 ROI pixels).
  prevalence = pixel["num_positive"] / (pixel["num_positive"] + pixel["num_negative"])
  assert pixel["num_positive"] > 20 and pixel["auroc"] > 0.75, pixel
  assert pixel["ap"] > 10 * prevalence, pixel
  # Normal-cord SSIM leaves the lesion out: the scoring ROI's lesion pixels carry label 6.
  assert (prepared.slice_set.labels[prepared.slice_set.score_roi] == L.LESION).sum() == \
      pixel["num_positive"]


def test_a_missing_lesion_mask_is_named(tmp_path):
  lesions = tmp_path / "lesions"
  lesions.mkdir()
  images, segs = sct_inputs(str(tmp_path))
  with pytest.raises(errors.InputError, match="t2_lesion_seg.nii.gz: lesion mask of .* not found"
                     ".*all-zero mask"):
    prepare.prepare_cohort("sct", images, segs, str(tmp_path / "c"), lesions_dir=str(lesions))


def test_a_tilted_cord_is_warned_at_prepare_and_evaluate(tmp_path, capsys):
  """The real scan and its labels rotated 40 degrees in the sagittal plane: segments are row
  bands between level centroids, which a tilted cord breaks; both commands say so."""

  images, segs = os.path.join(tmp_path, "images"), os.path.join(tmp_path, "segs")
  os.makedirs(images)
  os.makedirs(segs)
  for src, dst, order in (("t2.nii.gz", os.path.join(images, "t2.nii.gz"), 1),
                          ("t2_seg-manual_labeled.nii.gz",
                           os.path.join(segs, "t2_seg_labeled.nii.gz"), 0)):
    img = nib.load(SCT / src)
    data = np.asarray(img.dataobj).astype(np.float32)
    # Stored P, S, R: axes 0 and 1 span the sagittal plane.
    rotated = ndimage.rotate(data, 40, axes=(0, 1), order=order, reshape=False)
    nib.save(nib.Nifti1Image(np.rint(rotated).astype(np.int16), img.affine), dst)
  out = str(tmp_path / "cohort")
  prepare.prepare_cohort("sct", images, segs, out)
  assert "the cord runs at 4" in capsys.readouterr().err
  prepared = rung_base.prepare_cohort(out, data_config(), progress=False)
  assert any(w.startswith("cord tilted more than 25 degrees") and "sub-t2 4" in w
             for w in prepared.warnings), prepared.warnings


def test_a_large_cohort_with_truth_keeps_the_flagged_selection_and_says_so(tmp_path):
  """Figures of every patient are for small or truth-less cohorts; a cohort of more than ten
  patients with truth shows the flagged ones, and the report says which were drawn."""

  root = str(tmp_path / "cohort")
  te.write_cohort(root, num_subjects=12)
  prepared = rung_base.prepare_cohort(root, te.data_config(), progress=False)
  settings = eval_settings.EvalSettings(postprocess.PostprocessParams(90, 2, None),
                                        thresholds.ThresholdRule(k=1.0))
  out = tmp_path / "eval"
  result = rung_base.evaluate(registry.get("intensity")(), prepared, settings, str(out))
  flagged = [s.subject_id for s, f in zip(result.scores, result.decisions.patient_flags) if f]
  assert 0 < len(flagged) < 12
  drawn = sorted(p.name[:-len("_slice.png")] for p in (out / "figures").glob("*_slice.png"))
  assert drawn == sorted(flagged)
  assert f"Flagged patients only ({len(flagged)} of 12" in (out / "report.md").read_text()


def test_the_ladder_compares_rungs_on_a_cohort_with_levels_out_of_view(sct_cohort, tmp_path):
  """`u2ad ablate`'s comparison (tables and ROC curves) on real scans whose C5-6 ... C7-T1 are
  out of view (NaN segment scores), one lesion and one normal patient."""
  from u2ad_jax.evaluation import ladder  # pylint: disable=import-outside-toplevel

  src, _ = sct_cohort
  cohort_dir = tmp_path / "cohort"
  shutil.copytree(src, cohort_dir)
  # The same scan as a second subject (the layout's names are the subject's).
  for old, new in (("sub-t2", "sub-t3"),):
    shutil.copytree(cohort_dir / old, cohort_dir / new)
    shutil.copytree(cohort_dir / "derivatives" / "labels" / old,
                    cohort_dir / "derivatives" / "labels" / new)
    for folder in (cohort_dir / new / "anat", cohort_dir / "derivatives" / "labels" / new / "anat"):
      for path in folder.iterdir():
        path.rename(folder / path.name.replace(old, new))
  # Truth known everywhere (0 out of view): the segments' ROC must skip the unscored ones.
  _write_participants(str(cohort_dir), "participant_id\thas_lesion\tC2-3\tC3-4\tC4-5\tC5-6\t"
                                       "C6-7\tC7-T1\nsub-t2\t1\t0\t1\t0\t0\t0\t0\n"
                                       "sub-t3\t0\t0\t0\t0\t0\t0\t0\n")
  prepared = rung_base.prepare_cohort(str(cohort_dir), data_config(), progress=False)
  result = rung_base.evaluate(registry.get("intensity")(), prepared, eval_settings_for_tests())
  assert np.isnan(result.segment_scores[:, 3:]).all()
  path = ladder.write_comparison(str(tmp_path / "ladder"),
                                 {"intensity": result, "eu_au": result})
  assert (tmp_path / "ladder" / "figures" / "roc_ladder.png").stat().st_size > 5000
  assert "roc_ladder.png" in open(path, encoding="utf-8").read()


def test_only_a_checkpoint_before_the_end_of_the_final_stage_is_warned():
  from u2ad_jax.evaluation import trust  # pylint: disable=import-outside-toplevel  (new module)

  config = ml_collections.ConfigDict({"stages": ("pretrain", "adapt_eu", "adapt_eu_au"),
                                      "stage_epochs": {"pretrain": 12, "adapt_eu": 6,
                                                       "adapt_eu_au": 4}})
  final = {"stage": "adapt_eu_au", "epoch": 4, "batch": 0}
  assert trust.checkpoint_warning(final, config, 90) is None
  assert trust.checkpoint_warning(None, config, 90) is None  # position unknown: no claim
  for meta, where in (({"stage": "adapt_eu_au", "epoch": 3, "batch": 2}, "adapt_eu_au, epoch 3 "
                       "of 4"), ({"stage": "adapt_eu", "epoch": 6, "batch": 0}, "adapt_eu")):
    warning = trust.checkpoint_warning(meta, config, 50)
    assert warning.startswith(f"checkpoint step 50 is from stage {where}"), warning

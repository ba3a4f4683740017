"""`u2ad prepare`: TotalSpineSeg / SCT segmentations -> our cohort, checked against native labels.

Fixtures in both tools' formats are generated on the fly from the phantom (and from the real
sample slices where present): the conversion must give back the same cord, CSF and vertebral-body
masks and the same vertebral levels as the labels they were made from. Bad input (label values
that are not the tool's, another grid, a missing segmentation) stops with one line naming the file
and leaves nothing behind.
"""

import json
import os
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.commands import prepare
from u2ad_jax.data import cohort
from u2ad_jax.data import nifti
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import generator
from u2ad_jax.data import spine_tools as st
from u2ad_jax.evaluation import settings as eval_settings
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import registry
from u2ad_jax.data import levels as levels_lib

NUM_SLICES = 5
_NAMES = {i: n for n, i in L.VERTEBRA_INSTANCE_IDS.items()}


# ----------------------------------------------------------------------------- fixtures


def tss_from_labels(labels, vertebrae, arches=True):
  """TotalSpineSeg step-2 labels `[X, Y, Z]` (RAS) made from our label + vertebra maps.

  Cord (3, 6) -> 1, CSF -> 2 (canal minus cord), discs and protrusions -> a disc value, each body
  -> its vertebra's value; with `arches`, every vertebra also gets a posterior arch behind the
  canal (TotalSpineSeg labels whole vertebrae), which the conversion must leave out of label 2.
  """
  tss = np.zeros(labels.shape, np.int32)
  tss[np.isin(labels, (L.DISC, L.PROTRUSION))] = 66
  tss[labels == L.CSF] = st.TSS_CANAL
  tss[np.isin(labels, L.CORD_LABELS)] = st.TSS_CORD
  for instance, name in _NAMES.items():
    tss[vertebrae == instance] = st.TSS_VERTEBRAE[name]
  if arches:
    canal = np.isin(labels, (L.CORD, L.CSF, L.LESION))
    y = np.arange(labels.shape[1])
    for instance, name in _NAMES.items():
      zs = np.flatnonzero((vertebrae == instance).any(axis=(0, 1)))
      for z in zs:
        behind = canal[:, :, z].any(axis=0)
        if not behind.any():
          continue
        back = int(y[behind].min())  # the canal's most posterior voxel at this level
        arch = (y < back - 2) & (y >= back - 10)
        free = labels[:, arch, z] == 0
        tss[:, arch, z] = np.where(free, st.TSS_VERTEBRAE[name], tss[:, arch, z])
  return tss


def sct_from_labels(labels, vertebrae):
  """SCT `_seg_labeled` (cord valued by vertebral level, C1 = 1 ...) and a binary canal mask.

  Levels are projected onto the cord along z, split half-way between consecutive bodies (the
  disc), C1 above the C2 body, T3 below the T2 body.
  """
  cord = np.isin(labels, L.CORD_LABELS)
  ids = sorted(_NAMES)
  tops = {i: np.flatnonzero((vertebrae == i).any(axis=(0, 1))).max() for i in ids}
  bottoms = {i: np.flatnonzero((vertebrae == i).any(axis=(0, 1))).min() for i in ids}
  z = np.arange(labels.shape[2])
  level = np.full(z.shape, 1)  # C1 above C2
  level[z <= tops[ids[0]]] = ids[0]
  for upper, lower in zip(ids[:-1], ids[1:]):
    level[z <= (bottoms[upper] + tops[lower]) / 2] = lower
  level[z < bottoms[ids[-1]]] = ids[-1] + 1  # T3 below T2
  seg = np.where(cord, level[None, None, :], 0).astype(np.int32)
  canal = np.isin(labels, (L.CORD, L.CSF, L.LESION)).astype(np.uint8)
  return seg, canal


def save(path, data, affine, dtype=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), path)


@pytest.fixture(scope="module")
def subject():
  return generator.generate_subject("sub-001", "clinical", 3, True, num_slices=NUM_SLICES)


def write_inputs(root, subject, tool, name="sub-001_T2w", labels=None, vertebrae=None):
  """images/<name>.nii.gz and the tool's segmentation(s) in segs/; returns (images, segs)."""
  labels = subject.labels if labels is None else labels
  vertebrae = subject.vertebrae if vertebrae is None else vertebrae
  images, segs = os.path.join(root, "images"), os.path.join(root, "segs")
  save(os.path.join(images, name + ".nii.gz"), subject.image, subject.affine, np.float32)
  if tool == "totalspineseg":
    save(os.path.join(segs, name + ".nii.gz"), tss_from_labels(labels, vertebrae),
         subject.affine, np.uint8)
  else:
    seg, canal = sct_from_labels(labels, vertebrae)
    save(os.path.join(segs, name + "_seg_labeled.nii.gz"), seg, subject.affine, np.uint8)
    save(os.path.join(segs, name + "_canal_seg.nii.gz"), canal, subject.affine, np.uint8)
  return images, segs


def data_config(size=128):
  return ml_collections.ConfigDict(dict(
      image_size=size, fov_mm=200.0, pixel_mm=1.0, clip_percentiles=(0.2, 99.8),
      min_roi_patches=4, patch_size=8))


def native_cohort(root, subject):
  cohort_writer.write_subject(root, subject)
  return root


# ----------------------------------------------------------------------------- conversion


def test_totalspineseg_conversion_gives_back_the_native_masks(subject):
  tss = tss_from_labels(subject.labels, subject.vertebrae)
  assert (tss[subject.labels == 0] > 0).any()  # the fixture has posterior arches
  c = st.convert_totalspineseg(tss)
  assert np.array_equal(c.labels == L.CORD, np.isin(subject.labels, L.CORD_LABELS))
  assert np.array_equal(c.labels == L.CSF, subject.labels == L.CSF)
  assert np.array_equal(c.labels == L.VERTEBRA, subject.labels == L.VERTEBRA)  # arches dropped
  assert np.array_equal(c.vertebrae, subject.vertebrae)
  assert c.levels_present == L.VERTEBRA_NAMES


def test_prepare_totalspineseg_cohort_matches_native_levels(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  out = str(tmp_path / "cohort")
  records = prepare.prepare_cohort("totalspineseg", images, segs, out)
  assert [r["participant_id"] for r in records] == ["sub-001"]
  (files,) = cohort.list_subjects(out)
  assert files.vertebrae is not None
  image, label, vertebrae = nifti.read_subject(files.image, files.label, files.vertebrae)
  assert np.array_equal(label.data == L.CORD, np.isin(subject.labels, L.CORD_LABELS))
  assert np.array_equal(label.data == L.CSF, subject.labels == L.CSF)
  assert np.array_equal(label.data == L.VERTEBRA, subject.labels == L.VERTEBRA)
  assert np.array_equal(vertebrae.data, subject.vertebrae)
  np.testing.assert_array_equal(image.data, subject.image)

  native = native_cohort(str(tmp_path / "native"), subject)
  got = rung_base.prepare_cohort(out, data_config(), progress=False).levels["sub-001"]
  want = rung_base.prepare_cohort(native, data_config(), progress=False).levels["sub-001"]
  assert got.method == want.method == "identity"
  np.testing.assert_allclose(got.centroid_rows, want.centroid_rows)
  # Without identities (counting bodies) the native cohort agrees too: same bodies, same order.
  counted = levels_lib.find_levels(
      rung_base.prepare_cohort(native, data_config(), progress=False).slice_set.labels)
  np.testing.assert_allclose(counted.centroid_rows, want.centroid_rows)


def test_prepare_sct_cohort_same_cord_csf_and_levels(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "sct")
  out = str(tmp_path / "cohort")
  prepare.prepare_cohort("sct", images, segs, out)
  (files,) = cohort.list_subjects(out)
  _, label, vertebrae = nifti.read_subject(files.image, files.label, files.vertebrae)
  assert np.array_equal(label.data == L.CORD, np.isin(subject.labels, L.CORD_LABELS))
  assert np.array_equal(label.data == L.CSF, subject.labels == L.CSF)
  assert not (label.data == L.VERTEBRA).any()  # SCT gives no bodies (documented)
  got = rung_base.prepare_cohort(out, data_config(), progress=False).levels["sub-001"]
  native = native_cohort(str(tmp_path / "native"), subject)
  want = rung_base.prepare_cohort(native, data_config(), progress=False).levels["sub-001"]
  assert got.method == "identity"
  # Cord-projected level centres vs body centroids: same order, within 3 model pixels (2.3 mm
  # at 128 px over 200 mm), far below a level's height (~15 mm): every segment keeps its name.
  np.testing.assert_allclose(got.centroid_rows, want.centroid_rows, atol=3.0)


def crop_below_c2(subject):
  """The subject with the field of view starting just below the C2 body (C3 on top)."""
  c2 = L.VERTEBRA_INSTANCE_IDS["C2"]
  cut = int(np.flatnonzero((subject.vertebrae == c2).any(axis=(0, 1))).min())
  arrays = {k: getattr(subject, k)[:, :, :cut]
            for k in ("image", "clean", "labels", "vertebrae", "lesion_ids")}
  return generator.Subject(**{**subject.__dict__, **arrays})


def test_field_of_view_from_c3_is_scored_at_the_right_levels(tmp_path, subject):
  cropped = crop_below_c2(subject)
  images, segs = write_inputs(str(tmp_path), cropped, "totalspineseg")
  out = str(tmp_path / "cohort")
  records = prepare.prepare_cohort("totalspineseg", images, segs, out)
  assert records[0]["levels_in_view"] == "C3;C4;C5;C6;C7;T1"  # C3 is C3, not "C2"

  # Counting would call the top body C2 and score every segment one level off ...
  from u2ad_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  (files,) = cohort.list_subjects(out)
  loaded = preprocess.load_subject(files, data_config())
  counted = levels_lib.find_levels(loaded.labels)
  first = loaded.vertebrae[counted.reference_slice, int(round(counted.centroid_rows[0])),
                           int(round(counted.centroid_cols[0]))]
  assert first == L.VERTEBRA_INSTANCE_IDS["C3"]  # its "C2" is C3

  # ... by identity, C2 is n/a and the five segments in view keep their names: the same
  # levels from the converted cohort as from the native one (phantom labels + vertebra map).
  prepared = rung_base.prepare_cohort(out, data_config(), progress=False)
  lv = prepared.levels["sub-001"]
  assert lv.method == "identity" and np.isnan(lv.centroid_rows[0])
  assert lv.segments_present.tolist() == [False, True, True, True, True, True]
  native = rung_base.prepare_cohort(native_cohort(str(tmp_path / "native"), cropped),
                                    data_config(), progress=False)
  np.testing.assert_allclose(native.levels["sub-001"].centroid_rows, lv.centroid_rows)
  # The lesion (C5-6 and C6-7 in the phantom's own truth) lands in the same named segments.
  prepared = native
  truth = levels_lib.segment_truth_from_labels(prepared.slice_set.labels, lv)
  names = [n for n, t in zip(L.SEGMENT_NAMES, truth) if t]
  assert names == subject.truth["lesion_levels"] == ["C5-6", "C6-7"]

  # Scoring writes n/a for C2-3 in every table (the intensity rung: no training needed).
  settings = eval_settings.EvalSettings.from_config(ml_collections.ConfigDict(
      {"data": data_config().to_dict(), "evaluation": {"mad_k": 2.5}}))
  report_dir = tmp_path / "eval"
  result = rung_base.evaluate(registry.get("intensity")(), prepared, settings, str(report_dir))
  assert np.isnan(result.segment_scores[0, 0]) and np.isfinite(result.segment_scores[0, 1:]).all()
  assert not result.decisions.segment_flags[0, 0]
  rows = (report_dir / "segments.csv").read_text().splitlines()
  c23 = [r for r in rows if r.startswith("sub-001,C2-3,")]
  # Every row has the header's ten fields; the truth stays in its column (0: no lesion there).
  assert c23 == ["sub-001,C2-3,n/a,n/a,,,,,,0"]
  assert result.truth is not None and result.truth.segments[0].tolist() == truth.tolist()
  sidecar = json.loads((report_dir / "subjects" / "sub-001" / "sub-001_scores.json").read_text())
  assert sidecar["segments"]["C2-3"]["score"] is None
  assert sidecar["levels"]["centroid_rows"]["C2"] is None
  assert sidecar["levels"]["method"] == "identity"
  assert "C6-7" in sidecar["segments"] and sidecar["segments"]["C6-7"]["score"] is not None
  report_md = (report_dir / "report.md").read_text()
  assert "by vertebra identity" in report_md and "sub-001 C2-3" in report_md


def test_no_complete_segment_is_refused(tmp_path, subject):
  # Only C2 (and the bodies below T1) in view: nothing can be scored; the message says which.
  v = subject.vertebrae.copy()
  for name in ("C3", "C4", "C5", "C6", "C7", "T1"):
    v[v == L.VERTEBRA_INSTANCE_IDS[name]] = 0
  with pytest.raises(errors.LabelError, match="only C2 of C2 ... T1"):
    levels_lib.find_levels(generator.volume_to_model(subject.labels),
                           vertebrae=generator.volume_to_model(v), source="x_vertebrae.nii.gz")


def test_unlabelled_body_does_not_shift_levels(subject):
  # C4 missing from the body label (fused / not segmented): counting shifts, identity does not.
  from_identity = levels_lib.find_levels(
      generator.volume_to_model(subject.labels), vertebrae=generator.volume_to_model(subject.vertebrae))
  labels = subject.labels.copy()
  labels[subject.vertebrae == L.VERTEBRA_INSTANCE_IDS["C4"]] = 0
  model_labels = generator.volume_to_model(labels)
  still = levels_lib.find_levels(model_labels, vertebrae=generator.volume_to_model(subject.vertebrae))
  np.testing.assert_allclose(still.centroid_rows, from_identity.centroid_rows)
  counted = levels_lib.find_levels(model_labels)
  assert counted.method == "count"
  assert abs(counted.centroid_rows[2] - from_identity.centroid_rows[3]) < 1.0  # "C4" is C5


# ----------------------------------------------------------------------------- real slices


def _real_volume(samples_dir, name, copies=3):
  """A thin 3D volume (RAS, 1 mm / 3 mm slices) from one real 2D sample slice."""
  data = np.load(os.path.join(samples_dir, name))
  image, labels = data[0], np.rint(data[2]).astype(np.uint8)
  image_vol = generator.model_to_volume(np.repeat(image[None], copies, 0)).astype(np.float32) * 1000
  label_vol = generator.model_to_volume(np.repeat(labels[None], copies, 0))
  # Identities by counting the sample's own bodies top-down (its label map has none).
  model = np.repeat(labels[None], copies, 0)
  bodies = levels_lib.vertebral_bodies(model[copies // 2])
  vert_model = np.zeros_like(model)
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  comps, _ = ndimage.label(model[copies // 2] == L.VERTEBRA)
  for k, (r, c, _) in enumerate(bodies[:8]):
    comp = comps[int(round(r)), int(round(c))]
    if comp:
      vert_model[:, comps == comp] = k + 2
  affine = np.diag([3.0, 200 / 256, 200 / 256, 1.0])
  return image_vol, label_vol, generator.model_to_volume(vert_model), affine


def test_real_clinical_slice_through_totalspineseg_format(tmp_path, samples_dir):
  image, labels, vertebrae, affine = _real_volume(samples_dir, "clinical_1.npy")
  assert len(np.unique(vertebrae)) - 1 >= 7, "the sample shows C2 ... T1"
  images, segs = str(tmp_path / "images"), str(tmp_path / "segs")
  save(os.path.join(images, "clinical_1.nii.gz"), image, affine, np.float32)
  save(os.path.join(segs, "clinical_1.nii.gz"), tss_from_labels(labels, vertebrae, arches=False),
       affine, np.uint8)
  out = str(tmp_path / "cohort")
  records = prepare.prepare_cohort("totalspineseg", images, segs, out)
  assert records[0]["participant_id"] == "sub-clinical1"
  (files,) = cohort.list_subjects(out)
  _, label, vert = nifti.read_subject(files.image, files.label, files.vertebrae)
  assert np.array_equal(label.data == L.CORD, np.isin(labels, L.CORD_LABELS))
  assert np.array_equal(label.data == L.CSF, labels == L.CSF)
  identified = vertebrae > 0
  # Every identified body is converted (bodies lie in front of the canal on a real slice too).
  assert np.array_equal((label.data == L.VERTEBRA) & identified, identified)
  cfg = data_config(256)
  got = rung_base.prepare_cohort(out, cfg, progress=False).levels["sub-clinical1"]
  counted = levels_lib.find_levels(generator.volume_to_model(labels))
  np.testing.assert_allclose(got.centroid_rows, counted.centroid_rows, atol=0.5)


def test_real_parasagittal_slice_without_cord_is_refused(tmp_path, samples_dir):
  image, labels, vertebrae, affine = _real_volume(samples_dir, "public_1.npy")
  assert not np.isin(labels, L.CORD_LABELS).any()
  images, segs = str(tmp_path / "images"), str(tmp_path / "segs")
  save(os.path.join(images, "public_1.nii.gz"), image, affine, np.float32)
  seg_path = os.path.join(segs, "public_1.nii.gz")
  save(seg_path, tss_from_labels(labels, vertebrae, arches=False), affine, np.uint8)
  with pytest.raises(errors.LabelError, match="no spinal cord") as e:
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "cohort"))
  assert e.value.path == seg_path
  assert not os.path.exists(tmp_path / "cohort")


# ----------------------------------------------------------------------------- bad input


def _leftovers(parent):
  return [n for n in os.listdir(parent) if n.startswith(".cohort.prepare-") or n == "cohort"]


def test_wrong_label_values_one_line_naming_the_file(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  seg_path = os.path.join(segs, "sub-001_T2w.nii.gz")
  bad = nib.load(seg_path).get_fdata().astype(np.int32)
  bad[0, 0, 0] = 150
  save(seg_path, bad, subject.affine, np.uint8)
  with pytest.raises(errors.LabelError, match=r"values \[150\] are not TotalSpineSeg") as e:
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "cohort"))
  assert e.value.path == seg_path and "\n" not in str(e.value)
  assert not _leftovers(tmp_path)
  # The 2024 numbering (cord 200, canal 201) is recognised as such.
  legacy = np.where(bad == st.TSS_CORD, 200, np.where(bad == st.TSS_CANAL, 201, 0))
  save(seg_path, legacy, subject.affine, np.uint8)
  with pytest.raises(errors.LabelError, match="2024 TotalSpineSeg numbering"):
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "cohort"))
  # An SCT disc-label file passed as the labelled cord: 49 / 50 are not levels.
  images, segs = write_inputs(str(tmp_path / "sct"), subject, "sct")
  sct_path = os.path.join(segs, "sub-001_T2w_seg_labeled.nii.gz")
  discs = np.zeros(subject.labels.shape, np.uint8)
  discs[2, 10, 10], discs[2, 10, 40] = 3, 50
  save(sct_path, discs, subject.affine, np.uint8)
  with pytest.raises(errors.LabelError, match="not SCT vertebral levels") as e:
    prepare.prepare_cohort("sct", images, segs, str(tmp_path / "sct" / "cohort"))
  assert e.value.path == sct_path


def test_shifted_grid_one_line_naming_the_file(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  seg_path = os.path.join(segs, "sub-001_T2w.nii.gz")
  shifted = subject.affine.copy()
  shifted[2, 3] += 2.0  # 2 mm along z: another series / resampled
  save(seg_path, nib.load(seg_path).get_fdata(), shifted, np.uint8)
  with pytest.raises(errors.GeometryError, match="affine differs from the scan") as e:
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "cohort"))
  assert e.value.path == seg_path
  assert not _leftovers(tmp_path)


def test_missing_segmentation_one_line_and_nothing_written(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  # A second scan without a segmentation: the first one must not be left behind either.
  save(os.path.join(images, "sub-002_T2w.nii.gz"), subject.image, subject.affine, np.float32)
  with pytest.raises(errors.InputError, match="segmentation of .*sub-002_T2w.nii.gz not found") as e:
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "cohort"))
  assert e.value.path == os.path.join(segs, "sub-002_T2w.nii.gz")
  assert not _leftovers(tmp_path)


def test_existing_output_refused_and_cli_one_line(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  out = tmp_path / "cohort"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  proc = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "prepare", "--from",
                         "totalspineseg", "--images", images, "--segs", segs, "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "is not empty and is not an output of `u2ad prepare`" in err[0], \
      proc.stderr
  assert os.listdir(out) == ["keep.txt"]


def test_earlier_prepare_output_replaced_only_with_overwrite(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  out = str(tmp_path / "cohort")
  prepare.prepare_cohort("totalspineseg", images, segs, out)
  first = sorted(os.listdir(out))
  with pytest.raises(errors.InputError, match="pass --overwrite"):
    prepare.prepare_cohort("totalspineseg", images, segs, out)
  records = prepare.prepare_cohort("totalspineseg", images, segs, out, overwrite=True)
  assert [r["participant_id"] for r in records] == [subject.subject_id]
  assert sorted(os.listdir(out)) == first
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".cohort.")]  # no leftovers
  # The scans' own folder is never an output.
  with pytest.raises(errors.UsageError, match="--images"):
    prepare.prepare_cohort("totalspineseg", images, segs, os.path.join(images, "cohort"))


def test_subject_ids_from_file_names():
  assert st.subject_id_for("sub-007_acq-sag_T2w.nii.gz") == "sub-007"
  assert st.subject_id_for("/x/ses-1_sub-AB12_T2w.nii") == "sub-AB12"
  assert st.subject_id_for("patient 7_T2.nii.gz") == "sub-patient7T2"


def test_participants_table_is_validated(tmp_path, subject):
  images, segs = write_inputs(str(tmp_path), subject, "totalspineseg")
  tsv = tmp_path / "p.tsv"
  tsv.write_text("participant_id\thas_lesion\nsub-001\t1\n")
  out = str(tmp_path / "cohort")
  prepare.prepare_cohort("totalspineseg", images, segs, out, participants=str(tsv))
  assert cohort.read_participants(out)["sub-001"]["has_lesion"] == 1
  tsv.write_text("participant_id\thas_lesion\nsub-001\t1\nsub-999\t0\n")
  with pytest.raises(errors.CorruptFileError, match="sub-999"):
    prepare.prepare_cohort("totalspineseg", images, segs, str(tmp_path / "other"),
                           participants=str(tsv))
  assert not os.path.exists(tmp_path / "other")

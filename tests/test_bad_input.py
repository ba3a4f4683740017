"""Every kind of bad input gets its typed error, and the message names the file."""

import gzip
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax.data import cohort
from u2ad_jax.data import nifti
from u2ad_jax.data import npy_slices
from u2ad_jax.data import preprocess

CFG = ml_collections.ConfigDict(dict(image_size=64, fov_mm=80.0, pixel_mm=1.0,
                                     clip_percentiles=(0.2, 99.8), min_roi_patches=4,
                                     patch_size=8))
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def make_volumes(num_vertebrae=7, shape=(7, 48, 80)):
  """A sagittal stack in RAS: cord + CSF tube along z, vertebral bodies anterior of it."""
  x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
  labels = np.zeros(shape, np.uint8)
  vertebrae = np.zeros(shape, np.uint8)
  for k in range(num_vertebrae):
    body = (y >= 30) & (y < 40) & (z >= 76 - 10 * k - 7) & (z < 76 - 10 * k)
    labels[body] = 2
    vertebrae[body] = 2 + k
  r2 = (2 * (x - 3)) ** 2 + (y - 18) ** 2
  labels[(r2 < 36) & (z > 4) & (z < 76)] = 4
  labels[(r2 < 12) & (z > 4) & (z < 76)] = 3
  image = np.array([0.1, 0.3, 0.45, 0.5, 0.9, 0.6, 0.7, 0.6], np.float32)[labels]
  image += np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
  return np.abs(image), labels, vertebrae


def write_cohort(root, image, labels, vertebrae=None, image_affine=AFFINE, label_affine=AFFINE,
                 subject_id="sub-001"):
  anat = root / subject_id / "anat"
  derivatives = root / "derivatives" / "labels" / subject_id / "anat"
  anat.mkdir(parents=True, exist_ok=True)
  derivatives.mkdir(parents=True, exist_ok=True)
  files = cohort.SubjectFiles(
      subject_id, str(anat / f"{subject_id}_T2w.nii.gz"),
      str(derivatives / f"{subject_id}_T2w_label.nii.gz"),
      None if vertebrae is None else str(derivatives / f"{subject_id}_T2w_vertebrae.nii.gz"))
  nib.save(nib.Nifti1Image(image, image_affine), files.image)
  nib.save(nib.Nifti1Image(labels, label_affine), files.label)
  if vertebrae is not None:
    nib.save(nib.Nifti1Image(vertebrae, image_affine), files.vertebrae)
  return files


def expect(error_type, path, fn, *args, **kwargs):
  """Runs fn, checks the exact error type, its path and that the message names the file."""
  with pytest.raises(error_type) as info:
    fn(*args, **kwargs)
  assert type(info.value) is error_type, f"{type(info.value).__name__}: {info.value}"
  assert info.value.path == os.fspath(path)
  assert os.path.basename(os.fspath(path)) in str(info.value)
  return info.value


def test_valid_subject_loads(tmp_path):
  files = write_cohort(tmp_path, *make_volumes())
  slices = preprocess.load_subject(files, CFG, require_vertebrae=True)
  assert len(slices) >= 3


def test_truncated_gzip(tmp_path):
  files = write_cohort(tmp_path, *make_volumes()[:2])
  data = open(files.image, "rb").read()
  with open(files.image, "wb") as f:
    f.write(data[: len(data) // 2])
  expect(errors.CorruptFileError, files.image, preprocess.load_subject, files, CFG)


def test_gzip_of_truncated_nifti(tmp_path):
  # A complete gzip stream whose NIfTI payload is short: the header promises more voxels.
  files = write_cohort(tmp_path, *make_volumes()[:2])
  raw = gzip.decompress(open(files.label, "rb").read())
  with open(files.label, "wb") as f:
    f.write(gzip.compress(raw[: 352 + 100]))
  expect(errors.CorruptFileError, files.label, preprocess.load_subject, files, CFG)


def test_not_nifti(tmp_path):
  files = write_cohort(tmp_path, *make_volumes()[:2])
  with open(files.image, "wb") as f:
    f.write(b"this is not a NIfTI file" * 10)
  expect(errors.CorruptFileError, files.image, nifti.read_volume, files.image)


def test_missing_file(tmp_path):
  expect(errors.InputError, tmp_path / "nothing.nii.gz", nifti.read_volume, tmp_path / "nothing.nii.gz")


@pytest.mark.parametrize("shape", [(7, 48, 96, 2), (48, 96)])
def test_not_3d(tmp_path, shape):
  path = tmp_path / "bad.nii.gz"
  nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
  expect(errors.GeometryError, path, nifti.read_volume, path)


def test_shape_mismatch(tmp_path):
  image, labels, _ = make_volumes()
  files = write_cohort(tmp_path, image, labels[:, :, :-2].copy())
  error = expect(errors.GeometryError, files.label, preprocess.load_subject, files, CFG)
  assert "shape" in error.problem


def test_affine_mismatch(tmp_path):
  image, labels, _ = make_volumes()
  shifted = AFFINE.copy()
  shifted[2, 3] += 1.5
  files = write_cohort(tmp_path, image, labels, label_affine=shifted)
  error = expect(errors.GeometryError, files.label, preprocess.load_subject, files, CFG)
  assert "affine" in error.problem
  # Differences below the tolerance (float32 round-off of converters) are accepted.
  nearly = AFFINE.copy()
  nearly[0, 3] += 1e-5
  files = write_cohort(tmp_path / "ok", image, labels, label_affine=nearly)
  assert len(preprocess.load_subject(files, CFG)) > 0


def test_vertebrae_grid_mismatch(tmp_path):
  image, labels, vertebrae = make_volumes()
  files = write_cohort(tmp_path, image, labels, vertebrae[:-1].copy())
  expect(errors.GeometryError, files.vertebrae, preprocess.load_subject, files, CFG)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_image(tmp_path, value):
  image, labels, _ = make_volumes()
  image[3, 20, 40] = value
  files = write_cohort(tmp_path, image, labels)
  error = expect(errors.NonFiniteError, files.image, preprocess.load_subject, files, CFG)
  assert ("1 NaN" in error.problem) == bool(np.isnan(value))


def test_non_finite_labels(tmp_path):
  image, labels, _ = make_volumes()
  labels = labels.astype(np.float32)
  labels[0, 0, 0] = np.nan
  files = write_cohort(tmp_path, image, labels)
  expect(errors.NonFiniteError, files.label, preprocess.load_subject, files, CFG)


def test_unknown_label_value(tmp_path):
  image, labels, _ = make_volumes()
  labels[0, 0, :3] = 9
  files = write_cohort(tmp_path, image, labels)
  error = expect(errors.LabelError, files.label, preprocess.load_subject, files, CFG)
  assert "[9]" in error.problem


def test_non_integer_labels(tmp_path):
  image, labels, _ = make_volumes()
  labels = labels.astype(np.float32)
  labels[0, 0, 0] = 2.5
  files = write_cohort(tmp_path, image, labels)
  expect(errors.LabelError, files.label, preprocess.load_subject, files, CFG)


def test_unknown_vertebra_id(tmp_path):
  image, labels, vertebrae = make_volumes()
  vertebrae[0, 0, 0] = 42
  files = write_cohort(tmp_path, image, labels, vertebrae)
  expect(errors.LabelError, files.vertebrae, preprocess.load_subject, files, CFG)


def test_empty_cord_roi(tmp_path):
  image, labels, _ = make_volumes()
  labels[labels == 3] = 4  # CSF only: no cord anywhere
  files = write_cohort(tmp_path, image, labels)
  error = expect(errors.LabelError, files.label, preprocess.load_subject, files, CFG)
  assert "cord" in error.problem


def test_cord_roi_too_small_on_every_slice(tmp_path):
  image, labels, _ = make_volumes()
  files = write_cohort(tmp_path, image, labels)
  cfg = ml_collections.ConfigDict(CFG.to_dict())
  cfg.min_roi_patches = 64 * 64 // 64 + 1  # more patches than the grid has
  expect(errors.LabelError, files.label, preprocess.load_subject, files, cfg)


def test_missing_vertebrae_only_matters_for_scoring(tmp_path):
  image, labels, vertebrae = make_volumes(num_vertebrae=5)
  files = write_cohort(tmp_path, image, labels)
  assert len(preprocess.load_subject(files, CFG)) > 0  # training does not need vertebrae
  error = expect(errors.LabelError, files.label, preprocess.load_subject, files, CFG,
                 require_vertebrae=True)
  assert "5" in error.problem
  # With an instance map the levels are known by identity: C2 ... C6 score C2-3 ... C5-6 and
  # C6-7 / C7-T1 are n/a (data/levels.py); with no segment left the missing levels are named.
  files = write_cohort(tmp_path / "with_map", image, labels, vertebrae)
  assert len(preprocess.load_subject(files, CFG, require_vertebrae=True)) > 0
  image, labels, vertebrae = make_volumes(num_vertebrae=1)
  files = write_cohort(tmp_path / "one_level", image, labels, vertebrae)
  error = expect(errors.LabelError, files.vertebrae, preprocess.load_subject, files, CFG,
                 require_vertebrae=True)
  assert "C7" in error.problem and "T1" in error.problem


def test_constant_image(tmp_path):
  _, labels, _ = make_volumes()
  files = write_cohort(tmp_path, np.full(labels.shape, 0.5, np.float32), labels)
  expect(errors.InputError, files.image, preprocess.load_subject, files, CFG)


def test_missing_label_file(tmp_path):
  files = write_cohort(tmp_path, *make_volumes()[:2])
  os.remove(files.label)
  expect(errors.InputError, files.label, cohort.list_subjects, tmp_path)
  with pytest.raises(errors.InputError, match="sub-001_T2w_label"):
    preprocess.load_cohort(tmp_path, CFG, progress=False)


def test_empty_or_missing_cohort(tmp_path):
  expect(errors.InputError, tmp_path, cohort.list_subjects, tmp_path)
  expect(errors.InputError, tmp_path / "absent", cohort.list_subjects, tmp_path / "absent")
  write_cohort(tmp_path, *make_volumes()[:2])
  expect(errors.InputError, tmp_path, cohort.list_subjects, tmp_path, ["sub-404"])


def test_skip_bad_subjects(tmp_path, capsys):
  image, labels, _ = make_volumes()
  write_cohort(tmp_path, image, labels, subject_id="sub-001")
  bad = labels.copy()
  bad[bad == 3] = 4
  write_cohort(tmp_path, image, bad, subject_id="sub-002")
  with pytest.raises(errors.LabelError):
    preprocess.load_cohort(tmp_path, CFG, progress=False)
  loaded = preprocess.load_cohort(tmp_path, CFG, progress=True, skip_bad=True)
  assert loaded.subjects == ["sub-001"]
  err = capsys.readouterr().err
  assert "skipping sub-002" in err and "1/2 sub-001" in err


def test_participants_without_id_column(tmp_path):
  (tmp_path / "participants.tsv").write_text("subject\tgrade\nsub-001\t1\n")
  expect(errors.CorruptFileError, tmp_path / "participants.tsv", cohort.read_participants, tmp_path)


def test_participants_bad_integer(tmp_path):
  (tmp_path / "participants.tsv").write_text("participant_id\tgrade\nsub-001\thigh\n")
  expect(errors.CorruptFileError, tmp_path / "participants.tsv", cohort.read_participants, tmp_path)


def _npy(tmp_path, array, name="slice.npy"):
  path = tmp_path / name
  np.save(path, array)
  return path


def _good_npy():
  array = np.zeros((3, 32, 32))
  array[0] = np.linspace(0, 1, 32 * 32).reshape(32, 32)
  array[2, 10:20, 12:15] = 3
  array[1] = array[2] > 0
  return array


def test_npy_bad_inputs(tmp_path):
  good = _good_npy()
  image, roi, labels = npy_slices.load_npy_slice(_npy(tmp_path, good))
  assert image.shape == (32, 32) and roi.sum() == 30 and labels.max() == 3
  expect(errors.GeometryError, _npy(tmp_path, good[:2], "two.npy"), npy_slices.load_npy_slice,
         tmp_path / "two.npy")
  nan = good.copy()
  nan[0, 1, 1] = np.nan
  expect(errors.NonFiniteError, _npy(tmp_path, nan, "nan.npy"), npy_slices.load_npy_slice,
         tmp_path / "nan.npy")
  unknown = good.copy()
  unknown[2, 0, 0] = 9
  expect(errors.LabelError, _npy(tmp_path, unknown, "label.npy"), npy_slices.load_npy_slice,
         tmp_path / "label.npy")
  fuzzy_roi = good.copy()
  fuzzy_roi[1, 0, 0] = 0.5
  expect(errors.LabelError, _npy(tmp_path, fuzzy_roi, "roi.npy"), npy_slices.load_npy_slice,
         tmp_path / "roi.npy")
  bright = good.copy()
  bright[0, 0, 0] = 3.0
  expect(errors.CorruptFileError, _npy(tmp_path, bright, "range.npy"), npy_slices.load_npy_slice,
         tmp_path / "range.npy")
  (tmp_path / "text.npy").write_bytes(b"not numpy")
  expect(errors.CorruptFileError, tmp_path / "text.npy", npy_slices.load_npy_slice,
         tmp_path / "text.npy")
  empty = tmp_path / "empty"
  empty.mkdir()
  expect(errors.InputError, empty, npy_slices.load_npy_dir, empty)

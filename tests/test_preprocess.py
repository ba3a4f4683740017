"""NIfTI reading, preprocessing geometry (incl. the round trip back to the input grid),
intensity normalisation, ROIs, the .npy sample reader, cohort discovery and atomic writes.

The fixtures are small synthetic volumes built here from world-coordinate shapes (a cylindrical
cord in a CSF sleeve, block vertebral bodies with discs between them), stored with different
axis orders / flips and anisotropic voxels so that reorientation is exercised.
"""

import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax.data import cohort
from u2ad_jax.data import nifti
from u2ad_jax.data import npy_slices
from u2ad_jax.data import preprocess
from u2ad_jax.data import slice_geometry
from u2ad_jax.data import sliceset

# Stored axis codes -> (canonical world axis, sign).
_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
# Canonical extent: 9 sagittal slices of 2.5 mm, 80 x 0.9 mm A-P, 100 x 1.1 mm S-I.
SPACING = (2.5, 0.9, 1.1)
CANONICAL_SHAPE = (9, 80, 100)
STORAGES = [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "L")]
INTENSITY = np.array([0.0, 0.3, 0.45, 0.5, 0.9, 0.6, 0.7, 0.6])


def data_cfg(**overrides):
  cfg = dict(image_size=96, fov_mm=96.0, pixel_mm=1.0, clip_percentiles=(0.2, 99.8),
             min_roi_patches=4, patch_size=8)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def make_affine(codes):
  """Affine storing the canonical grid with the given axis codes, volume centre at the origin."""
  affine = np.eye(4)
  affine[:3, :3] = 0
  shape = []
  for i, code in enumerate(codes):
    world, sign = _AXES[code]
    affine[world, i] = sign * SPACING[world]
    shape.append(CANONICAL_SHAPE[world])
  affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
  return affine, tuple(shape)


def make_subject(codes=("R", "A", "S"), seed=0):
  """Returns (image float32, labels uint8, vertebra ids uint8, affine) on the stored grid."""
  affine, shape = make_affine(codes)
  ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
  xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
  x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
  labels = np.zeros(shape, np.uint8)
  vertebrae = np.zeros(shape, np.uint8)
  box = (np.abs(x) < 9) & (y > 2) & (y < 16)  # vertebral bodies, anterior (+y) of the canal
  for k in range(8):  # C2 ... T2, 8 mm bodies and 4 mm discs from z = 46 mm down
    top = 46 - 12 * k
    body = box & (z <= top) & (z > top - 8)
    labels[body] = 2
    vertebrae[body] = 2 + k
    labels[box & (z <= top - 8) & (z > top - 12)] = 1
  r2 = x ** 2 + (y + 10) ** 2  # canal centred 10 mm posterior
  labels[(r2 < 6.5 ** 2) & (np.abs(z) < 44)] = 4
  # Cord only from z = -20 to 40 mm: asymmetric along S-I, so a flipped axis would show.
  labels[(r2 < 4.0 ** 2) & (z > -20) & (z < 40)] = 3
  rng = np.random.default_rng(seed)
  image = INTENSITY[labels] + np.where((np.abs(y) < 30) & (labels == 0), 0.2, 0.0)
  image = np.abs(image + rng.normal(0, 0.02, shape)).astype(np.float32)
  return image, labels, vertebrae, affine


def write_subject(root, subject_id, image, labels, vertebrae, affine, label_affine=None):
  anat = os.path.join(root, subject_id, "anat")
  derivatives = os.path.join(root, "derivatives", "labels", subject_id, "anat")
  os.makedirs(anat, exist_ok=True)
  os.makedirs(derivatives, exist_ok=True)
  files = cohort.SubjectFiles(subject_id, os.path.join(anat, f"{subject_id}_T2w.nii.gz"),
                              os.path.join(derivatives, f"{subject_id}_T2w_label.nii.gz"),
                              None if vertebrae is None else
                              os.path.join(derivatives, f"{subject_id}_T2w_vertebrae.nii.gz"))
  nib.save(nib.Nifti1Image(image, affine), files.image)
  nib.save(nib.Nifti1Image(labels, affine if label_affine is None else label_affine), files.label)
  if vertebrae is not None:
    nib.save(nib.Nifti1Image(vertebrae, affine), files.vertebrae)
  return files


def dice(a, b):
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ----------------------------------------------------------------------------- nifti


@pytest.mark.parametrize("codes", STORAGES)
def test_read_volume_is_closest_canonical_and_invertible(tmp_path, codes):
  image, labels, _, affine = make_subject(codes)
  path = tmp_path / "img.nii.gz"
  nib.save(nib.Nifti1Image(image, affine), path)
  volume = nifti.read_volume(path)
  reference = nib.as_closest_canonical(nib.load(path))
  np.testing.assert_array_equal(volume.data, reference.get_fdata(dtype=np.float32))
  np.testing.assert_allclose(volume.affine, reference.affine)
  assert volume.data.shape == CANONICAL_SHAPE
  np.testing.assert_allclose(volume.voxel_mm, SPACING)
  assert volume.orientation.canonical_shape == CANONICAL_SHAPE
  np.testing.assert_array_equal(volume.orientation.to_original(volume.data), image)


def test_4d_with_singleton_time_axis_reads_as_3d(tmp_path):
  image, _, _, affine = make_subject()
  path = tmp_path / "img4d.nii.gz"
  nib.save(nib.Nifti1Image(image[..., None], affine), path)
  volume = nifti.read_volume(path)
  assert volume.data.shape == CANONICAL_SHAPE
  np.testing.assert_array_equal(volume.data, image)


def test_write_like_keeps_grid_affine_and_values(tmp_path):
  image, _, _, affine = make_subject(("P", "I", "L"))
  source = tmp_path / "img.nii.gz"
  header = nib.Nifti1Image(image, affine).header
  header.set_slope_inter(2.0, 1.0)  # an input scaling must not leak into the written map
  nib.save(nib.Nifti1Image(image, affine, header), source)
  values = np.random.default_rng(1).random(image.shape).astype(np.float32)
  out = tmp_path / "map.nii.gz"
  nifti.write_like(out, values, source)
  written = nib.load(out)
  np.testing.assert_allclose(written.affine, nib.load(source).affine)
  assert written.get_data_dtype() == np.float32
  np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), values)
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
  with pytest.raises(ValueError):
    nifti.write_like(out, values[:-1], source)
  # Other reference forms: an (affine, header) tuple, and a 4D singleton input file.
  nifti.write_like(tmp_path / "tuple.nii", values, (affine, None))
  np.testing.assert_allclose(nib.load(tmp_path / "tuple.nii").affine, affine)
  nib.save(nib.Nifti1Image(image[..., None], affine), tmp_path / "img4d.nii.gz")
  nifti.write_like(tmp_path / "from4d.nii.gz", values, tmp_path / "img4d.nii.gz")
  assert nib.load(tmp_path / "from4d.nii.gz").shape == image.shape


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("codes", STORAGES)
def test_model_frame_orientation_independent_of_storage(tmp_path, codes):
  reference = preprocess.load_subject(write_subject(tmp_path / "ras", "sub-1", *make_subject()[:3],
                                                    make_subject()[3]), data_cfg())
  image, labels, vertebrae, affine = make_subject(codes)
  slices = preprocess.load_subject(write_subject(tmp_path / "x", "sub-1", image, labels, vertebrae,
                                                 affine), data_cfg())
  # Same anatomy stored three ways -> identical label slices in the model frame.
  np.testing.assert_array_equal(slices.labels, reference.labels)
  np.testing.assert_array_equal(slices.slice_index, reference.slice_index)
  # Rows run S -> I: the cord (z in -20..40 mm) sits in the upper half, 10 mm above centre.
  # Columns run A -> P: vertebral bodies (anterior) left of the cord.
  cord_rows, cord_cols = np.nonzero((slices.labels == 3).any(axis=0))
  _, vertebra_cols = np.nonzero((slices.labels == 2).any(axis=0))
  centre = (96 - 1) / 2
  assert cord_rows.mean() == pytest.approx(centre - 10, abs=1.0)
  assert cord_cols.mean() == pytest.approx(centre + 10, abs=1.0)
  assert vertebra_cols.mean() < cord_cols.mean() - 10
  # Top-most vertebra in the model frame is instance C2 (id 2).
  rows_c2 = np.nonzero((slices.vertebrae == 2).any(axis=(0, 2)))[0]
  rows_c3 = np.nonzero((slices.vertebrae == 3).any(axis=(0, 2)))[0]
  assert rows_c2.max() < rows_c3.min()


@pytest.mark.parametrize("codes", STORAGES)
def test_model_to_world_matches_physical_layout(tmp_path, codes):
  image, labels, vertebrae, affine = make_subject(codes)
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  geometry = preprocess.load_subject(files, data_cfg()).geometries["sub-1"]
  pixel = 96.0 / 96  # fov_mm / image_size
  # Slice 4 is the mid-sagittal one (x = 0); the field of view is centred within a pixel.
  centre = geometry.model_to_world(4, 47.5, 47.5)
  np.testing.assert_allclose(centre, [0.0, 0.0, 0.0], atol=pixel)
  down = geometry.model_to_world(4, 48.5, 47.5) - centre
  right = geometry.model_to_world(4, 47.5, 48.5) - centre
  np.testing.assert_allclose(down, [0, 0, -pixel], atol=1e-6)  # next row: 1 pixel inferior
  np.testing.assert_allclose(right, [0, -pixel, 0], atol=1e-6)  # next column: 1 pixel posterior
  np.testing.assert_allclose(geometry.model_to_world(0, 0, 0)[0], -10.0)  # slice 0: x = -10 mm


@pytest.mark.parametrize("codes,image_size", [(STORAGES[0], 96), (STORAGES[1], 128),
                                              (STORAGES[2], 96), (STORAGES[2], 128)])
def test_cord_mask_round_trip_overlays_input(tmp_path, codes, image_size):
  image, labels, vertebrae, affine = make_subject(codes)
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  slices = preprocess.load_subject(files, data_cfg(image_size=image_size))
  geometry = slices.geometries["sub-1"]
  cord_slices = slices.labels == 3
  # The fixture crops S-I (110 mm > 96) and pads A-P (72 mm < 96): both inverted.
  back = slice_geometry.slices_to_volume(cord_slices.astype(np.float32), slices.slice_index, geometry)
  assert back.shape == labels.shape  # the STORED grid, not the canonical one
  assert dice(back > 0.5, labels == 3) > 0.9
  out = tmp_path / "cord_map.nii.gz"
  nifti.write_like(out, back, geometry)
  written = nib.load(out)
  np.testing.assert_allclose(written.affine, affine, atol=1e-6)
  assert dice(written.get_fdata() > 0.5, nib.load(files.label).get_fdata() == 3) > 0.9
  # Integer maps default to nearest-neighbour: the output holds only the input's values.
  back_nearest = slice_geometry.slices_to_volume(slices.labels, slices.slice_index, geometry)
  assert set(np.unique(back_nearest)) <= set(np.unique(labels))
  assert dice(back_nearest == 3, labels == 3) > 0.9


@pytest.mark.parametrize("codes", STORAGES)
def test_single_voxel_forward_and_back(tmp_path, codes):
  image, labels, vertebrae, affine = make_subject(codes)
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  slices = preprocess.load_subject(files, data_cfg())
  geometry = slices.geometries["sub-1"]
  voxel_size = np.array(SPACING)
  # Forward: a bright canonical voxel appears at the model pixel whose world position is it.
  volume = nifti.read_volume(files.image)
  spike = np.zeros(CANONICAL_SHAPE, np.float32)
  target = (5, 31, 62)
  spike[target] = 1.0
  model = slice_geometry.to_model_slices(spike, geometry, order=1, antialias=False)
  s, r, c = np.unravel_index(np.argmax(model), model.shape)
  assert s == target[0]
  world_target = volume.affine[:3, :3] @ np.array(target) + volume.affine[:3, 3]
  assert np.all(np.abs(geometry.model_to_world(s, r, c) - world_target) <= voxel_size)
  # Back: one bright model pixel lands on the stored voxel under it (within one voxel).
  maps = np.zeros((1, 96, 96), np.float32)
  maps[0, 30, 70] = 1.0
  back = slice_geometry.slices_to_volume(maps, [3], geometry)
  ijk = np.array(np.unravel_index(np.argmax(back), back.shape))
  world_back = affine[:3, :3] @ ijk + affine[:3, 3]
  assert np.all(np.abs(world_back - geometry.model_to_world(3, 30, 70)) <= voxel_size)
  assert back.max() >= 0.25  # bilinear weight of the nearest voxel centre


def test_pixels_outside_acquired_volume_are_zero(tmp_path):
  image, labels, vertebrae, affine = make_subject()
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  slices = preprocess.load_subject(files, data_cfg())
  inside = slice_geometry.model_inside(slices.geometries["sub-1"])
  # A-P extent is 72 mm of 96: 12 padded columns on each side (within one pixel of rounding).
  covered_cols = np.flatnonzero(inside.any(axis=0))
  assert 11 <= covered_cols[0] <= 13 and 11 <= 95 - covered_cols[-1] <= 13
  assert inside[:, covered_cols[0]:covered_cols[-1] + 1].all()
  # S-I extent is 110 mm of 96: cropped, no padded rows.
  assert inside.any(axis=1).all()
  assert np.all(slices.images[:, ~inside] == 0)
  assert np.all(slices.labels[:, ~inside] == 0)


# ----------------------------------------------------------------------------- intensity


def test_normalize_intensity_matches_direct_numpy():
  rng = np.random.default_rng(3)
  volume = rng.gamma(2.0, 0.2, size=(4, 32, 32)).astype(np.float32)
  volume[:, :5] = 0.0  # background that must not count as foreground
  volume[0, 10, 10] = 40.0  # a hot voxel that the upper percentile clips
  inside = np.ones((32, 32), bool)
  inside[:, -3:] = False
  normalised, (lo, hi) = preprocess.normalize_intensity(volume, inside[None], (0.2, 99.8), 0.01)
  values = volume[:, inside]
  foreground = values[values > 0.01 * values.max()]
  lo_ref, hi_ref = np.percentile(foreground.astype(np.float64), [0.2, 99.8])
  clipped = np.clip(volume, lo_ref, hi_ref)
  expected = (clipped - clipped[:, inside].min()) / (clipped[:, inside].max() - clipped[:, inside].min())
  expected[:, ~inside] = 0
  assert (lo, hi) == pytest.approx((lo_ref, hi_ref))
  np.testing.assert_allclose(normalised, expected, atol=1e-6)
  assert normalised.dtype == np.float32


def test_loaded_images_follow_percentile_rule(tmp_path):
  image, labels, vertebrae, affine = make_subject()
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  cfg = data_cfg(min_roi_patches=0)  # keep every slice: the percentiles are per volume
  slices = preprocess.load_subject(files, cfg)
  geometry = slices.geometries["sub-1"]
  assert len(slices) == CANONICAL_SHAPE[0]
  raw = slice_geometry.to_model_slices(nifti.read_volume(files.image).data, geometry, order=3)
  inside = slice_geometry.model_inside(geometry)
  values = raw[:, inside]
  foreground = values[values > 0.01 * values.max()]
  lo, hi = np.percentile(foreground.astype(np.float64), [0.2, 99.8])
  assert geometry.intensity_range == pytest.approx((lo, hi))
  np.testing.assert_allclose(slices.images, np.where(inside, (np.clip(raw, lo, hi) - lo) / (hi - lo), 0),
                             atol=1e-6)
  assert slices.images.min() == 0.0 and slices.images.max() == 1.0
  # 0.2 % of the foreground saturates at the top (percentile definition, up to ties / rounding).
  fg = slices.images[:, inside][values > 0.01 * values.max()]
  assert 0.001 <= (fg >= 1.0).mean() <= 0.004


# ----------------------------------------------------------------------------- ROIs and slices


def test_rois_from_labels():
  labels = np.zeros((2, 16, 16), np.uint8)
  labels[0, 4:12, 6:9] = 3  # 3 px wide cord -> erosion keeps the middle column
  labels[0, 4:12, 9:11] = 4
  labels[1, 4:12, 7] = 6  # 1 px wide lesion-only cord: erosion empties it -> fallback
  cross = ndimage.generate_binary_structure(2, 1)
  train = sliceset.train_roi_from_labels(labels)
  score = sliceset.score_roi_from_labels(labels)
  for i in range(2):
    np.testing.assert_array_equal(train[i], ndimage.binary_dilation(np.isin(labels[i], (3, 4, 6)), cross))
  np.testing.assert_array_equal(score[0], ndimage.binary_erosion(labels[0] == 3, cross))
  assert score[0].sum() == 6 and not score[0][labels[0] == 4].any()
  np.testing.assert_array_equal(score[1], labels[1] == 6)


def test_slice_filter_by_roi_patches(tmp_path):
  image, labels, vertebrae, affine = make_subject()
  files = write_subject(tmp_path, "sub-1", image, labels, vertebrae, affine)
  every = preprocess.load_subject(files, data_cfg(min_roi_patches=0))
  counts = sliceset.roi_patch_count(every.train_roi, 8)
  threshold = int(np.sort(counts)[-3]) if np.sort(counts)[-3] > 0 else 1
  kept = preprocess.load_subject(files, data_cfg(min_roi_patches=threshold))
  np.testing.assert_array_equal(kept.slice_index, np.flatnonzero(counts >= threshold))
  assert 3 <= len(kept) < len(every)
  # The lateral slices (|x| >= 7.5 mm) have no cord or CSF.
  assert counts[0] == counts[-1] == 0
  # patch counting agrees with a direct loop
  roi = every.train_roi[4]
  direct = sum(roi[i:i + 8, j:j + 8].any() for i in range(0, 96, 8) for j in range(0, 96, 8))
  assert counts[4] == direct


def test_slice_set_subset_and_concat(tmp_path):
  parts = []
  for k, codes in enumerate(STORAGES[:2]):
    image, labels, vertebrae, affine = make_subject(codes, seed=k)
    parts.append(preprocess.load_subject(write_subject(tmp_path, f"sub-{k}", image, labels,
                                                       vertebrae, affine), data_cfg()))
  both = sliceset.SliceSet.concat(parts)
  assert len(both) == len(parts[0]) + len(parts[1])
  assert both.subjects == ["sub-0", "sub-1"]
  np.testing.assert_array_equal(both.subject("sub-1").images, parts[1].images)
  picked = both.subset([len(parts[0]), 0])
  assert picked.subject_ids == ["sub-1", "sub-0"]
  np.testing.assert_array_equal(picked.images[1], parts[0].images[0])
  assert set(both.subset(np.arange(2)).geometries) == {"sub-0"}
  mask = np.zeros(len(both), bool)
  mask[-1] = True
  assert both.subset(mask).slice_index[0] == parts[1].slice_index[-1]
  # The same subject loaded twice carries two geometries: concatenating them is refused.
  again = preprocess.load_subject(cohort.list_subjects(tmp_path, ["sub-0"])[0], data_cfg())
  with pytest.raises(ValueError):
    sliceset.SliceSet.concat([parts[0], again])


# ----------------------------------------------------------------------------- cohort


def test_list_subjects_and_participants(tmp_path):
  for k in (2, 1):
    image, labels, vertebrae, affine = make_subject(seed=k)
    write_subject(tmp_path, f"sub-00{k}", image, labels, vertebrae if k == 1 else None, affine)
  os.makedirs(tmp_path / "sub-009" / "anat")  # a folder without an image is not a subject
  subjects = cohort.list_subjects(tmp_path)
  assert [s.subject_id for s in subjects] == ["sub-001", "sub-002"]
  assert subjects[0].vertebrae is not None and subjects[1].vertebrae is None
  assert [s.subject_id for s in cohort.list_subjects(tmp_path, ["sub-002"])] == ["sub-002"]
  header = ["participant_id", "profile", "has_lesion", "grade", "lesion_levels",
            "C2-3", "C3-4", "C4-5", "C5-6", "C6-7", "C7-T1"]
  io_utils.write_csv(tmp_path / "participants.tsv", [
      ["sub-001", "clinical", 1, 2, "C4-5,C5-6", 0, 0, 1, 1, 0, 0],
      ["sub-002", "clinical", 0, 0, "n/a", 0, 0, 0, 0, 0, 0]], header=header, delimiter="\t")
  table = cohort.read_participants(tmp_path)
  assert table["sub-001"]["has_lesion"] == 1 and table["sub-001"]["grade"] == 2
  assert table["sub-001"]["lesion_levels"] == ["C4-5", "C5-6"]
  assert table["sub-001"]["C5-6"] == 1 and table["sub-001"]["profile"] == "clinical"
  assert table["sub-002"]["lesion_levels"] == []
  loaded = preprocess.load_cohort(tmp_path, data_cfg(), progress=False)
  assert loaded.subjects == ["sub-001", "sub-002"]
  assert loaded.subject("sub-002").vertebrae.max() == 0
  assert loaded.subject("sub-001").vertebrae.max() > 0


def test_read_participants_absent_is_empty(tmp_path):
  assert cohort.read_participants(tmp_path) == {}


# ----------------------------------------------------------------------------- npy samples


def test_npy_samples_load(samples_dir):
  names = sorted(p.name for p in samples_dir.glob("*.npy"))
  assert len(names) == 5
  cross = ndimage.generate_binary_structure(2, 1)
  for name in names:
    image, roi, labels = npy_slices.load_npy_slice(samples_dir / name)
    assert image.shape == roi.shape == labels.shape == (256, 256)
    assert image.dtype == np.float32 and roi.dtype == bool and labels.dtype == np.uint8
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.9
    assert set(np.unique(labels)) <= set(range(8))
    raw = np.load(samples_dir / name)
    np.testing.assert_array_equal(labels, raw[2].astype(np.uint8))
    # README: ROI = cord + CSF (dilated once, largest component). In the files the ROI lies
    # inside the dilated cord + CSF and covers the undilated cord + CSF.
    cord_csf = np.isin(labels, (3, 4))
    assert not (roi & ~ndimage.binary_dilation(cord_csf, cross)).any()
    if cord_csf.any():
      assert dice(roi, cord_csf) > 0.85
    else:
      assert not roi.any()
  clinical = npy_slices.load_npy_slice(samples_dir / "clinical_1.npy")
  assert clinical[1].sum() > 1000 and np.isin(clinical[2], (3,)).sum() > 500
  slice_set = npy_slices.load_npy_dir(samples_dir)
  assert len(slice_set) == 5 and slice_set.images.shape == (5, 256, 256)
  assert slice_set.subject_ids == [n[:-4] for n in names]
  assert all(g is None for g in slice_set.geometries.values())
  np.testing.assert_array_equal(slice_set.score_roi, sliceset.score_roi_from_labels(slice_set.labels))
  assert slice_set.subject("clinical_1").score_roi.sum() > 0
  assert slice_set.subject("public_1").score_roi.sum() == 0
  recomputed = npy_slices.load_npy_dir(samples_dir, recompute_train_roi=True)
  np.testing.assert_array_equal(recomputed.train_roi,
                                sliceset.train_roi_from_labels(slice_set.labels))


# ----------------------------------------------------------------------------- io_utils


def test_atomic_writes(tmp_path):
  target = tmp_path / "sub" / "metrics.json"
  io_utils.write_json(target, {"a": np.float32(1.5), "b": np.arange(3)})
  assert target.read_text() == '{\n  "a": 1.5,\n  "b": [\n    0,\n    1,\n    2\n  ]\n}\n'
  with pytest.raises(TypeError):
    io_utils.write_json(target, {"bad": object()})
  # A failed write leaves the previous file and no temporary behind.
  assert target.read_text().startswith('{\n  "a"')
  assert os.listdir(tmp_path / "sub") == ["metrics.json"]
  io_utils.write_text(tmp_path / "t.txt", "hello")
  assert (tmp_path / "t.txt").read_text() == "hello"
  umask = os.umask(0)
  os.umask(umask)
  assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~umask
  io_utils.write_csv(tmp_path / "t.csv", [[1, "x"]], header=["n", "s"])
  assert (tmp_path / "t.csv").read_text() == "n,s\n1,x\n"

"""The synthetic cervical-spine cohort: realism, noise, lesions, determinism, files and CLI.

A handful of small subjects (5 sagittal slices each) is generated once per module. Measurements
here are the tests' own (not the generator's helpers) so that a generator bug cannot hide itself.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from u2ad_jax import labels as L
from u2ad_jax.phantom import anatomy as pa
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import generator

NUM_SLICES = 5  # the central slices: enough for the cord, small enough to be fast
# Fixed seeds: two lesion subjects (grades 1 and 2) and two lesion-free clinical subjects.
LESION_SEEDS = {1: 11, 2: 14}
HEALTHY_SEEDS = (15, 16)


@pytest.fixture(scope="module")
def clinical():
  subjects = {f"g{g}": generator.generate_subject(f"sub-g{g}", "clinical", seed, True, grade=g,
                                                num_slices=NUM_SLICES)
              for g, seed in LESION_SEEDS.items()}
  for seed in HEALTHY_SEEDS:
    subjects[f"h{seed}"] = generator.generate_subject(f"sub-h{seed}", "clinical", seed, False,
                                                    num_slices=NUM_SLICES)
  return subjects


@pytest.fixture(scope="module")
def public():
  return generator.generate_subject("sub-p", "public", 3, None, num_slices=NUM_SLICES)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("cohort")
  tsv = cohort_writer.write_cohort(root, 3, "clinical", seed=5, lesion_fraction=0.67, num_slices=NUM_SLICES)
  return root, tsv


# ----------------------------------------------------------------------------- helpers


def model_slices(volume):
  """RAS+ [X, Y, Z] -> [X, rows S->I, cols A->P], computed here independently."""
  return np.stack([v.T[::-1, ::-1] for v in volume])


def normalise(volume, pixel_mm, fov_mm=200.0):
  """The standard normalisation: centre-crop the model slices to the 200 mm field of view, clip
  at the 0.2 / 99.8 percentiles of the foreground (> 1 % of the maximum), min-max to [0, 1]."""
  slices = model_slices(volume)
  size = int(round(fov_mm / pixel_mm))
  r0 = max((slices.shape[1] - size) // 2, 0)
  c0 = max((slices.shape[2] - size) // 2, 0)
  crop = slices[:, r0:r0 + size, c0:c0 + size]
  foreground = crop[crop > 0.01 * crop.max()]
  lo, hi = np.percentile(foreground, [0.2, 99.8])
  return (np.clip(crop, lo, hi) - lo) / (hi - lo), (r0, c0, size)


def crop_labels(volume, window):
  r0, c0, size = window
  return model_slices(volume)[:, r0:r0 + size, c0:c0 + size]


# ----------------------------------------------------------------------------- realism


def test_label_intensities_match_real_clinical_slices(samples_dir, clinical):
  # Real values: pixel-pooled per-label means of the two clinical sample slices.
  real_values = {lab: [] for lab in (L.CORD, L.CSF, L.VERTEBRA, L.DISC)}
  for name in ("clinical_1.npy", "clinical_3.npy"):
    sample = np.load(samples_dir / name)
    for lab in real_values:
      real_values[lab].append(sample[0][sample[2] == lab])
  real = {lab: float(np.concatenate(v).mean()) for lab, v in real_values.items()}
  # Tolerances (absolute, normalised units) about one real standard deviation of a label or less:
  # cord 0.05, CSF 0.07, vertebral body 0.06, disc 0.04.
  tolerance = {L.CORD: 0.05, L.CSF: 0.07, L.VERTEBRA: 0.06, L.DISC: 0.04}
  synthetic = {lab: [] for lab in real}
  for subject in clinical.values():
    image, window = normalise(subject.image, subject.affine[1, 1])
    labels = crop_labels(subject.labels, window)
    cord_slices = np.isin(labels, L.CORD_LABELS).sum(axis=(1, 2)) > 200
    for lab in real:
      synthetic[lab].append(float(image[cord_slices][labels[cord_slices] == lab].mean()))
  for lab in real:
    measured = float(np.mean(synthetic[lab]))
    assert abs(measured - real[lab]) <= tolerance[lab], (lab, measured, real[lab])
  # Ordering that a reconstruction model must learn: CSF > cord ~ body > disc.
  means = {lab: np.mean(v) for lab, v in synthetic.items()}
  assert means[L.CSF] > 1.3 * means[L.CORD] and means[L.DISC] < 0.6 * means[L.VERTEBRA]


def test_public_profile_is_the_darker_domain(clinical, public):
  """Domain shift: public (3D, ~0.8 mm, dark fat, high SNR) vs clinical (thick 2D TSE)."""
  clinical_subject = clinical["h15"]
  assert public.affine[0, 0] < 1.0 and clinical_subject.affine[0, 0] >= 3.0
  assert 0.75 <= public.affine[1, 1] <= 0.85 and 0.6 <= clinical_subject.affine[1, 1] <= 0.8
  pub, _ = normalise(public.image, public.affine[1, 1])
  cli, _ = normalise(clinical_subject.image, clinical_subject.affine[1, 1])
  # Real samples: median 0.045 public vs 0.15 clinical.
  assert np.median(pub) < 0.08 < 0.1 < np.median(cli) < 0.2
  snr = {s.profile: generator.CSF_UNITS / s.noise_sigma for s in (public, clinical_subject)}
  assert snr["public"] > 1.5 * snr["clinical"]


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("which", ["g1", "h15", "public"])
def test_rician_noise_level_recovered_from_background(clinical, public, which):
  subject = public if which == "public" else clinical[which]
  sigma = subject.noise_sigma
  # Background: voxels without object signal (air), picked from the noise-free image.
  background = subject.clean < 0.05 * sigma
  assert background.sum() > 5000
  values = subject.image[background].astype(np.float64)
  estimate = np.sqrt(np.mean(values ** 2) / 2.0)  # Rayleigh: E[M^2] = 2 sigma^2
  assert abs(estimate / sigma - 1.0) < 0.2
  # Magnitude (Rician) noise, not additive Gaussian: the background mean is sigma sqrt(pi / 2).
  assert abs(values.mean() / (sigma * np.sqrt(np.pi / 2.0)) - 1.0) < 0.05


# ----------------------------------------------------------------------------- lesions


def lesion_measurements(subject):
  """Per lesion: (grade, lesion / local-cord ratio, lesion / local-CSF-p90 ratio) in the clean image.

  Local cord: cord voxels (label 3) of the lesion's slices within 10 mm (superior-inferior) of the
  lesion; local CSF: the 95th percentile of CSF voxels of those slices within 20 mm.
  """
  z_mm = subject.affine[2, 2]
  z = np.arange(subject.labels.shape[2])
  out = []
  for entry in subject.lesions:
    lesion = subject.lesion_ids == entry["index"]
    slices = lesion.any(axis=(1, 2))
    zs = np.flatnonzero(lesion.any(axis=(0, 1)))

    def near(margin):
      keep = (z >= zs[0] - margin / z_mm) & (z <= zs[-1] + margin / z_mm)
      return slices[:, None, None] & keep[None, None, :]

    cord = (subject.labels == L.CORD) & near(10.0)
    csf = (subject.labels == L.CSF) & near(20.0)
    lesion_mean = subject.clean[lesion].mean()
    out.append((entry["grade"], lesion_mean / subject.clean[cord].mean(),
                lesion_mean / np.percentile(subject.clean[csf], 95)))
  return out


def test_lesion_contrast_within_grade_ranges(clinical):
  seen = set()
  for key in ("g1", "g2"):
    measured = lesion_measurements(clinical[key])
    assert measured, key
    for grade, cord_ratio, csf_ratio in measured:
      seen.add(grade)
      lo, hi = {1: (1.2, 1.5), 2: (1.5, 2.2)}[grade]
      assert lo <= cord_ratio <= hi, (key, grade, cord_ratio)
      if grade == 2:
        assert csf_ratio < 1.0, (key, csf_ratio)  # always below the local CSF
  assert seen == {1, 2}


def test_lesions_are_confined_to_the_cord(clinical):
  for key, subject in clinical.items():
    lesion = subject.labels == L.LESION
    np.testing.assert_array_equal(lesion, subject.lesion_ids > 0)
    assert lesion.any() == key.startswith("g")
    if not lesion.any():
      continue
    assert subject.truth["has_lesion"] == 1
    slices = model_slices(subject.labels)
    fractions = []
    # Along each AP line through a lesion, the lesion sits inside a run of cord tissue
    # (labels 3 / 6) that also contains normal cord: it never spans the cord's AP diameter.
    for k, r in zip(*np.nonzero((slices == L.LESION).any(axis=2))):
      row = slices[k, r]
      runs, count = ndimage.label(np.isin(row, L.CORD_LABELS))
      for j in range(1, count + 1):
        run = row[runs == j]
        if (run == L.LESION).any():
          assert (run == L.CORD).any(), (key, k, r)
          fractions.append(float((run == L.LESION).mean()))
    assert np.mean(fractions) <= 0.6


def test_lesion_placement_statistics():
  """Lesions sit at compressed levels, mostly C5-6 then C4-5 / C6-7, with the stated sizes."""
  levels, grades = [], []
  for seed in range(60):
    rng = np.random.default_rng(seed)
    anatomy = pa.sample_anatomy(rng, fov_si=240.0, fov_ap=230.0, lesion=True,
                                             healthy_profile=False, slice_positions=np.arange(-2, 3) * 3.5)
    for les in anatomy.lesions:
      assert les.level in anatomy.compression  # only at compressed levels
      assert 1.5 - 1e-9 <= les.ap_mm <= 4.0
      length = 2.0 * les.half_length
      assert (3.0 - 1e-9 <= length <= 15.0) or (les.pencil and length <= 30.0)
      levels.append(les.level)
      grades.append(les.grade)
  counts = {name: levels.count(name) for name in L.SEGMENT_NAMES}
  assert counts["C5-6"] > counts["C4-5"] > counts["C3-4"]
  assert counts["C5-6"] > counts["C6-7"] > counts["C2-3"]
  assert 0.3 < np.mean(np.array(grades) == 2) < 0.7


def test_anatomy_ranges():
  s = pa.S_GRID
  curvatures = set()
  for seed in range(30):
    anatomy = pa.sample_anatomy(np.random.default_rng(seed), fov_si=240.0, fov_ap=230.0,
                                             lesion=False, healthy_profile=False)
    curvatures.add(anatomy.curvature)
    p = anatomy.profiles
    c2_3, c5 = anatomy.disc_center(0), anatomy.body_center(3)
    at = lambda name, where: float(np.interp(where, s, p[name]))  # noqa: E731
    assert 6.8 <= at("cord_ap", c2_3 + 3.0) <= 8.2
    assert at("cord_ap", c5) > at("cord_ap", c2_3 + 3.0)  # cervical enlargement
    # Width 10-13 mm between C3 and C7 wherever the cord is not flattened by a stenosis.
    span = (s > anatomy.body_top[1]) & (s < anatomy.body_bottom[5])
    normal = span & ((p["cord_hi"] - p["cord_lo"]) > 0.95 * p["cord_ap"])
    width = 2.0 * p["cord_w"][normal]
    assert normal.sum() > 100 and 10.0 - 1e-3 <= width.min() and width.max() <= 13.25
    assert 14.0 <= at("t_lam", c5) - at("t_pvb", c5) <= 17.0  # canal AP
    for ratio in anatomy.compression.values():
      assert 0.3 <= ratio <= 0.85
    assert 0.85 <= anatomy.scale <= 1.15
  assert curvatures == {"lordotic", "straight", "kyphotic"}


def test_bright_normal_lookalikes_exist(clinical):
  """Thresholding the cord is not enough: lesion-free cords hold pixels as bright as grade 1."""
  brightest, bright_pixels = 0.0, 0
  for seed in HEALTHY_SEEDS:
    subject = clinical[f"h{seed}"]
    labels, clean = model_slices(subject.labels), model_slices(subject.clean)
    for k in range(labels.shape[0]):
      cord = labels[k] == L.CORD
      if cord.sum() < 200:
        continue
      scoring = ndimage.binary_erosion(cord, ndimage.generate_binary_structure(2, 1))
      relative = clean[k][scoring] / np.median(clean[k][cord])
      brightest = max(brightest, float(relative.max()))
      bright_pixels += int((relative > 1.2).sum())
  # Inside the scoring ROI (cord eroded once, so not just edge partial volume), normal pixels
  # reach the grade-1 range (lesion / local cord >= 1.2).
  assert bright_pixels >= 20
  assert brightest >= 1.25


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_differs():
  a = generator.generate_subject("sub-a", "clinical", 21, True, num_slices=3)
  b = generator.generate_subject("sub-a", "clinical", 21, True, num_slices=3)
  c = generator.generate_subject("sub-a", "clinical", 22, True, num_slices=3)
  for name in ("image", "labels", "vertebrae", "lesion_ids"):
    assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
  assert a.image.shape != c.image.shape or a.image.tobytes() != c.image.tobytes()


def test_write_cohort_is_byte_deterministic(tmp_path, cohort):
  root, _ = cohort
  again = tmp_path / "again"
  cohort_writer.write_cohort(again, 3, "clinical", seed=5, lesion_fraction=0.67, num_slices=NUM_SLICES)
  for sid in ("sub-001", "sub-002", "sub-003"):
    for path in cohort_writer.subject_paths(root, sid).values():
      other = os.path.join(again, os.path.relpath(path, root))
      with open(path, "rb") as f, open(other, "rb") as g:
        assert f.read() == g.read(), path
  with open(root / "participants.tsv", "rb") as f, open(again / "participants.tsv", "rb") as g:
    assert f.read() == g.read()


# ----------------------------------------------------------------------------- files


def segment_truth(label_volume, vertebra_volume):
  """The evaluation rule, re-implemented: reference slice = largest cord area among slices
  showing C2 ... T1; segment k spans rows [centroid k, centroid k+1); positive when a lesion
  voxel of any slice lies in it."""
  labels, vertebrae = model_slices(label_volume), model_slices(vertebra_volume)
  ids = [L.VERTEBRA_INSTANCE_IDS[n] for n in L.VERTEBRA_NAMES]
  candidates = [k for k in range(labels.shape[0]) if all((vertebrae[k] == v).any() for v in ids)]
  ref = max(candidates, key=lambda k: (np.isin(labels[k], L.CORD_LABELS).sum(), -k))
  centroids = [np.nonzero(vertebrae[ref] == v)[0].mean() for v in ids]
  truth = dict.fromkeys(L.SEGMENT_NAMES, 0)
  for r in np.flatnonzero((labels == L.LESION).any(axis=(0, 2))):
    for k, name in enumerate(L.SEGMENT_NAMES):
      if centroids[k] <= r < centroids[k + 1]:
        truth[name] = 1
  return truth


def test_cohort_layout_loads_with_consistent_truth(cohort):
  root, tsv = cohort
  assert os.path.isfile(root / "dataset_description.json")
  description = json.loads((root / "dataset_description.json").read_text())
  assert description["BIDSVersion"] and description["Generator"]["profile"] == "clinical"
  with open(tsv, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f]
  assert header[:5] == ["participant_id", "profile", "has_lesion", "grade", "lesion_levels"]
  assert set(L.SEGMENT_NAMES) <= set(header)
  assert [r["participant_id"] for r in rows] == ["sub-001", "sub-002", "sub-003"]
  assert sum(int(r["has_lesion"]) for r in rows) == 2  # round(0.67 * 3) lesion subjects
  for row in rows:
    sid = row["participant_id"]
    paths = cohort_writer.subject_paths(root, sid)
    image, label, vert = (nib.load(paths[k]) for k in ("image", "label", "vertebrae"))
    assert image.shape == label.shape == vert.shape and image.shape[0] == NUM_SLICES
    for img in (label, vert):
      np.testing.assert_allclose(img.affine, image.affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    canonical = nib.as_closest_canonical(image)
    np.testing.assert_allclose(canonical.affine, image.affine)
    thickness, dy, dz = image.header.get_zooms()
    assert 3.0 <= thickness <= 4.5 and 0.6 <= dy == dz <= 0.8
    data = np.asanyarray(image.dataobj)
    labels = np.asanyarray(label.dataobj)
    vertebrae = np.asanyarray(vert.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all() and data.min() >= 0
    assert set(np.unique(labels)) <= set(L.KNOWN_LABELS)
    assert {L.CORD, L.CSF, L.VERTEBRA, L.DISC} <= set(np.unique(labels))
    np.testing.assert_array_equal(vertebrae > 0, labels == L.VERTEBRA)
    assert set(np.unique(vertebrae)) <= {0, *L.VERTEBRA_INSTANCE_IDS.values()}
    has_lesion = bool((labels == L.LESION).any())
    assert int(row["has_lesion"]) == has_lesion
    assert (int(row["grade"]) > 0) == has_lesion
    truth = segment_truth(labels, vertebrae)
    for name in L.SEGMENT_NAMES:
      assert int(row[name]) == truth[name], (sid, name)
    listed = [] if row["lesion_levels"] == "n/a" else row["lesion_levels"].split(";")
    assert listed == [n for n in L.SEGMENT_NAMES if truth[n]]
    assert has_lesion == bool(listed)


# ----------------------------------------------------------------------------- CLI


def test_synth_command_writes_and_summarises(tmp_path):
  out = tmp_path / "synth"
  proc = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "synth", "--out", str(out), "--subjects", "2",
                         "--profile", "public", "--seed", "1", "--slices", "3", "--lesion-fraction", "0.5"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "[2/2] sub-002 public" in proc.stderr  # progress on stderr, the summary on stdout
  assert "s per slice" in proc.stdout and "subjects: 2 (1 with lesions" in proc.stdout
  for sid in ("sub-001", "sub-002"):
    assert nib.load(out / sid / "anat" / f"{sid}_T2w.nii.gz").shape[0] == 3
  bad = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "synth", "--subjects", "1"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--out" in bad.stderr

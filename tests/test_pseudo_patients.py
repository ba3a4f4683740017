"""The real-anatomy benchmark generator (u2ad_jax/phantom/pseudo_patients.py): truth, layout, realism.

Two sources: the release's real sample slices (skipped where absent) and, always, a small phantom
cohort in our layout (the generator's other input format).
"""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.data import cohort
from u2ad_jax.phantom import cohort_writer
from u2ad_jax.phantom import contrast
from u2ad_jax.phantom import generator
from u2ad_jax.phantom import pseudo_lesions
from u2ad_jax.phantom import pseudo_patients as pp
from u2ad_jax.phantom import real_slices
from u2ad_jax import config_files
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.data import levels

# Realism tolerances, generated cohort vs its source, after the standard normalisation: tissue
# means within 0.025 (intensities in [0, 1]; the phantom's own calibration is within 0.013), tissue
# sds within a factor 1.3, noise sigma 0.9-1.45 x the source's (the target is 1.0-1.2 x, and the
# renormalisation of a deformed, bias-modulated image rescales it by a few percent).
MEAN_TOLERANCE = 0.025
SD_FACTOR = 1.3
NOISE_RANGE = (0.9, 1.45)


@pytest.fixture(scope="module")
def phantom_source(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom_source")
  cohort_writer.write_cohort(root, 2, "clinical", seed=11, lesion_fraction=0.0, num_slices=3)
  return root


def _model(path):
  return generator.volume_to_model(np.asarray(nib.load(path).dataobj))


def _check_cohort(root, num_subjects):
  """Layout, truth and lesion placement of a generated cohort; returns the lesion records."""
  files = cohort.list_subjects(root)
  assert [f.subject_id for f in files] == [f"sub-{i + 1:03d}" for i in range(num_subjects)]
  table = cohort.read_participants(root)
  records = []
  for f in files:
    record = json.load(open(cohort_writer.subject_paths(root, f.subject_id)["lesions"]))
    lab = _model(f.label)
    image = nib.load(f.image)
    assert image.shape == nib.load(f.label).shape and image.shape[0] == pp.DEFAULT_NUM_SLICES
    np.testing.assert_allclose(np.diag(image.affine)[:3],
                               [pp.DEFAULT_SLICE_SPACING_MM, real_slices.DEFAULT_PIXEL_MM, real_slices.DEFAULT_PIXEL_MM])
    row = table[f.subject_id]
    assert row["has_lesion"] == int((lab == L.LESION).any()) == int(bool(record["lesions"]))
    lv = levels.find_levels(lab)
    seg_of_row = lv.row_segments(lab.shape[1])
    truth = set()
    for lesion in record["lesions"]:
      assert lesion["voxels"] > 0
      # The lesion lies in the segment it was drawn for (and only there: it is kept inside).
      assert lesion["segments"] == [lesion["level"]]
      truth.add(lesion["level"])
      lo, hi = contrast.GRADE_RATIO[lesion["grade"]]
      assert lo - 1e-3 <= lesion["ratio"] <= hi + 1e-3
      assert lesion["ratio"] == pytest.approx(lesion["target_ratio"], abs=2e-3)
      if lesion["grade"] == 2:
        assert lesion["ratio"] < lesion["csf_ratio"]
      records.append(lesion)
    lesion_segments = {L.SEGMENT_NAMES[s] for s in seg_of_row[np.flatnonzero(
        (lab == L.LESION).any(axis=(0, 2)))] if s >= 0}
    assert lesion_segments == truth
    assert {n for n in L.SEGMENT_NAMES if row[n]} == truth == set(row["lesion_levels"])
  return records


def test_from_the_real_samples(samples_dir, tmp_path):
  root = tmp_path / "real"
  pp.write_cohort(root, samples_dir, 8, seed=4, lesion_fraction=0.5)
  records = _check_cohort(root, 8)
  assert len(records) >= 4  # 4 lesion patients, one lesion each or more
  # Loadable for scoring: vertebral bodies (C2 identified on clinical_1) and levels.
  config = config_files.load("cpu.py")
  prepared = rung_base.prepare_cohort(root, config.data, progress=False)
  assert len(prepared.slice_set.subjects) == 8
  assert os.path.isfile(cohort_writer.subject_paths(root, "sub-001")["vertebrae"])
  realism = pp.read_realism(root)
  assert realism["bases"] == ["clinical_1"]
  assert set(realism["rejected"]) == {"clinical_3", "public_1", "public_2", "public_3"}
  _check_realism(realism)
  # Noise really is the source's: the source estimate is what the estimator reads on the slice.
  image, _, lab = __import__("u2ad_jax.data.npy_slices", fromlist=["x"]).load_npy_slice(
      samples_dir / "clinical_1.npy")
  assert realism["source_stats"]["noise_sigma"] == pytest.approx(
      real_slices.noise_sigma(image, real_slices.foreground(image, lab)))


def _check_realism(realism):
  source, generated = realism["source_stats"], realism["generated_stats"]
  for tissue in real_slices.REALISM_TISSUES:
    s, g = source[tissue], generated[tissue]
    assert abs(g["mean"] - s["mean"]) <= MEAN_TOLERANCE, (tissue, s, g)
    assert 1 / SD_FACTOR <= g["sd"] / s["sd"] <= SD_FACTOR, (tissue, s, g)
  ratio = generated["noise_sigma"] / source["noise_sigma"]
  assert NOISE_RANGE[0] <= ratio <= NOISE_RANGE[1], ratio


def test_from_a_cohort_in_our_layout(phantom_source, tmp_path):
  root = tmp_path / "from_cohort"
  pp.write_cohort(root, phantom_source, 6, seed=2, lesion_fraction=0.5)
  _check_cohort(root, 6)
  realism = pp.read_realism(root)
  assert len(realism["bases"]) >= 2  # midline slices of both phantom subjects
  _check_realism(realism)
  rung_base.prepare_cohort(root, config_files.load("cpu.py").data, progress=False)


def test_subject_ratio_is_measured_on_the_image(phantom_source):
  bases, _ = real_slices.load_bases(phantom_source)
  for seed in range(3):
    subject = pp.generate_subject("sub-x", bases[0], seed, lesion=True)
    clean = generator.volume_to_model(subject.clean)
    lab = generator.volume_to_model(subject.labels)
    ids = generator.volume_to_model(subject.lesion_ids)
    # The same seed without lesions has the same geometry (drawn first): every lesion voxel was
    # cord there, and nothing else changed in the label map.
    healthy_lab = generator.volume_to_model(pp.generate_subject("sub-x", bases[0], seed, lesion=False).labels)
    assert np.all(healthy_lab[lab == L.LESION] == L.CORD)
    assert np.array_equal(healthy_lab[lab != L.LESION], lab[lab != L.LESION])
    assert subject.lesions
    for lesion in subject.lesions:
      mask = ids == lesion["index"]
      ratio, _ = pseudo_lesions.lesion_ratio(clean, lab, mask, bases[0].pixel_mm)
      assert ratio == pytest.approx(lesion["ratio"], rel=1e-4)
      # The lesion is brighter than its cord in the NOISY image too (it shares the noise).
      noisy = generator.volume_to_model(subject.image)
      cord = (lab == L.CORD) & mask.any(axis=(1, 2))[:, None, None]
      assert noisy[mask].mean() > noisy[cord].mean()


def test_deterministic_and_seed_dependent(phantom_source, tmp_path):
  paths = []
  for name, seed in (("a", 5), ("b", 5), ("c", 6)):
    pp.write_cohort(tmp_path / name, phantom_source, 2, seed=seed, lesion_fraction=0.5)
    paths.append(open(cohort_writer.subject_paths(tmp_path / name, "sub-001")["image"], "rb").read())
  assert paths[0] == paths[1] and paths[0] != paths[2]


def test_noise_estimator_reads_white_noise():
  rng = np.random.default_rng(0)
  rr, cc = np.mgrid[:128, :128]
  smooth = 0.3 + 0.002 * rr + 0.001 * cc + 0.1 * np.sin(rr / 20.0)
  for sigma in (0.01, 0.05):
    assert real_slices.noise_sigma(smooth + sigma * rng.standard_normal(smooth.shape)) == pytest.approx(sigma, rel=0.06)


def test_unusable_sources_fail_with_the_reasons(samples_dir, tmp_path):
  only_public = tmp_path / "public"
  only_public.mkdir()
  for name in ("public_1.npy", "clinical_3.npy"):
    shutil.copy(samples_dir / name, only_public / name)
  with pytest.raises(errors.InputError, match="no slice with a usable cord ROI.*clinical_3: cord on"):
    real_slices.load_bases(only_public)
  with pytest.raises(errors.InputError, match="not found"):
    real_slices.load_bases(tmp_path / "missing")


def test_synth_command_healthy(phantom_source, tmp_path):
  out = tmp_path / "healthy"
  proc = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "synth", "--out", str(out),
                         "--from-slices", str(phantom_source), "--subjects", "2", "--healthy",
                         "--seed", "3", "--slices", "3"],
                        capture_output=True, text=True, env={**os.environ}, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "wrote real-anatomy cohort" in proc.stdout and "0 with lesions" in proc.stdout
  table = cohort.read_participants(out)
  assert [r["has_lesion"] for r in table.values()] == [0, 0]
  assert nib.load(cohort_writer.subject_paths(out, "sub-001")["image"]).shape[0] == 3
  bad = subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "synth", "--out", str(tmp_path / "x"),
                        "--from-slices", str(phantom_source), "--healthy", "--lesion-fraction", "0.5"],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2 and "contradict" in bad.stderr

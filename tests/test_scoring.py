"""Vertebral levels, segment assignment, curves, scores and the unsupervised threshold."""

import numpy as np
import pytest

from u2ad_jax import errors
from u2ad_jax import labels as L
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import curves
from u2ad_jax.evaluation.rungs import intensity
from u2ad_jax.data import levels as levels_lib
from u2ad_jax.evaluation import postprocess
from u2ad_jax.evaluation import scoring
from u2ad_jax.evaluation import thresholds

H, W = 128, 64
# Body tops and heights of C2 (tall), C3 ... T1, T2: centroids 14.5, 30.5, 44.5, ..., 114.5.
TOPS = (8, 26, 40, 54, 68, 82, 96, 110)
HEIGHTS = (14, 10, 10, 10, 10, 10, 10, 10)
CENTROIDS = tuple(t + (h - 1) / 2 for t, h in zip(TOPS, HEIGHTS))


def make_subject(num_slices=3, lesion_rows=None, lesion_slice=1, bodies=8):
  """Label maps [S, H, W] with vertebral bodies, CSF, cord, and an optional lesion."""
  lab = np.zeros((num_slices, H, W), np.uint8)
  for top, height in list(zip(TOPS, HEIGHTS))[:bodies]:
    lab[:, top:top + height, 4:20] = L.VERTEBRA
  lab[:, :, 26:30] = L.CSF
  lab[:, :, 38:42] = L.CSF
  lab[:, :, 30:38] = L.CORD
  lab[0, :, 30:32] = L.CSF  # off-midline slice: thinner cord, so slice 1 or 2 is the reference
  if lesion_rows is not None:
    lab[lesion_slice, lesion_rows[0]:lesion_rows[1], 32:36] = L.LESION
  return lab


def test_levels_and_segments_from_label_map():
  lab = make_subject()
  lab[:, 2, 10] = L.VERTEBRA  # a stray voxel above C2 is not a body
  lv = levels_lib.find_levels(lab, source="sub-x_label.nii.gz")
  np.testing.assert_allclose(lv.centroid_rows, CENTROIDS[:7])
  assert lv.num_bodies == 8 and lv.reference_slice == 1
  seg = lv.row_segments(H)
  assert seg[14] == -1 and seg[15] == 0 and seg[30] == 0 and seg[31] == 1
  assert seg[100] == 5 and seg[101] == -1
  np.testing.assert_allclose(lv.segment_bounds()[3], [CENTROIDS[3], CENTROIDS[4]])


def test_too_few_vertebrae_names_the_file():
  lab = make_subject(bodies=6)
  with pytest.raises(errors.LabelError) as info:
    levels_lib.find_levels(lab, source="/data/sub-007_T2w_label.nii.gz", subject_id="sub-007")
  assert "sub-007_T2w_label.nii.gz" in str(info.value)
  assert "6 vertebral bodies" in str(info.value)


@pytest.mark.parametrize("segment", range(6))
def test_lesion_peak_lands_in_its_segment(segment):
  # A lesion centred between the centroids of vertebra k and k+1 (the disc level) is segment k.
  mid = int((CENTROIDS[segment] + CENTROIDS[segment + 1]) / 2)
  lab = make_subject(lesion_rows=(mid - 2, mid + 3))
  lv = levels_lib.find_levels(lab)
  rng = np.random.default_rng(segment)
  cord = np.isin(lab, L.CORD_LABELS)
  anomaly = np.where(cord, rng.uniform(0, 0.1, lab.shape), 0.0)
  anomaly[lab == L.LESION] = 1.0
  processed = postprocess.postprocess(anomaly, cord, postprocess.PostprocessParams(95, 2, None))
  s = scoring.score_subject("sub-1", processed, lv)
  assert s.peak_segment == segment
  assert s.peak_slice == 1
  assert mid - 2 <= s.peak_row < mid + 3
  assert s.patient_score == pytest.approx(s.segment_scores.max())
  truth = levels_lib.segment_truth_from_labels(lab, lv)
  assert truth.tolist() == [k == segment for k in range(6)]


def test_curve_reductions_and_segment_maxima():
  maps = np.zeros((2, H, W))
  maps[0, 50, 30:34] = 0.5  # C4-5 (rows 44.5 .. 58.5): sum 2.0, max 0.5
  maps[1, 90, 31] = 3.0  # C7-T1 (86.5 .. 100.5)
  c_sum = curves.anomaly_curve(maps, "sum")
  assert c_sum.shape == (2, H) and c_sum[0, 50] == pytest.approx(2.0)
  assert curves.anomaly_curve(maps, "max")[0, 50] == pytest.approx(0.5)
  lv = levels_lib.find_levels(make_subject())
  s = scoring.score_subject("s", maps, lv, reduction="sum")
  np.testing.assert_allclose(s.segment_scores, [0, 0, 2.0, 0, 0, 3.0])
  assert s.segment_peak_slices[2] == 0 and s.segment_peak_slices[5] == 1
  assert s.segment_peak_rows[2] == 50 and s.segment_peak_rows[5] == 90
  with pytest.raises(ValueError):
    curves.anomaly_curve(maps, "mean")


def test_curve_window_sums_along_the_cord():
  maps = np.zeros((1, H, W))
  maps[0, 60:64, 32] = 1.0                 # a 4-row lesion, 1 per row
  maps[0, 100, 33] = 2.5                   # a single bright noise row
  maps[0, 0, 33] = 1.0                     # at the top edge: rows above the image count 0
  per_row = curves.anomaly_curve(maps)
  windowed = curves.anomaly_curve(maps, "sum", window=5)
  assert per_row[0].max() == pytest.approx(2.5)   # per row, the noise row wins
  assert windowed[0, 61] == pytest.approx(4.0) and windowed[0, 62] == pytest.approx(4.0)
  assert windowed[0, 100] == pytest.approx(2.5)   # with the window, the lesion wins
  assert windowed[0, 0] == pytest.approx(1.0) and windowed[0, 2] == pytest.approx(1.0)
  assert windowed[0, 3] == 0.0
  np.testing.assert_allclose(windowed.sum(), per_row.sum() * 5 - 1.0 * 2)  # edge loses 2 rows
  assert curves.window_rows(8.0, 200 / 128) == 5 and curves.window_rows(8.0, 200 / 256) == 11
  assert curves.window_rows(0.0, 1.0) == 1 and curves.window_rows(2.0, 1.0) == 3
  for bad in (0, 4):
    with pytest.raises(ValueError, match="odd"):
      curves.anomaly_curve(maps, "sum", window=bad)
  with pytest.raises(ValueError):
    curves.window_rows(-1.0, 1.0)


def test_robust_threshold_rule():
  values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
  # median 3, MAD 1 -> sigma 1.4826.
  assert thresholds.robust_threshold(values, 3.0) == pytest.approx(3 + 3 * 1.4826)
  # More than half tied: MAD is 0, the mean absolute deviation takes over.
  zeros = np.array([0, 0, 0, 0, 0, 0, 1.0, 5.0])
  med, sigma = thresholds.robust_location_scale(zeros)
  assert med == 0 and sigma == pytest.approx(1.2533 * 6 / 8)
  d = thresholds.decide(values, np.tile(values[:, None], (1, 6)), thresholds.ThresholdRule(k=3))
  assert d.patient_flags.tolist() == [False, False, False, False, True]
  assert d.segment_flags[4].all() and not d.segment_flags[:4].any()
  with pytest.raises(ValueError):
    thresholds.ThresholdRule(name="oracle")


def _cohort(num_subjects=10, seed=0):
  """A small hand-made cohort: every other subject has a lesion, anomaly = noise + lesion."""
  rng = np.random.default_rng(seed)
  labs, ids, participants = [], [], {}
  for i in range(num_subjects):
    sid = f"sub-{i:03d}"
    seg = int(rng.integers(0, 6))
    mid = int((CENTROIDS[seg] + CENTROIDS[seg + 1]) / 2)
    has = i % 2 == 1
    labs.append(make_subject(lesion_rows=(mid - 2, mid + 2) if has else None))
    ids += [sid] * 3
    participants[sid] = {"participant_id": sid, "has_lesion": int(has),
                         **{n: int(has and k == seg) for k, n in enumerate(L.SEGMENT_NAMES)}}
  labels = np.concatenate(labs)
  cord = np.isin(labels, L.CORD_LABELS)
  images = np.where(cord, 0.2, 0.05) + rng.normal(0, 0.01, labels.shape)
  images[labels == L.LESION] = 0.4
  anomaly = np.where(cord, rng.uniform(0, 0.1, labels.shape), 0.0)
  anomaly[labels == L.LESION] += 0.5
  return dict(images=images.astype(np.float32), labels=labels, score_roi=cord,
              slice_subjects=ids, anomaly=anomaly), participants


def test_segment_truth_from_the_table_and_from_the_model_grid():
  """participants.tsv may mark a segment the scored label maps do not reach; both are reported."""
  data, participants = _cohort()
  params = postprocess.PostprocessParams(90, 2, None)
  same = analysis.analyse("x", postprocess_params=params, rule=thresholds.ThresholdRule(),
                          participants=participants, **data)
  assert same.metrics["segment"] == same.metrics["segment_model_grid"]
  ill = next(sid for sid, row in participants.items() if row["has_lesion"])
  seg = next(k for k, n in enumerate(L.SEGMENT_NAMES) if participants[ill][n])
  extra = (seg + 1) if seg < 5 else (seg - 1)
  participants[ill][L.SEGMENT_NAMES[extra]] = 1  # e.g. a lesion tip past a centroid
  r = analysis.analyse("x", postprocess_params=params, rule=thresholds.ThresholdRule(),
                       participants=participants, **data)
  table, grid = r.metrics["segment"], r.metrics["segment_model_grid"]
  assert table["num_positive"] == grid["num_positive"] + 1
  assert table["fn"] == grid["fn"] + 1 and table["tp"] == grid["tp"]
  assert grid == same.metrics["segment_model_grid"]
  bare = analysis.analyse("x", postprocess_params=params, rule=thresholds.ThresholdRule(),
                          participants=None, **data)
  assert "segment_model_grid" not in bare.metrics  # truth already from the label maps


def test_threshold_uses_no_labels():
  """Property: permuting the truth among patients changes the metrics, never the decisions."""
  data, participants = _cohort()
  params = postprocess.PostprocessParams(90, 2, None)
  rule = thresholds.ThresholdRule()
  ref = analysis.analyse("x", postprocess_params=params, rule=rule, participants=participants,
                         **data)
  assert ref.metrics["patient"]["auroc"] == pytest.approx(1.0)
  assert ref.metrics["segment"]["auroc"] > 0.95
  # Non-trivial decisions, so the property below can fail.
  assert 0 < ref.decisions.segment_flags.sum() < ref.decisions.segment_flags.size
  rng = np.random.default_rng(1)
  ids = list(participants)
  for _ in range(3):
    shuffled = dict(zip(ids, (participants[j] for j in rng.permutation(ids))))
    other = analysis.analyse("x", postprocess_params=params, rule=rule, participants=shuffled,
                             **data)
    assert other.decisions.threshold == ref.decisions.threshold
    np.testing.assert_array_equal(other.decisions.patient_flags, ref.decisions.patient_flags)
    np.testing.assert_array_equal(other.decisions.segment_flags, ref.decisions.segment_flags)
  # Without truth the decisions are still the same, and there are no metrics.
  no_truth = dict(data, labels=np.where(data["labels"] == L.LESION, L.CORD, data["labels"]))
  bare = analysis.analyse("x", postprocess_params=params, rule=rule, participants=None, **no_truth)
  assert bare.metrics is None and bare.truth is None
  np.testing.assert_array_equal(bare.decisions.patient_flags, ref.decisions.patient_flags)


def test_truth_from_labels_when_no_table():
  data, participants = _cohort(num_subjects=4)
  res = analysis.analyse("x", postprocess_params=postprocess.PostprocessParams(),
                         rule=thresholds.ThresholdRule(), participants=None, **data)
  assert res.truth.source == "label maps"
  expected = np.array([[participants[s][n] for n in L.SEGMENT_NAMES] for s in res.subject_ids],
                      bool)
  np.testing.assert_array_equal(res.truth.segments, expected)
  np.testing.assert_array_equal(res.truth.patient, expected.any(axis=1))


def test_intensity_rung_map():
  lab = make_subject(lesion_rows=(60, 64))
  cord = np.isin(lab, L.CORD_LABELS)
  images = np.where(cord, 0.2, 0.6).astype(np.float32)  # bright CSF / background is outside
  images[lab == L.LESION] = 0.3
  maps = intensity.intensity_maps(images, cord, ["s"] * 3)
  np.testing.assert_allclose(maps[lab == L.LESION], 0.5, rtol=1e-6)
  assert np.all(maps[(lab != L.LESION)] == 0)


def test_phantom_levels_and_lesion_segments(tmp_path):
  """On phantom subjects with known vertebra instances and lesion segments: the levels found from
  label 2 are the instance centroids, and a perfect anomaly map (the lesion label) puts each
  patient's peak in one of its true lesion segments."""
  import ml_collections
  from u2ad_jax.data import cohort
  from u2ad_jax.data import preprocess
  from u2ad_jax.phantom import cohort_writer
  from u2ad_jax.phantom import generator

  root = str(tmp_path / "clinical")
  cohort_writer.write_cohort(root, 3, "clinical", seed=5, lesion_fraction=1.0)
  cfg = ml_collections.ConfigDict(dict(image_size=128, fov_mm=200.0, pixel_mm=1.0,
                                       clip_percentiles=(0.2, 99.8), min_roi_patches=4,
                                       patch_size=8))
  s = preprocess.load_cohort(root, cfg, require_vertebrae=True, progress=False)
  truth = cohort.read_participants(root)
  levels = scoring.cohort_levels(s.labels, s.score_roi, s.subject_ids)
  for sid in s.subjects:
    pos = s.indices_of(sid)
    expected = generator.reference_centroids(s.labels[pos], s.vertebrae[pos])
    np.testing.assert_allclose(levels[sid].centroid_rows, expected, atol=0.5)
  oracle = (s.labels == L.LESION).astype(np.float32)
  result = analysis.analyse("oracle", images=s.images, labels=s.labels, score_roi=s.score_roi,
                            slice_subjects=s.subject_ids, anomaly=oracle,
                            postprocess_params=postprocess.PostprocessParams(0, 1, None),
                            rule=thresholds.ThresholdRule(), participants=truth, levels=levels)
  checked = 0
  for i, sc in enumerate(result.scores):
    assert truth[sc.subject_id]["has_lesion"] == 1
    if sc.patient_score == 0:
      continue  # the lesion did not survive the ROI erosion at this resolution
    checked += 1
    assert L.SEGMENT_NAMES[sc.peak_segment] in truth[sc.subject_id]["lesion_levels"]
    # The peak row of the label map lies inside the segment the score went to.
    lo, hi = sc.levels.segment_bounds()[sc.peak_segment]
    assert lo <= sc.peak_row < hi
  assert checked >= 2


def _fake_scores(matrix):
  """SubjectScores carrying only the `[P, 6]` segment scores (what normalise_levels reads)."""
  out = []
  for i, row in enumerate(np.asarray(matrix, dtype=np.float64)):
    peak = int(np.nanargmax(row))
    out.append(scoring.SubjectScores(
        subject_id=f"sub-{i:03d}", positions=np.array([i]), levels=None,
        slice_curves=np.zeros((1, 4)), curve=np.zeros(4), segment_scores=row,
        segment_peak_rows=np.arange(6), segment_peak_slices=np.zeros(6, np.int64),
        patient_score=float(row[peak]), peak_segment=peak, reference=0.0))
  return out


def test_level_z_against_a_hand_computed_case():
  nan = np.nan
  raw = np.array([
      # C2-3: median 3, MAD 1 -> sigma 1.4826.  C3-4: all 5 (anatomy: large but equal).
      # C4-5: finite [0, 2, 4, 6] -> median 3, MAD 2.  C5-6: MAD 0 -> 1.2533 x mean AD 1.6.
      [1.0, 5.0, nan, 1.0, 0.0, 0.0],
      [2.0, 5.0, 0.0, 1.0, 0.0, 0.0],
      [3.0, 5.0, 2.0, 1.0, 0.0, 0.0],
      [4.0, 5.0, 4.0, 1.0, 0.0, 0.0],
      [10.0, 5.0, 6.0, 9.0, 0.0, 0.0]])
  scores = _fake_scores(raw)
  # Raw: every patient's maximum sits at the anatomically large C3-4 except the last.
  assert [s.peak_segment for s in scores] == [1, 1, 1, 1, 0]
  z = scoring.normalise_levels(scores, "level_z")
  expected = np.array([
      [-2 / 1.4826, 0, nan, 0, 0, 0],
      [-1 / 1.4826, 0, -3 / 2.9652, 0, 0, 0],
      [0, 0, -1 / 2.9652, 0, 0, 0],
      [1 / 1.4826, 0, 1 / 2.9652, 0, 0, 0],
      [7 / 1.4826, 0, 3 / 2.9652, 8 / (1.2533 * 1.6), 0, 0]])
  np.testing.assert_allclose(scoring.segment_matrix(z), expected, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(scoring.patient_vector(z), [0, 0, 0, 1 / 1.4826, 7 / 1.4826],
                             atol=1e-12)
  assert [s.peak_segment for s in z] == [1, 1, 0, 0, 0]
  assert all(s.level_normalised for s in z) and not any(s.level_normalised for s in scores)
  np.testing.assert_array_equal(z[4].curve, scores[4].curve)  # curves stay in map units
  assert scoring.normalise_levels(scores, "none") == scores
  with pytest.raises(ValueError):
    scoring.normalise_levels(scores, "per_patient")


def test_level_z_removes_a_level_specific_normal_peak():
  """A level where every normal subject's residual is high (anatomy) wins the raw maximum and
  hides a moderate lesion elsewhere; per-level z ranks the lesion patients first."""
  data, participants = _cohort(num_subjects=12, seed=3)
  c23 = (np.arange(H)[:, None] >= CENTROIDS[0] + 1) & (np.arange(H)[:, None] < CENTROIDS[1] - 1)
  anomaly = data["anomaly"].copy()
  anomaly[:, c23[:, 0], :] += np.where(data["score_roi"][:, c23[:, 0], :], 0.5, 0.0)
  lesion = data["labels"] == L.LESION
  anomaly[lesion] -= 0.3  # lesions now weaker than the C2-3 anatomy
  anomaly[lesion & c23[None]] -= 0.2  # and none at C2-3 itself: those patients become normal
  for i, sid in enumerate(participants):
    if participants[sid]["C2-3"]:
      participants[sid] = dict(participants[sid], has_lesion=0, **{"C2-3": 0})
  data = dict(data, anomaly=anomaly,
              labels=np.where((data["labels"] == L.LESION) & c23[None], L.CORD, data["labels"]))
  # A low percentile: the C2-3 band alone is over 10 % of the cord, and must not erase lesions.
  params = postprocess.PostprocessParams(50, 2, None)
  raw = analysis.analyse("x", postprocess_params=params, rule=thresholds.ThresholdRule(k=2.5),
                         participants=participants, **data)
  z = analysis.analyse("x", postprocess_params=params, rule=thresholds.ThresholdRule(k=2.5),
                       participants=participants, segment_norm="level_z", **data)
  assert all(s.peak_segment == 0 for s in raw.scores)  # C2-3 anatomy holds every raw peak
  assert z.metrics["patient"]["auroc"] == pytest.approx(1.0)
  assert z.metrics["patient"]["auroc"] > raw.metrics["patient"]["auroc"]

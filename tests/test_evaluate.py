"""Evaluation outputs: maps back on the input grid, reports, and clean failures."""

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
from u2ad_jax.evaluation import analysis
from u2ad_jax.evaluation import outputs
from u2ad_jax.evaluation import postprocess
from u2ad_jax.evaluation import settings as eval_settings
from u2ad_jax.evaluation import thresholds
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.evaluation.rungs import intensity
from u2ad_jax.evaluation.rungs import model as model_rung
from u2ad_jax.evaluation.rungs import registry

S = 64  # model size = field of view in mm = in-plane voxels: the geometry is the identity
BODY_TOPS = (4, 12, 19, 26, 33, 40, 47, 54)  # C2 ... T2, 5 rows each (C2: 6)


def _model_frame_labels(num_slices, lesion):
  lab = np.zeros((num_slices, S, S), np.uint8)
  for i, top in enumerate(BODY_TOPS):
    lab[:, top:top + (6 if i == 0 else 5), 6:18] = L.VERTEBRA
  lab[:, :, 24:27] = L.CSF
  lab[:, :, 33:36] = L.CSF
  lab[:, :, 27:33] = L.CORD
  if lesion:
    lab[num_slices // 2, 37:40, 29:31] = L.LESION
  return lab


def _to_canonical(model_frame):
  # Model pixel (r, c) of slice x is canonical voxel (x, y = S-1-c, z = S-1-r).
  return np.ascontiguousarray(model_frame[:, ::-1, ::-1].transpose(0, 2, 1))


def write_cohort(root, num_subjects=2, vertebrae=True, marker=None, stored=("P", "I", "R")):
  """A tiny BIDS-like cohort stored in a non-canonical orientation. Returns {id: label path}."""
  rng = np.random.default_rng(0)
  paths = {}
  rows = []
  for n in range(num_subjects):
    sid = f"sub-{n + 1:03d}"
    lesion = n % 2 == 1
    lab_m = _model_frame_labels(5, lesion)
    if not vertebrae:
      lab_m[lab_m == L.VERTEBRA] = 0
    img_m = np.where(lab_m == L.CORD, 0.3, 0.1) + rng.normal(0, 0.01, lab_m.shape)
    img_m[lab_m == L.CSF] = 0.8
    img_m[lab_m == L.LESION] = 0.6
    if marker is not None and n == 0:
      img_m[marker] = 3.0
    affine = np.diag([1.2, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-3, -30, 10]
    target = nib.orientations.axcodes2ornt(stored)
    for kind, data in (("T2w", img_m.astype(np.float32)), ("label", lab_m)):
      canonical = nib.Nifti1Image(_to_canonical(data), affine)
      img = canonical.as_reoriented(target)
      if kind == "T2w":
        path = os.path.join(root, sid, "anat", f"{sid}_T2w.nii.gz")
      else:
        path = os.path.join(root, "derivatives", "labels", sid, "anat", f"{sid}_T2w_label.nii.gz")
        paths[sid] = path
      os.makedirs(os.path.dirname(path), exist_ok=True)
      nib.save(img, path)
    rows.append(f"{sid}\t{int(lesion)}")
  with open(os.path.join(root, "participants.tsv"), "w") as f:
    f.write("participant_id\thas_lesion\n" + "\n".join(rows) + "\n")
  return paths


def data_config():
  return ml_collections.ConfigDict(dict(
      image_size=S, fov_mm=float(S), pixel_mm=1.0, clip_percentiles=(0.0, 100.0),
      min_roi_patches=4, patch_size=8))


def test_maps_overlay_the_input(tmp_path):
  root = str(tmp_path / "cohort")
  marker = (2, 30, 29)  # slice 2, row 30 (segment C5-6), column 29 (cord)
  write_cohort(root, marker=marker)
  prepared = rung_base.prepare_cohort(root, data_config(), progress=False)
  s = prepared.slice_set
  # The marker is the brightest model pixel: the preprocessing put it where we expect.
  first = s.indices_of("sub-001")
  assert np.unravel_index(np.argmax(s.images[first]), s.images[first].shape) == (
      list(s.slice_index[first]).index(marker[0]), marker[1], marker[2])
  anomaly = np.zeros(s.images.shape, np.float32)
  anomaly[first[list(s.slice_index[first]).index(marker[0])], marker[1], marker[2]] = 1.0
  result = analysis.analyse(
      "marker", images=s.images, labels=s.labels, score_roi=s.score_roi,
      slice_subjects=s.subject_ids, anomaly=anomaly,
      postprocess_params=postprocess.PostprocessParams(0, 1, None), rule=thresholds.ThresholdRule(),
      participants=prepared.participants, levels=prepared.levels, recon=s.images, eu=anomaly)
  assert result.scores[0].peak_segment == 3  # row 30: between the C5 (28) and C6 (35) centroids
  out = str(tmp_path / "out")
  outputs.write_subject_outputs(out, result, s, {"model": {"name": "marker"}})
  ref = nib.load(os.path.join(root, "sub-001", "anat", "sub-001_T2w.nii.gz"))
  for name in ("anomaly", "eu", "recon", "anomaly_postprocessed"):
    written = nib.load(os.path.join(out, "subjects", "sub-001", f"sub-001_{name}.nii.gz"))
    assert written.shape == ref.shape
    np.testing.assert_allclose(written.affine, ref.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(ref.affine) != ("R", "A", "S")
  written = np.asarray(nib.load(
      os.path.join(out, "subjects", "sub-001", "sub-001_anomaly.nii.gz")).dataobj)
  source = np.asarray(ref.dataobj)
  assert np.unravel_index(np.argmax(written), written.shape) == np.unravel_index(
      np.argmax(source), source.shape)
  assert written.max() == pytest.approx(1.0) and np.sum(written > 0) == 1
  # The reconstruction (here: the image itself) comes back in the input's intensity units.
  recon = nib.as_closest_canonical(nib.load(
      os.path.join(out, "subjects", "sub-001", "sub-001_recon.nii.gz"))).get_fdata()
  scored = s.slice_index[first]
  np.testing.assert_allclose(recon[scored], nib.as_closest_canonical(ref).get_fdata()[scored],
                             atol=2e-3)
  sidecar = json.load(open(os.path.join(out, "subjects", "sub-001", "sub-001_scores.json")))
  assert sidecar["patient"]["peak_slice_index"] == marker[0]
  assert sidecar["patient"]["peak_row"] == marker[1]
  # The peak's position in the INPUT file's voxel indices (stored P, I, R: not the model grid).
  source_peak = tuple(int(v) for v in np.unravel_index(np.argmax(source), source.shape))
  assert tuple(sidecar["patient"]["peak_voxel"]) == source_peak
  assert source_peak != (marker[0], marker[1], marker[2])
  assert set(sidecar["segments"]) == set(L.SEGMENT_NAMES)


def test_cohort_without_vertebrae_fails_before_work(tmp_path):
  root = str(tmp_path / "cohort")
  paths = write_cohort(root, vertebrae=False)
  with pytest.raises(errors.LabelError) as info:
    rung_base.prepare_cohort(root, data_config(), progress=False)
  assert paths["sub-001"] in str(info.value) and "vertebra" in str(info.value)


def test_report_and_tables(tmp_path):
  root = str(tmp_path / "cohort")
  write_cohort(root, num_subjects=4)
  prepared = rung_base.prepare_cohort(root, data_config(), progress=False)
  settings = eval_settings.EvalSettings(postprocess.PostprocessParams(90, 2, None),
                                        thresholds.ThresholdRule(k=1.0))
  out = tmp_path / "intensity"
  result = rung_base.evaluate(registry.get("intensity")(), prepared, settings, out)
  # The lesions are twice the cord's brightness: the intensity rung ranks them first.
  assert result.metrics["patient"]["auroc"] == pytest.approx(1.0)
  for name in ("report.md", "patients.csv", "segments.csv", "metrics.json", "summary.json",
               "figures/scores.png", "figures/roc.png"):
    assert (out / name).is_file(), name
  text = (out / "report.md").read_text()
  for link in [l.split("](")[1].split(")")[0] for l in text.split("\n") if "](" in l]:
    assert (out / link).is_file(), link
  lines = (out / "patients.csv").read_text().strip().split("\n")
  assert len(lines) == 5 and lines[0].startswith("subject_id,patient_score,flagged")
  # Peak positions are voxels of the input NIfTI: inside its stored shape, and the lesion
  # patient's peak voxel is a lesion voxel of its label file.
  import csv  # pylint: disable=g-import-not-at-top
  rows = list(csv.DictReader((out / "patients.csv").open()))
  for row in rows:
    label = np.asarray(nib.load(os.path.join(
        root, "derivatives", "labels", row["subject_id"], "anat",
        f"{row['subject_id']}_T2w_label.nii.gz")).dataobj)
    ijk = tuple(int(row[k]) for k in ("peak_i", "peak_j", "peak_k"))
    assert all(0 <= v < n for v, n in zip(ijk, label.shape))
    assert row["model_row"] != ""
    if row["subject_id"] == "sub-002":  # has the lesion
      assert label[ijk] == L.LESION, (ijk, label[ijk])
  assert len((out / "segments.csv").read_text().strip().split("\n")) == 1 + 4 * 6
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics) >= {"patient", "segment", "pixel", "threshold"}
  # No staging directories are left beside the output.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "intensity"]


def test_rungs_are_looked_up_by_name_and_share_the_driver(tmp_path):
  """The registry names every rung; a rung is a class with `name` and `maps`, and the shared
  driver scores and writes it like the built-in ones."""
  assert registry.get("intensity") is intensity.IntensityRung
  assert registry.get("model") is model_rung.ModelRung
  with pytest.raises(errors.UsageError, match="unknown rung 'oracle'.*'intensity', 'model'"):
    registry.get("oracle")

  class OracleRung:
    """Anomaly = the lesion label itself: a perfect detector."""
    name = "oracle"

    def maps(self, prepared, settings):
      del settings
      s = prepared.slice_set
      return rung_base.RungMaps(anomaly=(s.labels == L.LESION).astype(np.float32),
                                provenance={"model": {"name": "oracle"}},
                                header=["- Rung: the lesion label."])

  root = str(tmp_path / "cohort")
  write_cohort(root, num_subjects=4)
  prepared = rung_base.prepare_cohort(root, data_config(), progress=False)
  settings = eval_settings.EvalSettings(postprocess.PostprocessParams(90, 1, None),
                                        thresholds.ThresholdRule(k=1.0))
  out = tmp_path / "oracle"
  result = rung_base.evaluate(OracleRung(), prepared, settings, out)
  assert result.name == "oracle"
  assert result.metrics["pixel"]["auroc"] == pytest.approx(1.0)
  assert result.metrics["patient"]["auroc"] == pytest.approx(1.0)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["model"] == {"name": "oracle"} and "sub-002" in summary["patients"]
  assert (out / "report.md").read_text().startswith("# U2AD evaluation: oracle")


def test_staged_directory_leaves_nothing_on_error(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with outputs.staged_directory(out) as staging:
      open(os.path.join(staging, "report.md"), "w").write("partial")
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []
  # A directory the command did not write is never replaced, even by the swap itself.
  out.mkdir()
  (out / "old.txt").write_text("previous run")
  with pytest.raises(errors.InputError, match="not a previous output"):
    with outputs.staged_directory(out) as staging:
      open(os.path.join(staging, "report.md"), "w").write("new")
  assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
  (out / "old.txt").unlink()
  with outputs.staged_directory(out) as staging:
    open(os.path.join(staging, "report.md"), "w").write("new")
  with outputs.staged_directory(out) as staging:  # its own previous output: replaced
    open(os.path.join(staging, "report2.md"), "w").write("newer")
  assert sorted(p.name for p in out.iterdir()) == [".u2ad-output.json", "report2.md"]
  assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "u2ad_jax.cli", "evaluate", *args],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_missing_and_corrupt_workdir_fail_cleanly(tmp_path):
  root = str(tmp_path / "cohort")
  write_cohort(root)
  out = tmp_path / "out"
  proc = _run_cli("--workdir", str(tmp_path / "nope"), "--data", root, "--out", str(out))
  assert proc.returncode == 2, proc.stderr
  assert "config.json" in proc.stderr and "Traceback" not in proc.stderr
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text("{not json")
  with pytest.raises(errors.CheckpointError) as info:
    model_rung.evaluate_checkpoint(bad, root, out, verbose=False)
  assert "config.json" in str(info.value)
  assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "cohort"]


def test_eval_devices_split_batches_evenly():
  devices = ["d0", "d1", "d2", "d3"]
  assert model_rung.eval_devices(8, devices) == devices
  assert model_rung.eval_devices(6, devices) == devices[:3]
  assert model_rung.eval_devices(5, devices) == devices[:1]
  assert model_rung.eval_devices(2, devices) == devices[:2]
  with pytest.raises(ValueError, match="no devices"):
    model_rung.eval_devices(4, [])


def test_model_maps_do_not_depend_on_the_device_count():
  import pathlib

  import jax

  import toy_data
  from u2ad_jax import config_lib
  from u2ad_jax.train import settings
  from u2ad_jax.train import state as state_lib

  devices = jax.local_devices()
  assert len(devices) == 4, "conftest asks for 4 CPU devices"
  config_dir = pathlib.Path(__file__).resolve().parents[1] / "configs"
  config = config_lib.sibling(str(config_dir / "base.py"), "base").get_config("runlocal")
  model = settings.build_model(config)
  params = state_lib.init_params(model, jax.random.key(0))
  # 7 slices in batches of 4: the second batch is padded, so padding is exercised too.
  slices = toy_data.toy_slice_set(7, config.data.image_size, seed=5)
  messages = []
  kwargs = dict(batch_size=4, num_samples=2)
  one = model_rung.model_maps(model, params, config, slices.images, slices.train_roi,
                              devices=devices[:1], **kwargs)
  many = model_rung.model_maps(model, params, config, slices.images, slices.train_roi,
                               devices=devices, progress=messages.append, **kwargs)
  assert "on 4 device(s)" in messages[-1]
  for name in ("eu", "mean", "au"):
    np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Real maps, not copies of the input: reconstructions differ inside the ROI and vary over
  # passes there; outside the train ROI's patches the input comes back exactly.
  roi = slices.train_roi
  assert (one["eu"][roi] > 0).mean() > 0.5
  assert np.abs(one["mean"] - slices.images)[roi].mean() > 1e-3
  patch = config.data.patch_size
  h = slices.images.shape[1] // patch
  roi_patches = roi.reshape(len(roi), h, patch, h, patch).any(axis=(2, 4))
  outside = ~np.repeat(np.repeat(roi_patches, patch, axis=1), patch, axis=2)
  np.testing.assert_array_equal(one["mean"][outside], slices.images[outside])
  assert (one["eu"][outside] == 0).all()


def test_eval_settings_take_missing_keys_from_base_and_refuse_aliases():
  """An older recorded config without `mad_k` gets configs/base.py's k (2.5), not a second
  literal; retired alias keys (`threshold_k`, `reduction`, ...) fail instead of being read."""
  from u2ad_jax import config_files
  base_k = config_files.default_section("evaluation")["mad_k"]
  recorded = ml_collections.ConfigDict({"evaluation": {"threshold": "mad"}, "postprocess": {}})
  settings = eval_settings.EvalSettings.from_config(recorded)
  assert settings.rule.k == base_k == 2.5
  assert settings.postprocess.percentile == config_files.default_section(
      "postprocess")["percentile"]
  assert settings.segment_norm == "none"  # configs/base.py's default
  recorded.evaluation.segment_norm = "level_z"
  assert eval_settings.EvalSettings.from_config(recorded).segment_norm == "level_z"
  recorded.evaluation.segment_norm = "per_patient"
  with pytest.raises(ValueError, match="segment_norm"):
    eval_settings.EvalSettings.from_config(recorded)
  for alias in ("threshold_k", "reduction", "threshold_rule"):
    old = ml_collections.ConfigDict({"evaluation": {alias: 3.0}})
    with pytest.raises(ValueError, match=f"unknown setting.*{alias}"):
      eval_settings.EvalSettings.from_config(old)

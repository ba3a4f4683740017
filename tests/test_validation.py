"""Validation while training: held-out normal slices scored every few steps."""

import json

import jax
import numpy as np
import pytest

import toy_data
from u2ad_jax import config_lib
from u2ad_jax import config_files
from u2ad_jax.train import checkpoint
from u2ad_jax.train import metrics_log
from u2ad_jax.train import stage as stage_lib
from u2ad_jax.train import trainer
from u2ad_jax.train import validation


def test_held_out_subjects_are_chosen_by_the_seed_and_leave_training_data():
  subjects = [f"sub-{i:03d}" for i in range(10)]
  a = validation.held_out_subjects(subjects, 2, seed=0)
  assert a == validation.held_out_subjects(list(reversed(subjects)), 2, seed=0)
  assert len(a) == 2 and set(a) <= set(subjects) and a == sorted(a)
  assert any(validation.held_out_subjects(subjects, 2, seed=s) != a for s in range(1, 5))
  assert len(validation.held_out_subjects(subjects[:2], 5, seed=0)) == 1  # one stays to train on
  assert validation.held_out_subjects(subjects[:1], 1, seed=0) == []


def test_split_and_choice_keep_normal_cord_slices():
  slices = toy_data.toy_slice_set(12, image_size=32, seed=1)
  empty = slices.subset(np.arange(12))
  empty.score_roi[3] = False  # a slice without cord is never a validation slice
  train, held = validation.split_public(empty, ["toy-001", "toy-004"])
  assert len(train) == 8 and len(held) == 4
  assert not set(train.subject_ids) & {"toy-001", "toy-004"}
  chosen = validation.choose_slices(held, 2)
  assert len(chosen) == 2 and set(chosen.subject_ids) <= {"toy-001", "toy-004"}
  assert all(roi.any() for roi in chosen.score_roi)
  assert len(validation.choose_slices(empty.subset([3]), 5)) == 0


def _config(every_steps, **validation_fields):
  config = config_files.load("configs/smoke.py:runlocal")
  config_lib.apply_overrides(config, [
      "stages=('pretrain',)", "stage_epochs.pretrain=3", "optim.decay_every_epochs=0",
      "batch_size=4", "checkpoint.every_steps=0", f"validation.every_steps={every_steps}"]
      + [f"validation.{k}={v}" for k, v in validation_fields.items()])
  return config


@pytest.fixture(scope="module")
def public():
  return toy_data.toy_slice_set(16, image_size=32, seed=2)


def test_training_validates_held_out_public_subjects(tmp_path, public):
  config = _config(4, num_subjects=2, figures=True, max_slices=3)
  result = trainer.train(config, tmp_path / "run", slice_sets={"public_dir": public},
                         verbose=False)
  records = metrics_log.MetricsLog(tmp_path / "run").read()
  start = [r for r in records if r.get("event") == "stage_start"][0]
  # 2 of the 8 toy subjects are held out: 12 of 16 slices train (3 steps of 4 per epoch).
  assert start["slices"] == 12 and start["steps_per_epoch"] == 3
  validations = [r for r in records if r.get("event") == "validation"]
  # Every 4 steps and at the stage end (9 steps): 4, 8, 9.
  assert [r["step"] for r in validations] == [4, 8, 9] and result.step == 9
  for r in validations:
    assert r["slices"] == 3
    assert np.isfinite(r["val_loss"]) and r["val_loss"] > 0
    assert -1 <= r["val_corr"] <= 1 and 0 < r["val_psnr"] < 100 and r["val_ssim"] <= 1
    assert r["train_cpu_s"] > 0 and r["train_wall_s"] > 0 and r["seconds"] > 0
  # Validation changes with the parameters only: the masks are fixed.
  assert len({r["val_loss"] for r in validations}) == 3
  recorded = json.loads((tmp_path / "run" / checkpoint.CONFIG_FILE).read_text())
  held = recorded["validation"]["subjects"]
  assert held == validation.held_out_subjects(public.subjects, 2, config.seed)
  figures = sorted((tmp_path / "run" / stage_lib.VALIDATION_DIR).glob("step_*.png"))
  assert [f.name for f in figures] == ["step_0000004.png", "step_0000008.png",
                                       "step_0000009.png"]
  assert (tmp_path / "run" / metrics_log.CURVES_FILE).stat().st_size > 1000


def test_validation_from_a_cohort_of_its_own_and_off(tmp_path, public, monkeypatch):
  own = toy_data.toy_slice_set(4, image_size=32, seed=3, subject_prefix="val")
  config = _config(0)
  trainer.train(config, tmp_path / "off", slice_sets={"public_dir": public}, verbose=False)
  records = metrics_log.MetricsLog(tmp_path / "off").read()
  assert not [r for r in records if r.get("event") == "validation"]
  assert [r for r in records if r.get("event") == "stage_start"][0]["slices"] == 16

  data_dir = tmp_path / "val"
  data_dir.mkdir()
  monkeypatch.setattr(trainer.preprocess, "load_cohort", lambda root, cfg, progress: own)
  config = _config(5, data_dir=str(data_dir))
  trainer.train(config, tmp_path / "own", slice_sets={"public_dir": public}, verbose=False)
  records = metrics_log.MetricsLog(tmp_path / "own").read()
  assert [r for r in records if r.get("event") == "stage_start"][0]["slices"] == 16
  # Every 5 steps of 12 (4 per epoch) and at the end: 5, 10, 12.
  assert [(r["step"], r["slices"]) for r in records if r.get("event") == "validation"] == [
      (5, 4), (10, 4), (12, 4)]
  assert json.loads((tmp_path / "own" / checkpoint.CONFIG_FILE).read_text())[
      "validation"]["subjects"] == []


def test_validator_scores_a_perfect_reconstruction_as_perfect(public, monkeypatch):
  config = _config(1)
  from u2ad_jax.train import settings as settings_lib
  run = settings_lib.resolve(config)
  model = settings_lib.build_model(config)
  slices = validation.choose_slices(public, 4)
  validator = validation.Validator(model, slices, run.step, run.validation, jax.random.key(0),
                                   "pmap", jax.devices()[:1])
  params = trainer.state_lib.init_params(model, jax.random.key(1))
  metrics, means = validator(params)
  assert sorted(means) == list(range(4)) and metrics["slices"] == 4
  assert metrics["val_ssim"] < 0.9  # a fresh model does not reconstruct
  # A model that returns its input: the MC mean is the input, SSIM 1, correlation 1.
  monkeypatch.setattr(validator.maps, "apply_fn",
                      lambda p, x, plan: (x, x, {}))
  validator.maps._mc.clear()
  perfect, _ = validator(params)
  assert perfect["val_ssim"] == pytest.approx(1.0) and perfect["val_corr"] == pytest.approx(1.0)


def test_demo_validates_on_healthy_subjects_of_the_clinical_profile(tmp_path, monkeypatch):
  """The demo's score is made on the clinical profile: its held-out normal anatomy is a healthy
  clinical-profile cohort of its own (seed + 2), not the public profile."""
  from u2ad_jax.workflows import demo  # pylint: disable=g-import-not-at-top
  seen = {}

  class Stop(Exception):
    pass

  def fake_train(config, workdir, **kwargs):
    seen["validation"] = config.validation.to_dict()
    raise Stop()

  monkeypatch.setattr(trainer, "train", fake_train)
  size = demo.DemoSize(num_public=2, num_clinical=2, num_slices=3, num_validation=1)
  with pytest.raises(Stop):
    demo.run_demo(tmp_path / "demo", smoke=True, size=size, seed=4,
                  overrides=["validation.every_steps=5"], verbose=False)
  val_dir = tmp_path / "demo" / "data" / "validation"
  assert seen["validation"]["data_dir"] == str(val_dir)
  record = json.loads((val_dir / "u2ad_demo_cohort.json").read_text())
  assert record == {"profile": "clinical", "num_subjects": 1, "seed": 6, "lesion_fraction": 0.0,
                    "num_slices": 3}
  rows = (val_dir / "participants.tsv").read_text().strip().splitlines()
  header = rows[0].split("\t")
  assert len(rows) == 2 and rows[1].split("\t")[header.index("has_lesion")] in ("0", "False")
  # Off while training validates nothing: no cohort is generated.
  with pytest.raises(Stop):
    demo.run_demo(tmp_path / "demo2", smoke=True, size=size, seed=4, verbose=False)
  assert seen["validation"]["data_dir"] == ""
  assert not (tmp_path / "demo2" / "data" / "validation").exists()

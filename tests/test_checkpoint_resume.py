"""Checkpoints: kill-and-resume gives exactly the uninterrupted run; refusals; eval restore.

Schedule of the runs below (toy data: 8 public slices, 10 clinical, global batch 4):
  pretrain     1 epoch  x 2 steps  steps 1-2
  adapt_eu     2 epochs x 3 steps  steps 3-8   maps at step 2 (epoch 0) only: refresh_epochs = 2
  adapt_eu_au  1 epoch  x 3 steps  steps 9-11  maps at step 8
Checkpoints every 2 steps and at stage ends. The first kill (after step 7) resumes from step 6,
in the middle of adapt_eu's SECOND epoch, whose maps were computed from step-2 parameters: only
maps restored from the checkpoint (not regenerated) reproduce the uninterrupted run. The second
kill (after step 10) resumes mid-epoch in adapt_eu_au.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from u2ad_jax import config_lib
from u2ad_jax import errors
from u2ad_jax.train import checkpoint
from u2ad_jax.train import metrics_log
from u2ad_jax.train import toy_data
from u2ad_jax.train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _config():
  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "base").get_config("runlocal")
  config.stage_epochs.adapt_eu = 2
  config.uncertainty.refresh_epochs = 2
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = 2
  config.log_every_steps = 100
  return config


@pytest.fixture(scope="module")
def data():
  return {"public_dir": toy_data.toy_slice_set(8, 32, seed=11),
          "clinical_dir": toy_data.toy_slice_set(10, 32, seed=12, lesion_fraction=0.5,
                                                 subject_prefix="clin")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  return workdir, result


def _step_records(workdir):
  return [r for r in metrics_log.MetricsLog(workdir).read() if "event" not in r]


def _assert_equal_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_kill_and_resume_is_exact(tmp_path, data, uninterrupted):
  reference_dir, reference = uninterrupted
  assert reference.step == 11 and not reference.stopped

  config = _config()
  config.debug_stop_after_steps = 7
  first = trainer.train(config, tmp_path, slice_sets=data, verbose=False)
  assert first.stopped and first.step == 7
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    meta = checkpoints.restore_meta(6)
  assert (meta["stage"], meta["epoch"], meta["batch"]) == ("adapt_eu", 1, 1)
  assert meta["maps_slices"] == 10

  config.debug_stop_after_steps = 10
  second = trainer.train(config, tmp_path, slice_sets=data, verbose=False)
  assert second.stopped and second.step == 10

  config.debug_stop_after_steps = 0
  final = trainer.train(config, tmp_path, slice_sets=data, verbose=False)
  assert final.step == 11 and not final.stopped
  _assert_equal_params(final.state.params, reference.state.params)
  _assert_equal_params(final.state.opt_state, reference.state.opt_state)

  # The metric log reads as one run: every step once, in order, with identical losses.
  resumed, straight = _step_records(tmp_path), _step_records(reference_dir)
  assert [r["step"] for r in resumed] == list(range(1, 12))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  events = [(r["event"], r["step"]) for r in metrics_log.MetricsLog(tmp_path).read()
            if r.get("event") in ("stage_start", "maps")]
  assert events == [("stage_start", 0), ("stage_start", 2), ("maps", 2), ("stage_start", 8),
                    ("maps", 8)]
  # keep-N: only the newest two checkpoints remain.
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    assert checkpoints.all_steps() == [10, 11]


def test_workdir_outputs_and_restore_for_eval(uninterrupted):
  workdir, result = uninterrupted
  assert os.path.getsize(workdir / metrics_log.CURVES_FILE) > 1000
  with open(workdir / metrics_log.CURVES_FILE, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  recorded = json.loads((workdir / checkpoint.CONFIG_FILE).read_text())
  assert recorded["model"]["variant"] == "mu"
  model, params, config, step = checkpoint.restore_for_eval(workdir)
  assert step == 11 and config.data.image_size == 32 and model.image_size == 32
  _assert_equal_params(params, result.state.params)
  _, older, _, step = checkpoint.restore_for_eval(workdir, step=10)
  assert step == 10
  with pytest.raises(errors.CheckpointError, match="no checkpoint at step 3"):
    checkpoint.restore_for_eval(workdir, step=3)


def test_restore_for_eval_errors_name_the_path(tmp_path, uninterrupted):
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.restore_for_eval(tmp_path / "nowhere")
  assert str(tmp_path / "nowhere") in str(e.value)
  # A damaged checkpoint: the state's array data removed.
  damaged = tmp_path / "damaged"
  shutil.copytree(uninterrupted[0], damaged)
  state_dir = damaged / "checkpoints" / "11" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file() and path.name not in ("_METADATA", "_CHECKPOINT_METADATA"):
      path.write_bytes(b"garbage")
  with pytest.raises(errors.CheckpointError) as e:
    checkpoint.restore_for_eval(damaged)
  assert str(damaged / "checkpoints" / "11") in str(e.value)


def test_resume_refuses_a_different_model_shape(tmp_path, data, uninterrupted):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], workdir)
  config = _config()
  config.data.image_size = 64
  with pytest.raises(errors.ConfigMismatchError, match=r"data\.image_size: 32 there, 64 now"):
    trainer.train(config, workdir, slice_sets=data, verbose=False)
  config = _config()
  config.model.variant = "cpu"
  with pytest.raises(errors.ConfigMismatchError, match="model.variant"):
    trainer.train(config, workdir, slice_sets=data, verbose=False)
  # Non-shape settings may change on resume (e.g. more epochs): training continues.
  config = _config()
  config.stage_epochs.adapt_eu_au = 2
  result = trainer.train(config, workdir, slice_sets=data, verbose=False)
  assert result.step == 14


def test_init_from_starts_from_another_runs_parameters(tmp_path, data, uninterrupted):
  source_dir, source = uninterrupted
  config = _config()
  config.stages = ("adapt_eu_au",)
  config.stage_epochs.adapt_eu_au = 0  # nothing to train: the start point is the result
  result = trainer.train(config, tmp_path / "adapt", init_from=source_dir, slice_sets=data,
                         verbose=False)
  assert result.step == 0
  _assert_equal_params(result.state.params, source.state.params)
  config.data.patch_size = 8
  with pytest.raises(errors.ConfigMismatchError, match="patch_size"):
    trainer.train(config, tmp_path / "other", init_from=source_dir, slice_sets=data,
                  verbose=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
  config = _config()
  config.stages = ("pretrain", "adapt_eu")
  bad = data["clinical_dir"].subset(np.arange(10))
  bad.images[:, 10:20, :] = np.nan  # the cord crosses these rows in every slice
  with pytest.raises(errors.NonFiniteLossError, match="last good checkpoint is step 2"):
    trainer.train(config, tmp_path, slice_sets={"public_dir": data["public_dir"],
                                                "clinical_dir": bad}, verbose=False)
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    assert checkpoints.latest_step() == 2


def test_shard_map_trainer_matches_pmap(tmp_path, data, uninterrupted):
  # The guided stage's loop (steps and the sharded map refreshes) under both wrappers; the pmap
  # functions are already compiled by the uninterrupted run.
  results = {}
  for mode in ("pmap", "shard_map"):
    config = _config()
    config.stages = ("adapt_eu_au",)
    config.parallel = mode
    results[mode] = trainer.train(config, tmp_path / mode, slice_sets=data, verbose=False)
  assert results["shard_map"].step == 3
  for x, y in zip(jax.tree.leaves(results["shard_map"].state.params),
                  jax.tree.leaves(results["pmap"].state.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

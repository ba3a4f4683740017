"""End to end: `u2ad train` on tiny synthetic NIfTI cohorts, all three stages; the loss decreases,
the workdir holds what evaluation needs, and re-running the command resumes (nothing left to do)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import support
from u2ad_jax import output_guard
from u2ad_jax.train import checkpoint
from u2ad_jax.train import metrics_log

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  return support.write_small_cohorts(tmp_path_factory.mktemp("cohorts"))


def _train(workdir, public, clinical):
  env = support.cpu_subprocess_env(2)
  command = [sys.executable, "-m", "u2ad_jax.cli", "train",
             "--config", str(REPO / "configs" / "cpu.py") + ":runlocal",
             "--workdir", str(workdir),
             f"--config.data.public_dir={public}", f"--config.data.clinical_dir={clinical}",
             "--config.stage_epochs.pretrain=4", "--config.optim.decay_every_epochs=0",
             "--config.log_every_steps=4"]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                        cwd=str(REPO))


def test_train_command_end_to_end(tmp_path, cohorts):
  public, clinical = cohorts
  workdir = tmp_path / "run"
  run = _train(workdir, public, clinical)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "finished at step" in run.stdout  # the result on stdout, logs and progress on stderr
  assert "steps/s ETA" in run.stderr  # the progress line (stderr: progress is not a result)

  records = metrics_log.MetricsLog(workdir).read()
  steps = [r for r in records if "event" not in r]
  pretrain = [r["loss"] for r in steps if r["stage"] == "pretrain"]
  assert len(pretrain) >= 8
  assert np.mean(pretrain[-2:]) < 0.8 * np.mean(pretrain[:2]), pretrain
  assert {r["stage"] for r in steps} == {"pretrain", "adapt_eu", "adapt_eu_au"}
  assert all(np.isfinite(r["grad_norm"]) and r["param_norm"] > 0 for r in steps)
  maps = [r for r in records if r.get("event") == "maps"]
  assert [r["stage"] for r in maps] == ["adapt_eu", "adapt_eu_au"]
  # The schedule's guidance reached the step records: AU exclusion only in the last stage.
  assert {r["au_exclusion"] for r in steps if r["stage"] == "adapt_eu_au"} == {True}
  assert {r["au_exclusion"] for r in steps if r["stage"] != "adapt_eu_au"} == {False}

  assert (workdir / metrics_log.CURVES_FILE).stat().st_size > 1000
  config = json.loads((workdir / checkpoint.CONFIG_FILE).read_text())
  assert config["data"]["public_dir"] == str(public)
  model, params, restored_config, step = checkpoint.restore_for_eval(workdir)
  assert step == steps[-1]["step"] and model.image_size == 32

  # Same command again: resumes from the final checkpoint, nothing left to train.
  again = _train(workdir, public, clinical)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"finished at step {step}" in again.stdout
  assert "resuming" in again.stderr
  assert len([r for r in metrics_log.MetricsLog(workdir).read() if "event" not in r]) == len(steps)


def test_train_command_reports_bad_input_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, "-m", "u2ad_jax.cli", "train", "--config",
       str(REPO / "configs" / "cpu.py") + ":runlocal", "--workdir", str(tmp_path / "w"),
       f"--config.data.public_dir={tmp_path / 'missing'}"],
      env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=str(REPO))
  assert run.returncode == 2
  assert "missing: config.data.public_dir: no such directory" in run.stderr
  assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ checked before any compute


def _runlocal_config(public, clinical):
  from u2ad_jax import config_lib
  config = config_lib.sibling(str(REPO / "configs" / "base.py"), "base").get_config("runlocal")
  config.data.public_dir = str(public)
  config.data.clinical_dir = str(clinical)
  return config


def _with_label_value(source, target, value):
  """A copy of cohort `source` whose last subject's label map holds one voxel of `value`."""
  import shutil
  import nibabel as nib
  shutil.copytree(source, target)
  label_file = sorted(target.rglob("*_T2w_label.nii.gz"))[-1]
  label = nib.load(str(label_file))
  data = np.asarray(label.dataobj).copy()
  data.flat[0] = value
  nib.save(nib.Nifti1Image(data, label.affine, label.header), str(label_file))
  return label_file


def test_bad_clinical_cohort_stops_before_pretraining_and_writes_nothing(tmp_path, cohorts,
                                                                         monkeypatch):
  from u2ad_jax import errors
  from u2ad_jax.train import trainer
  public, clinical = cohorts
  label_file = _with_label_value(clinical, tmp_path / "clinical9", 9)
  # Any compute would go through the model; it must not even be initialised.
  monkeypatch.setattr(trainer.state_lib, "init_params", lambda *a, **k: pytest.fail("computed"))
  workdir = tmp_path / "run"
  with pytest.raises(errors.LabelError) as e:
    trainer.train(_runlocal_config(public, tmp_path / "clinical9"), workdir, verbose=False)
  assert str(label_file) in str(e.value)
  assert not workdir.exists()
  # A bad public_dir: nothing written either (no config.json, no empty checkpoints/).
  with pytest.raises(errors.InputError, match="public_dir: no such directory"):
    trainer.train(_runlocal_config(tmp_path / "missing", clinical), workdir, verbose=False)
  assert not workdir.exists()
  # An --init_from that is not a run: refused up front as well.
  config = _runlocal_config(public, clinical)
  config.stages = ("adapt_eu", "adapt_eu_au")
  with pytest.raises(errors.CheckpointError, match="not a u2ad training workdir"):
    trainer.train(config, workdir, init_from=tmp_path / "nowhere", verbose=False)
  assert not workdir.exists()


def test_train_refuses_a_workdir_that_is_not_a_u2ad_run(tmp_path, cohorts):
  from u2ad_jax import errors
  from u2ad_jax.train import trainer
  from u2ad_jax.train import workdir as workdir_lib
  public, clinical = cohorts
  foreign = tmp_path / "notes"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(errors.WorkdirError, match="not a u2ad training run"):
    trainer.train(_runlocal_config(public, clinical), foreign, verbose=False)
  assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
  assert (foreign / "notes.txt").read_text() == "mine"
  # A cohort is not a run either; a file is refused; missing / empty directories are new runs.
  with pytest.raises(errors.WorkdirError):
    workdir_lib.check_train_workdir(public)
  with pytest.raises(errors.WorkdirError, match="not a directory"):
    workdir_lib.check_train_workdir(foreign / "notes.txt")
  (tmp_path / "empty").mkdir()
  assert workdir_lib.check_train_workdir(tmp_path / "empty") is False
  assert workdir_lib.check_train_workdir(tmp_path / "new") is False
  # A run of an earlier version (config.json + checkpoints/, no marker) is still resumed ...
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "config.json").write_text(_runlocal_config(public, clinical).to_json())
  (old / "checkpoints").mkdir()
  assert workdir_lib.check_train_workdir(old) is True
  # ... but not once something foreign sits beside it.
  (old / "notes.txt").write_text("mine")
  with pytest.raises(errors.WorkdirError):
    workdir_lib.check_train_workdir(old)
  workdir_lib.mark(old)
  assert workdir_lib.check_train_workdir(old) is True
  # Another command's output (the shared marker names the command) is never a training run.
  evaluation = tmp_path / "eval"
  evaluation.mkdir()
  output_guard.write_marker(evaluation, "evaluate")
  (evaluation / "report.md").write_text("an evaluation")
  with pytest.raises(errors.WorkdirError):
    workdir_lib.check_train_workdir(evaluation)

"""End to end: `u2ad train` on tiny synthetic NIfTI cohorts, all three stages; the loss decreases,
the workdir holds what evaluation needs, and re-running the command resumes (nothing left to do)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from u2ad_jax.data import phantom
from u2ad_jax.train import checkpoint
from u2ad_jax.train import metrics_log

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  root = tmp_path_factory.mktemp("cohorts")
  phantom.write_cohort(root / "public", 3, "public", seed=1, num_slices=3)
  phantom.write_cohort(root / "clinical", 3, "clinical", seed=2, num_slices=3,
                       lesion_fraction=0.67)
  return root / "public", root / "clinical"


def _train(workdir, public, clinical):
  # Cheap XLA compilation: these runs take milliseconds per step but seconds to compile.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                       "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
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
  assert "finished at step" in run.stdout
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
  assert "resuming" in again.stdout
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

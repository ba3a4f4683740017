"""What a user does wrong or changes their mind about at the command line: Ctrl-C during
training, a missing config file with overrides, a config given by its bare name, a demo run again
after an interrupt. Each gets one line saying what happened and what to do."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import support
from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.workflows import demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd, env=None, timeout=120):
  return subprocess.run([sys.executable, "-m", "u2ad_jax.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                        env=env or {**os.environ, "PYTHONPATH": str(REPO)})


def _one_error_line(result, name, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"u2ad {name}: error: "), result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_missing_config_file_with_an_override_is_one_line(tmp_path):
  # Without the override this was already one line; with it absl loaded the file while
  # parsing and printed a 59-line traceback, exit 1.
  result = _cli("train", "--config", "no_such.py", "--workdir", tmp_path / "w",
                "--config.optim.lr=1", cwd=tmp_path)
  _one_error_line(result, "train", "no_such.py", "config file not found")
  assert list(tmp_path.iterdir()) == []


def test_train_finds_a_config_by_its_bare_name_like_demo(tmp_path):
  # `--config cpu.py` from a directory without configs/: found in the checkout (or the
  # installed package), as `u2ad demo --config cpu.py` finds it. The run then stops on a
  # misspelt `--set` key, which only a loaded config can tell.
  result = _cli("train", "--config", "cpu.py:runlocal", "--workdir", tmp_path / "w",
                "--config.optim.lr=1e-3", "--set", "optim.lrr=1", cwd=tmp_path)
  _one_error_line(result, "train", "optim.lrr")
  assert "config file not found" not in result.stderr


def test_demo_run_again_after_an_interrupt_says_overwrite_resumes(tmp_path):
  out = tmp_path / "demo"
  out.mkdir()
  output_guard.write_marker(out, "demo")
  (out / "run").mkdir()  # what an interrupted demo leaves: its marker, data and a run
  with pytest.raises(errors.InputError) as info:
    demo.run_demo(out, smoke=True, verbose=False)
  message = str(info.value)
  assert "pass --overwrite to resume it" in message and "replace it" not in message
  assert "training continues from its last checkpoint" in message
  # Ctrl-C inside the demo's training says the same.
  interrupted = errors.TrainingInterrupted(7, 6, "/x/run/checkpoints")
  assert str(interrupted).endswith("run the same command to resume")
  hinted = interrupted.with_hint("run the same command with --overwrite to resume")
  assert str(hinted) == ("interrupted at step 7; the last checkpoint is step 6 "
                         "(/x/run/checkpoints); run the same command with --overwrite to resume")


def test_ctrl_c_during_training_is_one_line_with_the_step_and_the_checkpoint(tmp_path):
  """SIGINT to a real `u2ad train`: the step in progress finishes, its checkpoint is written,
  and one line says where the run stands and that the same command resumes (exit 130), instead
  of a KeyboardInterrupt traceback."""
  public, clinical = support.write_small_cohorts(tmp_path / "data")
  workdir = tmp_path / "run"
  process = subprocess.Popen(
      [sys.executable, "-m", "u2ad_jax.cli", "train", "--config", "cpu.py:runlocal",
       "--workdir", str(workdir), f"--config.data.public_dir={public}",
       f"--config.data.clinical_dir={clinical}", "--config.stage_epochs.pretrain=500",
       "--config.checkpoint.every_steps=2"],
      env=support.cpu_subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=str(tmp_path))
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
      break
    time.sleep(0.2)
  assert process.poll() is None, process.communicate()[1][-3000:]
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("u2ad train: interrupted at step "), last
  step = int(last.split("interrupted at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert step >= 3 and saved and saved[-1] <= step
  assert f"the last checkpoint is step {saved[-1]} ({workdir / 'checkpoints'})" in last
  assert last.endswith("run the same command to resume")

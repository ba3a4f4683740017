"""Fault injection: kills, damaged checkpoints, a full disk and a NaN batch never lose work.

Every scenario is seeded and compares against an uninterrupted run:
- SIGKILL of `u2ad train` (a subprocess) at 10 seeded random points, between steps and inside
  checkpoint saves (before, during and right after the asynchronous write; the hook is
  u2ad_jax/train/faults.py), each resumed by the same command, ends with parameters
  bit-identical to the uninterrupted run;
- a truncated / corrupted / half-deleted newest checkpoint: the run resumes from the previous
  complete one with a warning (and still ends bit-identical); when none is complete, one line
  naming the checkpoint, no traceback;
- a checkpoint write failing with ENOSPC: a clean stop naming the last complete checkpoint,
  which stays intact and resumes to the uninterrupted result; the same for metrics.jsonl and
  config.json (one line naming the file and the checkpoint);
- a NaN batch: NonFiniteLossError, the last good checkpoint kept.
"""

import concurrent.futures
import errno
import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import support
from u2ad_jax import errors
from u2ad_jax import io_utils
from u2ad_jax.train import checkpoint
from u2ad_jax.train import faults
from u2ad_jax.train import metrics_log
from u2ad_jax.train import resume
from u2ad_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
KILL_SEED = 20261202
NUM_KILLS = 10
# Subprocess runs: 9 slices per cohort, batch 4 -> 3 steps per epoch; stages of 2 / 2 / 1 epochs
# = steps 1-6 / 7-12 / 13-15; checkpoints every 2 steps and at stage ends.
TOTAL_STEPS = 15
SAVE_STEPS = (2, 4, 6, 8, 10, 12, 14, 15)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _step_losses(workdir):
  return [(r["step"], r["loss"]) for r in metrics_log.MetricsLog(workdir).read()
          if "event" not in r]


# ------------------------------------------------------------------------ subprocess: SIGKILL


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  root = tmp_path_factory.mktemp("fault_cli")
  support.write_small_cohorts(root)
  # One device, cheap compilation, and a compilation cache shared by the runs of this module:
  # most of a run is process start-up, so the ~12 runs below stay affordable.
  env = support.cpu_subprocess_env(1, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(faults.ENV_VAR, None)
  return root, env


def _cli_train(cli_env, workdir, fault=None):
  root, env = cli_env
  env = dict(env)
  if fault:
    env[faults.ENV_VAR] = fault
  command = [sys.executable, "-m", "u2ad_jax.cli", "train",
             "--config", str(REPO / "configs" / "base.py") + ":runlocal",
             "--workdir", str(workdir),
             f"--config.data.public_dir={root / 'public'}",
             f"--config.data.clinical_dir={root / 'clinical'}",
             "--config.stage_epochs.pretrain=2", "--config.stage_epochs.adapt_eu=2",
             "--config.checkpoint.every_steps=2", "--config.log_every_steps=100"]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                        cwd=str(REPO))


def kill_plan(seed=KILL_SEED, num=NUM_KILLS):
  """`num` (point, step) kills at distinct steps in increasing order (seeded).

  At a checkpoint step the point is drawn among the three save points and the step itself,
  elsewhere it is the step. Increasing steps guarantee that every kill is reached by the run
  that resumes from the previous one.
  """
  rng = np.random.default_rng(seed)
  steps = sorted(rng.choice(np.arange(1, TOTAL_STEPS + 1), size=num, replace=False).tolist())
  plan = []
  for step in steps:
    points = (("save_begin", "save_inflight", "save_done", "step") if step in SAVE_STEPS
              else ("step",))
    plan.append((str(rng.choice(points)), int(step)))
  return plan


def test_kill_plan_is_seeded_and_reaches_inside_saves():
  plan = kill_plan()
  assert plan == kill_plan() and len(plan) == NUM_KILLS
  assert len({s for _, s in plan}) == NUM_KILLS
  assert sum(p.startswith("save") for p, _ in plan) >= 3, plan


def _kill_chain(cli_env, workdir, kills):
  """Runs `u2ad train` into `workdir` once per kill (each resuming the previous one), then once
  to the end. Returns (kills survived, kills that left a half-written checkpoint)."""
  survived, mid_write = 0, 0
  for point, step in kills:
    run = _cli_train(cli_env, workdir, f"kill@{point}:{step}")
    assert run.returncode == -9, (point, step, run.returncode, run.stderr[-3000:])
    names = [p.name for p in (workdir / "checkpoints").iterdir()]
    if point == "save_inflight" and any("tmp" in name for name in names):
      mid_write += 1  # killed with the checkpoint half written
    complete = [int(name) for name in names if name.isdigit()]
    if point == "save_done":
      assert step in complete
    elif point == "save_begin":
      assert step not in complete
    survived += 1
  final = _cli_train(cli_env, workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"finished at step {TOTAL_STEPS}" in final.stdout
  return survived, mid_write


def test_sigkill_at_random_points_resumes_bit_identical(tmp_path, cli_env):
  # The reference run and two kill chains (alternate kills of the seeded plan) run side by side:
  # a run is mostly single-threaded start-up and tracing, so this halves the wall time.
  plan = kill_plan()
  chains = {tmp_path / "killed_a": plan[0::2], tmp_path / "killed_b": plan[1::2]}
  reference_dir = tmp_path / "reference"
  with concurrent.futures.ThreadPoolExecutor(len(chains) + 1) as pool:
    reference_run = pool.submit(_cli_train, cli_env, reference_dir)
    results = [pool.submit(_kill_chain, cli_env, workdir, kills)
               for workdir, kills in chains.items()]
    run = reference_run.result()
    counts = [r.result() for r in results]
  assert run.returncode == 0, run.stderr[-3000:]
  _, reference, _, reference_step = checkpoint.restore_for_eval(reference_dir)
  assert reference_step == TOTAL_STEPS
  for workdir in chains:
    _, params, _, step = checkpoint.restore_for_eval(workdir)
    assert step == TOTAL_STEPS
    assert _leaves_equal(params, reference)  # bit-identical
    assert _step_losses(workdir) == _step_losses(reference_dir)
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
  survived, mid_write = sum(c[0] for c in counts), sum(c[1] for c in counts)
  print(f"kills survived / tried: {survived} / {NUM_KILLS} ({mid_write} during a write)")
  assert survived == NUM_KILLS and mid_write >= 1

  workdir = tmp_path / "killed_a"
  # No complete checkpoint left: one line naming it, no traceback, nothing changed.
  for path in (workdir / "checkpoints").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  before = sorted(str(p) for p in workdir.rglob("*"))
  run = _cli_train(cli_env, workdir)
  assert run.returncode == 2, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  error_lines = [l for l in run.stderr.splitlines() if "no complete checkpoint" in l]
  assert len(error_lines) == 1 and str(workdir / "checkpoints") in error_lines[0], run.stderr
  assert sorted(str(p) for p in workdir.rglob("*")) == before


# ------------------------------------------------------------------------ in-process faults


_config = functools.partial(support.resume_config, max_to_keep=3)


@pytest.fixture(scope="module")
def data():
  return support.toy_train_data()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
  """11 steps; checkpoints 2, 4, 6, 8, 10, 11 (the newest 3 kept)."""
  workdir = tmp_path_factory.mktemp("fault_reference")
  result = trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  assert result.step == 11
  return workdir, result


def _array_files(step_dir):
  return [p for p in (step_dir / "state").rglob("*")
          if p.is_file() and p.parent.name == "d" and p.stat().st_size > 100]


def _truncate_arrays(step_dir):
  for path in _array_files(step_dir):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_bytes(step_dir):
  for path in _array_files(step_dir):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def _garbage_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


def _remove_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _empty_every_file(step_dir):
  for path in step_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"")


def _garbage_tree_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("xx")


CORRUPTIONS = {"truncated arrays": _truncate_arrays, "zeroed bytes": _flip_bytes,
               "garbage meta": _garbage_meta, "state removed": _remove_state,
               "all files empty": _empty_every_file,
               "garbage tree metadata": _garbage_tree_metadata}


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data, uninterrupted,
                                                                  capfd):
  reference_dir, reference = uninterrupted
  survived = 0
  for name, corrupt in CORRUPTIONS.items():
    workdir = tmp_path / name.replace(" ", "_")
    shutil.copytree(reference_dir, workdir)
    corrupt(workdir / "checkpoints" / "11")
    capfd.readouterr()
    result = trainer.train(_config(), workdir, slice_sets=data, verbose=False)
    err = capfd.readouterr().err
    assert "WARNING: checkpoint step 11 cannot be restored" in err, (name, err)
    assert "resuming from step 10" in err, (name, err)
    assert result.step == 11 and not result.stopped
    assert _leaves_equal(result.state.params, reference.state.params), name
    assert _leaves_equal(result.state.opt_state, reference.state.opt_state), name
    # The damaged step is kept aside for inspection, the new step 11 is complete.
    assert (workdir / resume.DAMAGED_DIR / "11").is_dir()
    _, params, _, step = checkpoint.restore_for_eval(workdir)
    assert step == 11 and _leaves_equal(params, reference.state.params)
    assert _step_losses(workdir) == _step_losses(reference_dir)
    survived += 1
  print(f"corruptions survived / tried: {survived} / {len(CORRUPTIONS)}")
  assert survived == len(CORRUPTIONS)


def test_no_complete_checkpoint_is_a_clear_error_and_nothing_changes(tmp_path, data,
                                                                    uninterrupted):
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], workdir)
  for step in (8, 10, 11):
    _truncate_arrays(workdir / "checkpoints" / str(step))
  before = {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")}
  with pytest.raises(errors.CheckpointError) as e:
    trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  message = str(e.value)
  assert message.startswith(str(workdir / "checkpoints" / "11") + ": no complete checkpoint")
  assert "[11, 10, 8]" in message and "\n" not in message
  assert {str(p): p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_enospc_stops_cleanly_and_the_last_checkpoint_resumes(tmp_path, data, uninterrupted,
                                                             monkeypatch):
  reference = uninterrupted[1]
  # (a) the hook: the write of checkpoint 6 fails before it starts.
  monkeypatch.setenv(faults.ENV_VAR, "enospc@save_begin:6")
  with pytest.raises(errors.CheckpointWriteError) as e:
    trainer.train(_config(), tmp_path / "a", slice_sets=data, verbose=False)
  assert "No space left on device" in str(e.value)
  assert "last complete checkpoint is step 4" in str(e.value)
  monkeypatch.delenv(faults.ENV_VAR)
  with checkpoint.Checkpoints(tmp_path / "a") as ckpts:
    assert ckpts.all_steps() == [2, 4]
  result = trainer.train(_config(), tmp_path / "a", slice_sets=data, verbose=False)
  assert result.step == 11 and _leaves_equal(result.state.params, reference.state.params)

  # (b) Orbax's own writer fails inside the asynchronous save of checkpoint 8 (its JSON item).
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  original = json_handler.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if any(part.startswith("8.") for part in pathlib.Path(os.fspath(directory)).parts):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(self, x, directory)
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  with pytest.raises(errors.CheckpointWriteError) as e:
    trainer.train(_config(), tmp_path / "b", slice_sets=data, verbose=False)
  assert "No space left on device" in str(e.value)
  assert "last complete checkpoint is step 6" in str(e.value)
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", original)
  with checkpoint.Checkpoints(tmp_path / "b") as ckpts:
    assert ckpts.all_steps() == [2, 4, 6]
  result = trainer.train(_config(), tmp_path / "b", slice_sets=data, verbose=False)
  assert result.step == 11 and _leaves_equal(result.state.params, reference.state.params)


class _FullDiskFile:
  """A file whose write() of step `step`'s metric record fails as a full disk does (ENOSPC,
  without a file name)."""

  def __init__(self, f, step):
    self.f, self.step = f, step

  def write(self, text):
    if text.startswith(f'{{"step": {self.step},'):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return self.f.write(text)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.f.close()


def test_enospc_on_the_metric_log_or_the_config_is_one_line_naming_the_last_checkpoint(
    tmp_path, data, uninterrupted, monkeypatch):
  reference_dir, reference = uninterrupted
  workdir = tmp_path / "run"
  # (a) metrics.jsonl: appending step 7's record fails (checkpoints 2, 4, 6 are complete).
  real_open = open
  monkeypatch.setattr(metrics_log, "open", raising=False,
                      value=lambda *a, **k: _FullDiskFile(real_open(*a, **k), 7))
  with pytest.raises(errors.RunWriteError) as e:
    trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  message = str(e.value)
  assert message.startswith(f"{workdir / 'metrics.jsonl'}: writing failed (No space left on "
                            "device); training stopped and the last complete checkpoint is step 6")
  assert "\n" not in message
  monkeypatch.delattr(metrics_log, "open")
  # (b) config.json, written again by the run resuming from step 6.
  real_write_text = io_utils.write_text

  def full_disk(path, *args, **kwargs):
    if os.fspath(path).endswith(checkpoint.CONFIG_FILE):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write_text(path, *args, **kwargs)
  monkeypatch.setattr(io_utils, "write_text", full_disk)
  with pytest.raises(errors.RunWriteError) as e:
    trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  assert str(e.value).startswith(f"{workdir / 'config.json'}: writing failed (No space left on "
                                 "device); training stopped and the last complete checkpoint "
                                 "is step 6")
  monkeypatch.setattr(io_utils, "write_text", real_write_text)
  # Space again: the same command resumes to the uninterrupted result and log.
  result = trainer.train(_config(), workdir, slice_sets=data, verbose=False)
  assert result.step == 11 and _leaves_equal(result.state.params, reference.state.params)
  assert _step_losses(workdir) == _step_losses(reference_dir)


def test_nan_batch_raises_and_keeps_the_last_good_checkpoint(tmp_path, data, uninterrupted,
                                                             monkeypatch):
  monkeypatch.setenv(faults.ENV_VAR, "nan@step:7")
  with pytest.raises(errors.NonFiniteLossError, match="at step 7 .*last good checkpoint is step 6"):
    trainer.train(_config(), tmp_path, slice_sets=data, verbose=False)
  monkeypatch.delenv(faults.ENV_VAR)
  with checkpoint.Checkpoints(tmp_path) as ckpts:
    assert ckpts.latest_step() == 6
  # The kept checkpoint is intact: resuming reaches the uninterrupted result.
  result = trainer.train(_config(), tmp_path, slice_sets=data, verbose=False)
  assert _leaves_equal(result.state.params, uninterrupted[1].state.params)


def test_fault_hook_is_inert_and_strict(monkeypatch):
  monkeypatch.delenv(faults.ENV_VAR, raising=False)
  assert faults.hit("step", 1) is None and not faults.wanted("save_done", 2)
  monkeypatch.setenv(faults.ENV_VAR, "nan@step:3")
  assert faults.hit("step", 2) is None and faults.hit("step", 3) == "nan"
  monkeypatch.setenv(faults.ENV_VAR, "explode@step:3")
  with pytest.raises(ValueError, match="U2AD_FAULT_INJECT"):
    faults.hit("step", 3)


def test_a_programming_error_is_not_reported_as_a_damaged_checkpoint(uninterrupted, monkeypatch):
  def bug(*args, **kwargs):
    raise TypeError("a bug in the caller")

  def data_loss(*args, **kwargs):
    raise ValueError("DATA_LOSS: Error reading local file")
  with checkpoint.Checkpoints(uninterrupted[0], read_only=True) as ckpts:
    monkeypatch.setattr(ckpts.manager, "restore", bug)
    with pytest.raises(TypeError, match="a bug in the caller"):
      ckpts.restore_meta(11)
    monkeypatch.setattr(ckpts.manager, "restore", data_loss)
    with pytest.raises(errors.CheckpointError, match="DATA_LOSS"):
      ckpts.restore_meta(11)

"""The run log does not wait on the device every step: metrics are fetched at log boundaries
(and before every save), still checked step by step and written in order."""

import jax.numpy as jnp
import pytest

from u2ad_jax import errors
from u2ad_jax.train import metrics_log
from u2ad_jax.train import progress
from u2ad_jax.train import run_log


def _log(tmp_path, every):
  log = run_log.RunLog(str(tmp_path), chief=True, verbose=False)
  log.begin_stage("pretrain", epochs=1, steps_per_epoch=10, done_steps=0, every=every)
  return log


def test_metrics_are_fetched_at_log_boundaries_not_every_step(tmp_path, monkeypatch):
  fetches = []
  to_host = run_log.parallel.to_host
  monkeypatch.setattr(run_log.parallel, "to_host",
                      lambda tree: fetches.append(len(tree)) or to_host(tree))
  log = _log(tmp_path, every=4)
  for step in range(1, 11):
    log.add({"step": step, "epoch": 0}, {"loss": jnp.float32(step)}, None, "ckpt")
    assert fetches == [4] * (step // 4), step  # nothing read until 4 steps are pending
  log.flush(None, "ckpt")  # a save or the stage end reads the rest
  assert fetches == [4, 4, 2]
  records = [r for r in metrics_log.MetricsLog(str(tmp_path)).read() if "event" not in r]
  assert [r["step"] for r in records] == list(range(1, 11))
  assert [r["loss"] for r in records] == [float(s) for s in range(1, 11)]


def test_the_first_non_finite_pending_loss_is_reported(tmp_path):
  log = _log(tmp_path, every=50)
  for step, loss in enumerate([0.5, 0.4, float("nan"), 0.3, float("inf")], start=1):
    log.add({"step": step, "epoch": 0}, {"loss": jnp.float32(loss)}, 2, "ckpt")
  with pytest.raises(errors.NonFiniteLossError, match="at step 3 .*last good checkpoint is step 2"):
    log.flush(2, "ckpt")
  records = [r for r in metrics_log.MetricsLog(str(tmp_path)).read() if "event" not in r]
  assert [r["step"] for r in records] == [1, 2]  # the good steps before it are logged


def test_speed_counts_steps_that_arrived_after_the_first_fetch():
  p = progress.Progress("pretrain", total_steps=8, enabled=False)
  for step in range(1, 5):  # the first fetch: compilation included, not timed
    speed = p.update(step, 0, 1, {"loss": 1.0}, now=10.0)
  assert speed["steps_per_sec"] != speed["steps_per_sec"]  # nan: nothing timed yet
  for step in range(5, 9):  # 4 steps finished in the 2 s between the fetches
    speed = p.update(step, 0, 1, {"loss": 1.0}, now=12.0)
  assert speed["steps_per_sec"] == pytest.approx(2.0)

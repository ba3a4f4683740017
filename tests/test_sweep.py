"""Checkpoint sweep: `u2ad evaluate --steps` scores a run's kept checkpoints, resumable."""

import csv
import json
import os
import subprocess
import sys

import pytest

import support
import test_evaluate as te
from u2ad_jax import config_lib
from u2ad_jax import errors
from u2ad_jax import mc_maps
from u2ad_jax import output_guard
from u2ad_jax.evaluation import sweep
from u2ad_jax.evaluation.rungs import base as rung_base
from u2ad_jax.train import checkpoint
from u2ad_jax.train import settings as train_settings
from u2ad_jax.train import trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 5-step pretraining on test_evaluate's 64-px cohort (4 patients, 5 slices each), saved
  every step, the newest one kept plus every 2nd step: checkpoints 2, 4 and 5."""
  root = tmp_path_factory.mktemp("sweep")
  cohort = root / "cohort"
  te.write_cohort(str(cohort), num_subjects=4)
  config = config_lib.sibling(str(support.REPO / "configs" / "base.py"), "base").get_config(
      "runlocal")
  config_lib.apply_overrides(config, [
      "stages=('pretrain',)", "stage_epochs.pretrain=1", "batch_size=4",
      "data.image_size=64", "data.patch_size=8", "data.fov_mm=64.0", "data.pixel_mm=1.0",
      "data.clip_percentiles=(0.0, 100.0)", "data.min_roi_patches=4",
      "checkpoint.every_steps=1", "checkpoint.max_to_keep=1", "checkpoint.keep_every_steps=2",
      "validation.every_steps=0", "tensorboard=False", "log_every_steps=100",
      "evaluation.num_samples=2", "uncertainty.num_samples=2"])
  config.data.public_dir = str(cohort)
  result = trainer.train(config, root / "run", verbose=False)
  assert result.step == 5
  return root / "run", cohort


def test_keep_every_steps_keeps_the_multiples_besides_the_newest(run):
  with checkpoint.Checkpoints(run[0], read_only=True) as ckpts:
    assert ckpts.all_steps() == [2, 4, 5]


def test_keep_every_steps_must_be_hit_by_the_saves():
  config = support.resume_config(max_to_keep=1)
  config.checkpoint.keep_every_steps = 3  # saves every 2 steps never land on 3, 9, ...
  with pytest.raises(errors.ConfigValueError, match="keep_every_steps=3 must be a multiple"):
    train_settings.resolve(config)


def test_parse_and_resolve_steps():
  assert sweep.parse_steps("all") == "all" and sweep.parse_steps(" latest") == "latest"
  assert sweep.parse_steps("40,20, 40") == (20, 40)
  for bad, what in (("12,abc", "'abc' is not a step number"), ("", "an empty step"),
                    ("3,", "an empty step"), ("-4", "'-4' is not")):
    with pytest.raises(errors.UsageError, match=what):
      sweep.parse_steps(bad)
  assert sweep.resolve_steps("all", [5, 2, 4], "ckpt") == [2, 4, 5]
  assert sweep.resolve_steps("latest", [5, 2, 4], "ckpt") == [5]
  assert sweep.resolve_steps((2, 5), [5, 2, 4], "ckpt") == [2, 5]
  with pytest.raises(errors.UsageError, match=r"no checkpoint at step 3 in ckpt \(kept: 2, 4, 5"):
    sweep.resolve_steps((2, 3), [5, 2, 4], "ckpt")


def _count_traces(monkeypatch):
  """Counts traces of the Monte-Carlo body (one per compilation) and MonteCarloMaps built."""
  counts = {"traces": 0, "built": 0}
  body, init = mc_maps.MonteCarloMaps._body, mc_maps.MonteCarloMaps.__init__

  def counting_body(self, *args, **kwargs):
    counts["traces"] += 1
    return body(self, *args, **kwargs)

  def counting_init(self, *args, **kwargs):
    counts["built"] += 1
    init(self, *args, **kwargs)

  monkeypatch.setattr(mc_maps.MonteCarloMaps, "_body", counting_body)
  monkeypatch.setattr(mc_maps.MonteCarloMaps, "__init__", counting_init)
  return counts


def test_sweep_scores_every_kept_step_compiles_once_and_resumes(run, tmp_path, monkeypatch):
  workdir, cohort = run
  out = tmp_path / "sweep"
  counts = _count_traces(monkeypatch)
  # Killed while scoring step 4: step 2's folder is complete, nothing of step 4 is left.
  evaluate = rung_base.evaluate

  def killed_at_step_4(rung, *args, **kwargs):
    if rung.step == 4:
      raise KeyboardInterrupt
    return evaluate(rung, *args, **kwargs)

  monkeypatch.setattr(rung_base, "evaluate", killed_at_step_4)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(workdir, cohort, out, "all")
  assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
      "step_0000002", "sweep.csv", "sweep.json", "sweep.png"]
  first = dict(counts)
  assert first["built"] == 1 and first["traces"] >= 1
  monkeypatch.setattr(rung_base, "evaluate", evaluate)

  result = sweep.run_sweep(workdir, cohort, out, "all")
  assert result.computed == [4, 5]  # step 2 was not scored again
  # Two more checkpoints, one MonteCarloMaps and as many traces as one checkpoint needed:
  # the function is compiled once for all the steps of a sweep.
  assert counts["built"] - first["built"] == 1
  assert counts["traces"] - first["traces"] == first["traces"]
  with open(out / "sweep.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["step"] for r in rows] == ["2", "4", "5"] and set(rows[0]) == set(sweep.CSV_HEADER)
  for r in rows:
    assert r["stage"] == "pretrain" and r["num_patients"] == "4"
    for name in ("patient_auroc", "segment_auroc", "patient_f1", "ssim_normal_cord"):
      assert 0.0 <= float(r[name]) <= 1.0, (name, r)
  assert rows[0]["seconds"] and rows[1]["seconds"] and rows[2]["seconds"]
  # Each step folder is that checkpoint's ordinary evaluation.
  for step in (2, 4, 5):
    summary = json.loads((out / f"step_{step:07d}" / "summary.json").read_text())
    assert summary["checkpoint_step"] == step
    metrics = json.loads((out / f"step_{step:07d}" / "metrics.json").read_text())
    assert float(rows[[2, 4, 5].index(step)]["patient_auroc"]) == pytest.approx(
        metrics["patient"]["auroc"], abs=1e-4)
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert output_guard.read_marker(out)["command"] == sweep.COMMAND

  # Run again: nothing to compute. Another cohort into the same folder is refused...
  assert sweep.run_sweep(workdir, cohort, out, "all").computed == []
  other = tmp_path / "other"
  te.write_cohort(str(other), num_subjects=2)
  with pytest.raises(errors.InputError, match="holds a sweep of another data"):
    sweep.run_sweep(workdir, other, out, "latest")
  # ... and --overwrite starts the folder over, with only the requested steps.
  assert sweep.run_sweep(workdir, other, out, "latest", overwrite=True).computed == [5]
  assert sorted(p.name for p in out.iterdir() if p.name.startswith("step_")) == ["step_0000005"]


def test_sweep_output_follows_the_output_rule(run, tmp_path):
  workdir, cohort = run
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("a user's file")
  with pytest.raises(errors.InputError, match="not an output of `u2ad evaluate --steps`"):
    sweep.run_sweep(workdir, cohort, mine, "latest")
  with pytest.raises(errors.UsageError, match="--workdir"):
    sweep.run_sweep(workdir, cohort, workdir / "sweep", "latest")
  assert (mine / "notes.txt").read_text() == "a user's file"
  assert not (workdir / "sweep").exists()


@pytest.mark.parametrize("steps, needle", [
    ("12,abc", "--steps 12,abc: 'abc' is not a step number"),
    ("3", "no checkpoint at step 3"),
])
def test_bad_steps_are_one_line_exit_2(run, tmp_path, steps, needle):
  workdir, cohort = run
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "u2ad_jax.cli", "evaluate", f"--workdir={workdir}",
       f"--data={cohort}", f"--out={out}", f"--steps={steps}"],
      capture_output=True, text=True, timeout=120, env=support.cpu_subprocess_env(1))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("u2ad evaluate: error: ") and needle in lines[0]
  assert not out.exists()

"""Workdirs as URIs: a `scheme://` workdir reaches etils epath and Orbax exactly as given.

epath serves gs:// / s3:// / az:// through fsspec. Here `s3://` is mapped to an in-memory fsspec
file system (no network; epath has no memory:// or file:// scheme), so the whole trainer runs on
a URI workdir: the config record, the
marker, the metric log and the curve figure go through epath, and Orbax's CheckpointManager
(whose TensorStore arrays would need the real service) is replaced by a recorder that checks the
directory string it is handed. A local folder named `s3:` appearing anywhere is a failure.
Also: the rule that every process resumes from the same checkpoint.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import support
from u2ad_jax import errors
from u2ad_jax import output_guard
from u2ad_jax.train import checkpoint
from u2ad_jax.train import metrics_log
from u2ad_jax.train import resume
from u2ad_jax.train import workdir as workdir_lib

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "base.py")
TIMEOUT_S = 240


@pytest.fixture
def empty_cwd(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # a rewritten URI would show up here as a local folder 'gs:'
  yield
  assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


class _RecordingManager:
  """Stands in for ocp.CheckpointManager: records the directory and the saved steps."""
  created: list = []

  def __init__(self, directory, options=None):
    self.directory, self.steps = directory, []
    _RecordingManager.created.append(self)

  def save(self, step, args=None, force=False):
    self.steps.append(int(step))
    return True

  def latest_step(self):
    return max(self.steps) if self.steps else None

  def all_steps(self):
    return list(self.steps)

  def wait_until_finished(self):
    pass

  def reload(self):
    pass

  def close(self):
    pass


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for uri in ("gs://bucket/run", "s3://bucket/a/b", "az://c/run/"):
    assert workdir_lib.is_uri(uri)
    assert workdir_lib.resolve(uri) == uri
  assert not workdir_lib.is_uri("runs/x") and not workdir_lib.is_uri("/abs/gs:/x")
  assert workdir_lib.resolve("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert workdir_lib.join("gs://bucket/run", "checkpoints", "4") == "gs://bucket/run/checkpoints/4"
  assert checkpoint.config_path("gs://bucket/run") == "gs://bucket/run/config.json"
  assert checkpoint.config_path("runs/x") == os.path.join(str(tmp_path), "runs", "x",
                                                          "config.json")
  assert os.listdir(tmp_path) == []


def test_checkpoint_manager_gets_the_uri_unchanged(empty_cwd, monkeypatch):
  _RecordingManager.created.clear()
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", _RecordingManager)
  with checkpoint.Checkpoints("gs://bucket/run") as ckpts:
    assert ckpts.directory == "gs://bucket/run/checkpoints"
    assert ckpts.step_dir(7) == "gs://bucket/run/checkpoints/7"
  assert _RecordingManager.created[0].directory == "gs://bucket/run/checkpoints"


# The trainer on a URI workdir, in a fresh process with cheap XLA compilation (the step compiles
# in seconds instead of half a minute): argv = out.json. Reports what it found as JSON.
TRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import fsspec
    from fsspec.implementations import memory
    from u2ad_jax import output_guard
    import toy_data
    from u2ad_jax import config_lib
    from u2ad_jax.train import checkpoint, metrics_log, trainer
    from u2ad_jax.train import workdir as workdir_lib

    class FakeS3(memory.MemoryFileSystem):
      protocol = ("s3",)
      store = {}
      pseudo_dirs = [""]

      @classmethod
      def _strip_protocol(cls, path):
        path = os.fspath(path)
        return super()._strip_protocol(path[5:] if path.startswith("s3://") else path)

    class Recorder:
      created = []

      def __init__(self, directory, options=None):
        self.directory, self.steps = directory, []
        Recorder.created.append(self)

      def save(self, step, args=None, force=False):
        self.steps.append(int(step))

      def latest_step(self):
        return max(self.steps) if self.steps else None

      def all_steps(self):
        return list(self.steps)

      def wait_until_finished(self):
        pass

      def reload(self):
        pass

      def close(self):
        pass

    fsspec.register_implementation("s3", FakeS3, clobber=True)
    checkpoint.ocp.CheckpointManager = Recorder
    config = config_lib.sibling(sys.argv[2], "base").get_config("runlocal")
    config.stages = ("pretrain",)
    config.stage_epochs.pretrain = 2
    config.checkpoint.every_steps = 2
    uri = "s3://bucket/runs/uri"
    report = {"fresh": workdir_lib.check_train_workdir(uri)}
    result = trainer.train(config, uri, slice_sets={"public_dir": toy_data.toy_slice_set(
        8, 32, seed=3)}, verbose=False)
    fs = FakeS3()
    report.update(
        workdir=result.workdir, step=result.step,
        managers=[(m.directory, m.steps) for m in Recorder.created],
        files=sorted(f.rsplit("/", 1)[-1] for f in fs.find("bucket/runs/uri")),
        png=fs.cat("bucket/runs/uri/" + metrics_log.CURVES_FILE)[:8].hex(),
        logged=[r["step"] for r in metrics_log.MetricsLog(uri).read() if "event" not in r],
        stages=list(checkpoint.read_config(uri).stages),
        resumable=workdir_lib.check_train_workdir(uri),
        marker=json.loads(fs.cat("bucket/runs/uri/" + output_guard.MARKER))["command"],
        cwd=os.listdir("."))
    # The TensorBoard event file, copied out for TensorBoard's reader (which reads local files).
    events = [f for f in fs.find("bucket/runs/uri") if "events.out.tfevents." in f]
    report["events"] = len(events)
    with open(sys.argv[1] + ".events", "wb") as f:
      f.write(fs.cat(events[0]))
    with open(sys.argv[1], "w") as f:
      json.dump(report, f)
""")


def test_train_on_a_uri_workdir(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(TRAIN_SCRIPT)
  out = tmp_path / "report.json"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = support.cpu_subprocess_env(1)
  run = subprocess.run([sys.executable, str(script), str(out), os.path.abspath(BASE)], env=env,
                       cwd=str(cwd), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  report = json.loads(out.read_text())
  uri = "s3://bucket/runs/uri"
  assert report["fresh"] is False and report["resumable"] is True
  assert report["workdir"] == uri and report["step"] == 4
  # Orbax got the URI as given (one read-only probe is never opened: no checkpoints/ yet).
  assert report["managers"] == [[uri + "/checkpoints", [2, 4]]]
  # Everything else of the run was written through epath into the URI, by process 0.
  assert {"config.json", output_guard.MARKER, "metrics.jsonl", metrics_log.CURVES_FILE} <= set(
      report["files"])
  assert bytes.fromhex(report["png"]) == b"\x89PNG\r\n\x1a\n"
  assert report["logged"] == [1, 2, 3, 4]
  assert report["stages"] == ["pretrain"] and report["marker"] == "train"
  assert report["cwd"] == []  # no local folder 's3:' (os.path would have made one)
  # The TensorBoard events went through epath into the URI too (tensorboardX's own s3 writer
  # would need boto3 and a bucket), complete after the run.
  from tensorboard.backend.event_processing import event_accumulator
  assert report["events"] == 1
  local = tmp_path / "tb"
  local.mkdir()
  (local / "events.out.tfevents.0.copy").write_bytes((tmp_path / "report.json.events").read_bytes())
  acc = event_accumulator.EventAccumulator(str(local))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def _start(step, epoch=0, batch=0):
  return resume.Start(resume.Position(0, epoch, batch), step=step)


def test_processes_must_agree_on_the_resume_step():
  same = np.stack([resume.start_record(_start(4, 1, 0))] * 3)
  resume.check_same_start("gs://bucket/run", same)
  fresh = np.stack([resume.start_record(_start(None))] * 2)
  resume.check_same_start("gs://bucket/run", fresh)
  mixed = np.stack([resume.start_record(_start(4, 1, 0)), resume.start_record(_start(None))])
  with pytest.raises(errors.WorkdirError, match=r"gs://bucket/run: the processes disagree.*"
                     r"process 0: checkpoint step 4 \(stage 0, epoch 1, batch 0\); "
                     r"process 1: no checkpoint"):
    resume.check_same_start("gs://bucket/run", mixed)


def test_evaluation_records_a_uri_workdir_as_given(tmp_path, monkeypatch):
  """summary.json and report.md name `gs://bucket/run` exactly as given (os.path.abspath made it
  `<cwd>/gs:/bucket/run`), and --threshold-from recognises the same run by it. The checkpoint
  restore and the MC maps are stand-ins (no bucket here); everything else is the real path."""
  import ml_collections
  import test_evaluate as te
  from u2ad_jax.evaluation.rungs import model as model_rung

  uri = "gs://bucket/run"
  config = ml_collections.ConfigDict({
      "data": te.data_config().to_dict(), "model": {"variant": "mu"},
      "evaluation": {"mad_k": 2.5, "num_samples": 2}, "postprocess": {"percentile": 90.0},
      "uncertainty": {"num_samples": 2}})
  restored = []

  class Model:
    image_size = te.S

  def restore(workdir, step=None):
    restored.append(workdir)
    return Model(), None, ml_collections.ConfigDict(config.to_dict()), 7

  def maps(model, params, config, images, train_roi, **kwargs):
    mean = np.minimum(images, 0.35).astype(np.float32)
    return {"mean": mean, "eu": np.zeros_like(mean)}

  monkeypatch.setattr(checkpoint, "restore_for_eval", restore)
  monkeypatch.setattr(model_rung, "model_maps", maps)
  # No bucket: the checkpoint's training position (for the stage warning) is unknown.
  monkeypatch.setattr(model_rung.ModelRung, "_checkpoint_meta", lambda self: None)
  cohort = tmp_path / "cohort"
  te.write_cohort(str(cohort), num_subjects=2)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  result = model_rung.evaluate_checkpoint(uri, str(cohort), str(tmp_path / "eval"),
                                          verbose=False)
  assert restored == [uri] and result.name == "run"
  summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
  assert summary["model"]["workdir"] == uri
  assert f"of `{uri}`" in (tmp_path / "eval" / "report.md").read_text()
  # The recorded threshold belongs to the same run (its URI), and not to another bucket's.
  model_rung.evaluate_checkpoint(uri + "/", str(cohort), str(tmp_path / "eval2"), verbose=False,
                                 threshold_from=str(tmp_path / "eval"))
  with pytest.raises(errors.InputError, match="threshold recorded for the model in gs://bucket/run,"
                                              " not gs://other/run"):
    model_rung.evaluate_checkpoint("gs://other/run", str(cohort), None, verbose=False,
                                   threshold_from=str(tmp_path / "eval"))
  assert os.listdir(cwd) == []  # no local folder 'gs:'

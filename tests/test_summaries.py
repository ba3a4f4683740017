"""TensorBoard event files of `u2ad train`, read back with TensorBoard's own reader."""

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import support
from u2ad_jax import config_lib
from u2ad_jax.train import metrics_log
from u2ad_jax.train import summaries
from u2ad_jax.train import trainer


def _read(workdir):
  """TensorBoard's view of a workdir: ({scalar tag: [steps]}, {image tag: [(step, h, w)]})."""
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  acc.Reload()
  tags = acc.Tags()
  scalars = {t: [e.step for e in acc.Scalars(t)] for t in tags["scalars"]}
  images = {t: [(e.step, e.height, e.width) for e in acc.Images(t)] for t in tags["images"]}
  return acc, scalars, images


def _config(**fields):
  """base:runlocal (32 px), pretraining then EU adaptation (a map refresh), 1 epoch each of
  8 / 10 slices at batch 4: 2 + 3 steps; validation every 2 steps on 2 held-out subjects."""
  config = config_lib.sibling(str(support.REPO / "configs" / "base.py"), "base").get_config(
      "runlocal")
  config_lib.apply_overrides(config, [
      "stages=('pretrain','adapt_eu')", "stage_epochs.pretrain=1", "stage_epochs.adapt_eu=1",
      "batch_size=4", "checkpoint.every_steps=0", "log_every_steps=100",
      "validation.every_steps=2", "validation.num_subjects=2", "validation.panel_slices=3"]
      + [f"{k}={v}" for k, v in fields.items()])
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tb") / "run"
  result = trainer.train(_config(), workdir, slice_sets=support.toy_train_data(), verbose=False)
  return workdir, result


def test_event_files_hold_every_step_metric_validation_and_panels(trained):
  workdir, result = trained
  assert len(summaries.event_files(workdir)) == 1
  acc, scalars, images = _read(workdir)
  records = metrics_log.MetricsLog(workdir).read()
  steps = [r["step"] for r in records if "event" not in r]
  # 4 public slices of 8 after the held-out subjects: 1 step; 10 clinical: 3 steps.
  assert steps == list(range(1, result.step + 1)) and result.step == 1 + 3
  for tag in ("train/loss", "train/image", "train/edge", "train/grad_norm", "train/lr",
              "guidance/w_eu", "guidance/tau", "guidance/au_exclusion"):
    assert scalars[tag] == steps, tag
  # Speed is known from the second fetch of each stage on (the first includes compilation).
  assert scalars["speed/steps_per_sec"] and scalars["speed/images_per_sec"]
  assert set(scalars["speed/steps_per_sec"]) <= set(steps)
  # The values are metrics.jsonl's (float32 in the event file).
  loss = {r["step"]: r["loss"] for r in records if "event" not in r}
  for e in acc.Scalars("train/loss"):
    assert e.value == pytest.approx(loss[e.step], rel=1e-6)
  validations = [r["step"] for r in records if r.get("event") == "validation"]
  assert validations == [1, 2, 4]  # every 2 steps and at each stage end (1 and 4)
  for tag in ("validation/loss", "validation/ssim", "validation/psnr", "validation/corr"):
    assert scalars[tag] == validations, tag
  maps = [r["step"] for r in records if r.get("event") == "maps"]
  assert maps == [1] and scalars["maps/mean_patch_eu"] == maps
  # Panels at the end of pretraining (= the adaptation's first map refresh: once) and at the
  # end of adaptation: 4 rows of 32 px, 3 slices of 32 px, 2-px gaps.
  assert images[summaries.PANEL_TAG] == [(1, 4 * 32 + 6, 3 * 32 + 4), (4, 4 * 32 + 6, 3 * 32 + 4)]
  assert scalars[summaries.PANEL_TAG + "_eu_max"] == [1, 4]


def test_panel_rows_and_scales():
  k, h, w = 2, 6, 5
  maps = {"image": np.full((k, h, w), 0.5), "mean": np.zeros((k, h, w)),
          "eu": np.zeros((k, h, w)), "anomaly": np.zeros((k, h, w))}
  maps["eu"][1, 2, 3] = 4.0
  image, scales = summaries.panel_image(maps, gap=1)
  assert image.shape == (4 * h + 3, 2 * w + 1, 3) and image.dtype == np.uint8
  assert scales == {"eu": 4.0, "anomaly": 0.0}
  assert (image[:h, :w] == 128).all() and (image[h + 1:2 * h + 1, :w] == 0).all()
  eu_row = image[2 * (h + 1):2 * (h + 1) + h]
  bright = eu_row[2, w + 1 + 3]
  assert bright.sum() > eu_row[0, 0].sum() + 300  # the maximum is the colour map's top
  assert (image[h, :] == 255).all()  # the gap between rows


def test_a_resumed_run_hides_what_the_interrupted_attempt_logged_after_its_checkpoint(
    tmp_path, capsys):
  workdir = tmp_path / "run"
  data = support.toy_train_data()
  config = _config(**{"checkpoint.every_steps": 2, "validation.every_steps": 0})
  config.debug_stop_after_steps = 3  # killed after step 3; its checkpoint is step 2
  assert trainer.train(config, workdir, slice_sets=data, verbose=False).stopped
  _, scalars, _ = _read(workdir)
  assert scalars["train/loss"] == [1, 2, 3]
  config.debug_stop_after_steps = 0
  capsys.readouterr()
  result = trainer.train(config, workdir, slice_sets=data, verbose=True)
  said = [l for l in capsys.readouterr().err.splitlines() if "tensorboard --logdir" in l]
  assert said == [f"[train] TensorBoard: tensorboard --logdir {workdir}"]  # once per command
  assert len(summaries.event_files(workdir)) == 2
  _, scalars, _ = _read(workdir)
  # Step 3 of the first attempt is purged and logged again by the resumed run: once each.
  assert scalars["train/loss"] == list(range(1, result.step + 1))


def test_tensorboard_off_writes_no_event_file(tmp_path):
  config = _config(**{"tensorboard": False, "stages": "('pretrain',)",
                      "validation.every_steps": 0})
  trainer.train(config, tmp_path / "run", slice_sets=support.toy_train_data(), verbose=False)
  assert summaries.event_files(tmp_path / "run") == []
  assert (tmp_path / "run" / metrics_log.METRICS_FILE).exists()

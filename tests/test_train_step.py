"""The per-device train step under its two wrappers and on 1, 2 and 4 devices (4 fake CPU devices).

The equivalence runs use plain SGD: Adam divides each gradient by its running RMS, so a gradient
that is exactly zero in exact arithmetic (e.g. the attention key bias, to which softmax is
invariant) but float noise in practice moves by about lr whatever its sign, and runs that sum in
a different order would differ by O(lr) there. SGD keeps float noise at float size. The trainer
tests cover the Adam path.
"""

import functools
import pathlib

import jax
import numpy as np
import optax
import pytest

import toy_data
from u2ad_jax import config_lib
from u2ad_jax import patches
from u2ad_jax import parallel
from u2ad_jax.train import settings as settings_lib
from u2ad_jax.train import state as state_lib
from u2ad_jax.train import step as step_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
GLOBAL_BATCH = 4
NUM_STEPS = 3


@pytest.fixture(scope="module")
def setup():
  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "base").get_config("runlocal")
  model = settings_lib.build_model(config)
  params = state_lib.init_params(model, jax.random.key(0))
  optimizer = optax.sgd(0.05)
  slices = toy_data.toy_slice_set(GLOBAL_BATCH * NUM_STEPS, config.data.image_size, seed=3)
  rng = np.random.default_rng(0)
  n = model.num_patches
  batches = []
  for s in range(NUM_STEPS):
    rows = slice(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)
    roi_patches = np.asarray(patches.patch_any(slices.train_roi[rows], config.data.patch_size))
    batches.append({
        "image": slices.images[rows][..., None], "train_roi": slices.train_roi[rows],
        "valid": np.array([True, True, True, s != 1]),  # one padding row in step 1
        "patch_eu": rng.gamma(1.0, 1.0, (GLOBAL_BATCH, n)).astype(np.float32),
        "exclude": roi_patches & (rng.uniform(size=(GLOBAL_BATCH, n)) < 0.2)})
  # Guidance changes between steps (a schedule); it must not recompile.
  guidance = [step_lib.guidance_arrays(2.0, 0.5, True), step_lib.guidance_arrays(1.0, 1.0, False),
              step_lib.guidance_arrays(3.0, 2.0, True)]
  return dict(config=config, model=model, params=params, optimizer=optimizer, batches=batches,
              guidance=guidance)


def _run(setup, mode, num_devices):
  """NUM_STEPS guided steps on the first `num_devices` devices; returns (params, metrics)."""
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(1)  # runs at trace time only
    return setup["model"].apply(*args, **kwargs)

  settings = settings_lib.step_settings(setup["config"], guided=True)
  body = functools.partial(step_lib.train_step, apply_fn=counting_apply,
                           optimizer=setup["optimizer"], settings=settings)
  devices = jax.devices()[:num_devices]
  fn = parallel.DataParallel(body, mode, num_args=4, sharded=(1,), donate=(0,), devices=devices)
  params = jax.tree.map(np.array, setup["params"])  # fresh buffers: the state is donated
  state = fn.replicate(state_lib.create_state(params, setup["optimizer"]))
  key = jax.random.key(42)
  history = []
  for batch, guidance in zip(setup["batches"], setup["guidance"]):
    local = {k: v.reshape((num_devices, GLOBAL_BATCH // num_devices) + v.shape[1:])
             for k, v in batch.items()}
    state, metrics = fn(state, local, key, guidance)
    history.append(parallel.to_host(metrics))
  assert len(traces) == 1, "the step retraced"
  assert int(parallel.to_host(state.step)) == NUM_STEPS
  return parallel.to_host(state.params), history


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def pmap4(setup):
  return _run(setup, "pmap", 4)


def test_pmap_and_shard_map_agree(setup, pmap4):
  params_p, hist_p = pmap4
  params_s, hist_s = _run(setup, "shard_map", 4)
  _assert_close(params_p, params_s)
  for mp, ms in zip(hist_p, hist_s):
    _assert_close(mp, ms)
  # The parameters moved, and the loss terms are real numbers.
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(params_p), jax.tree.leaves(setup["params"])))
  assert moved > 1e-4
  assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in hist_p)
  assert [int(m["examples"]) for m in hist_p] == [4, 3, 4]
  assert hist_p[-1]["loss"] < hist_p[0]["loss"]


@pytest.mark.parametrize("num_devices", [1, 2])
def test_device_count_does_not_change_training(setup, pmap4, num_devices):
  # The same global batches on 1, 2 and 4 devices: same masks (keyed by global example
  # position), same pooled loss, same parameters up to float summation order.
  params, history = _run(setup, "pmap", num_devices)
  _assert_close(params, pmap4[0])
  for m, m4 in zip(history, pmap4[1]):
    _assert_close(m, m4)


def test_per_device_masks_differ_and_follow_the_guidance(setup):
  config = setup["config"]
  settings = settings_lib.step_settings(config, guided=True)
  batch = setup["batches"][0]
  # Identical rows on every device: only the device (global example position) differs.
  same = {k: np.repeat(v[:1], 4, axis=0)[:, None] for k, v in batch.items()}
  guidance = step_lib.guidance_arrays(1.0, 1.0, True)

  def body(b, key, g):
    device = jax.lax.axis_index(parallel.AXIS)
    return step_lib.draw_masks(jax.random.fold_in(key, 7), b, g, settings, device)

  masks = jax.pmap(body, axis_name=parallel.AXIS, in_axes=(0, None, None))(
      same, jax.random.key(1), guidance)
  masks = np.asarray(masks)[:, 0]  # [4 devices, N]
  assert len({m.tobytes() for m in masks}) == 4  # all four differ
  roi = np.asarray(patches.patch_any(batch["train_roi"][:1], config.data.patch_size))[0]
  excluded = batch["exclude"][0]
  n_roi = roi.sum()
  expected = min(int(np.floor(config.masking.ratio * n_roi + 0.5)), int((roi & ~excluded).sum()))
  assert (masks.sum(axis=1) == expected).all()  # exact count per image
  assert not (masks & ~roi).any()  # only ROI patches
  assert not (masks & excluded).any()  # AU candidates stay visible
  # With the exclusion switched off by the schedule, candidates can be masked again.
  masks_off = np.asarray(jax.pmap(body, axis_name=parallel.AXIS, in_axes=(0, None, None))(
      same, jax.random.key(1), step_lib.guidance_arrays(1.0, 1.0, False)))[:, 0]
  assert (masks_off & excluded).any()


def _optim(**fields):
  base = dict(lr=1.0, b1=0.9, b2=0.95, decay_every_epochs=4, decay_factor=0.1)
  return state_lib.OptimizerSettings(**{**base, **fields})


def test_learning_rate_schedules():
  """Step decay (the paper's, and the default when the new fields are absent), cosine decay to
  lr * decay_factor, and the linear warmup that precedes either."""
  step = state_lib.learning_rate_schedule(_optim(), steps_per_epoch=10)
  assert [float(step(c)) for c in (0, 39, 40, 80)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
  cosine = state_lib.learning_rate_schedule(_optim(schedule="cosine"), steps_per_epoch=10)
  assert [float(cosine(c)) for c in (0, 20, 40, 100)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
  warm = state_lib.learning_rate_schedule(_optim(schedule="cosine", warmup_epochs=1.0),
                                          steps_per_epoch=10)
  values = [float(warm(c)) for c in range(0, 60)]
  assert values[0] == pytest.approx(1.0 / 11) and values[10] == pytest.approx(1.0)
  assert all(a < b for a, b in zip(values[:10], values[1:11]))  # rising during the warmup
  assert values[30] == pytest.approx(0.55) and values[50] == pytest.approx(0.1)
  # Over the whole stage, whatever its length (after a one-epoch warmup here).
  for epochs in (6, 21):
    stage = state_lib.learning_rate_schedule(
        _optim(schedule="cosine_stage", warmup_epochs=1.0), 10, stage_epochs=epochs)
    end = 10 * epochs
    middle = 10 + (end - 10) // 2
    assert float(stage(10)) == pytest.approx(1.0)
    assert float(stage(middle)) == pytest.approx(0.55, abs=0.01)
    assert float(stage(end)) == pytest.approx(0.1) and float(stage(end + 50)) == pytest.approx(0.1)
  assert float(state_lib.learning_rate_schedule(_optim(schedule="cosine_stage"), 10)(99)) == 1.0
  flat = state_lib.learning_rate_schedule(_optim(decay_every_epochs=0, warmup_epochs=0.5), 10)
  assert float(flat(5)) == pytest.approx(1.0) and float(flat(1000)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="schedule"):
    state_lib.learning_rate_schedule(_optim(schedule="linear"), 10)
  # The optimizer state's structure does not depend on the schedule (checkpoints restore).
  params = {"w": np.zeros(3, np.float32)}
  shapes = [jax.tree_util.tree_structure(state_lib.make_optimizer(o, 10).init(params))
            for o in (_optim(), _optim(schedule="cosine", warmup_epochs=2.0))]
  assert shapes[0] == shapes[1]


def test_one_optimizer_object_per_settings_shared_by_state_and_step():
  optim = _optim(schedule="cosine")
  optimizer = state_lib.make_optimizer(optim, 10)
  assert state_lib.make_optimizer(_optim(schedule="cosine"), 10) is optimizer
  assert state_lib.make_optimizer(optim, 11) is not optimizer
  with pytest.raises(ValueError, match="optim.restart"):
    _optim(restart="never")
  # The step is cached on that object: the same settings give the same compiled wrapper.
  config = config_lib.sibling(str(CONFIG_DIR / "base.py"), "base").get_config("runlocal")
  model = settings_lib.build_model(config)
  settings = settings_lib.step_settings(config)
  wrapped = step_lib.make_train_step(model, optimizer, settings, "pmap", jax.devices()[:1])
  assert step_lib.make_train_step(model, state_lib.make_optimizer(optim, 10), settings, "pmap",
                                  jax.devices()[:1]) is wrapped


@pytest.mark.parametrize("restart", ["stage", "adaptation"])
def test_optimizer_restart_rule_across_stages(tmp_path, restart):
  """'stage' (the default): every stage starts its own warmup + cosine with fresh Adam moments;
  'adaptation': adapt_eu_au continues adapt_eu's schedule (only pretrain -> adaptation restarts).
  """
  from u2ad_jax import config_files  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import metrics_log  # pylint: disable=g-import-not-at-top
  from u2ad_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = config_files.load("configs/smoke.py:runlocal")
  config_lib.apply_overrides(config, [
      "stages=('pretrain', 'adapt_eu', 'adapt_eu_au')", "stage_epochs.pretrain=2",
      "stage_epochs.adapt_eu=2", "stage_epochs.adapt_eu_au=2", "batch_size=4",
      "optim.schedule='cosine_stage'", "optim.warmup_epochs=1.0", "optim.lr=0.01",
      f"optim.restart='{restart}'", "checkpoint.every_steps=0", "log_every_steps=1"])
  data = {"public_dir": toy_data.toy_slice_set(8, image_size=32, seed=4),
          "clinical_dir": toy_data.toy_slice_set(8, image_size=32, seed=5, subject_prefix="c")}
  trainer.train(config, tmp_path / "run", slice_sets=data, verbose=False)
  steps = [r for r in metrics_log.MetricsLog(tmp_path / "run").read() if "event" not in r]
  first = {}
  for r in steps:
    first.setdefault(r["stage"], r["lr"])
  last_eu = [r["lr"] for r in steps if r["stage"] == "adapt_eu"][-1]
  warmup_start = 0.01 / 3  # lr / (warmup steps + 1), 2 steps per epoch
  assert first["pretrain"] == pytest.approx(warmup_start)
  assert first["adapt_eu"] == pytest.approx(warmup_start)  # both rules restart here
  if restart == "stage":
    assert first["adapt_eu_au"] == pytest.approx(warmup_start)
  else:  # the schedule goes on from where adapt_eu left it: past the warmup, decaying
    assert first["adapt_eu_au"] < last_eu and first["adapt_eu_au"] != pytest.approx(warmup_start)

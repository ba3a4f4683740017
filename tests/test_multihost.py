"""Multi-host training for real: processes on 127.0.0.1 (CPU collectives over gloo).

Two processes with two CPU devices each, their devices INTERLEAVED in the mesh (process 0 owns
mesh slots 0 and 2, process 1 slots 1 and 3: the layout a launcher or topology may produce),
train with the real driver (shard_map, the mode that accepts any layout) and must end with the
parameters AND the refreshed guidance maps of one process with four devices on the same global
batches. Every per-process block (the batch rows, the first example index of the masks, the map
rows) is derived from the mesh, so nothing depends on each process's devices being contiguous.
pmap, whose host-local inputs JAX accepts only for contiguous blocks, refuses such a layout
up front (`parallel.check_layout`, tested here without processes).

A process that dies or fails where the processes must agree before training (where to resume;
process 0 setting a damaged checkpoint aside) stops the others with one line, within
`--process_timeout`, instead of leaving them waiting.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import support

TIMEOUT_S = 240

# Runs `trainer.train` in a fresh process: argv = base config path, workdir, out.npz, mode
# [, port, process_id] (with the last two: one process of a two-process job, interleaved mesh).
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    base_config, workdir, out, mode = sys.argv[1:5]
    if len(sys.argv) > 5:
      from u2ad_jax.train import distributed
      distributed.initialize(f"127.0.0.1:{sys.argv[5]}", num_processes=2,
                             process_id=int(sys.argv[6]))
    import jax
    import toy_data
    from u2ad_jax import config_lib
    from u2ad_jax import parallel
    from u2ad_jax.train import maps, trainer
    config = config_lib.sibling(base_config, "base").get_config("runlocal")
    # The guided stage: EU + AU guidance from maps computed across all devices, refreshed at
    # both epochs (the second refresh from trained parameters).
    config.stages = ("adapt_eu_au",)
    config.stage_epochs.adapt_eu_au = 2
    config.batch_size = 8  # 2 rows per device; 12 slices = one full and one padded batch
    config.checkpoint.every_steps = 0  # the end-of-stage save only
    config.parallel = mode
    data = {"clinical_dir": toy_data.toy_slice_set(12, 32, seed=22, lesion_fraction=0.5)}
    assert jax.device_count() == 4, jax.devices()
    devices = jax.devices()
    if jax.process_count() > 1:
      by_process = [[d for d in devices if d.process_index == p] for p in range(2)]
      devices = [d for pair in zip(*by_process) for d in pair]
      assert parallel.mesh_positions(devices).tolist() == [jax.process_index(),
                                                          jax.process_index() + 2]
    refreshed = []
    original = maps.MapGenerator.__call__
    def recording(self, *args):
      result = original(self, *args)
      refreshed.append(result)
      return result
    maps.MapGenerator.__call__ = recording
    result = trainer.train(config, workdir, slice_sets=data, verbose=False, devices=devices)
    leaves = jax.tree.leaves(result.state.params)
    np.savez(out, step=result.step, process_count=jax.process_count(),
             refreshes=len(refreshed), lr=float(config.optim.lr),
             **{f"p{i}": x for i, x in enumerate(leaves)},
             **{f"{k}{i}": m[k] for i, m in enumerate(refreshed) for k in m})
""")


def test_two_interleaved_processes_equal_one_process_with_four_devices(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  base_config = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "base.py")
  base_config = os.path.abspath(base_config)
  port = str(support.free_port())
  mode = "shard_map"

  def start(args, num_devices):
    return subprocess.Popen([sys.executable, str(script), *args],
                            env=support.cpu_subprocess_env(num_devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  multi = [start([base_config, str(tmp_path / "multi"), str(tmp_path / f"multi{i}.npz"), mode,
                  port, str(i)], 2) for i in range(2)]
  single = start([base_config, str(tmp_path / "single"), str(tmp_path / "single.npz"), mode], 4)
  support.finish_processes(multi + [single], TIMEOUT_S)

  reference = np.load(tmp_path / "single.npz")
  assert int(reference["process_count"]) == 1
  refreshes = int(reference["refreshes"])
  assert refreshes == 2  # epoch 0 and epoch 1 (from parameters trained for one epoch)
  num_leaves = len([k for k in reference.files if k[0] == "p" and k[1:].isdigit()])
  steps = int(reference["step"])
  for i in range(2):
    result = np.load(tmp_path / f"multi{i}.npz")
    assert int(result["process_count"]) == 2
    assert int(result["step"]) == steps == 4
    assert int(result["refreshes"]) == refreshes
    for r in range(refreshes):
      assert reference[f"patch_eu{r}"].shape[0] == 12
      # Maps are per slice: equal up to float summation order (the second refresh runs on
      # parameters that already differ in the last bits, and EU is a variance), candidates
      # exactly. A map on the wrong slice would be off by its whole value.
      np.testing.assert_allclose(result[f"patch_eu{r}"], reference[f"patch_eu{r}"],
                                 rtol=1e-5 if r == 0 else 1e-4, atol=1e-9)
      np.testing.assert_array_equal(result[f"exclude{r}"], reference[f"exclude{r}"])
    # The second refresh used trained parameters: it must differ from the first.
    assert not np.allclose(result["patch_eu0"], result["patch_eu1"], rtol=1e-3, atol=0)
    for k in range(num_leaves):
      got, want = result[f"p{k}"], reference[f"p{k}"]
      if want.ndim >= 3 and want.shape[-3] == 3:
        # The attention's qkv bias [..., 3, heads, head_dim]: the KEY bias has an exactly zero
        # gradient (softmax ignores a constant added to every logit of a query), so what it
        # gets is reduction-order rounding, which Adam scales to up to `lr` per step in either
        # run; it is held to Adam's step bound. Query and value biases are compared tightly.
        key_diff = np.abs(got[..., 1, :, :] - want[..., 1, :, :])
        assert key_diff.max() <= steps * float(reference["lr"]) * 1.01
        got, want = np.delete(got, 1, axis=-3), np.delete(want, 1, axis=-3)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"leaf {k}")
  # Both processes wrote one shared checkpoint directory (process 0 the logs).
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints"))[-1] == "4"
  assert (tmp_path / "multi" / "metrics.jsonl").exists()


class _Device:
  """A stand-in for jax.Device: what the layout rule reads."""

  def __init__(self, process_index, id_):
    self.process_index, self.id = process_index, id_


def test_layout_rule_shard_map_any_order_pmap_contiguous_only():
  from u2ad_jax import parallel
  contiguous = [_Device(0, 0), _Device(0, 1), _Device(1, 2), _Device(1, 3)]
  interleaved = [contiguous[i] for i in (0, 2, 1, 3)]
  unequal = [_Device(0, 0), _Device(1, 1), _Device(1, 2)]
  for devices in (contiguous, interleaved, unequal):
    parallel.check_layout("shard_map", devices)
  parallel.check_layout("pmap", contiguous)
  parallel.check_layout("pmap", unequal)
  with pytest.raises(ValueError, match=r"process 0 holds mesh slots \[0, 2\] of 4.*shard_map"):
    parallel.check_layout("pmap", interleaved)
  np.testing.assert_array_equal(parallel._slots_of(interleaved, 1), [1, 3])
  with pytest.raises(ValueError, match="process 2 owns none"):
    parallel._slots_of(interleaved, 2)
  with pytest.raises(ValueError, match="repeats devices"):
    parallel._slots_of(contiguous + contiguous[:1], 0)


def test_batch_blocks_follow_the_mesh_slots_of_each_process():
  """Interleaved processes (slots [0, 2] and [1, 3]) and unequal ones ([0] and [1, 2, 3]) build
  exactly the rows of their slots: reassembled in mesh order, the one-process batch."""
  import toy_data
  from u2ad_jax.data import pipeline
  slices = toy_data.toy_slice_set(10, 32, seed=5)
  common = dict(global_batch=8, seed=3, augment=True, drop_remainder=False)
  whole = pipeline.BatchIterator(slices, num_devices=4, **common)
  for layout in ([[0, 2], [1, 3]], [[0], [1, 2, 3]], [[3, 1], [0, 2]]):
    parts = [pipeline.BatchIterator(slices, num_devices=len(slots), process_index=p,
                                    process_count=2, device_positions=slots, total_devices=4,
                                    **common) for p, slots in enumerate(layout)]
    for epoch in range(2):
      for reference, *blocks in zip(whole.epoch(epoch), *(it.epoch(epoch) for it in parts)):
        for key in ("image", "train_roi", "index", "valid"):
          rebuilt = np.zeros_like(reference[key])
          for slots, block in zip(layout, blocks):
            rebuilt[np.asarray(slots)] = block[key]
          np.testing.assert_array_equal(rebuilt, reference[key], err_msg=f"{layout} {key}")
  assert (np.concatenate([b["index"].ravel() for b in whole.epoch(0)]) >= 0).sum() == 10
  with pytest.raises(ValueError, match="distinct mesh slots"):
    pipeline.BatchIterator(slices, num_devices=2, device_positions=[1, 1], total_devices=4,
                           **common)
  with pytest.raises(ValueError, match="does not split over 3 device"):
    pipeline.BatchIterator(slices, num_devices=1, device_positions=[0], total_devices=3,
                           **common)


# ------------------------------------------------------------------------ a process that fails

# One process of a two-process job on 127.0.0.1 that stops where the processes must agree. argv:
# scenario, workdir, port, process id, out.json, base config. Reports what train() raised, or the
# workdir as it saw it when it opened the checkpoint manager.
FAULT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    scenario, workdir, port, process, out, base_config = sys.argv[1:7]
    process = int(process)
    from u2ad_jax.train import distributed
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process, timeout_s=5)
    import toy_data
    from u2ad_jax import config_lib, errors
    from u2ad_jax.train import checkpoint, resume, trainer
    config = config_lib.sibling(base_config, "base").get_config("runlocal")
    config.stages = ("pretrain",)

    # Both processes find the newest checkpoint (step 7, a folder the test made) damaged; process
    # 0 sets it aside slowly (a slow mount), or fails to.
    resume.find_start = lambda *args: resume.Start(resume.Position(0, 0, 0), damaged=(7,))
    real_set_aside = resume.set_aside

    def set_aside(workdir, steps):
      time.sleep(2)
      if scenario == "move_fails":
        raise PermissionError(13, "Permission denied", os.path.join(workdir, "checkpoints", "7"))
      real_set_aside(workdir, steps)
    resume.set_aside = set_aside

    class Opened(Exception):
      pass

    def opened(workdir, read_only=False, **kwargs):
      if read_only:
        raise errors.CheckpointError(workdir, "not looked at in this test")
      raise Opened(sorted(os.listdir(workdir)), sorted(os.listdir(os.path.join(workdir,
                                                                          "checkpoints"))))
    checkpoint.Checkpoints = opened
    try:
      trainer.train(config, workdir, verbose=False,
                    slice_sets={"public_dir": toy_data.toy_slice_set(8, 32, seed=3)})
      report = {"raised": None}
    except Opened as e:
      report = {"raised": "Opened", "workdir": e.args[0], "checkpoints": e.args[1]}
    except errors.U2ADError as e:
      report = {"raised": type(e).__name__, "message": str(e)}
    with open(out, "w") as f:
      json.dump(report, f)
""")


def _two_processes(tmp_path, scenario):
  script = tmp_path / "fault.py"
  script.write_text(FAULT_SCRIPT)
  base_config = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                             "base.py"))
  workdir = tmp_path / scenario
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "checkpoints" / "7" / "state").write_text("damaged")
  from u2ad_jax.train import workdir as workdir_lib
  workdir_lib.mark(workdir)  # a run of its own, to resume
  port = str(support.free_port())
  processes = [subprocess.Popen(
      [sys.executable, str(script), scenario, str(workdir), port, str(i),
       str(tmp_path / f"{scenario}{i}.json"), base_config],
      env=support.cpu_subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  support.finish_processes(processes, 120)
  return workdir, [json.loads((tmp_path / f"{scenario}{i}.json").read_text()) for i in range(2)]


def test_every_process_waits_for_the_damaged_checkpoint_to_be_set_aside(tmp_path):
  """Process 0 moves the damaged newest checkpoint aside (slowly); process 1 opens the checkpoint
  manager only after that, so neither lists the damaged step the resumed run writes again."""
  workdir, reports = _two_processes(tmp_path, "slow_move")
  for report in reports:
    assert report["raised"] == "Opened", report
    assert report["checkpoints"] == [] and "checkpoints_damaged" in report["workdir"], report
  assert os.listdir(workdir / "checkpoints_damaged") == ["7"]


def test_a_failed_damaged_checkpoint_move_stops_every_process_with_one_line(tmp_path):
  """Process 0 cannot set the damaged checkpoint aside: it stops with one line, and process 1
  (told so, not left waiting) stops with one line naming process 0's problem."""
  workdir, (chief, other) = _two_processes(tmp_path, "move_fails")
  assert chief["raised"] == "RunWriteError", chief
  assert chief["message"].startswith(f"{workdir / 'checkpoints' / '7'}: writing failed "
                                     "(Permission denied); training stopped")
  assert other["raised"] == "WorkdirError", other
  assert other["message"].startswith(f"{workdir}: process 0 could not prepare it (failed: "
                                     "[Errno 13] Permission denied")
  assert "\n" not in chief["message"] + other["message"]
  assert os.listdir(workdir / "checkpoints") == ["7"]  # nothing moved


# Process 1 of a `u2ad train` job: joins the job and starts its devices (the job's start-up
# exchanges), then dies before the processes agree where to resume (SIGKILL: no clean-up).
# argv: port.
DYING_PROCESS = textwrap.dedent("""
    import os, signal, sys
    from u2ad_jax.train import distributed
    distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=1)
    import jax
    print(distributed.describe(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_process_that_dies_before_the_resume_agreement_stops_the_job_with_one_line(tmp_path):
  """`u2ad train` process 0 waits at most --process_timeout for process 1 to say where it
  resumes; then one line, exit 2 at once (not the runtime's heartbeat timeout and abort)."""
  port = str(support.free_port())
  env = support.cpu_subprocess_env(1)
  config = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                        "base.py"))
  chief = subprocess.Popen(
      [sys.executable, "-m", "u2ad_jax.cli", "train", "--config", config + ":runlocal",
       "--workdir", str(tmp_path / "run"), "--coordinator_address", f"127.0.0.1:{port}",
       "--num_processes", "2", "--process_id", "0", "--process_timeout", "5"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  dying = subprocess.run([sys.executable, "-c", DYING_PROCESS, port], env=env,
                         capture_output=True, text=True, timeout=120)
  assert dying.returncode == -9, dying.stderr[-2000:]
  started = time.monotonic()
  try:
    _, stderr = chief.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    chief.kill()
    pytest.fail("process 0 still waits for the dead process 1")
  assert time.monotonic() - started < 60
  assert chief.returncode == 2, stderr[-3000:]
  errors_ = [l for l in stderr.splitlines() if "error:" in l]
  assert len(errors_) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert errors_[0].startswith("u2ad train: error: process 1 of 2 did not send where it "
                               "resumes within 5 s"), errors_[0]
  assert not (tmp_path / "run").exists()  # nothing was written

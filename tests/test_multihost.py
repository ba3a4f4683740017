"""Multi-host training for real: two processes on 127.0.0.1 (CPU collectives over gloo), one
CPU device each, train with the real driver and end with the parameters of one process with two
devices on the same global batches."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TIMEOUT_S = 300

# Runs `trainer.train` in a fresh process: argv = base config path, workdir, out.npz
# [, port, process_id] (with the last two: one process of a two-process job).
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    base_config, workdir, out = sys.argv[1:4]
    if len(sys.argv) > 4:
      from u2ad_jax.train import distributed
      distributed.initialize(f"127.0.0.1:{sys.argv[4]}", num_processes=2,
                             process_id=int(sys.argv[5]))
    import jax
    from u2ad_jax.train import config_lib, toy_data, trainer
    config = config_lib.sibling(base_config, "base").get_config("runlocal")
    # The guided stage: EU + AU guidance from maps computed across both processes.
    config.stages = ("adapt_eu_au",)
    config.stage_epochs.adapt_eu_au = 2
    config.checkpoint.every_steps = 2
    data = {"clinical_dir": toy_data.toy_slice_set(8, 32, seed=22, lesion_fraction=0.5)}
    assert jax.device_count() == 2, jax.devices()
    result = trainer.train(config, workdir, slice_sets=data, verbose=False)
    leaves = jax.tree.leaves(result.state.params)
    np.savez(out, step=result.step, process_count=jax.process_count(),
             **{f"p{i}": x for i, x in enumerate(leaves)})
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices):
  env = dict(os.environ)
  # Cheap XLA compilation: these runs take a few milliseconds per step but seconds to compile.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={num_devices} "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _finish(processes):
  """Waits for all processes (killing everything on timeout); returns their outputs."""
  outputs = []
  try:
    for p in processes:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outputs.append(out)
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f"training processes did not finish within {TIMEOUT_S} s")
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  base_config = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "base.py")
  base_config = os.path.abspath(base_config)
  port = str(_free_port())

  def start(args, num_devices):
    return subprocess.Popen([sys.executable, str(script), *args], env=_env(num_devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  multi = [start([base_config, str(tmp_path / "multi"), str(tmp_path / f"multi{i}.npz"), port,
                  str(i)], 1) for i in range(2)]
  single = start([base_config, str(tmp_path / "single"), str(tmp_path / "single.npz")], 2)
  _finish(multi + [single])

  reference = np.load(tmp_path / "single.npz")
  assert int(reference["process_count"]) == 1
  num_leaves = len([k for k in reference.files if k[0] == "p" and k[1:].isdigit()])
  for i in range(2):
    result = np.load(tmp_path / f"multi{i}.npz")
    assert int(result["process_count"]) == 2
    assert int(result["step"]) == int(reference["step"]) == 4
    for k in range(num_leaves):
      np.testing.assert_allclose(result[f"p{k}"], reference[f"p{k}"], rtol=1e-5, atol=1e-6)
  # Both processes wrote one shared checkpoint directory (process 0 the logs).
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints"))[-1] == "4"
  assert (tmp_path / "multi" / "metrics.jsonl").exists()

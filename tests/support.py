"""Helpers shared by several test modules: subprocess environment, small cohorts, resume config.

Test modules import it as `support` (pytest puts tests/ on sys.path). Fixtures stay in the
modules (or tests/conftest.py); these are the plain functions they are built from.
"""

import os
import pathlib
import socket
import subprocess

import pytest

import toy_data
from u2ad_jax.phantom import cohort_writer
from u2ad_jax import config_lib

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def cpu_subprocess_env(num_devices: int, **extra: str) -> dict[str, str]:
  """Environment of a test subprocess that runs JAX: CPU only, `num_devices` fake devices and
  cheap XLA compilation (these runs take milliseconds per step but seconds to compile at the
  default optimisation level). tests/ is appended to PYTHONPATH so that scripts can import
  `toy_data`. `extra` adds or overrides variables."""
  python_path = [p for p in (os.environ.get("PYTHONPATH"), str(TESTS_DIR)) if p]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(python_path),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} "
                       "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env.update(extra)
  return env


def write_small_cohorts(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the smallest phantom cohorts a `u2ad train` run accepts: 3 public subjects (seed 1)
  and 3 clinical ones (seed 2, two with lesions), 3 slices each. Returns (public, clinical)."""
  cohort_writer.write_cohort(root / "public", 3, "public", seed=1, num_slices=3)
  cohort_writer.write_cohort(root / "clinical", 3, "clinical", seed=2, num_slices=3,
                             lesion_fraction=0.67)
  return root / "public", root / "clinical"


def toy_train_data() -> dict:
  """In-memory cohorts of the trainer's resume tests: 8 public slices, 10 clinical (about half
  with a lesion), 32 px."""
  return {"public_dir": toy_data.toy_slice_set(8, 32, seed=11),
          "clinical_dir": toy_data.toy_slice_set(10, 32, seed=12, lesion_fraction=0.5,
                                                 subject_prefix="clin")}


def resume_config(max_to_keep: int):
  """The `:runlocal` base config of the resume tests: adapt_eu of 2 epochs, maps refreshed every
  2 epochs, a checkpoint every 2 steps (the newest `max_to_keep` kept), quiet logging."""
  config = config_lib.sibling(str(REPO / "configs" / "base.py"), "base").get_config("runlocal")
  config.stage_epochs.adapt_eu = 2
  config.uncertainty.refresh_epochs = 2
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = max_to_keep
  config.log_every_steps = 100
  return config


def free_port() -> int:
  """A TCP port on 127.0.0.1 free right now (for a test job's `jax.distributed` coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def finish_processes(processes: list[subprocess.Popen], timeout_s: float) -> list[str]:
  """Waits for all `processes` (text stdout piped; all killed when one exceeds `timeout_s`) and
  asserts each exited 0; returns their outputs."""
  outputs = []
  try:
    for p in processes:
      out, _ = p.communicate(timeout=timeout_s)
      outputs.append(out)
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f"test processes did not finish within {timeout_s} s")
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs

"""The multi-process flags shared by `u2ad train` and `u2ad evaluate`, and the job's start-up.

`--distributed` (SLURM / TPU auto-detection) or an explicit `--coordinator_address
--num_processes --process_id` joins a `jax.distributed` job; see launch/README.md.
"""

from __future__ import annotations

from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "join a multi-process job (jax.distributed.initialize; cluster "
    "settings detected from SLURM / TPU unless given below)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's rank")
_PROCESS_TIMEOUT = flags.DEFINE_float(
    "process_timeout", None, "seconds a process waits for the others where they must agree "
    "before training (where to resume, the workdir ready; default 600); a process that died or "
    "cannot be reached then stops the job with one error", lower_bound=0.001)


def requested() -> bool:
  """Whether the flags ask for a multi-process job."""
  return bool(_DISTRIBUTED.value or _COORDINATOR.value)


def start() -> bool:
  """Joins the job when requested; call before any JAX work. Returns `requested()`."""
  # Imported here: jax must not start before distributed initialisation.
  from u2ad_jax.train import distributed  # pylint: disable=g-import-not-at-top
  if requested():
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_PROCESS_TIMEOUT.value)
  return requested()

"""Multi-process start-up (`jax.distributed.initialize`) and the job's bounded exchanges.

One process per host (GPU nodes under SLURM, TPU VM workers), each driving its local devices.
With no arguments JAX detects the cluster itself (SLURM environment variables, TPU pod
metadata); explicit arguments cover everything else (e.g. several processes on one machine).
Data are sharded per process by `pipeline.BatchIterator(device_positions=...)`: every process
builds only the rows of its own devices' mesh slots (`parallel.mesh_positions`), wherever those
devices sit in the mesh.

Before training, the processes agree on things outside any device computation (where they
resume; that process 0 has prepared the workdir). `share` does that through the job's
coordination service with a BOUNDED wait: a process that died or cannot be reached makes the
others stop with one line (`ProcessLostError`) after `timeout_s` (`initialize(timeout_s=...)`,
`--process_timeout`), instead of waiting in a collective until the job's time limit.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax

from u2ad_jax import errors

# How long a process waits for the others at an exchange (seconds); set by `initialize`.
DEFAULT_TIMEOUT_S = 600.0
_timeout_s = DEFAULT_TIMEOUT_S
# Exchanges made so far, per name: every process makes them in the same order, so (name, count)
# names the same exchange everywhere and a key is never written twice (`trainer.train` may run
# several times in one job, e.g. `u2ad ablate`).
_exchanges: dict[str, int] = {}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               cpu_collectives: str | None = "gloo", timeout_s: float | None = None) -> None:
  """Joins the multi-process job; call before any other JAX work.

  Args:
    coordinator_address: 'host:port' of process 0 (None: detect from SLURM / TPU).
    num_processes, process_id: this job's size and this process's rank (None: detect).
    local_device_ids: restrict this process to some local accelerators (None: all).
    cpu_collectives: cross-process collectives for CPU devices ('gloo'); without it CPU-only
      jobs (tests, debugging) cannot reduce across processes. Ignored on GPU / TPU.
    timeout_s: the longest wait for the other processes at an exchange (`share`); None keeps
      DEFAULT_TIMEOUT_S.
  """
  global _timeout_s
  if timeout_s is not None:
    _timeout_s = float(timeout_s)
  if cpu_collectives:
    # Must be set before the CPU backend starts; harmless when the job runs on accelerators.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = int(num_processes)
  if process_id is not None:
    kwargs["process_id"] = int(process_id)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(**kwargs)


def describe() -> str:
  """One line: this process, the job's processes and devices."""
  return (f"process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} device(s)")


def share(name: str, value: str | None, *, what: str, senders: Sequence[int] | None = None,
          timeout_s: float | None = None) -> dict[int, str]:
  """One exchange between the processes, with a bounded wait. Every process calls it, with the
  same names in the same order.

  This process posts `value` (None: nothing) under `name`, then waits for the values of
  `senders` (default: every process) through the coordination service's key-value store, at
  most `timeout_s` (default: `initialize`'s) in all.

  Args:
    name: the exchange (a key prefix).
    value: what this process tells the others, or None.
    what: what the values are, for the error ("where it resumes").
    senders: the processes whose values are awaited.
    timeout_s: the longest wait.

  Returns:
    {process: value} of `senders`.

  Raises:
    ProcessLostError: some sender did not post within the time (it stopped, or this process or
      it lost the coordinator); names them.
  """
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top

  client = multihost.get_jax_distributed_client()
  count = _exchanges[name] = _exchanges.get(name, 0) + 1
  prefix = f"u2ad/{name}/{count}"
  if value is not None:
    client.key_value_set(f"{prefix}/{jax.process_index()}", value)
  senders = list(range(jax.process_count()) if senders is None else senders)
  timeout_s = _timeout_s if timeout_s is None else float(timeout_s)
  deadline = time.monotonic() + timeout_s
  values: dict[int, str] = {}
  for process in senders:
    remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
      values[process] = client.blocking_key_value_get(f"{prefix}/{process}", remaining_ms)
    except jax.errors.JaxRuntimeError as e:
      missing = [p for p in senders if p not in values and _posted(client, f"{prefix}/{p}") is None]
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise errors.ProcessLostError(
          f"process {', '.join(map(str, missing or [process]))} of {jax.process_count()} did not "
          f"send {what} within {timeout_s:g} s: it stopped, or cannot reach the coordinator "
          f"({reason[:160]}); process {jax.process_index()} stops too, see the other "
          "processes' logs") from e
  return values


def _posted(client, key: str) -> str | None:
  """The value under `key` if it is there now, else None (never waits)."""
  try:
    return client.key_value_try_get(key)
  except jax.errors.JaxRuntimeError:
    return None

"""Multi-process start-up: JAX's own runtime (`jax.distributed.initialize`).

One process per host (GPU nodes under SLURM, TPU VM workers), each driving its local devices.
With no arguments JAX detects the cluster itself (SLURM environment variables, TPU pod
metadata); explicit arguments cover everything else (e.g. several processes on one machine).
Data are sharded per process by `pipeline.BatchIterator(device_positions=...)`: every process
builds only the rows of its own devices' mesh slots (`parallel.mesh_positions`), wherever those
devices sit in the mesh.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               cpu_collectives: str | None = "gloo") -> None:
  """Joins the multi-process job; call before any other JAX work.

  Args:
    coordinator_address: 'host:port' of process 0 (None: detect from SLURM / TPU).
    num_processes, process_id: this job's size and this process's rank (None: detect).
    local_device_ids: restrict this process to some local accelerators (None: all).
    cpu_collectives: cross-process collectives for CPU devices ('gloo'); without it CPU-only
      jobs (tests, debugging) cannot reduce across processes. Ignored on GPU / TPU.
  """
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

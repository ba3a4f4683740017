"""Data-parallel wrappers around ONE per-device function written with named-axis collectives.

A per-device function `f(replicated..., sharded..., ...)` that reduces its outputs with
`lax.pmean(..., AXIS)` (or gathers them with `gather_rows`) runs unchanged under

- `jax.pmap(f, axis_name=AXIS, in_axes=(None, 0, ...), out_axes=None)`: the replicated arguments
  are broadcast (not stacked), outputs come back unstacked, so there is no replicate /
  unreplicate; host batches are `[D_local, b, ...]`. The design's default.
- `jax.jit(jax.shard_map(f, mesh, in_specs=(P(), P(AXIS), ...), out_specs=P()))` over a 1-D mesh
  of every device (Auto axis type: host batches are placed with an explicit NamedSharding);
  host batches are `[D_local * b, ...]` per process, assembled into the global array.

Both work across processes after `jax.distributed.initialize`: each process passes only its own
devices' rows of the global batch. Which rows those are is derived from the mesh, never assumed:
device `m` of the mesh (`axis_index == m`) holds rows `[m * b, (m + 1) * b)` of the global batch,
and a process's devices need not be contiguous in the mesh nor equal in number across processes
(`mesh_positions` gives a process its slots; `DataParallel.shard` places each local row block on
its own device explicitly). `Replicated` values that leave the step are host-local under
multi-process pmap and global under shard_map; `to_host` reads either.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
MODES = ("pmap", "shard_map")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D mesh named `AXIS` over `devices` (default: every device of every process), Auto axis.

  Auto (not Explicit) so that jit accepts host arrays and shardings placed by `device_put`.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))


def local_devices_of(devices: Sequence[jax.Device]) -> list[jax.Device]:
  """The devices of `devices` that belong to this process, in mesh order."""
  me = jax.process_index()
  return [d for d in devices if d.process_index == me]


def mesh_positions(devices: Sequence[jax.Device]) -> np.ndarray:
  """`[D_local]` int: the mesh slot (= `axis_index`) of each of this process's devices.

  In the order of `local_devices_of(devices)`, the order in which a host batch `[D_local, b, ...]`
  is laid out: local row block i belongs to mesh slot `mesh_positions(devices)[i]`, i.e. to rows
  `[slot * b, (slot + 1) * b)` of the global batch. Any layout of processes over the mesh works
  (interleaved, unequal device counts); a process without devices in `devices` is an error.
  """
  return _slots_of(list(devices), jax.process_index())


def _slots_of(devices: list, process: int) -> np.ndarray:
  ids = [(d.process_index, d.id) for d in devices]
  if len(set(ids)) != len(ids):
    raise ValueError(f"the device list repeats devices: {ids}")
  slots = np.array([m for m, d in enumerate(devices) if d.process_index == process], np.int64)
  if slots.size == 0:
    raise ValueError(f"process {process} owns none of the {len(devices)} devices it was given; "
                     "every process of the job must drive at least one of them")
  return slots


def check_layout(mode: str, devices: Sequence[Any]) -> None:
  """Raises ValueError (one line, naming the fix) for a device order `mode` cannot run.

  shard_map runs any order: `shard` places every row block on its device explicitly. pmap takes
  host-local inputs, which JAX accepts only when each process's devices form a contiguous block
  of the device order (its own check fails later, mid-run, with a generic message); so this
  check runs when the wrapper is built.
  """
  devices = list(devices)
  if mode != "pmap":
    return
  for process in sorted({d.process_index for d in devices}):
    slots = _slots_of(devices, process)
    if slots[-1] - slots[0] + 1 != slots.size:
      raise ValueError(
          f"config.parallel='pmap' needs each process's devices contiguous in the device order, "
          f"but process {process} holds mesh slots {slots.tolist()} of {len(devices)}; use "
          "config.parallel='shard_map' (any order) or order the devices by process")


def gather_rows(x: jax.Array) -> jax.Array:
  """Inside the wrapped function: this device's rows `[c, ...]` -> all devices' `[D * c, ...]`.

  Every device ends with the same (replicated) array, in device order. A psum of zero-padded
  blocks rather than `lax.all_gather`, whose result shard_map's type system treats as still
  device-varying (so it could not leave through `out_specs=P()`); adding zeros is exact.
  """
  rows = x.shape[0]
  num_devices = jax.lax.psum(1, AXIS)
  full = jnp.zeros((num_devices * rows,) + x.shape[1:], x.dtype)
  start = jax.lax.axis_index(AXIS) * rows
  full = jax.lax.dynamic_update_slice_in_dim(full, x, start, axis=0)
  return jax.lax.psum(full, AXIS)


def to_host(tree: Any) -> Any:
  """Device pytree -> numpy pytree (replicated values: this process's copy).

  Always a copy: on CPU `np.asarray` may alias the device buffer, which a later step donates
  and overwrites while e.g. an asynchronous checkpoint is still writing it.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return np.array(x, copy=True)
  return jax.tree.map(one, tree)


class DataParallel:
  """One per-device function, wrapped for `mode` over `devices`, with matching data placement.

  By default every output of `fn` must be identical on all devices (reduced with `pmean` /
  `psum` or gathered with `gather_rows`): it leaves unstacked (`out_axes=None` /
  `out_specs=P()`). Under shard_map a forgotten reduction is a trace-time error; under pmap it
  would silently return one device's value, so the step is tested under both. With
  `sharded_outputs` every output instead keeps each device's rows where they were computed
  (`out_axes=0` / `out_specs=P(AXIS)`), and `local_rows` reads this process's blocks: outputs
  that only their own host needs never cross the interconnect.

  Args:
    fn: per-device function. Its arguments are split into the replicated ones (positions not in
      `sharded`, broadcast to every device) and the sharded ones (leading axis split over devices).
    mode: 'pmap' or 'shard_map'.
    num_args: number of positional arguments of `fn`.
    sharded: positions of the arguments whose leading axis is the device / batch axis.
    donate: positions donated to the computation (e.g. the train state).
    devices: the devices to run on (all processes' devices; default `jax.devices()`).
    sharded_outputs: outputs stay split over devices by their leading (row) axis.
  """

  def __init__(self, fn: Callable[..., Any], mode: str, *, num_args: int,
               sharded: Sequence[int], donate: Sequence[int] = (),
               devices: Sequence[jax.Device] | None = None, sharded_outputs: bool = False):
    if mode not in MODES:
      raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    self.mode = mode
    self.devices = list(jax.devices() if devices is None else devices)
    check_layout(mode, self.devices)
    self.local_devices = local_devices_of(self.devices)
    self.num_devices = len(self.devices)
    self.num_local_devices = len(self.local_devices)
    self.local_positions = mesh_positions(self.devices)
    self.mesh = make_mesh(self.devices)
    self.sharded = tuple(sharded)
    self.num_args = int(num_args)
    self.sharded_outputs = bool(sharded_outputs)
    if mode == "pmap":
      in_axes = tuple(0 if i in self.sharded else None for i in range(num_args))
      self._fn = jax.pmap(fn, axis_name=AXIS, in_axes=in_axes,
                          out_axes=0 if self.sharded_outputs else None,
                          donate_argnums=tuple(donate), devices=self.devices)
      # What pmap itself returns for broadcast state: replicated over this process's devices.
      self._replicated = NamedSharding(make_mesh(self.local_devices), P())
    else:
      in_specs = tuple(P(AXIS) if i in self.sharded else P() for i in range(num_args))
      mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                             out_specs=P(AXIS) if self.sharded_outputs else P())
      self._fn = jax.jit(mapped, donate_argnums=tuple(donate))
      self._replicated = NamedSharding(self.mesh, P())
      self._batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def replicate(self, tree: Any) -> Any:
    """Places a host (numpy) or device pytree as the replicated input the wrapper expects.

    Every process must pass the same values (true for states restored from the same checkpoint
    or initialised from the same seed).
    """
    return jax.device_put(tree, self._replicated)

  def shard(self, tree: Any) -> Any:
    """Host pytree of this process's rows `[D_local, b, ...]` -> the wrapper's sharded input.

    Row block i goes to `self.local_devices[i]`, mesh slot `self.local_positions[i]`.
    """
    def check(x):
      if x.shape[0] != self.num_local_devices:
        raise ValueError(f"sharded inputs must lead with the {self.num_local_devices} local "
                         f"devices, got shape {x.shape}")
    jax.tree.map(check, tree)
    if self.mode == "pmap":
      return tree

    def place(x):
      # Each local row block onto its own device, explicitly: the global row range of a device
      # is its mesh slot's, wherever the process's devices sit in the mesh.
      x = np.asarray(x)
      global_shape = (self.num_devices * x.shape[1],) + x.shape[2:]
      blocks = [jax.device_put(x[i], d) for i, d in enumerate(self.local_devices)]
      return jax.make_array_from_single_device_arrays(global_shape, self._batch_sharding, blocks)
    return jax.tree.map(place, tree)

  def local_rows(self, tree: Any) -> Any:
    """Sharded outputs -> numpy `[D_local, c, ...]` of this process's devices, in the order of
    `local_devices` (row block i computed on mesh slot `local_positions[i]`)."""
    if not self.sharded_outputs:
      raise ValueError("local_rows reads sharded outputs; this wrapper replicates its outputs")

    def one(x):
      blocks = {shard.device: shard.data for shard in x.addressable_shards}
      rows = x.shape[1:] if self.mode == "pmap" else (x.shape[0] // self.num_devices,) + x.shape[1:]
      return np.stack([np.array(blocks[d], copy=True).reshape(rows) for d in self.local_devices])
    return jax.tree.map(one, tree)

  def __call__(self, *args):
    if len(args) != self.num_args:
      raise TypeError(f"expected {self.num_args} arguments, got {len(args)}")
    args = tuple(self.shard(a) if i in self.sharded else a for i, a in enumerate(args))
    return self._fn(*args)

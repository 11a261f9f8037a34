"""Device meshes and shardings (axes `data` and `fsdp`; the batch is split over both), and the
few multi-process helpers every stage shares: `initialize_distributed`, `process_rows`,
`gather_rows`, `is_writer`, `barrier`, `settle`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with named axis sizes; one size may be -1 (the rest).

    make_mesh({"data": -1, "fsdp": 1}) -> data-parallel over every device.
    """
    devices = list(devices if devices is not None else jax.devices())
    axes = dict(axes or {"data": -1, "fsdp": 1})
    for name in BATCH_AXES:
        axes.setdefault(name, 1)
    sizes = dict(axes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not split into mesh axes {axes}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh axes {sizes} need {total} devices, {len(devices)} available")
    grid = np.asarray(devices).reshape([sizes[k] for k in sizes])
    return Mesh(grid, tuple(sizes))


def batch_spec(ndim: int) -> P:
    """PartitionSpec splitting the leading (batch) dim over the batch axes."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_per_step(mesh: Mesh | None) -> int:
    """The batch must be a multiple of this (the number of batch shards)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global host batch array -> a device array split over the batch axes; with several
    processes each contributes its own slice of the leading dim."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    per = x.shape[0] // jax.process_count()
    local = x[jax.process_index() * per:(jax.process_index() + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Places a host pytree with a leading batch dim onto the mesh, split over the batch axes."""
    if mesh is None:
        return tree
    n = batch_size_per_step(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split over {n} batch shards of {mesh}")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree_util.tree_map(put, tree)


# -- several processes -------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, heartbeat_timeout_s: int | None = None,
                           shutdown_timeout_s: int | None = None,
                           initialization_timeout_s: int | None = None) -> None:
    """jax.distributed.initialize with only the given arguments: without an address, process
    count and id, JAX detects them (TPU pods, SLURM, Open MPI, ...).

    heartbeat_timeout_s: a peer silent for this long is declared lost, and every other process
    stops with JAX's "tasks are unhealthy (stopped sending heartbeats): <id>" error.
    shutdown_timeout_s: how long the exit barrier waits for the other processes.
    """
    kwargs = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id, "heartbeat_timeout_seconds": heartbeat_timeout_s,
              "shutdown_timeout_seconds": shutdown_timeout_s,
              "initialization_timeout": initialization_timeout_s}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def is_writer() -> bool:
    """True on the one process that writes shared files (reports, metadata): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def serial_dispatch() -> bool:
    """True where a program spanning several processes must end before the next one starts: a
    multi-process run on XLA:CPU, whose cross-process collectives go over Gloo."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def settle(tree: Any) -> Any:
    """`tree` once its values are computed, on a multi-process CPU run; `tree` at once elsewhere.

    With two multi-process programs in flight at once on XLA:CPU (consecutive train steps
    dispatched asynchronously, or a step and Orbax's save barrier), the devices of the two
    processes can enter their Gloo all-reduces in different orders and every process hangs
    in the step (benchmarks/multiprocess_cpu_dispatch.py reproduces it with a bare jitted
    all-reduce loop). Loops over such programs call this after each one. GPUs and TPUs order
    their collectives on streams, so they keep asynchronous dispatch.
    """
    if serial_dispatch():
        jax.block_until_ready(tree)
    return tree


def process_rows(num: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """This process's rows [start, stop) of `num` rows split in contiguous blocks of
    ceil(num / count) (the last ones may be shorter or empty)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    per = -(-num // count)
    return min(index * per, num), min((index + 1) * per, num)


def gather_rows(local: np.ndarray, max_rows: int) -> np.ndarray:
    """Every process's rows [n_p, ...] (n_p <= max_rows, the same bound on every process)
    concatenated in process order: with `process_rows` blocks, all rows in their global order.

    Blocks are padded to max_rows for the all-gather and trimmed after; with one process the
    array is returned as it is.
    """
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    if len(local) > max_rows:
        raise ValueError(f"{len(local)} rows exceed max_rows={max_rows}")
    padded = np.zeros((max_rows, *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded, tiled=True))  # [count*max_rows, ...]
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(local)]), tiled=True))
    return np.concatenate([every[p * max_rows:p * max_rows + int(n)] for p, n in enumerate(sizes)])


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding its global value, on every process (a collective
    when an array spans several processes; every process must call it)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)

"""Device meshes and shardings (axes `data` and `fsdp`; the batch is split over both)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
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

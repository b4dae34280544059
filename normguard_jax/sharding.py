"""Device mesh and shardings.

The mesh has two axes, ``("data", "fsdp")``. Batches are split over both (every device sees a
distinct slice of the batch); parameters and optimizer state are replicated by default (the
``fsdp`` axis is there for sharding large parameters later, and has size 1 unless configured).
Everything is expressed with ``jax.jit`` + ``NamedSharding``: the same program runs on one CPU,
8 fake CPU devices, a GPU node or a TPU pod slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Builds a ``(data, fsdp)`` mesh over ``devices`` (default: all global devices).

    Args:
      data: size of the data axis; -1 means "all devices not used by fsdp".
      fsdp: size of the fsdp axis.
      devices: optional explicit device list.

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), DATA_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays whose leading axis is the batch: split over all mesh axes."""
    return NamedSharding(mesh, P(DATA_AXES))


def global_batch(local_batch, mesh: Mesh):
    """Assembles each process's local batch into global, batch-sharded jax Arrays.

    Args:
      local_batch: pytree of host arrays with leading axis ``global_batch / process_count``
        (what :func:`normguard_jax.data.pipeline.local_batch` yields for this process).
      mesh: the device mesh.

    Returns:
      The same pytree as jax Arrays of leading size ``global_batch``, sharded over the mesh.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_batch_divisible(global_batch_size: int, mesh: Mesh, field: str) -> None:
    """Raises a ValueError naming ``field`` unless the batch splits evenly over devices and hosts."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"{field}={global_batch_size} must be divisible by the {n} devices")
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{field}={global_batch_size} must be divisible by the {jax.process_count()} processes")

"""Device mesh and shardings.

The mesh has two axes, ``("data", "fsdp")``. Batches are split over both (every device sees a
distinct slice of the batch). Parameters, optimizer state, EMA and θ_old are sharded over
``fsdp`` by one rule, :func:`param_spec` (ZeRO-3 / FSDP: each device stores 1/fsdp of every
large array; XLA all-gathers a weight where a layer needs it and reduce-scatters its
gradient); with ``fsdp = 1`` everything is replicated, as plain data parallelism.

The rule looks at shapes only, so it applies to any pytree — parameters, an optax state (its
moments have the parameters' shapes, hence their layout), a whole ``TrainState``/``RLState``,
or ``jax.ShapeDtypeStruct`` templates — and needs no per-model table of logical axis names:
an array of at least ``min_size`` elements is split along its largest axis that ``fsdp``
divides (the first such axis on a tie); smaller arrays, scalars and arrays with no divisible
axis are replicated. Everything is expressed with ``jax.jit`` + ``NamedSharding``: the same
program runs on one CPU, 8 fake CPU devices, a GPU node or a TPU pod slice.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
# Arrays with fewer elements stay replicated (biases, norm scales, small embeddings): sharding
# them saves little memory and costs one collective each. ``config.mesh.min_shard_size``.
MIN_SHARD_SIZE = 2**16


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


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """The ``PartitionSpec`` of one parameter-like array of ``shape`` (the module's rule).

    Args:
      shape: the array's shape (any rank; () for scalars).
      fsdp: size of the mesh's ``fsdp`` axis.
      min_size: arrays with fewer elements are replicated.

    Returns:
      ``P()`` (replicated) when ``fsdp == 1``, the array is smaller than ``min_size`` or no
      axis is divisible by ``fsdp``; otherwise a spec naming ``"fsdp"`` on the largest
      divisible axis (the first one on a tie) and ``None`` elsewhere.
    """
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``NamedSharding`` pytree of ``tree`` by :func:`param_spec` over ``mesh``'s fsdp axis.

    Args:
      tree: any pytree whose leaves have a ``shape`` (jax/NumPy arrays,
        ``jax.ShapeDtypeStruct``): parameters, an optax state, a ``TrainState`` or ``RLState``.
      mesh: a ``(data, fsdp)`` mesh (:func:`make_mesh`).
      min_size: see :func:`param_spec`.

    Returns:
      A pytree of the same structure with a ``NamedSharding`` per leaf (the ``in_shardings``
      / ``out_shardings`` of a jit, or the target of ``jax.device_put``).
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def shard_tree(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``jax.device_put(tree, tree_shardings(tree, mesh, min_size))``: ``tree`` laid out by the
    rule (each device keeps only its slices of the large arrays)."""
    return jax.device_put(tree, tree_shardings(tree, mesh, min_size))


def abstract_tree(tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``jax.ShapeDtypeStruct`` pytree of ``tree`` (arrays or structs) carrying the rule's
    shardings: abstract arguments for ``jax.jit(...).lower`` without allocating anything."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, tree_shardings(tree, mesh, min_size))


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of ``tree``'s arrays stored on each addressable device, ``{device: bytes}`` (sums
    ``addressable_shards``; a replicated array counts fully on every device)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


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

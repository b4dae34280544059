"""Deterministic, resumable batching: a batch is a pure function of the step.

The data position of a run is just its step: `global_batch_indices(N, step, B, seed)` says
which examples form global batch `step`, with no iterator state to save. Positions
`step*B .. step*B + B - 1` of an endless stream are mapped to examples through one random
permutation per epoch (`np.random.default_rng([seed, epoch])`), so every example is seen
exactly once per epoch and a batch may straddle an epoch boundary.

On several hosts, process `p` of `P` takes the contiguous slice `[p*B/P, (p+1)*B/P)` of the
global batch, which is the layout `jax.make_array_from_process_local_data` expects for a
batch sharded along its first axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.data.loading import ImageSplit


def _array_module(x):
    return jnp if isinstance(x, jax.Array) else np


def to_model_range(images):
    """uint8 pixels 0..255 -> float32 in [-1, 1] (`v / 127.5 - 1`).

    Works on NumPy arrays (returns NumPy) and on JAX arrays, also under `jit` (returns JAX).
    Any shape; the layout (NHWC) is kept.
    """
    xp = _array_module(images)
    return xp.asarray(images).astype(xp.float32) / 127.5 - 1.0


def to_uint8(images):
    """float in [-1, 1] -> uint8 0..255, the inverse of `to_model_range`.

    Values are clipped to [-1, 1] and rounded to the nearest level, so
    `to_uint8(to_model_range(u)) == u` for every uint8 `u`. NumPy in, NumPy out; JAX in, JAX out.
    """
    xp = _array_module(images)
    levels = (xp.clip(xp.asarray(images, dtype=xp.float32), -1.0, 1.0) + 1.0) * 127.5
    return xp.round(levels).astype(xp.uint8)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    permutation.flags.writeable = False
    return permutation


def global_batch_indices(
    num_examples: int, step: int, global_batch_size: int, seed: int
) -> np.ndarray:
    """Indices of the examples in global batch `step`.

    Args:
      num_examples: dataset size N > 0.
      step: the training step, >= 0; batch `step` covers stream positions
        `[step*B, (step+1)*B)`, and position q is example `perm_e[q mod N]` of epoch
        `e = q // N` (so the batch starts in epoch `step*B // N`).
      global_batch_size: B > 0 (may exceed N: the batch then spans several epochs).
      seed: non-negative int; epoch e uses `np.random.default_rng([seed, e]).permutation(N)`.

    Returns:
      int64 (B,) indices in [0, N).
    """
    if num_examples <= 0 or global_batch_size <= 0 or step < 0 or seed < 0:
        raise ValueError(
            f"need num_examples > 0, global_batch_size > 0, step >= 0 and seed >= 0; got "
            f"{num_examples}, {global_batch_size}, {step}, {seed}"
        )
    positions = int(step) * int(global_batch_size) + np.arange(global_batch_size, dtype=np.int64)
    epochs, within = np.divmod(positions, num_examples)
    indices = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = _epoch_permutation(num_examples, seed, int(epoch))[within[in_epoch]]
    return indices


def local_batch(
    split: ImageSplit,
    step: int,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> dict[str, np.ndarray]:
    """This process's share of global batch `step`.

    Args:
      split: the in-memory dataset split.
      step, global_batch_size, seed: as in `global_batch_indices`.
      process_index: this process, in [0, process_count) (`jax.process_index()`).
      process_count: number of processes P (`jax.process_count()`); must divide B.

    Returns:
      `{"image": float32 (B/P, H, W, C) in [-1, 1], "label": int32 (B/P,)}`, NumPy arrays:
      rows `[p*B/P, (p+1)*B/P)` of the global batch.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process = global_batch_size // process_count
    indices = global_batch_indices(len(split), step, global_batch_size, seed)
    mine = indices[process_index * per_process:(process_index + 1) * per_process]
    return {
        "image": to_model_range(split.images[mine]),
        "label": split.labels[mine].astype(np.int32),
    }


class BatchIterator:
    """Endless iterator of `local_batch(split, step, ...)` for step = start_step, start_step+1, ...

    Resuming from a checkpoint taken after step k means `BatchIterator(..., start_step=k+1)`;
    the batches are then identical to those of an uninterrupted run. `step` is the step of
    the next batch.
    """

    def __init__(
        self,
        split: ImageSplit,
        global_batch_size: int,
        seed: int,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        """Process index and count default to `jax.process_index()` / `jax.process_count()`."""
        self.split = split
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.step = start_step
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the "
                f"{self.process_count} processes"
            )

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = local_batch(
            self.split, self.step, self.global_batch_size, self.seed,
            self.process_index, self.process_count,
        )
        self.step += 1
        return batch

"""Every checkpoint access of the library: Orbax checkpoints of a run, and plain parameter trees.

A run's checkpoints live in ``<workdir>/checkpoints`` (:func:`directory`); nothing else in the
repository spells that folder name.

A checkpoint at step ``s`` holds ``state`` (any pytree of jax Arrays: params, EMA/old params,
optimizer state, step, RNG key data, tracker state) and ``meta`` (JSON: the config, the data
position and anything else a resumed run needs to continue *the same* run). Saving is
asynchronous; restoring puts every array back with the sharding of a template state, so a
restored run is laid out exactly like a fresh one. If the newest checkpoint cannot be read
(a partial write, a corrupted file), restore falls back to the previous one with a warning.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


FOLDER = "checkpoints"  # a run's checkpoint folder inside its workdir.


def directory(workdir: str) -> str:
    """The checkpoint folder of a run's ``workdir``."""
    return os.path.join(workdir, FOLDER)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` has a checkpoint folder (it may still hold no finished step)."""
    return os.path.isdir(directory(workdir))


def steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of ``workdir``, oldest first ([] without any)."""
    if not has_checkpoints(workdir):
        return []
    manager = ocp.CheckpointManager(os.path.abspath(directory(workdir)))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def open_manager(workdir: str, **options) -> ocp.CheckpointManager:
    """:func:`make_manager` over the checkpoint folder of ``workdir`` (same options)."""
    return make_manager(directory(workdir), **options)


def make_manager(directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 asynchronous: bool = True) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` over ``directory`` (created if missing).

    Args:
      directory: where step folders are written (usually ``<workdir>/checkpoints``).
      max_to_keep: how many most recent checkpoints are kept.
      save_interval_steps: ``save`` is a no-op at steps that are not multiples of this unless
        ``force=True``.
      asynchronous: write in a background thread (training continues meanwhile).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=asynchronous, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, *,
         force: bool = False) -> bool:
    """Saves ``state`` and the JSON-able ``meta`` at ``step``; returns whether it was saved."""
    return manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding template of ``state`` for restoring without allocating it twice.

    ``state`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``);
    a leaf without a sharding is placed on this process's first device, where an eager
    initialisation would have put it (not wherever the checkpoint was written from).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(leaf, state)


def restore_latest(manager: ocp.CheckpointManager, template: Any
                   ) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint.

    Args:
      manager: the checkpoint manager.
      template: a state with the structure, dtypes and shardings to restore into (a real state
        or the output of :func:`abstract_like`).

    Returns:
      ``(step, state, meta)``, or ``None`` when the directory holds no checkpoint. A checkpoint
      that fails to load is skipped with a warning and the previous one is tried.

    Raises:
      RuntimeError: if checkpoints exist but none can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    abstract = abstract_like(template)
    errors = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: try the previous
            logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an "
                            "older one.", step, manager.directory, type(e).__name__, e)
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            continue
        return step, restored.state, restored.meta
    raise RuntimeError(f"No readable checkpoint in {manager.directory}: " + "; ".join(errors))


def read_latest_meta(manager: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
    """The JSON record of the newest checkpoint whose record is readable, without its arrays.

    Lets a run check a checkpoint against its config (dataset, image shape, architecture)
    before building or compiling anything. Unreadable records are skipped with a warning.

    Returns:
      ``(step, meta)``, or ``None`` when there is no checkpoint or no readable record.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - an unreadable record means: try the previous
            logging.warning("Checkpoint record at step %d in %s is unreadable (%s: %s); trying "
                            "an older one.", step, manager.directory, type(e).__name__, e)
            continue
        return step, meta
    return None


def restore_state(directory: str, step: int, template: Any) -> Any:
    """Restores only the ``state`` item of the checkpoint at ``step`` into ``template``'s layout."""
    manager = make_manager(directory, asynchronous=False)
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(template)))).state
    finally:
        manager.close()


def read_meta(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """``(step, meta)``: only the JSON record of a run's checkpoint, newest unless ``step``.

    Useful to learn a checkpoint's config (image shape, architecture) before building models.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory(workdir)))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint found in {directory(workdir)}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()
    return step, meta


def restore_run(workdir: str, step: Optional[int], template_fn) -> tuple[int, Any, dict]:
    """``(step, state, meta)`` of a run's checkpoint, the state in the layout of a template.

    Args:
      workdir: the run directory.
      step: the checkpoint to read, or None for the newest one.
      template_fn: ``meta -> template`` (the template depends on the record: the config and
        image shape say which model to build).

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
    """
    step, meta = read_meta(workdir, step)
    state = restore_state(directory(workdir), step, template_fn(meta))
    return step, state, meta


def save_tree(path: str, tree: Any) -> None:
    """Writes a plain pytree of arrays (e.g. an auxiliary net's parameters) to ``path``."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree)
        checkpointer.wait_until_finished()


def load_tree(path: str, template: Any) -> Any:
    """Reads a pytree written by :func:`save_tree` into the layout of ``template``."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), abstract_like(template))

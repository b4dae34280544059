"""Every checkpoint access of the library: Orbax checkpoints of a run, and plain parameter trees.

A run's checkpoints live in ``<workdir>/checkpoints`` (:func:`directory`); nothing else in the
repository spells that folder name.

A checkpoint at step ``s`` holds ``state`` (any pytree of jax Arrays: params, EMA/old params,
optimizer state, step, RNG key data, tracker state) and ``meta`` (JSON: the config, the data
position and anything else a resumed run needs to continue *the same* run). Saving is
asynchronous; restoring puts every array back with the sharding of a template state, so a
restored run is laid out exactly like a fresh one.

One rule decides which checkpoint every reader gets: the newest step whose record and arrays
can both be read. An unreadable step (a partial write, a corrupted file) is skipped with a
warning naming it, by the run that resumes (:func:`restore_latest`) and by every loader
(:func:`restore_run`, used for bases, policies and evaluation) alike. The run that owns the
workdir then moves the unreadable steps aside, into ``<workdir>/unreadable_checkpoints/``
(kept for inspection, never deleted), so that it can write those steps again; readers never
move anything. When no step is readable nothing is moved and the run stops with an error.

A workdir belongs to one run at a time: :func:`workdir_lock` refuses a second process at once.

A workdir may be a local folder or an object-store URL such as ``gs://bucket/run``
(:mod:`normguard_jax.paths`): Orbax writes there directly. On an object store there is no
workdir lock and a move aside is a copy then a delete (see :mod:`paths`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from normguard_jax import config_checks, paths

FOLDER = "checkpoints"  # a run's checkpoint folder inside its workdir.
UNREADABLE_FOLDER = "unreadable_checkpoints"  # where unreadable steps are moved, beside FOLDER.
LOCK_FILE = "lock"      # the workdir lock (see workdir_lock).


def directory(workdir: str) -> str:
    """The checkpoint folder of a run's ``workdir`` (a local path or a URL, like ``workdir``)."""
    return os.path.join(workdir, FOLDER)


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` has a checkpoint folder (it may still hold no finished step)."""
    return paths.path(directory(workdir)).is_dir()


def steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of ``workdir``, oldest first ([] without any)."""
    if not has_checkpoints(workdir):
        return []
    manager = ocp.CheckpointManager(paths.absolute(directory(workdir)))
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
    return ocp.CheckpointManager(paths.absolute(directory), options=options)


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


def _newest_readable(directory: str, steps, read: Callable[[int], Any]
                     ) -> Optional[tuple[int, Any, list[int]]]:
    """The one fallback rule: ``read(step)`` from the newest step down, skipping failures.

    ``read`` raises :class:`_Unreadable` for a step that cannot be read; anything else it
    raises (a config that does not fit, a missing base) propagates.

    Returns:
      ``(step, read(step), newer unreadable steps)``, or None without any step.

    Raises:
      RuntimeError: steps exist but none can be read (nothing is moved then).
    """
    steps = sorted(steps, reverse=True)
    if not steps:
        return None
    errors = []
    for step in steps:
        try:
            return step, read(step), [s for s, _ in errors]
        except _Unreadable as e:
            cause = e.__cause__
            logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an "
                            "older one.", step, directory, type(cause).__name__, cause)
            errors.append((step, f"step {step}: {type(cause).__name__}: {cause}"))
    raise RuntimeError(
        f"No readable checkpoint in {directory}: " + "; ".join(e for _, e in errors)
        + ". Nothing was moved; if these steps are damaged, move them out of that folder (or "
        "use a new workdir) to start the run again.")


class _Unreadable(Exception):
    """A checkpoint step failed to load (the cause is chained)."""


def _read(manager: ocp.CheckpointManager, step: int, **items):
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any failure to read means: try an older step
        raise _Unreadable() from e


def move_aside(manager: ocp.CheckpointManager, steps) -> list[str]:
    """Moves checkpoint ``steps`` out of the manager's folder into :data:`UNREADABLE_FOLDER`
    beside it (process 0 moves, every process waits); returns the new paths."""
    directory = paths.path(manager.directory)
    target = directory.parent / UNREADABLE_FOLDER
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for step in steps:
        dest = str(target / f"{step}-{stamp}")
        if jax.process_index() == 0:
            paths.move_tree(directory / str(step), dest)
            logging.warning("Moved the unreadable checkpoint of step %d to %s (kept for "
                            "inspection); the run will write that step again.", step, dest)
        moved.append(dest)
    if moved and jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices("normguard_jax.checkpointing.move_aside")
    manager.reload()
    return moved


def restore_latest(manager: ocp.CheckpointManager, template: Any, *,
                   move_unreadable: bool = False) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint (record and arrays).

    Args:
      manager: the checkpoint manager.
      template: a state with the structure, dtypes and shardings to restore into (a real state
        or the output of :func:`abstract_like`).
      move_unreadable: move the newer, unreadable steps aside (:func:`move_aside`) so that the
        run can write them again. Only the process that holds the workdir lock may.

    Returns:
      ``(step, state, meta)``, or ``None`` when the directory holds no checkpoint. A checkpoint
      that fails to load is skipped with a warning and the previous one is tried.

    Raises:
      RuntimeError: if checkpoints exist but none can be read.
    """
    abstract = abstract_like(template)

    def read(step):
        restored = _read(manager, step, state=ocp.args.StandardRestore(abstract),
                         meta=ocp.args.JsonRestore())
        return restored.state, restored.meta

    found = _newest_readable(str(manager.directory), manager.all_steps(), read)
    if found is None:
        return None
    step, (state, meta), unreadable = found
    if move_unreadable and unreadable:
        move_aside(manager, unreadable)
    return step, state, meta


def read_latest_meta(manager: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
    """The JSON record of the newest checkpoint whose record is readable, without its arrays.

    Lets a run check a checkpoint against its config (dataset, image shape, architecture)
    before building or compiling anything. Unreadable records are skipped with a warning.

    Returns:
      ``(step, meta)``, or ``None`` when there is no checkpoint or no readable record.
    """
    try:
        found = _newest_readable(str(manager.directory), manager.all_steps(),
                                 lambda step: _read(manager, step,
                                                    meta=ocp.args.JsonRestore()).meta)
    except RuntimeError:
        return None
    return None if found is None else found[:2]


def restore_state(directory: str, step: int, template: Any) -> Any:
    """Restores only the ``state`` item of the checkpoint at ``step`` into ``template``'s layout."""
    manager = make_manager(directory, asynchronous=False)
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(template)))).state
    finally:
        manager.close()


def _reader(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(paths.absolute(directory(workdir)))


def read_meta(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """``(step, meta)``: only the JSON record of a run's checkpoint.

    Without ``step``: the newest step whose record is readable (unreadable ones are skipped
    with a warning; the arrays are not read, see :func:`restore_run` for the full rule).
    Useful to learn a checkpoint's config (image shape, architecture) before building models.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint (or not ``step``).
      RuntimeError: no record is readable.
    """
    manager = _reader(workdir)
    try:
        if step is not None:
            if step not in manager.all_steps():
                raise FileNotFoundError(f"No checkpoint of step {step} in {directory(workdir)}")
            return step, manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        found = _newest_readable(directory(workdir), manager.all_steps(),
                                 lambda s: _read(manager, s, meta=ocp.args.JsonRestore()).meta)
    finally:
        manager.close()
    if found is None:
        raise FileNotFoundError(f"No checkpoint found in {directory(workdir)}")
    return found[0], found[1]


def restore_run(workdir: str, step: Optional[int], template_fn: Callable[[dict], Any]
                ) -> tuple[int, Any, dict]:
    """``(step, state, meta)`` of a run's checkpoint, the state in the layout of a template.

    Without ``step``, the newest step whose record and arrays are both readable: the rule of
    :func:`restore_latest`, so a loader gets the step a resumed run would continue from.
    Nothing is moved (the workdir may belong to a running process).

    Args:
      workdir: the run directory.
      step: the checkpoint to read, or None for the newest readable one.
      template_fn: ``meta -> template`` (the template depends on the record: the config and
        image shape say which model to build). Its own errors are not taken for an
        unreadable checkpoint: they propagate.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint (or not ``step``).
      RuntimeError: no checkpoint is readable.
    """
    manager = _reader(workdir)
    try:
        available = manager.all_steps()
        if step is not None and step not in available:
            raise FileNotFoundError(f"No checkpoint of step {step} in {directory(workdir)}")

        def read(s):
            meta = _read(manager, s, meta=ocp.args.JsonRestore()).meta
            template = abstract_like(template_fn(meta))
            state = _read(manager, s, state=ocp.args.StandardRestore(template)).state
            return state, meta

        if step is not None:            # an explicit step: no fallback
            try:
                state, meta = read(step)
            except _Unreadable as e:
                raise RuntimeError(f"Checkpoint of step {step} in {directory(workdir)} is "
                                   f"unreadable: {type(e.__cause__).__name__}: "
                                   f"{e.__cause__}") from e.__cause__
            return step, state, meta
        found = _newest_readable(directory(workdir), available, read)
    finally:
        manager.close()
    if found is None:
        raise FileNotFoundError(f"No checkpoint found in {directory(workdir)}")
    step, (state, meta), _ = found
    return step, state, meta


def fingerprint(tree: Any) -> str:
    """A SHA-256 of a pytree's structure, shapes, dtypes and values (hex): the identity of a
    set of parameters, e.g. an RL run's θ_ref, recorded so that a resume can check it."""
    digest = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    digest.update(str(treedef).encode())
    for path, leaf in leaves:
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.shape}:{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The workdir lock.
# ----------------------------------------------------------------------------------------------


class WorkdirInUseError(config_checks.ConfigError):
    """Another running process holds the workdir; the message names it (pid, host). A
    ConfigError about ``--workdir``, like an unwritable one."""


def _lock_path(workdir: str) -> str:
    name = LOCK_FILE if jax.process_count() == 1 else f"{LOCK_FILE}.{jax.process_index()}"
    return os.path.join(workdir, name)


def _read_holder(handle) -> dict:
    handle.seek(0)
    text = handle.read()
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"process {holder.get('pid')} on host {holder.get('host')!r} (since "
            f"{holder.get('since')}, command {holder.get('command')!r})")


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds ``<workdir>/lock`` for the body; a second run on the same workdir is refused at once.

    The lock is an exclusive, non-blocking ``flock``, which the kernel releases when its
    holder exits in any way (``kill -9`` included): a lock left by a dead process never blocks
    a resume. The file names the holder (pid, host, start time, command) for the message of a
    refused process, and is emptied on release; a name found in it on entry is a holder that
    died, and is logged. On a file system without ``flock`` the name alone decides: a live
    process of this host refuses, anything else is taken over with a warning. Processes of a
    multi-process run each lock their own file (``lock.<process index>``).

    On an object store (a ``gs://``… workdir) nothing is locked and nothing is written: objects
    have no locks, and a lock object would outlive a preempted holder and block its resume. A
    warning says that the workdir is not protected; the body runs with ``None``.

    Raises:
      WorkdirInUseError: naming the holder.
    """
    if not paths.is_local(workdir):
        logging.warning("%s is on an object store, which has no file locks: this run does not "
                        "lock it, and a second run started on it would not be refused.", workdir)
        yield None
        return
    path = _lock_path(workdir)
    os.makedirs(workdir, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            for _ in range(20):      # the holder may be between taking the lock and naming itself
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_holder(handle)
            raise WorkdirInUseError(
                f"--workdir={workdir} is in use by {_describe(holder)}; a workdir holds one run "
                f"at a time: wait for it to end (or stop it) and rerun to resume, or use another "
                f"workdir (lock file: {path})") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            holder = _read_holder(handle)
            if (holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
                    and _alive(int(holder.get("pid", 0)))):
                raise WorkdirInUseError(f"--workdir={workdir} is in use by {_describe(holder)} "
                                        f"(lock file: {path})") from None
            logging.warning("The file system of %s does not support locks: the workdir is only "
                            "marked as in use, not locked.", workdir)
        previous = _read_holder(handle)
        if previous:
            logging.warning("Taking over the workdir lock of %s, which is no longer running.",
                            _describe(previous))
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "since": datetime.datetime.now().isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)}, handle)
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
    finally:
        handle.close()         # releases the flock


def save_tree(path: str, tree: Any) -> None:
    """Writes a plain pytree of arrays (e.g. an auxiliary net's parameters) to ``path``."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths.absolute(path), tree)
        checkpointer.wait_until_finished()


def load_tree(path: str, template: Any) -> Any:
    """Reads a pytree written by :func:`save_tree` into the layout of ``template``."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(paths.absolute(path), abstract_like(template))

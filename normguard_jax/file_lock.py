"""An inter-process lock on a file, for work that must happen once (dataset builds, net training)."""

from __future__ import annotations

import contextlib
import fcntl
import os

from absl import logging

from normguard_jax import paths


@contextlib.contextmanager
def exclusive(path: str):
    """Holds an exclusive ``flock`` on ``path`` (created, with its folder, if missing).

    Processes, and threads that each enter the context, wait for one another. A ``path`` on an
    object store (``gs://``…, :mod:`paths`) has no locks: the body runs unlocked, with a
    warning (build what it guards once, from one process, before starting several).
    """
    if not paths.is_local(path):
        logging.warning("%s is on an object store, which has no file locks: running without "
                        "this lock.", path)
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

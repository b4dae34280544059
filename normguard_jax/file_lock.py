"""An inter-process lock on a file, for work that must happen once (dataset builds, net training)."""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def exclusive(path: str):
    """Holds an exclusive ``flock`` on ``path`` (created, with its folder, if missing).

    Processes, and threads that each enter the context, wait for one another.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

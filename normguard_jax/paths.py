"""Run folders that are local directories or object-store URLs (``gs://``, ``s3://``, …).

Every file the library writes or reads under a workdir, an auxiliary-net folder or a data dir
goes through :func:`path`, an ``etils.epath.Path``: a local folder uses ordinary file I/O, a URL
with a scheme that epath supports (``gs://``, ``s3://``, ``az://``, ``hf://``) uses its backend
(TensorFlow's gfile when TensorFlow is installed, else fsspec with gcsfs/s3fs). Orbax and
TensorBoard take the same strings.

What differs on an object store (:func:`is_local` is False), where objects are written whole
and there are neither locks nor renames:

- the workdir lock (:func:`checkpointing.workdir_lock`) and the build locks of
  :mod:`file_lock` are not taken: a warning says so, and keeping one run per workdir is the
  user's job (a second run on the same bucket folder is not refused);
- moving an unreadable checkpoint aside copies its objects and then deletes them
  (:func:`move_tree`), which is not atomic: an interrupted move leaves a copy, and the next
  run moves the step again;
- ``metrics.jsonl`` is rewritten whole at every log instead of appended to
  (:class:`reporting.JsonlWriter`).
"""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(location: os.PathLike | str) -> bool:
    """Whether ``location`` is a local path (no ``scheme://`` prefix)."""
    return not _URL.match(os.fspath(location))


def absolute(location: os.PathLike | str) -> str:
    """``location`` as an absolute local path, or the URL unchanged (``os.path.abspath`` would
    turn ``gs://b/x`` into ``<cwd>/gs:/b/x``)."""
    location = os.fspath(location)
    return os.path.abspath(location) if is_local(location) else location


def path(location: os.PathLike | str) -> epath.Path:
    """An ``epath.Path`` of :func:`absolute` ``(location)``.

    Raises:
      ValueError: a URL whose scheme epath does not support.
    """
    location = absolute(location)
    try:
        return epath.Path(location)
    except KeyError:     # epath's own error for a scheme it has no backend for
        raise ValueError(f"{location!r}: unsupported URL scheme (etils.epath supports gs://, "
                         f"s3://, az:// and hf://)") from None


def move_tree(source: os.PathLike | str, target: os.PathLike | str) -> None:
    """Moves the folder ``source`` to ``target`` (whose parent is created if missing).

    Local: a rename (the library moves within one workdir, so within one file system). Object
    store: the backend's recursive rename, which copies every object and then deletes it, so
    an interruption may leave both.
    """
    source, target = path(source), path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)

"""Workdirs on an object store: ``gs://`` through etils.epath, against an in-memory bucket.

The bucket is fsspec's memory file system registered for the ``gs`` protocol, with appends
refused as on Cloud Storage; epath is made to use its fsspec backend rather than TensorFlow's.
Orbax's array writes go through tensorstore, which has its own GCS driver, so checkpoints are
tested on local folders (``tests/test_infrastructure.py``, ``tests/test_loop.py``).
"""

import importlib
import json
import logging
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from normguard_jax import checkpointing, config_checks, file_lock, paths, reporting


class _MemoryBucket(MemoryFileSystem):
    """An in-memory ``gs://`` file system whose objects cannot be appended to."""

    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]

    def __init__(self, *args, **kwargs):
        del args, kwargs           # epath passes GCS options (finalize_on_close)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path[len(prefix):] if path.startswith(prefix) else path
        return MemoryFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"objects cannot be appended to: {path}")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def bucket(monkeypatch):
    registry = importlib.import_module("fsspec.registry")
    # epath's choice of TensorFlow's gfile for gs:// is cached per process: replace the check.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    saved = {p: registry._registry.get(p) for p in ("gs", "gcs")}
    for protocol in saved:
        registry._registry[protocol] = _MemoryBucket
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    _MemoryBucket.store.clear()
    _MemoryBucket.pseudo_dirs[:] = [""]
    yield "gs://bucket/run"
    for protocol, cls in saved.items():
        if cls is None:
            registry._registry.pop(protocol, None)
        else:
            registry._registry[protocol] = cls
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    _MemoryBucket.store.clear()


def _objects():
    return sorted(_MemoryBucket.store)


def test_scheme_dispatch():
    assert paths.is_local("workdir/x") and paths.is_local("/abs") and paths.is_local("a:b")
    assert not paths.is_local("gs://b/x") and not paths.is_local("s3://b")
    assert paths.absolute("gs://b/x") == "gs://b/x"
    assert paths.absolute("rel/x") == os.path.join(os.getcwd(), "rel/x")
    assert str(paths.path("gs://b/x") / "checkpoints") == "gs://b/x/checkpoints"
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        paths.path("memory://x")
    with pytest.raises(config_checks.ConfigError, match=r"--workdir='memory://x'"):
        config_checks.writable_directory("memory://x")


def test_metrics_samples_and_records_go_to_the_bucket(bucket):
    config_checks.writable_directory(bucket)     # writes and removes a probe object
    assert not any(".write_probe" in o for o in _objects())
    writer = reporting.JsonlWriter(f"{bucket}/metrics.jsonl")
    writer.write_scalars(1, {"loss": np.float32(0.5)})
    writer.write_scalars(2, {"loss": 0.25})
    reporting.JsonlWriter(f"{bucket}/metrics.jsonl").write_scalars(3, {"loss": 0.125})  # resumed
    assert reporting.read_jsonl(f"{bucket}/metrics.jsonl") == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]
    assert reporting.read_jsonl(f"{bucket}/missing.jsonl") == []

    images = np.linspace(-1, 1, 4 * 3 * 3).reshape(4, 3, 3, 1)

    class _Writer:
        def write_images(self, step, images):
            self.images = images

    png = reporting.write_grid(_Writer(), bucket, 7, "samples", images, ncols=2)
    assert png == f"{bucket}/samples/samples_0000007.png"
    with paths.path(png).open("rb") as f:
        decoded = np.asarray(Image.open(f))
    grid = reporting.image_grid(images, 2)
    np.testing.assert_array_equal(decoded, np.repeat(np.repeat(grid, 2, 0), 2, 1))
    assert "/bucket/run/samples/samples_0000007.png" in _objects()
    assert not checkpointing.has_checkpoints(bucket)
    (paths.path(checkpointing.directory(bucket)) / "1").mkdir(parents=True)
    assert checkpointing.has_checkpoints(bucket)


def test_locks_on_a_bucket_are_skipped_with_a_warning(bucket, caplog):
    with caplog.at_level(logging.WARNING):
        with checkpointing.workdir_lock(bucket) as held:
            assert held is None
            with checkpointing.workdir_lock(bucket):      # not refused: nothing to lock
                pass
        with file_lock.exclusive(f"{bucket}/.build.lock"):
            pass
    assert _objects() == []                              # no lock object left behind
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no file locks" in m for m in messages) == 3


def test_moving_a_step_aside_on_a_bucket_copies_then_deletes(bucket):
    step = paths.path(checkpointing.directory(bucket)) / "5"
    (step / "state").mkdir(parents=True)
    (step / "state" / "array").write_bytes(b"\x00\x01")
    (step / "meta.json").write_text(json.dumps({"a": 1}))
    target = paths.path(bucket) / checkpointing.UNREADABLE_FOLDER / "5-now"
    paths.move_tree(step, target)
    assert not step.exists()
    assert (target / "state" / "array").read_bytes() == b"\x00\x01"
    assert json.loads((target / "meta.json").read_text()) == {"a": 1}


def test_local_paths_behave_as_before(tmp_path):
    writer = reporting.JsonlWriter(str(tmp_path / "m" / "metrics.jsonl"))
    writer.write_scalars(1, {"x": 1.0})
    writer.write_scalars(2, {"x": 2.0})
    assert (tmp_path / "m" / "metrics.jsonl").read_text().count("\n") == 2
    with checkpointing.workdir_lock(str(tmp_path / "w")) as held:
        assert held == str(tmp_path / "w" / checkpointing.LOCK_FILE)
        with pytest.raises(checkpointing.WorkdirInUseError):
            with checkpointing.workdir_lock(str(tmp_path / "w")):
                pass
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    paths.move_tree(tmp_path / "a", tmp_path / "moved" / "a")
    assert (tmp_path / "moved" / "a" / "b" / "f").read_text() == "x"
    assert not (tmp_path / "a").exists()

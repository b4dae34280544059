"""Metric writers, image grids and progress reporting.

Every run writes, under its workdir:
- TensorBoard event files (scalars and image grids) through clu's ``metric_writers``;
- ``metrics.jsonl``: one JSON object per logged step, for scripts and plots;
- ``samples/<tag>_<step>.png``: the image grids, to look at without TensorBoard.
Only process 0 writes; other processes get a writer that only logs to the console.
The workdir may be a local folder or an object-store URL (``gs://…``, :mod:`paths`).

clu's ``metric_writers`` imports TensorFlow (about 10 s on a 2-core CPU), so it is imported
only when a writer is made: jobs that write no metrics (evaluation, the analyses) start
without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Mapping

import jax
from absl import logging as absl_logging
import numpy as np
from PIL import Image

from normguard_jax import paths

if TYPE_CHECKING:
    from clu import metric_writers


class JsonlWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to a file; only scalars are written.

    Implements every method of clu's ``metric_writers.interface.MetricWriter`` without
    subclassing it, so that this module does not import TensorFlow (see the module docstring).
    On an object store, where an object cannot be appended to, the file is read once and
    rewritten whole at every write (a resumed run keeps the earlier rows).
    """

    def __init__(self, path: str):
        self._path = paths.path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._rows = None
        if not paths.is_local(self._path):
            self._rows = self._path.read_text() if self._path.exists() else ""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        line = json.dumps(row) + "\n"
        if self._rows is None:
            with self._path.open("a") as f:
                f.write(line)
        else:
            self._rows += line
            self._path.write_text(self._rows)

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class _DropLibraryInfo(logging.Filter):
    """Drops INFO/DEBUG records emitted from inside the given packages (Orbax is very chatty)."""

    def __init__(self, packages):
        super().__init__()
        self._markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(
            m in record.pathname for m in self._markers)


def quiet_library_logs(packages=("orbax", "etils", "tensorflow_datasets")) -> None:
    """Keeps warnings of ``packages`` but hides their INFO lines on the absl log handler."""
    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo(packages))


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + console + ``metrics.jsonl`` on process 0; console only elsewhere."""
    from clu import metric_writers  # noqa: PLC0415  (imports TensorFlow: only when needed)
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    workdir = paths.absolute(workdir)   # TensorBoard's writer takes gs:// itself
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(workdir, asynchronous=False),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
    ])


def read_jsonl(path: str) -> list[dict]:
    """Reads a ``metrics.jsonl`` file (local or URL) into a list of dicts (empty if missing)."""
    path = paths.path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_grid(images, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles images into one uint8 RGB picture.

    Args:
      images: (N, H, W, C) float in [-1, 1] (values outside are clipped), C in {1, 3}.
      ncols: images per row (default: ceil(sqrt(N))).
      pad: pixels of grey between tiles.

    Returns:
      (rows·(H+pad)+pad, ncols·(W+pad)+pad, 3) uint8.
    """
    x = np.asarray(images, np.float32)
    n, h, w, c = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    u8 = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = u8[i]
    return grid


def save_png(path: str, grid: np.ndarray, upscale: int = 1) -> None:
    """Writes a uint8 (H, W, 3) array as PNG (local path or URL), optionally enlarged by
    nearest-neighbour ``upscale``."""
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if upscale > 1:
        grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
    with path.open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")


def write_grid(writer, workdir: str, step: int, tag: str, images, ncols: int) -> str:
    """Sends an image grid to TensorBoard and to ``<workdir>/samples/<tag>_<step>.png``.

    Returns the PNG path (written on process 0 only).
    """
    grid = image_grid(images, ncols)
    writer.write_images(step, {tag: grid[None]})
    path = os.path.join(workdir, "samples", f"{tag}_{int(step):07d}.png")
    if jax.process_index() == 0:
        save_png(path, grid, upscale=2)
    return path

"""Building datasets into a data dir once, and reading a whole split into memory.

`DATASETS` maps the names of the offline datasets to their TFDS builder classes. A name may
carry a builder config after a slash (`"shapes/small"`). Any other name is looked up in the
standard TFDS catalogue (`mnist`, `fashion_mnist`, `cifar10`, ...), which needs a network the
first time; without one, `load_split` raises `DatasetUnavailableError`.

Everything is written as ArrayRecord files and read back through TFDS's random-access data
source (`builder.as_data_source`, the call behind `tfds.data_source`), so reading needs no
`tf.data` pipeline.
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from normguard_jax import file_lock, paths
from normguard_jax.data import digits, shapes

DATASETS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits_mnist": digits.DigitsMnist,
    "digits_sklearn": digits.DigitsSklearn,
    "shapes": shapes.Shapes,
}

FILE_FORMAT = "array_record"


class DatasetUnavailableError(RuntimeError):
    """A catalogue dataset could not be found or built (typically: no network)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of a labelled image dataset, held in memory (read-only arrays).

    Attributes:
      images: uint8 (N, H, W, C), raw pixel values 0..255.
      labels: int32 (N,), class ids in [0, num_classes).
      num_classes: number of classes; the null class of classifier-free guidance is then
        `num_classes`.
      class_names: the `num_classes` class names, in id order.
      image_shape: (H, W, C).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N,H,W,C), got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int32 ({len(self.images)},), got "
                             f"{self.labels.dtype} {self.labels.shape}")
        if tuple(self.images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"image_shape {self.image_shape} != images {self.images.shape}")
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    def __len__(self) -> int:
        return len(self.labels)


def _parse_name(name: str) -> tuple[str, str | None]:
    base, _, config = name.partition("/")
    return base, config or None


def _lock_path(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "." + name.replace("/", "__") + ".lock")


@contextlib.contextmanager
def _scratch_tempdir(data_dir: str):
    """Points ``tempfile`` at a scratch folder inside ``data_dir`` for a build, then removes it.

    Constructing a builder, TFDS makes an empty ``mkdtemp("tfds")`` folder in the system temp
    dir that it never removes (``DatasetInfo.initialize_from_bucket``, once per process and
    dataset): here it lands in the scratch folder instead.
    """
    # A data dir on an object store gets a local scratch folder.
    scratch = tempfile.mkdtemp(prefix=".build-", dir=data_dir if paths.is_local(data_dir) else None)
    previous = tempfile.tempdir
    tempfile.tempdir = scratch
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


def _catalogue_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    offline = ", ".join(sorted(DATASETS))
    try:
        with _scratch_tempdir(data_dir):
            builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
            builder.download_and_prepare(file_format=FILE_FORMAT)
    except Exception as error:  # Any download or lookup failure: report it in one place.
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} could not be found or built in {data_dir!r} "
            f"({type(error).__name__}: {error}). Catalogue datasets need a network the first "
            f"time; the datasets that build offline are: {offline}."
        ) from error
    return builder


def prepare(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` into `data_dir` unless it is already there; returns its builder.

    A second call (in any process) finds the files and does not rebuild. Concurrent calls on
    the same `data_dir` are serialised by a file lock; different data dirs never interact.

    Args:
      name: a key of `DATASETS`, optionally with a builder config (`"shapes/small"`), or any
        TFDS catalogue name.
      data_dir: directory holding `<name>/<config>/<version>/` folders; None means the TFDS
        default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).

    Raises:
      DatasetUnavailableError: a catalogue dataset could not be found or downloaded.
    """
    data_dir = tfds.core.constants.DATA_DIR if data_dir is None else os.fspath(data_dir)
    paths.path(data_dir).mkdir(parents=True, exist_ok=True)
    base, config = _parse_name(name)
    with file_lock.exclusive(_lock_path(data_dir, name)):
        if base not in DATASETS:
            return _catalogue_builder(name, data_dir)
        with _scratch_tempdir(data_dir):
            builder = DATASETS[base](data_dir=data_dir, config=config, file_format=FILE_FORMAT)
            builder.download_and_prepare(file_format=FILE_FORMAT)
        return builder


def load_split(name: str, split: str, data_dir: str | os.PathLike | None) -> ImageSplit:
    """Loads a whole split into memory, building the dataset first if needed.

    Args:
      name: dataset name (see `prepare`). The dataset must have features `image` (uint8) and
        `label` (`ClassLabel`).
      split: a TFDS split, e.g. `"train"`, `"test"`, `"train[:10%]"`.
      data_dir: the TFDS data dir (None: the TFDS default, see `prepare`).

    Returns:
      An `ImageSplit` in the stored (deterministic) record order.
    """
    builder = prepare(name, data_dir)
    source = builder.as_data_source(split=split)
    records = source.__getitems__(range(len(source)))
    label_feature = builder.info.features["label"]
    image_shape = tuple(int(d) for d in builder.info.features["image"].shape)
    if records:
        images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records])
    else:
        images = np.zeros((0,) + image_shape, np.uint8)
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return ImageSplit(
        images=images,
        labels=labels,
        num_classes=int(label_feature.num_classes),
        class_names=tuple(label_feature.names),
        image_shape=image_shape,
    )

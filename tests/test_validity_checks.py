"""experiments/validity_checks.py: standard errors of the quality metrics, the ladder check,
the class-balanced halves, and the validity ordering with trained (tiny) metric nets."""

import numpy as np
import pytest

from experiments import validity_checks
from normguard_jax import auxnets, data, degradations, quality


# ---------------------------------------------------------------------------------------------
# Standard errors and the ladder check.
# ---------------------------------------------------------------------------------------------


class _FakeNets:
    """QualityNets stand-in: features = first pixels, logit = mean pixel (deterministic)."""

    def features(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1)[:, :4]

    def logits(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1).mean(axis=1)


def test_standard_errors_match_binomial_and_mean_formulas():
    rng = np.random.default_rng(8)
    n = 400
    labels = np.repeat(np.arange(4), n // 4)
    ref_images = rng.uniform(-1, 1, size=(n, 2, 2, 2)).astype(np.float32)
    ref = quality.Reference(
        features=_FakeNets().features(ref_images), mu=np.zeros(4), cov=np.eye(4),
        radii=quality.knn_radii(_FakeNets().features(ref_images), 3), diversity=1.0, k=3,
        size=n, dc_k=5, dc_radii=quality.knn_radii(_FakeNets().features(ref_images), 5))
    images = rng.uniform(-1.2, 1.1, size=(n, 2, 2, 2)).astype(np.float32)
    metrics, errors = validity_checks.quality_metrics_and_errors(images, labels, ref,
                                                                 _FakeNets(), repeats=40)
    logits = _FakeNets().logits(images)
    k = np.sum(logits > 0)
    p = (k + 1) / (n + 2)
    assert metrics["realism"] == pytest.approx(k / n)
    assert errors["realism"] == pytest.approx(np.sqrt(p * (1 - p) / n))
    assert errors["detector_logit"] == pytest.approx(np.std(logits, ddof=1) / np.sqrt(n))
    assert set(errors) == set(metrics) - {"diversity"}
    # Half-sampling estimates the standard error at the full size: compare with the spread
    # of the statistic over independent full-size draws (FD and recall).
    draws = []
    for i in range(40):
        x = np.random.default_rng(100 + i).uniform(-1.2, 1.1, size=(n, 2, 2, 2))
        draws.append(quality.quality_metrics(x.astype(np.float32), labels, ref,
                                                _FakeNets()))
    for name in ("fd", "recall", "coverage"):
        direct = np.std([d[name] for d in draws], ddof=1)
        assert 0.5 * direct < errors[name] < 2.0 * direct, (name, errors[name], direct)


def test_errors_of_repeated_images_count_distinct_images_only():
    rng = np.random.default_rng(9)
    distinct = rng.uniform(-1, 1, size=(10, 2, 2, 1)).astype(np.float32)
    images = np.repeat(distinct, 30, axis=0)
    labels = np.repeat(np.arange(10), 30)
    f = _FakeNets().features(images)
    ref = quality.Reference(features=f[::30], mu=np.zeros(4), cov=np.eye(4),
                               radii=quality.knn_radii(f[::30], 3), diversity=1.0, k=3,
                               size=10, dc_k=5, dc_radii=quality.knn_radii(f[::30], 5))
    _, errors = validity_checks.quality_metrics_and_errors(images, labels, ref, _FakeNets(),
                                                           repeats=4)
    k = np.sum(_FakeNets().logits(distinct) > 0)
    p = (k + 1) / 12
    assert errors["realism"] == pytest.approx(np.sqrt(p * (1 - p) / 10))


def test_random_half_is_class_balanced():
    labels = np.repeat(np.arange(3), [6, 7, 9])
    half = validity_checks.random_half(labels, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[half]), [3, 3, 4])
    assert len(np.unique(half)) == len(half)


def test_ladder_check_tolerates_noise_but_not_real_improvements():
    se = [0.01] * 5
    tol = 2 * np.sqrt(2) * 0.01
    # Lower is better: a dip smaller than the tolerance is fine, a larger one is not.
    ok = validity_checks.ladder_check([1.0, 1.0 - 0.9 * tol, 1.2, 1.5, 2.0], se, sign=-1)
    assert ok["passed"] and ok["significant"] and ok["closest"] == pytest.approx(0.9, rel=1e-3)
    bad = validity_checks.ladder_check([1.0, 1.0 - 1.1 * tol, 1.2, 1.5, 2.0], se, sign=-1)
    assert not bad["monotone"] and not bad["real_best"] and not bad["passed"]
    # Small steps that each pass can still drift below the real value.
    drift = validity_checks.ladder_check([0.5, 0.52, 0.54, 0.56, 0.58], [0.01] * 5, sign=+1)
    assert drift["monotone"] and not drift["real_best"]
    # Flat within noise: passes but is not significant; exactly flat is not "worse".
    flat = validity_checks.ladder_check([0.9, 0.9, 0.89, 0.9, 0.895], [0.02] * 5, sign=+1)
    assert flat["passed"] and not flat["significant"]
    assert not validity_checks.ladder_check([0.0] * 5, [0.0] * 5, sign=-1)["worse"]


# ---------------------------------------------------------------------------------------------
# Halves.
# ---------------------------------------------------------------------------------------------


def test_interleaved_halves_are_disjoint_and_class_balanced():
    labels = np.repeat(np.arange(4), [6, 7, 6, 9])
    a, b = validity_checks.interleaved_halves(labels)
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == len(labels)
    assert np.all(np.abs(np.bincount(labels[a]) - np.bincount(labels[b])) <= 1)


# ---------------------------------------------------------------------------------------------
# Validity with trained (tiny) metric nets.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_validity(data_dir, tmp_path_factory):
    """Metrics of real held-out digits and of every validity set, with tiny metric nets."""
    aux = str(tmp_path_factory.mktemp("aux"))
    nets = auxnets.AuxNetCache("digits_mnist", aux_dir=aux, data_dir=data_dir, preset="tiny")
    test = data.load_split("digits_mnist", "test", data_dir)
    ref_idx, cand_idx = validity_checks.interleaved_halves(test.labels)
    qnets = quality.quality_nets(nets)
    reference = quality.make_reference(test.images[ref_idx], test.labels[ref_idx], qnets)
    images = data.to_model_range(test.images[cand_idx])
    labels = test.labels[cand_idx]
    real = validity_checks.quality_metrics_and_errors(images, labels, reference, qnets,
                                                      repeats=10)
    rows = {}
    for family, strength, x in degradations.validity_sets(images, labels, seed=0):
        rows.setdefault(family, []).append(
            validity_checks.quality_metrics_and_errors(x, labels, reference, qnets, repeats=10))
    return real, rows


# Sampling-noise tolerance of the check, in standard errors (as in experiments/validity.py).
Z = 2.0
# Metrics that must see each family beyond the tolerance at the strongest strength (the others
# must only never improve; e.g. recall barely moves under contrast on near-binary digits).
CAUGHT_BY = {
    "noise": ("fd", "recall", "realism", "out_of_range", "overshoot"),
    "blur": ("fd", "recall", "realism"),
    "contrast": ("fd", "realism", "out_of_range", "overshoot"),
    "background_noise": ("fd", "recall", "realism", "out_of_range", "overshoot"),
    "diversity": ("fd", "recall"),
}


@pytest.mark.slow
def test_real_data_scores_best_and_metrics_worsen_with_strength(tiny_validity):
    """Every quality metric passes ``ladder_check`` on every family it is not blind to by
    construction, and so do the saturation diagnostics on the families they can see; FD, which
    has no sampling-noise excuse at this size, worsens strictly."""
    (real, real_se), rows = tiny_validity
    assert real["out_of_range"] == 0.0 and real["overshoot"] == 0.0
    for family, ladder in rows.items():
        for metric in quality.QUALITY_METRICS + ("out_of_range", "overshoot"):
            result = validity_checks.ladder_check(
                [real[metric]] + [m[metric] for m, _ in ladder],
                [real_se[metric]] + [e[metric] for _, e in ladder],
                quality.DIRECTION[metric], Z)
            where = (family, metric, real[metric], [m[metric] for m, _ in ladder])
            if family in validity_checks.BLIND_BY_CONSTRUCTION.get(metric, ()):
                continue
            assert result["passed"], (where, result)
            if metric in CAUGHT_BY.get(family, ()):
                assert result["significant"], (where, result)
        fd = [real["fd"]] + [m["fd"] for m, _ in ladder]
        assert all(b > a for a, b in zip(fd, fd[1:])), (family, fd)
    # The range statistics really are blind to blur: exactly 0, like real data.
    assert all(m["out_of_range"] == 0.0 for m, _ in rows["blur"])


@pytest.mark.slow
def test_fd_and_recall_worsen_as_diversity_is_reduced(tiny_validity):
    (real, _), rows = tiny_validity
    ladder = [m for m, _ in rows["diversity"]]
    fd = [real["fd"]] + [r["fd"] for r in ladder]
    recall = [real["recall"]] + [r["recall"] for r in ladder]
    coverage = [real["coverage"]] + [r["coverage"] for r in ladder]
    ratio = [real["diversity_ratio"]] + [r["diversity_ratio"] for r in ladder]
    assert all(b < a for a, b in zip(coverage, coverage[1:])), coverage
    assert all(b > a for a, b in zip(fd, fd[1:])), fd
    assert all(b <= a for a, b in zip(recall, recall[1:])) and recall[-1] < 0.1, recall
    assert all(b < a for a, b in zip(ratio, ratio[1:])) and ratio[-1] < 1e-6, ratio

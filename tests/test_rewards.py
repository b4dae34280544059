"""Rewards: registry contract, truthful differentiability, exact shapes rule, proxies,
combinations, and the cached reward classifier."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from flax import nnx

from normguard_jax import auxnets, config_checks, data, rewards
from normguard_jax.data import shapes
from normguard_jax.models import small_nets

from conftest import load_config_file

# (dataset, image_shape, num_classes) covering grey 32×32, grey 8×8 and RGB 32×32.
CASES = [("digits_mnist", (32, 32, 1), 10), ("digits_sklearn", (8, 8, 1), 10),
         ("shapes", (32, 32, 3), 16)]


def untrained_classifier_nets(image_shape, num_classes):
    """A randomly initialised classifier standing in for the cached one (contract tests)."""
    model = small_nets.Classifier(image_shape, num_classes, rngs=nnx.Rngs(0), widths=(4, 4, 4),
                                  hidden=8)
    graphdef, params = nnx.split(model, nnx.Param)
    net = auxnets.AuxNet("classifier", small_nets.make_apply(graphdef), params, {})
    return lambda name: {"classifier": net}[name]


def context(dataset, image_shape, num_classes):
    return rewards.RewardContext(dataset, image_shape, num_classes,
                                 untrained_classifier_nets(image_shape, num_classes))


@pytest.fixture(scope="module")
def shapes_set():
    """3 rendered images per class of the shapes dataset, float32 in [-1, 1]."""
    arrays = shapes.generate_split(3, seed=77, split_index=9)
    return data.to_model_range(arrays.images), arrays.labels


def _inputs(image_shape, num_classes, batch=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, (batch, *image_shape), minval=-0.9, maxval=0.9)
    return x, jax.random.randint(k2, (batch,), 0, num_classes)


@pytest.mark.parametrize("dataset, image_shape, num_classes", CASES)
def test_registry_contract_and_truthful_differentiability(dataset, image_shape, num_classes):
    """Every applicable reward jits to a (B,) float32 function; a reward flagged
    differentiable has a finite, non-zero image gradient, the others a zero gradient.

    Random images: no reward is saturated there (on clean renderings the shapes rule's
    softmaxes are, and its gradient is then legitimately about 0).
    """
    ctx = context(dataset, image_shape, num_classes)
    x, cond = _inputs(image_shape, num_classes, seed=1)
    names = rewards.applicable(ctx)
    assert ("saturation" in names) == (image_shape[-1] == 3)
    assert ("shapes_rule" in names) == (dataset == "shapes")
    for name in names:
        reward = rewards.build_reward(name, ctx)
        value_and_grad = jax.jit(lambda v, c: (reward(v, c),
                                               jax.grad(lambda u: jnp.sum(reward(u, c)))(v)))
        value, grad = value_and_grad(x, cond)
        assert value.shape == (4,) and value.dtype == jnp.float32, name
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), name
        assert grad.shape == x.shape
        norm = float(jnp.linalg.norm(grad))
        if reward.differentiable:
            assert norm > 1e-6, f"{name} claims to be differentiable but its gradient is 0"
        else:
            assert norm == 0.0, f"{name} claims not to be differentiable but has gradient {norm}"


def test_inapplicable_or_unknown_reward_fails_clearly():
    ctx = context("digits_mnist", (32, 32, 1), 10)
    with pytest.raises(ValueError, match="saturation.*not defined for dataset 'digits_mnist'"):
        rewards.build_reward("saturation", ctx)
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'"):
        rewards.build_reward("aesthetic", ctx)


def test_shapes_rule_scores_the_true_class_highest(shapes_set):
    images, labels = shapes_set
    x = jnp.asarray(images)
    rule = jax.jit(rewards.shapes_rule)
    correct = jax.jit(rewards.shapes_correct)
    by_class = np.stack([np.asarray(rule(x, jnp.full(labels.shape, k, jnp.int32)))
                         for k in range(shapes.NUM_CLASSES)], axis=1)    # (N, 16)
    assert np.mean(np.argmax(by_class, axis=1) == labels) >= 0.95
    true = by_class[np.arange(len(labels)), labels]
    wrong = np.where(np.eye(shapes.NUM_CLASSES, dtype=bool)[labels], np.nan, by_class)
    assert true.mean() > 0.8 and np.nanmean(wrong) < 0.05
    # Every wrong class that shares the colour (only the shape differs) scores lower on average.
    s_idx, c_idx = shapes.decompose_label(labels)
    for other in range(1, shapes.NUM_SHAPES):
        same_colour = shapes.compose_label((s_idx + other) % shapes.NUM_SHAPES, c_idx)
        assert np.mean(true > by_class[np.arange(len(labels)), same_colour]) >= 0.9
    assert float(np.mean(correct(x, jnp.asarray(labels)))) >= 0.95


def test_shapes_rule_ignores_images_without_the_colour(shapes_set):
    images, labels = shapes_set
    grey = jnp.asarray(images).mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    score = jax.jit(rewards.shapes_rule)(grey, jnp.asarray(labels))
    assert float(jnp.max(score)) < 0.3   # no chromatic foreground: no colour evidence


@pytest.mark.parametrize("shape_index", range(shapes.NUM_SHAPES))
def test_shape_templates_match_the_dataset_renderer(shape_index):
    centre, size = (15.3, 16.8), 9.0
    reference = shapes.shape_coverage(shape_index, centre, size, angle=0.0)  # 4×4 supersampled
    sizes = jnp.full((1, shapes.NUM_SHAPES), size)
    ours = rewards.shape_templates(jnp.asarray([centre]), sizes, 32, 32)
    zero_angle = int(np.argmin(np.abs(rewards.SHAPE_ANGLES)))
    template = np.asarray(ours[0, shape_index, zero_angle])
    assert np.abs(template - reference).mean() < 0.02
    np.testing.assert_allclose(template.sum(), rewards.SHAPE_AREAS[shape_index] * size**2,
                               rtol=0.05)
    np.testing.assert_allclose(reference.sum(), rewards.SHAPE_AREAS[shape_index] * size**2,
                               rtol=0.05)


def test_proxies_closed_form():
    half = jnp.concatenate([-jnp.ones((1, 8, 16, 1)), jnp.ones((1, 8, 16, 1))], axis=1)
    flat = jnp.full((1, 16, 16, 1), 0.3)
    cond = jnp.zeros((1,), jnp.int32)
    np.testing.assert_allclose(rewards.contrast(half, cond), [1.0], rtol=1e-6)
    np.testing.assert_allclose(rewards.contrast(flat, cond), [0.0], atol=1e-6)
    np.testing.assert_allclose(rewards.contrast(3.0 * half, cond), [1.0], rtol=1e-6)  # clipped
    np.testing.assert_allclose(rewards.stroke_weight(half, cond), [0.5], rtol=1e-6)
    red = jnp.broadcast_to(jnp.array([1.0, -1.0, -1.0]), (1, 8, 8, 3))
    grey = jnp.zeros((1, 8, 8, 3))
    np.testing.assert_allclose(rewards.saturation(red, cond), [1.0], rtol=1e-6)
    np.testing.assert_allclose(rewards.saturation(grey, cond), [0.0], atol=1e-6)
    np.testing.assert_allclose(rewards.compressibility(flat, cond), [0.0], atol=1e-5)
    np.testing.assert_allclose(rewards.jpeg_zeros(flat, cond), [1.0])
    checker = jnp.asarray((np.indices((16, 16)).sum(0) % 2) * 2.0 - 1.0)[None, :, :, None]
    assert float(rewards.compressibility(checker, cond)[0]) < -0.5
    assert float(rewards.jpeg_zeros(checker, cond)[0]) < 1.0


def test_dct_matrix_matches_scipy_orthonormal_dct():
    d = rewards.dct_matrix(8)
    np.testing.assert_allclose(d @ d.T, np.eye(8), atol=1e-6)
    block = np.random.default_rng(0).normal(size=(8, 8))
    expected = scipy.fft.dctn(block, type=2, norm="ortho")
    np.testing.assert_allclose(d @ block @ d.T, expected, atol=1e-5)


def test_quantised_dct_of_a_flat_block_is_its_dc_term():
    # Y = 128 + 64 everywhere: the DC coefficient of the orthonormal DCT is 8·64, divided by 16.
    x = jnp.full((1, 8, 8, 1), (192.0 / 127.5) - 1.0)
    q = np.asarray(rewards.quantised_dct(x))[0, 0, 0]
    np.testing.assert_allclose(q[0, 0], 8 * 64.0 / 16.0, rtol=1e-4)
    np.testing.assert_allclose(np.abs(q).sum() - abs(q[0, 0]), 0.0, atol=1e-3)


def test_classifier_rewards_match_a_direct_computation():
    ctx = context("digits_mnist", (32, 32, 1), 10)
    x, cond = _inputs((32, 32, 1), 10, batch=6, seed=3)
    net = ctx.nets("classifier")
    logits = np.asarray(net.apply(net.params, x), np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    got = rewards.build_reward("classifier_logprob", ctx)(x, cond)
    np.testing.assert_allclose(got, log_p[np.arange(6), np.asarray(cond)], rtol=1e-4, atol=1e-5)
    prob = rewards.build_reward("classifier_prob", ctx)(x, cond)
    np.testing.assert_allclose(prob, np.exp(log_p[np.arange(6), np.asarray(cond)]), rtol=1e-4,
                               atol=1e-6)
    hit = rewards.build_reward("classifier_correct", ctx)(x, cond)
    np.testing.assert_array_equal(hit, (logits.argmax(1) == np.asarray(cond)).astype(np.float32))


def test_combination_is_the_weighted_sum_of_its_components():
    ctx = context("digits_mnist", (32, 32, 1), 10)
    x, cond = _inputs((32, 32, 1), 10, batch=5, seed=4)
    weights = {"classifier_logprob": 1.0, "contrast": 2.5, "compressibility": -0.5}
    combined = rewards.build_combined(weights, ctx)
    total, parts = jax.jit(combined.__call__)(x, cond)
    assert set(parts) == set(weights) and total.shape == (5,)
    direct = sum(w * rewards.build_reward(n, ctx)(x, cond) for n, w in weights.items())
    np.testing.assert_allclose(total, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["contrast"], rewards.contrast(x, cond), rtol=1e-6)
    assert combined.differentiable
    assert not rewards.build_combined({"contrast": 1.0, "jpeg_zeros": 0.1}, ctx).differentiable
    assert rewards.build_combined({"contrast": 1.0, "jpeg_zeros": 0.0}, ctx).differentiable


@pytest.mark.parametrize("weights, message", [
    ({}, r"config.rewards must give at least one reward a non-zero weight"),
    ({"contrast": 0.0}, r"config.rewards must give at least one reward a non-zero weight"),
    ({"contrast": 1.0, "aesthetic": 1.0}, r"config.rewards.aesthetic is not a reward"),
    ({"saturation": 1.0}, r"config.rewards.saturation is not defined for dataset"),
    ({"contrast": math.inf}, r"config.rewards.contrast must be a finite number"),
])
def test_bad_reward_weights_name_the_field(weights, message):
    ctx = context("digits_mnist", (32, 32, 1), 10)
    with pytest.raises(config_checks.ConfigError, match=message):
        rewards.check_weights(weights, ctx)


@pytest.mark.parametrize("reward_set, case", [("digits", CASES[0]), ("digits", CASES[1]),
                                              ("shapes", CASES[2])])
def test_default_reward_sets_are_valid_and_have_headroom(reward_set, case, shapes_set):
    config = load_config_file("evaluate.py", reward_set)
    ctx = context(*case)
    combined = rewards.build_combined(dict(config.rewards), ctx)
    assert combined.differentiable
    assert len(combined.weights) >= 2       # alignment + a proxy that keeps rising
    assert any(n in ("contrast", "saturation", "stroke_weight", "compressibility")
               for n, _ in combined.weights)


@pytest.mark.slow
def test_classifier_trains_caches_and_is_reused(data_dir, tmp_path):
    aux = str(tmp_path / "aux")
    first = auxnets.load_or_train("classifier", "digits_sklearn", aux_dir=aux,
                                  data_dir=data_dir, preset="tiny")
    assert first.meta["heldout_accuracy"] > 0.6          # 10 classes: chance is 0.1
    assert (tmp_path / "aux" / "digits_sklearn" / "classifier" / "meta.json").exists()
    second = auxnets.load_or_train("classifier", "digits_sklearn", aux_dir=aux,
                                   data_dir=data_dir, preset="tiny")
    assert second.meta == first.meta
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="trained with spec"):
        auxnets.load_or_train("classifier", "digits_sklearn", aux_dir=aux, data_dir=data_dir,
                              preset="default")
    # The trained classifier's reward prefers the true label on held-out digits.
    test = data.load_split("digits_sklearn", "test", data_dir)
    ctx = rewards.RewardContext("digits_sklearn", (8, 8, 1), 10, lambda name: second)
    logprob = jax.jit(rewards.build_reward("classifier_logprob", ctx).fn)
    x = jnp.asarray(data.to_model_range(test.images))
    true = logprob(x, jnp.asarray(test.labels))
    wrong = logprob(x, jnp.asarray((test.labels + 1) % 10))
    assert float(jnp.mean(true)) > float(jnp.mean(wrong)) + 1.0

"""Tests for the generator architectures and their functional interface (normguard_jax.models)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from normguard_jax import models
from normguard_jax.models import embeddings

NUM_CLASSES = 10
NULL = NUM_CLASSES
# The class-conditional generators (the text-conditioned MMDiT: tests/test_conditioning.py and
# tests/test_mmdit.py).
ARCHS = sorted(set(models.GENERATORS) - set(models.TEXT_GENERATORS))
SHAPES = [(32, 32, 3), (32, 32, 1), (8, 8, 1)]


def _build(name, shape=(8, 8, 1), seed=0, **overrides):
    sizes = dict(models.SIZES[name]["tiny"], **overrides)
    return models.build_generator(
        name, image_shape=shape, num_classes=NUM_CLASSES, rngs=nnx.Rngs(seed), **sizes
    )


@jax.jit
def _perturb(params, seed, scale=0.2):
    """Adds N(0, scale²) noise to every parameter, so no layer stays at its zero init."""
    leaves, treedef = jax.tree.flatten(params)
    # One draw for all leaves (one random kernel to compile instead of one per shape).
    sizes = [leaf.size for leaf in leaves]
    noise = jax.random.normal(jax.random.key(seed), (sum(sizes),))
    chunks = jnp.split(noise, np.cumsum(sizes)[:-1])
    noisy = [leaf + scale * n.reshape(leaf.shape) for leaf, n in zip(leaves, chunks)]
    return jax.tree.unflatten(treedef, noisy)


def _abstract_graphdef(name, **overrides):
    """Graph of a tiny 8×8×1 model built without computing any parameter value."""
    graphdef, abstract_params = models.split_generator(
        nnx.eval_shape(lambda: _build(name, **overrides))
    )
    return graphdef, abstract_params


def _inputs(shape, batch, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.uniform(k1, (batch, *shape), minval=-1.0, maxval=1.0)
    sigma = jax.random.uniform(k2, (batch,))
    cond = jax.random.randint(k3, (batch,), 0, NUM_CLASSES + 1)
    return x, sigma, cond


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    """A tiny model on 8×8×1: name, graphdef, jitted velocity, initial and perturbed params."""
    name = request.param
    graphdef, _ = _abstract_graphdef(name)

    @jax.jit
    def init():  # one compilation instead of one per parameter shape
        _, params = models.split_generator(_build(name))
        return params, _perturb(params, 1)

    params, perturbed = init()
    return name, graphdef, jax.jit(models.make_velocity_fn(graphdef)), params, perturbed


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_closed_form():
    t = jnp.array([0.0, 1.0, 250.0])
    emb = embeddings.sinusoidal_embedding(t, 8, max_period=10_000.0)
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    # t = 0: all cosines 1, all sines 0.
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
    # Frequencies 10000^(-k/4), k = 0..3; column k is cos, column 4 + k is sin.
    freqs = 10_000.0 ** (-np.arange(4) / 4.0)
    np.testing.assert_allclose(emb[2, :4], np.cos(250.0 * freqs), atol=1e-4)
    np.testing.assert_allclose(emb[2, 4:], np.sin(250.0 * freqs), atol=1e-4)
    with pytest.raises(ValueError, match="even"):
        embeddings.sinusoidal_embedding(t, 7)


def test_position_embedding_encodes_row_and_column():
    dim, gh, gw = 16, 3, 5
    pos = embeddings.sincos_2d_position_embedding(dim, gh, gw)
    assert pos.shape == (gh * gw, dim)
    # Token (r, c) sits at r·gw + c; its first half depends on the row only, second on the column.
    grid = pos.reshape(gh, gw, dim)
    np.testing.assert_array_equal(grid[:, 0, : dim // 2], grid[:, 3, : dim // 2])
    np.testing.assert_array_equal(grid[0, :, dim // 2 :], grid[2, :, dim // 2 :])
    # Position (0, 0): sin(0) = 0 then cos(0) = 1 in each half.
    np.testing.assert_allclose(pos[0], np.tile(np.r_[np.zeros(4), np.ones(4)], 2))
    # All tokens distinct.
    assert len({tuple(np.round(row, 6)) for row in pos}) == gh * gw
    with pytest.raises(ValueError, match="divisible by 4"):
        embeddings.sincos_2d_position_embedding(6, 2, 2)


def test_condition_embedding_uses_sigma_times_1000_and_class_row():
    emb = embeddings.ConditionEmbedding(8, 3, freq_dim=16, rngs=nnx.Rngs(0))
    sigma = jnp.array([0.0, 0.25, 1.0])
    cond = jnp.array([0, 3, 2], dtype=jnp.int32)
    # Independent recomputation from the documented formula with the module's own weights.
    freqs = np.asarray(embeddings.sinusoidal_embedding(1000.0 * sigma, 16))
    hidden = freqs @ np.asarray(emb.fc1.kernel) + np.asarray(emb.fc1.bias)
    hidden = hidden / (1.0 + np.exp(-hidden))
    expected = hidden @ np.asarray(emb.fc2.kernel) + np.asarray(emb.fc2.bias)
    expected = expected + np.asarray(emb.class_table.embedding)[np.asarray(cond)]
    np.testing.assert_allclose(emb(sigma, cond), expected, rtol=1e-5, atol=1e-6)
    assert emb.class_table.embedding.shape == (3 + 1, 8)  # null class has its own row


def test_dit_patchify_round_trip_and_token_order():
    model = nnx.eval_shape(lambda: _build("dit", (8, 8, 3), patch_size=2))
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    tokens = model._patchify(x)
    assert tokens.shape == (2, 16, 2 * 2 * 3)
    # Token 5 is grid cell (row 1, col 1): pixels [2:4, 2:4], flattened row-major then channel.
    np.testing.assert_array_equal(tokens[1, 5], np.asarray(x[1, 2:4, 2:4, :]).reshape(-1))
    np.testing.assert_array_equal(model._unpatchify(tokens), x)


# ---------------------------------------------------------------- shapes and initialisation


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ARCHS)
def test_output_shape_equals_input_shape(name, shape):
    # Abstract evaluation traces the whole network (every reshape and conv) without compiling.
    model = nnx.eval_shape(lambda: _build(name, shape))
    graphdef, params = models.split_generator(model)
    x, sigma, cond = _inputs(shape, batch=2)
    out = jax.eval_shape(models.make_velocity_fn(graphdef), params, x, sigma, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_output_is_zero_at_init_and_not_after_perturbation(tiny):
    _, _, velocity, params, perturbed = tiny
    x, sigma, cond = _inputs((8, 8, 1), batch=4)
    # adaLN-Zero / zero-initialised output layer: exactly zero at initialisation.
    assert np.all(np.asarray(velocity(params, x, sigma, cond)) == 0.0)
    v = velocity(perturbed, x, sigma, cond)
    assert np.all(np.isfinite(v)) and float(jnp.abs(v).mean()) > 1e-3


def test_velocity_depends_on_sigma_and_class(tiny):
    _, _, velocity, _, params = tiny
    x1 = jax.random.uniform(jax.random.key(5), (1, 8, 8, 1), minval=-1.0, maxval=1.0)
    x = jnp.repeat(x1, 4, axis=0)
    # Row 0 is the reference; rows 1-3 change sigma, the class, or use the null class.
    sigma = jnp.array([0.3, 0.7, 0.3, 0.3])
    cond = jnp.array([1, 1, 2, NULL], dtype=jnp.int32)
    v = np.asarray(velocity(params, x, sigma, cond))
    scale = np.abs(v[0]).mean()
    for row, what in [(1, "sigma"), (2, "class"), (3, "null class")]:
        diff = np.abs(v[row] - v[0]).mean()
        assert diff > 1e-3 * scale, f"output does not depend on {what}"


def test_batch_independence(tiny):
    _, _, velocity, _, params = tiny
    x, sigma, cond = _inputs((8, 8, 1), batch=4, seed=7)
    v_batch = velocity(params, x, sigma, cond)
    for i in range(4):
        v_i = velocity(params, x[i : i + 1], sigma[i : i + 1], cond[i : i + 1])
        np.testing.assert_allclose(v_batch[i : i + 1], v_i, rtol=1e-5, atol=1e-5)
    # Reversing the batch reverses the outputs.
    v_rev = velocity(params, x[::-1], sigma[::-1], cond[::-1])
    np.testing.assert_allclose(v_rev, v_batch[::-1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- functional interface


@pytest.mark.slow  # eager mode compiles every primitive separately (~5 s for the U-Net)
def test_jit_velocity_matches_eager_module(tiny):
    _, graphdef, velocity, _, params = tiny
    x, sigma, cond = _inputs((8, 8, 1), batch=4, seed=2)
    eager = nnx.merge(graphdef, params)(x, sigma, cond)
    np.testing.assert_allclose(velocity(params, x, sigma, cond), eager, rtol=1e-5, atol=1e-5)


def _remat_count(fn, *args):
    """Number of rematerialisation (jax.checkpoint) equations anywhere in fn's jaxpr."""
    prim = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name
    return str(jax.make_jaxpr(fn)(*args)).count(f"{prim}[")


def _loss_and_grad(graphdef, x, sigma, cond):
    velocity = models.make_velocity_fn(graphdef)
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(velocity(p, x, sigma, cond) ** 2)))


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    """Inputs (classes 0, 3 and null), loss value and gradients of mean(v²) at perturbed params."""
    _, graphdef, _, _, params = tiny
    x, sigma, _ = _inputs((8, 8, 1), batch=3, seed=4)
    cond = jnp.array([0, 3, NULL], dtype=jnp.int32)
    val, grads = _loss_and_grad(graphdef, x, sigma, cond)(params)
    return (x, sigma, cond), val, grads


def test_gradients_finite_and_nonzero(tiny_grads):
    _, _, grads = tiny_grads
    flat = dict(jax.tree_util.tree_flatten_with_path(grads.to_pure_dict())[0])
    for path, g in flat.items():
        key = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), key
        if "class_table" not in key:
            assert np.abs(np.asarray(g)).max() > 0.0, f"dead parameter {key}"
    # Only the rows of the classes in the batch (including the null row) receive gradient.
    table = grads.to_pure_dict()["cond_embed"]["class_table"]["embedding"]
    assert table.shape[0] == NUM_CLASSES + 1
    used = np.abs(np.asarray(table)).sum(axis=1) > 0
    np.testing.assert_array_equal(np.flatnonzero(used), [0, 3, NULL])


@pytest.mark.slow  # one more gradient compilation (~5 s for the U-Net)
def test_remat_gives_same_value_and_gradients(tiny, tiny_grads):
    name, graphdef, _, _, params = tiny
    inputs, val, grads = tiny_grads
    graphdef_r, abstract_r = _abstract_graphdef(name, remat=True)
    assert jax.tree.structure(abstract_r) == jax.tree.structure(params)
    # remat really applied: rematerialisation equations appear only in the remat graph.
    assert _remat_count(models.make_velocity_fn(graphdef), params, *inputs) == 0
    assert _remat_count(models.make_velocity_fn(graphdef_r), params, *inputs) > 0
    val_r, grads_r = _loss_and_grad(graphdef_r, *inputs)(params)
    np.testing.assert_allclose(val_r, val, rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    jax.tree.map(close, grads_r, grads)


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
    name, _, velocity, _, params = tiny
    graphdef_b, abstract_b = _abstract_graphdef(name, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract_b))
    assert jax.tree.structure(abstract_b) == jax.tree.structure(params)
    x, sigma, cond = _inputs((8, 8, 1), batch=4, seed=8)
    v = velocity(params, x, sigma, cond)
    v_b = jax.jit(models.make_velocity_fn(graphdef_b))(params, x, sigma, cond)
    assert v_b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(v_b - v) / jnp.linalg.norm(v))
    assert 0.0 < rel < 0.1, rel  # differs (bf16 really used) but only by rounding


# ---------------------------------------------------------------- sizes and summaries


@pytest.mark.parametrize(
    "name, shape, overrides, message",
    [
        ("dit", (8, 8, 1), dict(patch_size=3), "divisible by patch_size"),
        ("dit", (8, 8, 1), dict(hidden_dim=30, num_heads=4), "divisible by num_heads"),
        ("dit", (8, 8, 1), dict(hidden_dim=6, num_heads=2), "divisible by 4"),
        ("unet", (12, 12, 1), dict(channel_mults=(1, 2, 2, 2)), "not divisible by 2"),
        ("unet", (8, 8, 1), dict(num_groups=3), "num_groups=3"),
        ("unet", (8, 8, 1), dict(num_heads=3), "num_heads=3"),
    ],
)
def test_incompatible_sizes_raise(name, shape, overrides, message):
    with pytest.raises(ValueError, match=message):
        _build(name, shape, **overrides)


def test_unknown_name_and_wrong_input_shape_raise():
    with pytest.raises(ValueError, match="unknown generator"):
        models.build_generator("vit", image_shape=(8, 8, 1), num_classes=2, rngs=nnx.Rngs(0))
    for name in ARCHS:
        model = nnx.eval_shape(lambda: _build(name, (8, 8, 1)))  # noqa: B023
        x, sigma, cond = _inputs((16, 16, 1), batch=1)
        with pytest.raises(ValueError, match="built for images"):
            model(x, sigma, cond)


def test_dit_parameter_count_closed_form():
    shape, sizes = (8, 8, 3), models.SIZES["dit"]["tiny"]
    d, p, f = sizes["hidden_dim"], sizes["patch_size"], sizes["freq_dim"]
    m = int(d * sizes["mlp_ratio"])
    pv = p * p * shape[2]
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
    expected = (
        (pv * d + d)  # patch embedding
        + (f * d + d) + (d * d + d) + (NUM_CLASSES + 1) * d  # σ MLP + class table
        + sizes["depth"] * block
        + (d * 2 * d + 2 * d) + (d * pv + pv)  # final adaLN + output linear
    )
    _, params = models.split_generator(nnx.eval_shape(lambda: _build("dit", shape)))
    assert models.count_params(params) == expected


def test_parameter_summary_total_matches_count(tiny):
    _, _, _, params, _ = tiny
    summary = models.parameter_summary(params)
    total = int(re.search(r"Total: ([\d,]+)", summary).group(1).replace(",", ""))
    assert total == models.count_params(params) == models.count_params(params.to_pure_dict())
    assert "cond_embed/class_table/embedding" in summary
    assert 10_000 <= total <= 50_000  # the "tiny" preset is test-sized


@pytest.mark.parametrize("name", ARCHS)
def test_generators_hold_only_params(name):
    model = nnx.eval_shape(lambda: _build(name))
    assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == []


# ---------------------------------------------------------------- DiT convolutional refinement


def _refined_and_plain(shape=(8, 8, 1), channels=8):
    """Tiny DiT with a ConvRefiner of width ``channels`` and the plain DiT of the same seed."""
    refined = _build("dit", shape, refine_channels=channels)
    plain = _build("dit", shape)
    return models.split_generator(refined), models.split_generator(plain)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dit_refiner_output_shape(shape):
    model = nnx.eval_shape(lambda: _build("dit", shape, refine_channels=8))
    graphdef, params = models.split_generator(model)
    x, sigma, cond = _inputs(shape, batch=2)
    out = jax.eval_shape(models.make_velocity_fn(graphdef), params, x, sigma, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_dit_refiner_is_identity_at_init_and_adds_only_its_parameters():
    (g_ref, p_ref), (g_plain, p_plain) = _refined_and_plain(channels=8)
    ref, plain = p_ref.to_pure_dict(), p_plain.to_pure_dict()
    refiner = ref.pop("refiner")
    # The refiner is built last, so every other parameter is the plain DiT's, value for value.
    jax.tree.map(np.testing.assert_array_equal, ref, plain)
    c, d = 1, models.SIZES["dit"]["tiny"]["hidden_dim"]
    expected = (9 * 2 * c * 8 + 8) + (8 + 8) + (d * 16 + 16) + (9 * 8 * 8 + 8) + (9 * 8 * c + c)
    assert models.count_params(refiner) == expected
    # With the shared parameters perturbed (so the token prediction is not zero), a refiner
    # whose conv_out is still zero leaves the output of the plain DiT unchanged.
    shared = _perturb(plain, 3)
    refiner_perturbed = _perturb(refiner, 4)
    refiner_perturbed["conv_out"] = refiner["conv_out"]
    x, sigma, cond = _inputs((8, 8, 1), batch=3, seed=6)
    v_plain = models.make_velocity_fn(g_plain)(shared, x, sigma, cond)
    v_ref = models.make_velocity_fn(g_ref)(dict(shared, refiner=refiner_perturbed), x, sigma, cond)
    assert float(jnp.abs(v_plain).mean()) > 1e-3
    np.testing.assert_allclose(v_ref, v_plain, rtol=1e-6, atol=1e-6)
    # Once conv_out is non-zero the head changes the output.
    v_on = models.make_velocity_fn(g_ref)(dict(shared, refiner=_perturb(refiner, 4)), x, sigma, cond)
    assert float(jnp.abs(v_on - v_plain).mean()) > 1e-3


def test_dit_refiner_gradients_reach_every_layer():
    (graphdef, params), _ = _refined_and_plain(channels=8)
    params = params.to_pure_dict()
    x, sigma, _ = _inputs((8, 8, 1), batch=3, seed=8)
    cond = jnp.array([0, 3, NULL], dtype=jnp.int32)
    target = jax.random.normal(jax.random.key(9), x.shape)
    velocity = models.make_velocity_fn(graphdef)
    grad = jax.jit(jax.grad(lambda p: jnp.mean((velocity(p, x, sigma, cond) - target) ** 2)))
    # At initialisation the zero conv_out already receives gradient (its input is not zero) ...
    g0 = grad(params)["refiner"]
    assert float(jnp.abs(g0["conv_out"]["kernel"]).max()) > 0.0
    # ... and after moving away from it, every refiner parameter and the token path do.
    g1 = grad(_perturb(params, 5))
    for path, g in jax.tree_util.tree_flatten_with_path(g1["refiner"])[0]:
        assert np.all(np.isfinite(g)), path
        assert float(np.abs(np.asarray(g)).max()) > 0.0, f"dead refiner parameter {path}"
    assert float(jnp.abs(g1["final_linear"]["kernel"]).max()) > 0.0
    assert float(jnp.abs(g1["patch_embed"]["kernel"]).max()) > 0.0


def test_dit_negative_refine_channels_raise():
    with pytest.raises(ValueError, match="refine_channels"):
        nnx.eval_shape(lambda: _build("dit", (8, 8, 1), refine_channels=-1))


def test_dit_input_skip_starts_at_zero_and_adds_gain_times_input():
    skip = _build("dit", (8, 8, 3), input_skip=True)
    plain = _build("dit", (8, 8, 3))
    g_skip, p_skip = models.split_generator(skip)
    g_plain, p_plain = models.split_generator(plain)
    params = p_skip.to_pure_dict()
    gain = params.pop("skip_gain")
    assert gain["kernel"].shape == (models.SIZES["dit"]["tiny"]["hidden_dim"], 3)
    shared = _perturb(p_plain.to_pure_dict(), 11)
    x, sigma, cond = _inputs((8, 8, 3), batch=2, seed=12)
    v_plain = models.make_velocity_fn(g_plain)(shared, x, sigma, cond)
    velocity = models.make_velocity_fn(g_skip)
    # Zero-initialised gain: the plain DiT's output.
    np.testing.assert_allclose(velocity(dict(shared, skip_gain=gain), x, sigma, cond), v_plain,
                               rtol=1e-6, atol=1e-6)
    # Gain fixed to (1, 2, 3) per channel (bias only): output = plain + gain·x, channel by channel.
    fixed = dict(kernel=jnp.zeros_like(gain["kernel"]), bias=jnp.array([1.0, 2.0, 3.0]))
    v = velocity(dict(shared, skip_gain=fixed), x, sigma, cond)
    np.testing.assert_allclose(v - v_plain, x * jnp.array([1.0, 2.0, 3.0]), rtol=1e-5, atol=1e-5)


def test_dit_conv_stem_feeds_patches_and_refiner():
    sizes = dict(refine_channels=8, stem_channels=4, input_skip=True)
    model = _build("dit", (8, 8, 3), **sizes)
    graphdef, params = models.split_generator(model)
    params = params.to_pure_dict()
    p = models.SIZES["dit"]["tiny"]["patch_size"]
    # Tokens are cut from the 4-channel stem output, and the refiner sees v, x and the stem.
    assert params["patch_embed"]["kernel"].shape[0] == p * p * 4
    assert params["refiner"]["conv_in"]["kernel"].shape == (3, 3, 2 * 3 + 4, 8)
    velocity = models.make_velocity_fn(graphdef)
    x, sigma, _ = _inputs((8, 8, 3), batch=2, seed=13)
    cond = jnp.array([1, NULL], dtype=jnp.int32)
    assert np.all(np.asarray(velocity(params, x, sigma, cond)) == 0.0)  # zero at init
    target = jax.random.normal(jax.random.key(14), x.shape)
    grads = jax.grad(lambda q: jnp.mean((velocity(q, x, sigma, cond) - target) ** 2))(
        _perturb(params, 15))
    for path, g in jax.tree_util.tree_flatten_with_path(grads["stem"])[0]:
        assert float(np.abs(np.asarray(g)).max()) > 0.0, f"dead stem parameter {path}"


# ---------------------------------------------------------------- class conditioning


def test_class_table_init_std_is_configurable_and_unet_keeps_0_02():
    wide = embeddings.ConditionEmbedding(64, 40, freq_dim=16, class_init_std=1.0,
                                         rngs=nnx.Rngs(0))
    default = embeddings.ConditionEmbedding(64, 40, freq_dim=16, rngs=nnx.Rngs(0))
    # 41·64 draws: the sample std is within ~3 % of the requested one.
    assert abs(float(np.std(wide.class_table.embedding)) - 1.0) < 0.05
    assert abs(float(np.std(default.class_table.embedding)) - 0.02) < 0.001
    # The σ MLP keeps its N(0, 0.02²) weights whatever the class table's scale.
    np.testing.assert_array_equal(wide.fc1.kernel, default.fc1.kernel)
    # The U-Net does not pass the option: its table keeps the reference scale.
    unet_table = nnx.jit(lambda: _build("unet"))().cond_embed.class_table.embedding
    assert abs(float(np.std(unet_table)) - 0.02) < 0.01
    dit_table = nnx.jit(lambda: _build("dit", class_init_std=0.7))().cond_embed.class_table
    assert abs(float(np.std(dit_table.embedding)) - 0.7) < 0.2


def _class_split_after_adam(class_init_std: float, steps: int) -> float:
    """Relative class dependence ‖v(c=0) - v(c=1)‖ / ‖v(c=0)‖ of a tiny 8×8 DiT after
    ``steps`` Adam steps (lr 1e-2) on a flow-matching batch whose data is +0.5 for class 0 and
    -0.5 for class 1 (so the ideal velocity depends on the class)."""
    model = _build("dit", class_init_std=class_init_std, seed=3)
    graphdef, params = models.split_generator(model)
    velocity = models.make_velocity_fn(graphdef)
    cond = jnp.array([0, 1] * 8, dtype=jnp.int32)
    x0 = jnp.where(cond[:, None, None, None] == 0, 0.5, -0.5) * jnp.ones((16, 8, 8, 1))
    eps = jax.random.normal(jax.random.key(4), x0.shape)
    sigma = jnp.linspace(0.1, 0.9, 16)
    xs = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    opt = optax.adam(1e-2)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: jnp.mean((velocity(q, xs, sigma, cond) - (eps - x0)) ** 2))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        # Same noisy inputs, both labels: only the class differs.
        v0 = velocity(p, xs, sigma, jnp.zeros_like(cond))
        v1 = velocity(p, xs, sigma, jnp.ones_like(cond))
        return jnp.linalg.norm(v0 - v1) / jnp.linalg.norm(v0)

    return float(run(params))


def test_dit_uses_the_class_after_a_few_steps_only_with_a_large_class_table():
    # adaLN-Zero: the output is exactly 0 at init, so it depends on nothing; the class can only
    # enter once the zero-initialised modulations have moved. With the reference table scale
    # (0.02) the class split after three Adam steps is ~25× smaller than with 1.0 (measured
    # 0.036 vs 0.98; after one step both are exactly 0, as no modulation has moved yet).
    split_small = _class_split_after_adam(0.02, steps=3)
    split_large = _class_split_after_adam(1.0, steps=3)
    assert split_large > 0.1, split_large
    assert split_large > 5 * split_small, (split_large, split_small)

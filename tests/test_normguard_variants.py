"""NormGuard variants (batch and σ-binned aggregates, σ ramps and margins, the guided velocity)
and the gradient-norm diagnostic, against closed forms on tiny examples."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from normguard_jax import config_checks, normguard, rl
from normguard_jax.objectives import base
from normguard_jax.objectives.flow_matching import flow_matching_loss

from conftest import load_config_file
from test_normguard import toy_batch, toy_params, toy_velocity

NG = normguard.NormGuardConfig
UNIT = jnp.full((1, 2, 2, 1), 0.5, jnp.float32)          # one sample of L2 norm 1


def scaled(norms):
    """(B, 2, 2, 1) velocities of the given per-sample L2 norms (all along one direction)."""
    return jnp.asarray(norms, jnp.float32)[:, None, None, None] * UNIT


def penalty(v_theta, v_ref, sigma, **kwargs):
    return float(normguard.guard_penalty(v_theta, v_ref, jnp.asarray(sigma, jnp.float32),
                                         NG(weight=1.0, **kwargs))[0])


def _ctx(ref_scale=0.5):
    return base.Context(velocity=toy_velocity, ref_params=toy_params(ref_scale))


# ----------------------------------------------------------------------------------------------
# The default is today's per-sample hinge, bit for bit.
# ----------------------------------------------------------------------------------------------


def _old_with_normguard(objective, weight, margin=0.0, power=1, eps=1e-6):
    """The transform as it was before the variants (relative form, conditional points)."""

    def guarded(params, batch, ctx):
        base_loss, aux = objective(params, batch, ctx)
        pts = aux.points
        v_ref = ctx.velocity(ctx.ref_params, pts.x, pts.sigma, pts.cond)
        n_theta = normguard.per_sample_norm(pts.v_theta)
        n_ref = normguard.per_sample_norm(jax.lax.stop_gradient(v_ref))
        excess = n_theta / jnp.maximum(n_ref, eps) - 1.0 - margin
        mean_penalty = jnp.mean(jnp.where(excess > 0, excess, 0.0) ** power)
        return base_loss + weight * mean_penalty, mean_penalty

    return guarded


@pytest.mark.parametrize("margin, power", [(0.0, 1), (0.1, 2)])
def test_default_config_is_exactly_the_old_loss_and_gradient(margin, power):
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    old = jax.jit(jax.value_and_grad(_old_with_normguard(flow_matching_loss, 0.7, margin, power),
                                     has_aux=True))
    new = jax.jit(jax.value_and_grad(
        normguard.with_normguard(flow_matching_loss, NG(weight=0.7, margin=margin, power=power)),
        has_aux=True))
    (l_old, pen_old), g_old = old(params, batch, ctx)
    (l_new, aux), g_new = new(params, batch, ctx)
    assert float(pen_old) > 0                                   # the hinge is active
    np.testing.assert_array_equal(l_new, l_old)
    np.testing.assert_array_equal(aux.metrics["normguard/penalty"], pen_old)
    jax.tree.map(np.testing.assert_array_equal, g_new, g_old)


def test_config_defaults_are_the_per_sample_hinge():
    cfg = NG()
    assert (cfg.aggregate, cfg.sigma_ramp, cfg.sigma_margin, cfg.log_grad_norms) == (
        "sample", "none", 0.0, False)
    config = load_config_file("rl_nft.py")
    ng = rl.normguard_config(config, null_class=3)
    assert ng == NG(velocity=ng.velocity, guidance_scale=ng.guidance_scale, null_class=3)


# ----------------------------------------------------------------------------------------------
# Batch and σ-binned aggregates.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("power", [1, 2])
def test_batch_aggregate_closed_form_value_and_gradient(form, power):
    t, r = np.array([1.5, 2.2, 1.0]), np.array([1.0, 2.0, 1.0])
    margin = 0.05
    v_theta, v_ref = scaled(t), scaled(r)
    cfg = NG(weight=1.0, form=form, power=power, margin=margin, aggregate="batch")
    if form == "relative":
        excess, d_excess = t.mean() / r.mean() - 1 - margin, 1 / (3 * r.mean())
        per_sample = np.maximum(t / r - 1 - margin, 0) ** power
    else:
        excess, d_excess = t.mean() - r.mean() - margin, 1 / 3
        per_sample = np.maximum(t - r - margin, 0) ** power
    assert excess > 0
    pen, ratio, active = normguard.guard_penalty(v_theta, v_ref, jnp.array([0.1, 0.5, 0.9]), cfg)
    np.testing.assert_allclose(float(pen), excess ** power, rtol=1e-5)
    np.testing.assert_allclose(ratio, t / r, rtol=1e-6)        # logged per sample, as before
    assert bool(active.all())                                  # every point is under the hinge
    # ... and it is not the per-sample penalty.
    assert abs(float(pen) - per_sample.mean()) > 1e-3
    np.testing.assert_allclose(penalty(v_theta, v_ref, [0.1, 0.5, 0.9], form=form, power=power,
                                       margin=margin), per_sample.mean(), rtol=1e-5)
    # d pen / d v_i = power·excess^(power-1) · d excess/d n_i · v_i/‖v_i‖.
    g = jax.grad(lambda v: normguard.guard_penalty(v, v_ref, jnp.zeros(3), cfg)[0])(v_theta)
    expected = (power * excess ** (power - 1) * d_excess / t)[:, None, None, None] * np.asarray(
        v_theta)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)


def test_batch_aggregate_lets_samples_exceed_when_the_mean_does_not():
    t, r = np.array([1.5, 1.6, 0.9]), np.array([1.0, 2.0, 1.0])    # means 4.0/3 vs 4/3
    v_theta, v_ref = scaled(t), scaled(r)
    sigma = jnp.array([0.2, 0.4, 0.6])
    np.testing.assert_allclose(penalty(v_theta, v_ref, sigma), 0.5 / 3, rtol=1e-5)
    cfg = NG(weight=1.0, aggregate="batch")
    pen, _, active = normguard.guard_penalty(v_theta, v_ref, sigma, cfg)
    assert float(pen) == 0.0 and not bool(active.any())
    g = jax.grad(lambda v: normguard.guard_penalty(v, v_ref, sigma, cfg)[0])(v_theta)
    np.testing.assert_array_equal(g, 0.0)


def _random_velocities(seed, b=6):
    k = jax.random.split(jax.random.key(seed), 2)
    v_ref = jax.random.normal(k[0], (b, 3, 3, 2))
    return 1.2 * v_ref + 0.3 * jax.random.normal(k[1], (b, 3, 3, 2)), v_ref


@pytest.mark.parametrize("form, power", [("relative", 1), ("absolute", 2)])
def test_sigma_bins_with_every_point_in_one_bin_is_the_batch_variant(form, power):
    v_theta, v_ref = _random_velocities(0)
    sigma = jnp.array([0.5, 0.55, 0.6, 0.7, 0.74, 0.51])          # all in bin 2 of 4
    kw = dict(weight=1.0, form=form, power=power, margin=0.05)
    binned, batch = NG(aggregate="sigma_bins", sigma_bins=4, **kw), NG(aggregate="batch", **kw)
    f = lambda cfg: jax.value_and_grad(
        lambda v: normguard.guard_penalty(v, v_ref, sigma, cfg)[0])(v_theta)
    (p_bin, g_bin), (p_batch, g_batch) = f(binned), f(batch)
    assert float(p_batch) > 0
    np.testing.assert_allclose(p_bin, p_batch, rtol=1e-6)
    np.testing.assert_allclose(g_bin, g_batch, rtol=1e-5, atol=1e-8)
    # One bin: the batch variant whatever σ.
    np.testing.assert_allclose(penalty(v_theta, v_ref, jnp.linspace(0, 1, 6),
                                       aggregate="sigma_bins", sigma_bins=1, form=form,
                                       power=power, margin=0.05), p_batch, rtol=1e-6)


def test_sigma_bins_ignore_empty_bins_and_average_the_others():
    # Bins of width 1/4: points at σ 0.1, 0.2 (bin 0) and 0.9, 1.0 (bin 3); bins 1, 2 empty.
    t, r = np.array([1.4, 1.0, 1.1, 0.8]), np.array([1.0, 1.0, 1.0, 1.0])
    sigma = jnp.array([0.1, 0.2, 0.9, 1.0])
    hinges = [max(t[:2].mean() / r[:2].mean() - 1, 0), max(t[2:].mean() / r[2:].mean() - 1, 0)]
    assert hinges[0] > 0 and hinges[1] == 0
    cfg = NG(weight=1.0, aggregate="sigma_bins", sigma_bins=4)
    pen, _, active = normguard.guard_penalty(scaled(t), scaled(r), sigma, cfg)
    np.testing.assert_allclose(float(pen), np.mean(hinges), rtol=1e-5)   # over 2 bins, not 4
    np.testing.assert_array_equal(active, [True, True, False, False])
    g = jax.grad(lambda v: normguard.guard_penalty(v, scaled(r), sigma, cfg)[0])(scaled(t))
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(g[2:], 0.0)                  # the inactive bin's points
    # One point per bin is the per-sample hinge.
    s3 = jnp.array([0.1, 0.5, 0.9])
    v_theta, v_ref = scaled([1.3, 0.7, 1.1]), scaled([1.0, 1.0, 1.0])
    np.testing.assert_allclose(penalty(v_theta, v_ref, s3, aggregate="sigma_bins", sigma_bins=3),
                               penalty(v_theta, v_ref, s3), rtol=1e-6)


def test_sigma_bin_edges():
    np.testing.assert_array_equal(
        normguard.sigma_bin(jnp.array([0.0, 0.2499, 0.25, 0.74, 0.75, 0.999, 1.0]), 4),
        [0, 0, 1, 2, 3, 3, 3])


# ----------------------------------------------------------------------------------------------
# σ ramps and margins.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
@pytest.mark.parametrize("aggregate", ["sample", "batch"])
def test_ramp_is_one_at_pure_noise_and_ramp_low_at_data(ramp, aggregate):
    v_theta, v_ref = _random_velocities(1)
    plain = lambda s: penalty(v_theta, v_ref, jnp.full(6, s), aggregate=aggregate)
    ramped = lambda s: penalty(v_theta, v_ref, jnp.full(6, s), aggregate=aggregate,
                               sigma_ramp=ramp, ramp_low=0.3)
    assert plain(1.0) > 0
    np.testing.assert_allclose(ramped(1.0), plain(1.0), rtol=1e-6)
    np.testing.assert_allclose(ramped(0.0), 0.3 * plain(0.0), rtol=1e-6)
    w_half = 0.3 + 0.7 * (0.5 if ramp == "linear" else np.sin(np.pi / 4) ** 2)
    np.testing.assert_allclose(ramped(0.5), w_half * plain(0.5), rtol=1e-6)


def test_per_sample_ramp_weights_each_sample_at_its_sigma():
    t, r = np.array([1.5, 1.2, 1.4]), np.ones(3)
    sigma = np.array([0.0, 0.5, 1.0])
    w = 0.2 + 0.8 * sigma
    np.testing.assert_allclose(
        penalty(scaled(t), scaled(r), sigma, sigma_ramp="linear", ramp_low=0.2),
        np.mean(w * (t / r - 1)), rtol=1e-5)
    np.testing.assert_allclose(normguard.ramp_weight(jnp.array(sigma), NG()), 1.0)


def test_sigma_margin_grows_towards_data():
    v_ref = scaled([1.0, 1.0, 1.0])
    v_theta = scaled([1.15, 1.15, 1.15])
    sigma = jnp.array([1.0, 0.5, 0.0])          # margins 0.05, 0.15, 0.25
    cfg = NG(weight=1.0, margin=0.05, sigma_margin=0.2)
    pen, _, active = normguard.guard_penalty(v_theta, v_ref, sigma, cfg)
    np.testing.assert_array_equal(active, [True, False, False])
    np.testing.assert_allclose(float(pen), 0.1 / 3, rtol=1e-5)
    # At σ = 1 the margin is the plain one.
    np.testing.assert_allclose(penalty(v_theta, v_ref, jnp.ones(3), margin=0.05,
                                       sigma_margin=0.2),
                               penalty(v_theta, v_ref, jnp.ones(3), margin=0.05), rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_margin"):
        normguard.hinge_penalty(v_theta, v_ref, cfg)            # the margin needs σ


VARIANTS = [dict(), dict(aggregate="batch"), dict(aggregate="sigma_bins", sigma_bins=4),
            dict(sigma_ramp="linear", ramp_low=0.5), dict(sigma_ramp="cosine"),
            dict(sigma_margin=0.3), dict(aggregate="sigma_bins", sigma_ramp="linear",
                                         sigma_margin=0.1, power=2, form="absolute")]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_every_variant_has_zero_penalty_and_gradient_when_inactive(kwargs):
    v_ref = jax.random.normal(jax.random.key(3), (6, 3, 3, 2))
    v_theta = jnp.linspace(0.2, 0.95, 6)[:, None, None, None] * v_ref
    sigma = jnp.linspace(0.0, 1.0, 6)
    cfg = NG(weight=1.0, **kwargs)
    f = lambda v: normguard.guard_penalty(v, v_ref, sigma, cfg)[0]
    assert float(f(v_theta)) == 0.0
    np.testing.assert_array_equal(jax.grad(f)(v_theta), 0.0)


@pytest.mark.parametrize("kwargs", VARIANTS[1:])
def test_every_variant_wraps_an_objective_under_jit(kwargs):
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    cfg = NG(weight=0.5, **kwargs)
    wrapped = normguard.with_normguard(flow_matching_loss, cfg)
    grad_fn = jax.value_and_grad(wrapped, has_aux=True)
    (l_eager, aux), g_eager = grad_fn(params, batch, ctx)
    (l_jit, _), g_jit = jax.jit(grad_fn)(params, batch, ctx)
    np.testing.assert_allclose(l_jit, l_eager, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_jit,
                 g_eager)
    base_loss, _ = flow_matching_loss(params, batch, ctx)
    np.testing.assert_allclose(l_eager, base_loss + 0.5 * aux.metrics["normguard/penalty"],
                               rtol=1e-6)
    assert float(aux.metrics["normguard/penalty"]) > 0


def test_guided_velocity_guard_with_a_batch_aggregate():
    """velocity="guided" (the guard under CFG) composes with the variants: the batch hinge is
    taken on the guided velocities ``v_u + w·(v_c - v_u)`` of θ and of the reference."""
    w, null = 2.0, 3
    params, batch, ctx = toy_params(1.0), toy_batch(b=6), _ctx(0.5)
    cfg = NG(weight=1.0, velocity="guided", guidance_scale=w, null_class=null, aggregate="batch")
    loss, aux = normguard.with_normguard(flow_matching_loss, cfg)(params, batch, ctx)
    pts = flow_matching_loss(params, batch, ctx)[1].points

    def guided(p):
        v_c = toy_velocity(p, pts.x, pts.sigma, pts.cond)
        v_u = toy_velocity(p, pts.x, pts.sigma, jnp.full_like(pts.cond, null))
        return np.asarray(v_u + w * (v_c - v_u), np.float64)

    n = lambda v: np.sqrt((v ** 2).reshape(len(v), -1).sum(1))
    expected = max(n(guided(params)).mean() / n(guided(ctx.ref_params)).mean() - 1, 0)
    assert expected > 0
    np.testing.assert_allclose(float(aux.metrics["normguard/penalty"]), expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    ({"aggregate": "mean"}, "aggregate"), ({"sigma_bins": 0}, "sigma_bins"),
    ({"sigma_bins": 2.5}, "sigma_bins"), ({"sigma_bins": True}, "sigma_bins"),
    ({"sigma_ramp": "exp"}, "sigma_ramp"), ({"ramp_low": 1.5}, "ramp_low"),
    ({"ramp_low": -0.1}, "ramp_low"), ({"ramp_low": "0.5"}, "ramp_low"),
    ({"sigma_margin": -1.0}, "sigma_margin"), ({"sigma_margin": float("inf")}, "sigma_margin"),
    ({"log_grad_norms": "yes"}, "log_grad_norms")])
def test_invalid_variant_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"normguard.{field}"):
        NG(**kwargs)


def test_rl_validate_names_an_invalid_variant_field():
    config = load_config_file("rl_nft.py")
    config.normguard.aggregate = "median"
    with pytest.raises(config_checks.ConfigError, match=r"^config\.normguard\.aggregate must"):
        rl.validate(config, num_devices=1)


def test_a_run_recorded_before_the_variants_resumes_with_the_defaults():
    config = load_config_file("rl_nft.py")
    recorded = config.to_dict()
    for name in ("aggregate", "sigma_bins", "sigma_ramp", "ramp_low", "sigma_margin",
                 "log_grad_norms"):
        del recorded["normguard"][name]
    assert config_checks.changed_fields(recorded, config) == {}
    config.normguard.aggregate = "batch"
    assert config_checks.changed_fields(recorded, config) == {
        "normguard.aggregate": ["(absent)", "batch"]}
    assert "normguard.log_grad_norms" in config_checks.RESUME_ALLOWED


# ----------------------------------------------------------------------------------------------
# Gradient norms of the base loss and of the penalty (λ calibration).
# ----------------------------------------------------------------------------------------------


def _separate_grads(params, batch, ctx, cfg):
    """∇ base_loss and ∇ penalty, each from its own jax.grad."""
    g_base = jax.grad(lambda p: flow_matching_loss(p, batch, ctx)[0])(params)

    def pen(p):
        pts = flow_matching_loss(p, batch, ctx)[1].points
        v_ref = toy_velocity(ctx.ref_params, pts.x, pts.sigma, pts.cond)
        return normguard.guard_penalty(pts.v_theta, v_ref, pts.sigma, cfg)[0]

    return g_base, jax.grad(pen)(params)


@pytest.mark.parametrize("weight", [0.0, 0.4])
@pytest.mark.parametrize("aggregate", ["sample", "batch"])
def test_grad_norms_are_those_of_the_separate_gradients(weight, aggregate):
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    cfg = NG(weight=weight, aggregate=aggregate, log_grad_norms=True)
    terms = normguard.guard_terms(flow_matching_loss, cfg)
    m = jax.jit(lambda p: normguard.grad_norm_metrics(lambda q: terms(q, batch, ctx), p, cfg))(
        params)
    g_base, g_pen = _separate_grads(params, batch, ctx, cfg)
    norm = lambda t: float(optax.global_norm(t))
    np.testing.assert_allclose(m["normguard/grad_norm_base"], norm(g_base), rtol=1e-5)
    np.testing.assert_allclose(m["normguard/grad_norm_penalty_unweighted"], norm(g_pen),
                               rtol=1e-5)
    assert norm(g_pen) > 0
    np.testing.assert_allclose(m["normguard/grad_norm_penalty"], weight * norm(g_pen),
                               rtol=1e-5)
    np.testing.assert_allclose(m["normguard/grad_norm_ratio"],
                               weight * norm(g_pen) / norm(g_base), rtol=1e-5)
    if weight == 0:
        assert float(m["normguard/grad_norm_penalty"]) == 0.0
        assert float(m["normguard/grad_norm_ratio"]) == 0.0


def test_rl_update_logs_grad_norms_only_when_asked_and_updates_the_same():
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    optimizer = optax.sgd(0.1)
    cfg = NG(weight=0.3, log_grad_norms=True)
    objective = normguard.with_normguard(flow_matching_loss, cfg)
    step = functools.partial(rl.update, objective=objective, optimizer=optimizer,
                             velocity=toy_velocity)
    args = (params, optimizer.init(params), None, ctx.ref_params, batch, jnp.array(True))
    p0, _, m0 = jax.jit(step)(*args)
    p1, _, m1 = jax.jit(functools.partial(
        step, guard_terms=normguard.guard_terms(flow_matching_loss, cfg), guard_config=cfg))(*args)
    assert not any(k.startswith("normguard/grad_norm") for k in m0)
    jax.tree.map(np.testing.assert_array_equal, p1, p0)
    g_base, g_pen = _separate_grads(params, batch, ctx, cfg)
    np.testing.assert_allclose(m1["normguard/grad_norm_base"], optax.global_norm(g_base),
                               rtol=1e-5)
    np.testing.assert_allclose(m1["normguard/grad_norm_penalty"],
                               0.3 * optax.global_norm(g_pen), rtol=1e-5)


def test_lambda_for_fraction_gives_the_stated_gradient_fraction():
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    measure = lambda cfg: normguard.grad_norm_metrics(
        lambda q: normguard.guard_terms(flow_matching_loss, cfg)(q, batch, ctx), params, cfg)
    m = measure(NG(weight=0.0))                                 # measured unguarded
    lam = normguard.lambda_for_fraction(0.25, m["normguard/grad_norm_base"],
                                        m["normguard/grad_norm_penalty_unweighted"])
    assert lam > 0
    np.testing.assert_allclose(measure(NG(weight=lam))["normguard/grad_norm_ratio"], 0.25,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="never active"):
        normguard.lambda_for_fraction(0.25, 1.0, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        normguard.lambda_for_fraction(-1.0, 1.0, 1.0)


def test_rl_config_log_grad_norms_reaches_the_guard():
    config = load_config_file("rl_nft.py")
    assert config.normguard.log_grad_norms is False
    config.normguard.update(ml_collections.ConfigDict({"log_grad_norms": True,
                                                       "aggregate": "sigma_bins"}))
    ng = rl.normguard_config(config, null_class=3)
    assert ng.log_grad_norms and ng.aggregate == "sigma_bins" and ng.sigma_bins == 4

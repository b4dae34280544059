"""NormGuard: hinge values, gradients, the λ = 0 identity, v_ref reuse, and sharded agreement."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from normguard_jax import normguard
from normguard_jax.objectives import base
from normguard_jax.objectives.flow_matching import flow_matching_loss

NG = normguard.NormGuardConfig


def _rand(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def toy_velocity(params, x, sigma, cond):
    """A linear 'generator': v = a·x + b·σ + c[cond] (per-channel), enough to have gradients."""
    return (params["a"] * x + params["b"] * sigma[:, None, None, None]
            + params["c"][cond][:, None, None, :])


def toy_params(scale=1.0):
    return {"a": jnp.float32(scale), "b": jnp.float32(0.3 * scale),
            "c": scale * jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 10}


def toy_batch(b=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"x0": jax.random.uniform(k[0], (b, 4, 4, 3), minval=-1, maxval=1),
            "noise": jax.random.normal(k[1], (b, 4, 4, 3)),
            "sigma": jax.random.uniform(k[2], (b,)),
            "cond": jnp.arange(b, dtype=jnp.int32) % 4}


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("power", [1, 2])
def test_inactive_when_not_above_reference(form, power):
    v_ref = _rand((8, 4, 4, 3), 0)
    scales = jnp.linspace(0.1, 1.0, 8)[:, None, None, None]  # ‖v_θ‖ ≤ ‖v_ref‖ sample-wise
    v_theta = scales * v_ref
    cfg = NG(weight=1.0, form=form, power=power)
    pen, ratio, active = normguard.hinge_penalty(v_theta, v_ref, cfg)
    np.testing.assert_array_equal(pen, 0.0)
    assert not bool(active.any())
    np.testing.assert_allclose(ratio, scales.ravel(), rtol=1e-6)
    grad = jax.grad(lambda v: jnp.mean(normguard.hinge_penalty(v, v_ref, cfg)[0]))(v_theta)
    np.testing.assert_array_equal(grad, 0.0)


def test_zero_velocity_has_zero_not_nan_gradient():
    v_ref = _rand((2, 3, 3, 1), 1)
    grad = jax.grad(lambda v: jnp.sum(normguard.hinge_penalty(v, v_ref, NG(weight=1.0))[0]))(
        jnp.zeros_like(v_ref))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("power", [1, 2])
def test_active_value_and_gradient_closed_form(form, power):
    v_ref = _rand((4, 4, 4, 3), 2)
    v_theta = 1.3 * v_ref + 0.05 * _rand((4, 4, 4, 3), 3)
    margin = 0.1
    cfg = NG(weight=1.0, form=form, power=power, margin=margin)
    n = np.sqrt(np.sum(np.asarray(v_theta, np.float64) ** 2, axis=(1, 2, 3)))
    r = np.sqrt(np.sum(np.asarray(v_ref, np.float64) ** 2, axis=(1, 2, 3)))
    if form == "relative":
        excess, dexcess_dn = n / r - 1 - margin, 1 / r
    else:
        excess, dexcess_dn = n - r - margin, np.ones_like(r)
    assert (excess > 0).all()
    pen, _, active = normguard.hinge_penalty(v_theta, v_ref, cfg)
    np.testing.assert_allclose(pen, excess ** power, rtol=1e-5)
    assert bool(active.all())
    # d pen_i / d v_i = power·excess^(power-1) · dexcess/d‖v‖ · v/‖v‖ ; v_ref receives none.
    g_theta, g_ref = jax.grad(lambda v, w: jnp.sum(normguard.hinge_penalty(v, w, cfg)[0]),
                              argnums=(0, 1))(v_theta, v_ref)
    coef = power * excess ** (power - 1) * dexcess_dn / n
    expected = coef[:, None, None, None] * np.asarray(v_theta, np.float64)
    np.testing.assert_allclose(g_theta, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(g_ref, 0.0)


def test_gradient_matches_finite_differences():
    v_ref = _rand((2, 2, 2, 1), 4)
    v_theta = 1.2 * v_ref
    cfg = NG(weight=1.0, power=2)
    f = lambda v: jnp.sum(normguard.hinge_penalty(v, v_ref, cfg)[0])
    g = np.asarray(jax.grad(f)(v_theta))
    v64 = np.asarray(v_theta, np.float64)
    h = 1e-3
    for idx in [(0, 0, 0, 0), (0, 1, 1, 0), (1, 0, 1, 0)]:
        e = np.zeros_like(v64)
        e[idx] = h
        fd = (float(f(jnp.asarray(v64 + e, jnp.float32))) - float(f(jnp.asarray(v64 - e, jnp.float32)))) / (2 * h)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=1e-4)


def test_margin_delays_activation():
    v_ref = _rand((3, 2, 2, 1), 5)
    v_theta = jnp.array([1.05, 1.15, 1.25])[:, None, None, None] * v_ref
    _, _, active = normguard.hinge_penalty(v_theta, v_ref, NG(weight=1.0, margin=0.1))
    np.testing.assert_array_equal(active, [False, True, True])


def _ctx(ref_scale=0.5):
    return base.Context(velocity=toy_velocity, ref_params=toy_params(ref_scale))


def test_weight_zero_is_exactly_the_base_objective():
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)   # ratio > 1: hinge would be active
    wrapped = normguard.with_normguard(flow_matching_loss, NG(weight=0.0))
    (l0, _), g0 = jax.value_and_grad(flow_matching_loss, has_aux=True)(params, batch, ctx)
    (l1, aux1), g1 = jax.value_and_grad(wrapped, has_aux=True)(params, batch, ctx)
    assert float(l0) == float(l1)
    jax.tree.map(np.testing.assert_array_equal, g0, g1)
    assert float(aux1.metrics["normguard/active_frac"]) > 0.5      # still measured and logged
    assert float(aux1.metrics["normguard/ratio"]) > 1.0


def test_wrapped_loss_adds_weighted_mean_penalty_and_its_gradient():
    params, batch, ctx = toy_params(1.0), toy_batch(), _ctx(0.5)
    cfg = NG(weight=0.7)
    wrapped = normguard.with_normguard(flow_matching_loss, cfg)

    def by_hand(p):
        base_loss, aux = flow_matching_loss(p, batch, ctx)
        pts = aux.points
        v_ref = toy_velocity(ctx.ref_params, pts.x, pts.sigma, pts.cond)
        n_t = jnp.sqrt(jnp.sum(pts.v_theta ** 2, axis=(1, 2, 3)))
        n_r = jnp.sqrt(jnp.sum(v_ref ** 2, axis=(1, 2, 3)))
        return base_loss + 0.7 * jnp.mean(jnp.maximum(n_t / n_r - 1, 0))

    (l1, aux), g1 = jax.value_and_grad(wrapped, has_aux=True)(params, batch, ctx)
    l2, g2 = jax.value_and_grad(by_hand)(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    np.testing.assert_allclose(aux.metrics["loss/total"], l1, rtol=1e-6)
    assert float(aux.metrics["loss/total"]) > float(aux.metrics["loss/base"])


def test_reference_reused_when_objective_computed_it():
    calls = {"ref": 0}

    def counting_velocity(params, x, sigma, cond):
        calls["ref"] += 1
        return toy_velocity(params, x, sigma, cond)

    def objective_with_ref(params, batch, ctx):
        loss, aux = flow_matching_loss(params, batch, ctx)
        v_ref = jax.lax.stop_gradient(2.0 * aux.points.v_theta)  # stands for a reused v_ref
        return loss, aux._replace(points=aux.points._replace(v_ref=v_ref))

    ctx = base.Context(velocity=counting_velocity, ref_params=toy_params(0.5))
    wrapped = normguard.with_normguard(objective_with_ref, NG(weight=1.0))
    _, aux = wrapped(toy_params(), toy_batch(), ctx)
    assert calls["ref"] == 1            # only the policy evaluation, no second reference pass
    np.testing.assert_allclose(aux.metrics["normguard/ratio"], 0.5, rtol=1e-5)
    calls["ref"] = 0
    normguard.with_normguard(flow_matching_loss, NG(weight=1.0))(toy_params(), toy_batch(), ctx)
    assert calls["ref"] == 2            # policy + one reference evaluation


def test_non_velocity_local_objective_is_refused():
    def not_local(params, batch, ctx):
        return jnp.float32(0.0), base.Aux(metrics={}, points=None)
    with pytest.raises(ValueError, match="velocity-local"):
        normguard.with_normguard(not_local, NG(weight=1.0))(toy_params(), toy_batch(), _ctx())


@pytest.mark.parametrize("kwargs, field", [
    ({"weight": -0.1}, "weight"), ({"form": "cosine"}, "form"), ({"power": 3}, "power"),
    ({"margin": -1.0}, "margin"), ({"weight": float("nan")}, "weight")])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"normguard.{field}"):
        NG(**kwargs)


def test_jit_vmap_and_eight_device_sharding_agree():
    assert jax.device_count() == 8
    params, batch, ctx = toy_params(1.0), toy_batch(b=16), _ctx(0.5)
    wrapped = normguard.with_normguard(flow_matching_loss, NG(weight=0.5, power=2))
    grad_fn = jax.value_and_grad(wrapped, has_aux=True)
    (l_eager, _), g_eager = grad_fn(params, batch, ctx)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    (l_sh, aux), g_sh = jax.jit(grad_fn)(params, sharded, ctx)
    np.testing.assert_allclose(l_sh, l_eager, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_sh, g_eager)

    # shard_map: each device computes its per-example loss; the global loss is the device mean,
    # and differentiating through the shard_map gives the global gradient.
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    def global_loss(p, b):
        return jax.lax.pmean(wrapped(p, b, ctx)[0], "data")

    l_sm, g_sm = jax.jit(jax.value_and_grad(global_loss))(params, sharded)
    np.testing.assert_allclose(l_sm, l_eager, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_sm, g_eager)

    # vmap over a stack of independent velocity sets gives per-set penalties.
    v = _rand((5, 2, 3, 3, 1), 7)
    pens = jax.vmap(lambda a, b: normguard.hinge_penalty(a, b, NG(weight=1.0))[0])(1.5 * v, v)
    np.testing.assert_allclose(pens, 0.5, rtol=1e-5)

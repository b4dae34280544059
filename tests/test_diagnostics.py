"""Velocity-norm ratios: closed forms on linear models and an independent step-by-step path."""

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import diagnostics, flow

SHAPE = (4, 4, 2)
NULL = 3


def linear_velocity(params, x, sigma, cond):
    """v = a·x + b·σ·onehot-ish(cond): linear in x, class-dependent unless b = 0."""
    shift = params["b"] * sigma[:, None, None, None] * (cond[:, None, None, None] + 1.0)
    return params["a"] * x + shift


def _ratios(params, ref, labels, guidance=1.5, steps=5):
    return diagnostics.velocity_norm_ratios(
        linear_velocity, params, ref, labels, jax.random.key(3), image_shape=SHAPE,
        num_steps=steps, shift=3.0, guidance_scale=guidance, null_class=NULL)


def test_identical_models_give_ratio_one():
    params = {"a": jnp.float32(-0.7), "b": jnp.float32(0.4)}
    r = _ratios(params, params, jnp.array([0, 1, 2, 1], jnp.int32))
    assert r.shape == (5, 4)
    np.testing.assert_allclose(np.asarray(r), 1.0, rtol=1e-6)


def test_scaled_linear_model_gives_the_scale_at_every_step():
    # v_θ = a·x, v_ref = c·x on the same state: ρ = |a| / |c| whatever the state and guidance.
    labels = jnp.array([0, 2, 1], jnp.int32)
    for guidance in (1.0, 2.5):
        r = _ratios({"a": jnp.float32(-1.3), "b": jnp.float32(0.0)},
                    {"a": jnp.float32(0.5), "b": jnp.float32(0.0)}, labels, guidance)
        np.testing.assert_allclose(np.asarray(r), 1.3 / 0.5, rtol=1e-5)


def test_ratios_match_an_independent_euler_loop():
    theta = {"a": jnp.float32(-0.9), "b": jnp.float32(0.3)}
    ref = {"a": jnp.float32(-0.8), "b": jnp.float32(0.1)}
    labels = jnp.array([0, 1, 2, 0], jnp.int32)
    w, steps = 2.0, 4
    got = np.asarray(_ratios(theta, ref, labels, w, steps))

    def guided(p, x, s):
        sig = jnp.full((x.shape[0],), s)
        vc = linear_velocity(p, x, sig, labels)
        vu = linear_velocity(p, x, sig, jnp.full_like(labels, NULL))
        return vu + w * (vc - vu)

    sigmas = flow.inference_sigmas(steps, 3.0)
    x = jax.random.normal(jax.random.fold_in(jax.random.key(3), 0), (4, *SHAPE), jnp.float32)
    expected = []
    for k in range(steps):
        v, v_ref = guided(theta, x, sigmas[k]), guided(ref, x, sigmas[k])
        expected.append(np.linalg.norm(np.asarray(v).reshape(4, -1), axis=1)
                        / np.linalg.norm(np.asarray(v_ref).reshape(4, -1), axis=1))
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5)
    assert not np.allclose(got, got[0]), "the ratio should vary along this trajectory"

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


def sum_reward(images, labels):
    return jnp.sum(images, axis=(1, 2, 3))


def tanh_velocity(params, x, sigma, cond):
    return jnp.tanh(params["a"] * x + params["b"] * sigma[:, None, None, None]
                    * (cond[:, None, None, None] + 1.0))


def square_reward(images, labels):
    return -jnp.mean(jnp.square(images - 0.3), axis=(1, 2, 3))


def test_adjoint_sensitivity_of_a_linear_model_is_closed_form():
    # v = a·x: x_T = Π_k (1 + Δ_k (1 + ε_k) a) x_0, so with R = Σ x_T,
    # dR/dε_k = R · Δ_k a / (1 + Δ_k a) at ε = 0.
    a, steps = -0.8, 6
    params = {"a": jnp.float32(a), "b": jnp.float32(0.0)}
    labels = jnp.array([0, 1, 2], jnp.int32)
    g = diagnostics.adjoint_sensitivity(
        linear_velocity, params, labels, jax.random.key(5), reward_fn=sum_reward,
        image_shape=SHAPE, num_steps=steps, shift=3.0, guidance_scale=1.0, null_class=NULL)
    sigmas = np.asarray(flow.inference_sigmas(steps, 3.0), np.float64)
    x0 = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(5), 0), (3, *SHAPE)),
                    np.float64)
    deltas = np.diff(sigmas)
    r = x0.sum(axis=(1, 2, 3)) * np.prod(1 + deltas * a)
    expected = (deltas * a / (1 + deltas * a))[:, None] * r[None, :]
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-4, atol=1e-5)


def test_adjoint_sensitivity_matches_finite_differences_and_the_plain_sampler():
    params = {"a": jnp.float32(1.1), "b": jnp.float32(0.5)}
    labels = jnp.array([0, 2], jnp.int32)
    steps, key, w = 4, jax.random.key(8), 1.5
    kw = dict(image_shape=SHAPE, num_steps=steps, shift=3.0, guidance_scale=w, null_class=NULL)
    g = np.asarray(diagnostics.adjoint_sensitivity(tanh_velocity, params, labels, key,
                                                   reward_fn=square_reward, **kw))
    from normguard_jax import sampling
    vfn = sampling.conditional_velocity_fn(tanh_velocity, params, labels, guidance_scale=w,
                                           null_class=NULL)
    sigmas = jnp.asarray(flow.inference_sigmas(steps, 3.0))
    x = sampling.initial_noise(jax.random.fold_in(key, 0), 2, SHAPE)
    plain = sampling.generate_images(tanh_velocity, params, labels, key, num_steps=steps,
                                     shift=3.0, guidance_scale=w, null_class=NULL,
                                     image_shape=SHAPE)
    zero = diagnostics.scaled_velocity_sample(vfn, x, sigmas, jnp.zeros((steps, 2)))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), rtol=1e-5, atol=1e-6)
    h = 1e-2
    for k in range(steps):
        for b in range(2):
            e = np.zeros((steps, 2), np.float32)
            e[k, b] = h
            up = square_reward(diagnostics.scaled_velocity_sample(vfn, x, sigmas, e), labels)
            down = square_reward(diagnostics.scaled_velocity_sample(vfn, x, sigmas, -e), labels)
            fd = (float(up[b]) - float(down[b])) / (2 * h)
            assert abs(g[k, b] - fd) < 2e-3 + 2e-2 * abs(fd), (k, b, g[k, b], fd)


def test_sensitivity_summary_by_hand():
    g = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    s = diagnostics.sensitivity_summary(g)
    np.testing.assert_allclose(s["mean"], [2.0, -1 / 3, 2.0])
    np.testing.assert_allclose(s["std"], [1.0, np.std([-1, 0, 0], ddof=1), 0.0])
    np.testing.assert_allclose(s["t_stat"][0], 2.0 * np.sqrt(3))
    assert s["t_stat"][2] == 0.0
    np.testing.assert_allclose(s["frac_positive"], [1.0, 0.0, 1.0])


def test_renormalised_generation_of_a_rescaled_model_equals_the_reference():
    # θ's velocity is 3× the reference's, same direction: rescaling to ‖v_ref‖ recovers θ_ref.
    from normguard_jax import sampling
    ref = {"a": jnp.float32(-0.6), "b": jnp.float32(0.2)}
    theta = jax.tree.map(lambda p: 3.0 * p, ref)
    labels = jnp.array([0, 1, 2, 0], jnp.int32)
    kw = dict(image_shape=SHAPE, num_steps=5, shift=3.0, guidance_scale=2.0, null_class=NULL)
    want = sampling.generate_images(linear_velocity, ref, labels, jax.random.key(1), **kw)
    got = sampling.generate_images(linear_velocity, theta, labels, jax.random.key(1),
                                   renormalize_to=ref, **kw)
    plain = sampling.generate_images(linear_velocity, theta, labels, jax.random.key(1), **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(plain), np.asarray(want), atol=1e-3)

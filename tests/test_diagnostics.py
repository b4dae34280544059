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


# Batch-level signal: the global derivative, renormalisation's first-order prediction, and the
# measured change.

def _first_order(theta, ref, labels, key, reward_fn, velocity=linear_velocity, steps=5, w=1.0):
    return diagnostics.renormalisation_first_order(
        velocity, theta, ref, labels, key, reward_fn=reward_fn, image_shape=SHAPE,
        num_steps=steps, shift=3.0, guidance_scale=w, null_class=NULL)


def test_global_derivative_and_renormalisation_of_a_rescaled_linear_model_are_closed_form():
    # v_θ = a·x, v_ref = c·x (same sign): x_T = Π_k (1 + Δ_k (1 + ε_k) a) x_0 and ρ = a/c at every
    # state, so ε = c/a − 1 exactly, and renormalised sampling is sampling v_ref.
    # With R = −mean((x_T − 0.3)²):  g_k = −2·mean((x_T − 0.3)·x_T) · Δ_k a / (1 + Δ_k a).
    a, c, steps = -0.8, -0.6, 5
    theta = {"a": jnp.float32(a), "b": jnp.float32(0.0)}
    ref = {"a": jnp.float32(c), "b": jnp.float32(0.0)}
    labels = jnp.array([0, 1, 2], jnp.int32)
    key = jax.random.key(5)
    out = {k: np.asarray(v, np.float64)
           for k, v in _first_order(theta, ref, labels, key, square_reward, steps=steps).items()}

    sigmas = np.asarray(flow.inference_sigmas(steps, 3.0), np.float64)
    deltas = np.diff(sigmas)
    x0 = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (3, *SHAPE)), np.float64)
    x_t = np.prod(1 + deltas * a) * x0
    x_ref = np.prod(1 + deltas * c) * x0

    def reward(x):
        return -np.mean((x - 0.3) ** 2, axis=(1, 2, 3))

    slope = -2 * np.mean((x_t - 0.3) * x_t, axis=(1, 2, 3))
    g = (deltas * a / (1 + deltas * a))[:, None] * slope[None, :]
    eps = c / a - 1
    np.testing.assert_allclose(out["reward"], reward(x_t), rtol=1e-5)
    np.testing.assert_allclose(out["g"], g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["global_derivative"], g.sum(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["eps"], eps, rtol=1e-5)
    np.testing.assert_allclose(out["predicted"], eps * g.sum(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["measured"], reward(x_ref) - reward(x_t), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(out["renormalised"], out["measured"], rtol=1e-4, atol=1e-6)


def test_linear_reward_gives_the_global_derivative_in_closed_form():
    # R = Σ x_T on v = a·x: G = R · Σ_k Δ_k a / (1 + Δ_k a); θ = θ_ref gives no renormalisation.
    a, steps = 1.2, 4
    params = {"a": jnp.float32(a), "b": jnp.float32(0.0)}
    labels = jnp.array([0, 2], jnp.int32)
    out = _first_order(params, params, labels, jax.random.key(2), sum_reward, steps=steps)
    deltas = np.diff(np.asarray(flow.inference_sigmas(steps, 3.0), np.float64))
    r = np.asarray(out["reward"], np.float64)
    np.testing.assert_allclose(np.asarray(out["global_derivative"]),
                               r * np.sum(deltas * a / (1 + deltas * a)), rtol=1e-4)
    for name in ("eps", "predicted", "measured", "renormalised"):
        np.testing.assert_allclose(np.asarray(out[name]), 0.0, atol=1e-5)


def test_first_order_prediction_error_is_second_order_in_the_perturbation():
    # A nonlinear velocity and reward: along ε = δ·u the error of R(δ) − R(0) ≈ δ Σ_k g_k u_k
    # shrinks like δ², and the prediction's relative error like δ.
    params = {"a": jnp.float32(1.1), "b": jnp.float32(0.5)}
    labels = jnp.array([0, 2, 1], jnp.int32)
    steps, key, w = 4, jax.random.key(8), 1.5
    from normguard_jax import sampling
    g = np.asarray(diagnostics.adjoint_sensitivity(
        tanh_velocity, params, labels, key, reward_fn=square_reward, image_shape=SHAPE,
        num_steps=steps, shift=3.0, guidance_scale=w, null_class=NULL), np.float64)
    vfn = sampling.conditional_velocity_fn(tanh_velocity, params, labels, guidance_scale=w,
                                           null_class=NULL)
    sigmas = jnp.asarray(flow.inference_sigmas(steps, 3.0))
    x = sampling.initial_noise(jax.random.fold_in(key, 0), 3, SHAPE)
    u = np.asarray(jax.random.normal(jax.random.key(1), (steps, 3)), np.float64)
    base = np.asarray(square_reward(diagnostics.scaled_velocity_sample(
        vfn, x, sigmas, jnp.zeros((steps, 3))), labels), np.float64)
    ratios = []
    for delta in (0.2, 0.1, 0.05, 0.025):
        moved = np.asarray(square_reward(diagnostics.scaled_velocity_sample(
            vfn, x, sigmas, jnp.asarray(delta * u, jnp.float32)), labels), np.float64)
        err = np.abs(moved - base - delta * np.sum(g * u, axis=0))
        ratios.append(err / delta ** 2)
    ratios = np.stack(ratios)
    assert np.all(ratios[-1] > 0) and np.all(ratios < 10 * ratios[0] + 1e-3), ratios
    # The ratio converges (to half the second derivative): the last two agree within 25 %.
    np.testing.assert_allclose(ratios[-1], ratios[-2], rtol=0.25)


def test_renormalisation_prediction_converges_as_the_policy_approaches_the_reference():
    # θ_δ = θ_ref with its slope scaled by (1 + δ): ε = 1/ρ − 1 = O(δ), and the prediction, the
    # fixed-scale measurement and the renormalised sampler agree up to O(δ²).
    ref = {"a": jnp.float32(1.1), "b": jnp.float32(0.5)}
    labels = jnp.array([0, 2, 1, 0], jnp.int32)
    errors, gaps = [], []
    for delta in (0.08, 0.04, 0.02):
        theta = {"a": ref["a"] * (1 + delta), "b": ref["b"]}
        out = {k: np.asarray(v, np.float64) for k, v in _first_order(
            theta, ref, labels, jax.random.key(4), square_reward, velocity=tanh_velocity,
            steps=4, w=1.5).items()}
        assert 0.2 * delta < np.mean(np.abs(out["eps"])) and np.max(np.abs(out["eps"])) < delta
        assert np.all(np.abs(out["measured"]) > 1e-5), out["measured"]
        errors.append(np.abs(out["measured"] - out["predicted"]) / delta ** 2)
        gaps.append(np.abs(out["renormalised"] - out["measured"]) / delta ** 2)
    errors, gaps = np.stack(errors), np.stack(gaps)
    assert np.all(errors[1:] < 2 * errors[0] + 1e-3), errors
    assert np.all(gaps[1:] < 2 * gaps[0] + 1e-3), gaps


def test_scaling_by_the_ratio_on_the_renormalised_trajectory_is_the_renormalised_sampler():
    # Exactly: the library's renormalised sampler is Euler sampling with ε_k = 1/ρ_k − 1 where ρ_k
    # is read on its own states.
    from normguard_jax import normguard, sampling
    theta = {"a": jnp.float32(1.3), "b": jnp.float32(0.2)}
    ref = {"a": jnp.float32(0.9), "b": jnp.float32(0.6)}
    labels = jnp.array([0, 1, 2], jnp.int32)
    steps, key, w = 5, jax.random.key(6), 1.5
    kw = dict(image_shape=SHAPE, num_steps=steps, shift=3.0, guidance_scale=w, null_class=NULL)
    want = sampling.generate_images(tanh_velocity, theta, labels, key, renormalize_to=ref, **kw)
    vfn = sampling.conditional_velocity_fn(tanh_velocity, theta, labels, guidance_scale=w,
                                           null_class=NULL)
    ref_fn = sampling.conditional_velocity_fn(tanh_velocity, ref, labels, guidance_scale=w,
                                              null_class=NULL)
    sigmas = jnp.asarray(flow.inference_sigmas(steps, 3.0))
    x = sampling.initial_noise(jax.random.fold_in(key, 0), 3, SHAPE)
    traj = sampling.sample(vfn, x, sigmas, jax.random.fold_in(key, 1), method="ode",
                           ref_velocity_fn=ref_fn, renormalize=True)
    rho = []
    for k in range(steps):
        s = jnp.full((3,), sigmas[k])
        rho.append(normguard.per_sample_norm(vfn(traj.states[k], s))
                   / normguard.per_sample_norm(ref_fn(traj.states[k], s)))
    eps = 1.0 / jnp.stack(rho) - 1.0
    got = diagnostics.scaled_velocity_sample(vfn, x, sigmas, eps)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(eps), 0.0, atol=1e-2)


def test_batch_level_summary_by_hand():
    v = np.array([[1.0, 3.0], [-1.0, -1.0], [2.0, 4.0]])
    s = diagnostics.batch_level_summary(v)
    means = np.array([2.0, -1.0, 3.0])
    np.testing.assert_allclose(s["batch_means"], means)
    np.testing.assert_allclose(s["mean"], 4 / 3)
    np.testing.assert_allclose(s["std_over_batches"], np.sqrt(78 / 9 / 2))
    np.testing.assert_allclose(s["t_stat"], (4 / 3) / (np.sqrt(78 / 9 / 2) / np.sqrt(3)))
    assert s["sign"] == 1.0
    np.testing.assert_allclose(s["frac_batches_with_sign"], 2 / 3)
    np.testing.assert_allclose(s["frac_samples_with_sign"], 4 / 6)
    # A negative grand mean counts the negative signs; one batch has no spread.
    s = diagnostics.batch_level_summary(-v)
    assert s["sign"] == -1.0 and s["t_stat"] < 0
    np.testing.assert_allclose(s["frac_samples_with_sign"], 4 / 6)
    one = diagnostics.batch_level_summary(np.array([[1.0, -3.0, -1.0]]))
    assert one["std_over_batches"] == 0.0 and one["t_stat"] == 0.0 and one["sign"] == -1.0
    np.testing.assert_allclose(one["frac_samples_with_sign"], 2 / 3)
    zero = diagnostics.batch_level_summary(np.zeros((2, 3)))
    assert zero["sign"] == 0.0 and zero["frac_samples_with_sign"] == 0.0


def test_first_order_agreement_by_hand():
    a = diagnostics.first_order_agreement([1.0, 2.0, -1.0], [2.0, 4.0, -2.0])
    np.testing.assert_allclose(a["slope"], 2.0)
    np.testing.assert_allclose(a["correlation"], 1.0)
    assert a["sign_agreement"] == 1.0
    np.testing.assert_allclose(a["rel_error_of_mean"], (4 / 3 - 2 / 3) / (4 / 3))
    b = diagnostics.first_order_agreement(np.zeros(3), [1.0, -1.0, 0.5])
    assert b["slope"] == 0.0 and b["correlation"] == 0.0

"""Adjoint Matching (normguard_jax/objectives/am.py): the lean adjoint, the closed-form tilt of
Gaussian data, NormGuard around it, and the config checks.

(a) The lean adjoint equals the true adjoint (``jax.grad`` of the terminal cost through the
    sampler with its noise fixed) when the fine-tuned model is the base, and when the base
    velocity is linear in x and the reward linear (then it does not depend on the states);
    it also matches central finite differences and, with many steps, the closed form
    ``ã(σ) = -(α/λ)·s²·(1-σ)/V(σ)`` for Gaussian data.
(b) Gaussian data N(μ0, s0²), the exact rectified-flow velocity as the model (learnable μ, s):
    fine-tuning with the AM objective on memoryless rollouts moves the model's law to the
    tilted one, N(μ0 + α·s0²/λ, s0²) for r = α·x and N(m, 1/(1/s0² + c/λ)) for r = -c·x²/2.
(c) NormGuard wraps it: the points carry v_ref, the reference is evaluated once.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from normguard_jax import config_checks, normguard, rl, sampling
from normguard_jax.objectives import METHODS, am
from normguard_jax.objectives.base import BatchSpec, Context, Rollout

from conftest import load_config_file

MU0, S0 = 0.5, 0.8
BASE = {"mu": jnp.float32(MU0), "log_s": jnp.float32(np.log(S0))}


def gauss_velocity(params, x, sigma, cond):
    """Exact rectified-flow velocity ``E[ε - x0 | x_σ = x]`` of data N(μ, s²) (per pixel)."""
    del cond
    s2, mu = jnp.exp(2.0 * params["log_s"]), params["mu"]
    sg = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    var = (1.0 - sg) ** 2 * s2 + sg ** 2
    return (sg - (1.0 - sg) * s2) / var * (x - (1.0 - sg) * mu) - mu


def mlp_velocity(params, x, sigma, cond):
    """A nonlinear toy velocity (tanh layer, σ-dependent)."""
    del cond
    sg = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return params["w"] * jnp.tanh(params["u"] * x + sg) + params["b"] * x * sg


def linear_velocity(params, x, sigma, cond):
    sg = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return params["a"] * x * (1.0 + sg) + params["b"] * sg + params["c"][cond][:, None, None, :]


def sum_reward(fn):
    return lambda images, cond: (jnp.sum(fn(images).reshape(images.shape[0], -1), 1), {})


def rollout(velocity, params, ref_params, labels, sigmas, key, shape=(1, 1, 1)):
    n = labels.shape[0]
    x = jax.random.normal(jax.random.fold_in(key, 0), (n,) + shape)
    traj = sampling.sample(lambda x, s: velocity(params, x, s, labels), x, sigmas,
                           jax.random.fold_in(key, 1), method="memoryless")
    return Rollout(labels=labels, images=traj.states[-1], rewards=jnp.zeros(n),
                   advantages=jnp.zeros(n), trajectory=traj, ref_params=ref_params)


def replay_cost(velocity, ref_params, traj, labels, k, reward, lam, key):
    """x_k ↦ -r(x_T)/λ through the base sampler's steps k..T-1 with the rollout's noise
    (``rollout`` samples with key ``fold_in(key, 1)``, step j with ``fold_in(·, j)``)."""
    sig = traj.sigmas

    def cost(x):
        for j in range(k, sig.shape[0] - 1):
            v = velocity(ref_params, x, jnp.full((x.shape[0],), sig[j]), labels)
            noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), j),
                                      x.shape, x.dtype)
            x = sampling.memoryless_step(x, v, sig[j], sig[j + 1], noise=noise).x_next
        return -jnp.sum(reward(x, labels)[0]) / lam

    return cost


def test_lean_adjoint_is_the_true_adjoint_when_the_model_is_the_base():
    params = {"w": jnp.float32(0.7), "u": jnp.float32(1.3), "b": jnp.float32(-0.4)}
    labels = jnp.zeros((3,), jnp.int32)
    sigmas = jnp.linspace(1.0, 0.0, 7)
    ro = rollout(mlp_velocity, params, params, labels, sigmas, jax.random.key(0), (2, 2, 1))
    reward = sum_reward(lambda x: jnp.sin(2.0 * x) + 0.3 * x ** 2)
    lam = 0.5
    grad_r = am.reward_gradient(reward, ro.images, labels)
    adj = am.lean_adjoint(mlp_velocity, params, ro.trajectory.states, sigmas, labels,
                          -grad_r / lam)
    for k in range(len(sigmas) - 1):
        cost = replay_cost(mlp_velocity, params, ro.trajectory, labels, k, reward, lam,
                           jax.random.key(0))
        np.testing.assert_allclose(cost(ro.trajectory.states[k]),   # the replay is the rollout
                                   -jnp.sum(reward(ro.images, labels)[0]) / lam, rtol=1e-5)
        true = jax.grad(cost)(ro.trajectory.states[k])
        np.testing.assert_allclose(adj[k], true, rtol=1e-4, atol=1e-6, err_msg=f"step {k}")


def test_lean_adjoint_with_a_linear_base_is_the_base_adjoint_along_finetuned_states():
    base = {"a": jnp.float32(-0.6), "b": jnp.float32(0.2), "c": jnp.array([[0.1], [-0.3]])}
    theta = {"a": jnp.float32(-0.3), "b": jnp.float32(0.5), "c": jnp.array([[0.4], [0.2]])}
    labels = jnp.array([0, 1, 1], jnp.int32)
    sigmas = jnp.linspace(1.0, 0.0, 6)
    ro = rollout(linear_velocity, theta, base, labels, sigmas, jax.random.key(1), (2, 2, 1))
    w = jax.random.normal(jax.random.key(2), (2, 2, 1))
    reward = lambda im, c: (jnp.sum(im * w, axis=(1, 2, 3)), {})     # linear: ∇r = w
    lam = 0.3
    grad_r = am.reward_gradient(reward, ro.images, labels)
    adj = am.lean_adjoint(linear_velocity, base, ro.trajectory.states, sigmas, labels,
                          -grad_r / lam)
    for k in range(len(sigmas) - 1):
        # the base process started anywhere (here at x_k of the fine-tuned trajectory)
        cost = replay_cost(linear_velocity, base, ro.trajectory, labels, k, reward, lam,
                           jax.random.key(1))
        x_k = ro.trajectory.states[k]
        _, vjp = jax.vjp(cost, x_k)
        np.testing.assert_allclose(adj[k], vjp(jnp.float32(1.0))[0], rtol=1e-5, atol=1e-6)
        # central finite differences in one coordinate
        e = jnp.zeros_like(x_k).at[1, 0, 1, 0].set(1e-2)
        fd = (cost(x_k + e) - cost(x_k - e)) / 2e-2
        np.testing.assert_allclose(adj[k][1, 0, 1, 0], fd, rtol=1e-3, atol=1e-5)


def test_lean_adjoint_of_gaussian_data_approaches_the_closed_form():
    # ã(σ) = -(α/λ)·s0²·(1-σ)/V(σ), V = (1-σ)²s0² + σ², for r = α·x (first order in 1/T).
    alpha, lam, steps = 1.5, 2.0, 400
    sigmas = jnp.linspace(1.0, 0.0, steps + 1)
    labels = jnp.zeros((4,), jnp.int32)
    ro = rollout(gauss_velocity, BASE, BASE, labels, sigmas, jax.random.key(3))
    adj = am.lean_adjoint(gauss_velocity, BASE, ro.trajectory.states, sigmas, labels,
                          jnp.full(ro.images.shape, -alpha / lam))
    s = np.asarray(sigmas)
    closed = -(alpha / lam) * S0 ** 2 * (1 - s) / ((1 - s) ** 2 * S0 ** 2 + s ** 2)
    np.testing.assert_allclose(np.asarray(adj)[:, 0, 0, 0, 0], closed, atol=5e-3)


def finetune_gaussian(reward, lam, *, steps=50, samples=256, iterations=150, lr=0.02,
                      weighting="control"):
    sigmas = jnp.linspace(1.0, 0.0, steps + 1)
    objective = am.make_objective(am.AMConfig(kl_weight=lam, weighting=weighting))
    spec = BatchSpec(prompts=samples, group_size=1, trained_steps=tuple(range(steps)),
                     velocity=gauss_velocity, reward_fn=reward)
    optimizer = optax.adam(lr)
    labels = jnp.zeros((samples,), jnp.int32)
    ctx = Context(velocity=gauss_velocity, ref_params=BASE)

    @jax.jit
    def iteration(params, opt_state, key):
        batch = am.training_batch(rollout(gauss_velocity, params, BASE, labels, sigmas, key),
                                  key, spec)
        grads, aux = jax.grad(objective, has_aux=True)(params, batch, ctx)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux.metrics["am/loss"]

    params, opt_state = dict(BASE), optimizer.init(BASE)
    for i in range(iterations):
        params, opt_state, loss = iteration(params, opt_state, jax.random.key(i))
        assert np.isfinite(float(loss))
    # the fine-tuned sampler, with fine steps (its own discretisation error is then small)
    many = jnp.zeros((20000,), jnp.int32)
    fine = rollout(gauss_velocity, params, BASE, many, jnp.linspace(1.0, 0.0, 401),
                   jax.random.key(10**6)).images
    # and with the training steps, next to the base sampler with the same steps
    coarse = {name: rollout(gauss_velocity, p, BASE, many, sigmas, jax.random.key(7)).images
              for name, p in (("theta", params), ("base", BASE))}
    moments = {name: (float(jnp.mean(x)), float(jnp.var(x))) for name, x in coarse.items()}
    return params, float(jnp.mean(fine)), float(jnp.var(fine)), moments


def tilt(mean, var, alpha, c, lam):
    """Moments of N(mean, var)·exp((α·x - c·x²/2)/λ), normalised."""
    precision = 1 / var + c / lam
    return (mean / var + alpha / lam) / precision, 1 / precision


# Tolerances (50 memoryless steps, 256 samples, 150 Adam steps at lr 0.02, ~7 s each). The
# discrete loss's fixed point is the exact tilt of the *discrete* base sampler's law (with
# T steps the DDPM-type sampler of N(0.5, 0.64) gives N(0.498, 0.581) at T = 50, N(0.491, 0.503)
# at T = 20), so the continuous tilted law is reached up to O(1/T) (measured: linear mean 0.784
# vs 0.82 at 50 steps, 0.737 at 20; quadratic variance 0.415 vs 0.390 at 50 steps, 0.456 at
# 20): mean within 0.05, variance within 10 % of the tilted law's. The fine-tuned sampler
# with the training steps must match the tilt of the base sampler with the same steps more
# tightly: mean within 0.02, variance within 5 %.
MEAN_TOL, VAR_RTOL = 0.05, 0.10
DISCRETE_MEAN_TOL, DISCRETE_VAR_RTOL = 0.02, 0.05


def check_discrete_tilt(moments, alpha, c, lam):
    mean, var = moments["theta"]
    mean_star, var_star = tilt(*moments["base"], alpha, c, lam)
    assert abs(mean - mean_star) < DISCRETE_MEAN_TOL, (mean, mean_star)
    assert abs(var / var_star - 1) < DISCRETE_VAR_RTOL, (var, var_star)


def check_continuous_tilt(params, mean, var, mu_star, var_star):
    """The learned Gaussian and the fine-tuned sampler's moments against the exact tilt."""
    assert abs(float(params["mu"]) - mu_star) < MEAN_TOL
    assert abs(float(jnp.exp(2 * params["log_s"])) / var_star - 1) < VAR_RTOL
    assert abs(mean - mu_star) < MEAN_TOL, mean
    assert abs(var / var_star - 1) < VAR_RTOL, var


def test_linear_reward_shifts_the_gaussian_mean_by_alpha_s0_squared_over_lambda():
    alpha, lam = 1.0, 2.0
    params, mean, var, moments = finetune_gaussian(sum_reward(lambda x: alpha * x), lam)
    mu_star, var_star = MU0 + alpha * S0 ** 2 / lam, S0 ** 2          # 0.82, 0.64
    assert (mu_star, var_star) == pytest.approx(tilt(MU0, S0 ** 2, alpha, 0.0, lam))
    check_discrete_tilt(moments, alpha, 0.0, lam)
    check_continuous_tilt(params, mean, var, mu_star, var_star)


def test_quadratic_reward_adds_c_over_lambda_to_the_precision():
    c, lam = 1.0, 1.0
    params, mean, var, moments = finetune_gaussian(sum_reward(lambda x: -0.5 * c * x ** 2), lam)
    precision = 1 / S0 ** 2 + c / lam
    mu_star, var_star = (MU0 / S0 ** 2) / precision, 1 / precision    # 0.305, 0.390
    check_discrete_tilt(moments, 0.0, c, lam)
    check_continuous_tilt(params, mean, var, mu_star, var_star)


def test_target_correction_is_the_tilted_minus_base_velocity_in_the_continuum():
    # γ·ã with the closed-form adjoint equals v_tilted - v_base = -(α·s0²/λ)·σ/V as Δ → 0.
    alpha, lam = 1.0, 2.0
    for sigma in (0.2, 0.5, 0.9):
        gamma, _ = am.step_factors(sigma, sigma - 1e-5)
        var = (1 - sigma) ** 2 * S0 ** 2 + sigma ** 2
        adjoint = -(alpha / lam) * S0 ** 2 * (1 - sigma) / var
        x = jnp.full((1, 1, 1, 1), 0.3)
        s = jnp.array([sigma])
        tilted = {"mu": BASE["mu"] + alpha * S0 ** 2 / lam, "log_s": BASE["log_s"]}
        diff = gauss_velocity(tilted, x, s, None) - gauss_velocity(BASE, x, s, None)
        np.testing.assert_allclose(float(gamma) * adjoint, float(diff[0, 0, 0, 0]), rtol=1e-3)


def test_normguard_wraps_adjoint_matching_and_reuses_its_reference():
    labels = jnp.zeros((8,), jnp.int32)
    sigmas = jnp.linspace(1.0, 0.0, 5)
    spec = BatchSpec(prompts=8, group_size=1, trained_steps=tuple(range(4)),
                     velocity=gauss_velocity, reward_fn=sum_reward(lambda x: x))
    theta = {"mu": jnp.float32(0.7), "log_s": jnp.float32(np.log(1.1))}
    batch = am.training_batch(rollout(gauss_velocity, theta, BASE, labels, sigmas,
                                      jax.random.key(0)), jax.random.key(1), spec)
    assert batch["x"].shape[0] == am.rows(spec) == 32
    calls = {"ref": 0}

    def counting(params, x, sigma, cond):
        calls["ref"] += params is BASE
        return gauss_velocity(params, x, sigma, cond)

    ctx = Context(velocity=counting, ref_params=BASE)
    objective = am.make_objective(am.AMConfig(kl_weight=0.5))
    loss, aux = objective(theta, batch, ctx)
    assert aux.points is not None and aux.points.v_ref is not None and calls["ref"] == 1
    calls["ref"] = 0
    guarded = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.5))
    (g_loss, g_aux), grads = jax.value_and_grad(guarded, has_aux=True)(theta, batch, ctx)
    assert calls["ref"] == 1
    assert float(g_loss) >= float(loss) and "normguard/ratio" in g_aux.metrics
    assert all(np.isfinite(float(g)) for g in jax.tree.leaves(grads))


def test_config_refuses_non_differentiable_rewards_and_other_samplers():
    config = load_config_file("rl_am.py")
    rl.validate(config, num_devices=1)
    config.rewards.classifier_correct = 1.0
    with pytest.raises(config_checks.ConfigError, match="config.rewards.classifier_correct"):
        rl.validate(config, num_devices=1)
    config.rewards.classifier_correct = 0.0
    rl.validate(config, num_devices=1)
    config.rollout.sampler = "sde"
    with pytest.raises(config_checks.ConfigError, match="config.rollout.sampler"):
        rl.validate(config, num_devices=1)
    config.rollout.sampler = "memoryless"
    config.rollout.guidance_scale = 2.0
    with pytest.raises(config_checks.ConfigError, match="config.rollout.guidance_scale"):
        rl.validate(config, num_devices=1)
    with pytest.raises(ValueError, match="config.objective.kl_weight must be"):
        am.AMConfig(kl_weight=0.0)
    assert METHODS["am"].needs_trajectory

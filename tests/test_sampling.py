"""Tests for normguard_jax.sampling: step rules, log-probs, trajectories, CFG, renormalisation.

Most tests use Gaussian data x0 ~ N(μ, s²I), for which the optimal velocity is closed form:
with m = (1-σ)μ and V = (1-σ)²s² + σ², v*(x, σ) = (σ - (1-σ)s²)/V · (x - m) - μ, and the exact
marginal at level σ is N(m, V). Every step rule is then an affine map plus Gaussian noise, so
the moments of a whole trajectory can be propagated exactly in float64 (``_moment_recursion``,
written from the formulas, independently of the library) and compared with Monte-Carlo samples.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from normguard_jax import flow, sampling

H, W, C = 4, 4, 1
MU = jnp.linspace(-0.6, 0.6, H * W * C, dtype=jnp.float32).reshape(1, H, W, C)
DATA_STD = 0.5
NOISE_LEVELS = {"ode": 0.0, "sde": 0.7, "cps": 0.8, "dance": 0.3}


def gaussian_velocity(mu, s):
    """Optimal velocity for x0 ~ N(mu, s²) (s = 0 is a point mass)."""

    def velocity(x, sigma):
        sg = sigma.reshape(-1, 1, 1, 1)
        m = (1.0 - sg) * mu
        var = (1.0 - sg) ** 2 * s**2 + sg**2
        return (sg - (1.0 - sg) * s**2) / var * (x - m) - mu

    return velocity


def mu_like(x):
    """Per-pixel data mean for images shaped like x: values spread over [-0.6, 0.6]."""
    size = math.prod(x.shape[1:])
    return jnp.linspace(-0.6, 0.6, size, dtype=jnp.float32).reshape(1, *x.shape[1:])


def parametric_velocity(params):
    """A velocity with two scalar parameters; params = (1, 0) is the optimal Gaussian velocity."""

    def velocity(x, sigma):
        return (
            params["scale"] * gaussian_velocity(mu_like(x), DATA_STD)(x, sigma) + params["bias"] * x
        )

    return velocity


def _moment_recursion(method, sigmas, s, eta):
    """Exact per-pixel moments along a trajectory for the Gaussian velocity, in float64.

    Writes E[x_k] = α_k·μ and Var[x_k] = var_k, starting from N(0, 1). The velocity is affine,
    v = c·x + d·μ with c = (σ - (1-σ)s²)/V and d = -c(1-σ) - 1, so each rule's mean is
    A·x + B·μ and x_next = A·x + B·μ + std·ε. Returns arrays (α, var) of length T+1.
    """
    sigmas = np.asarray(sigmas, np.float64)
    s2 = s * s
    alpha, var = [0.0], [1.0]
    for k in range(len(sigmas) - 1):
        sg, sn = sigmas[k], sigmas[k + 1]
        dt = sn - sg
        c = (sg - (1 - sg) * s2) / ((1 - sg) ** 2 * s2 + sg**2)
        d = -c * (1 - sg) - 1
        if method == "ode":
            a, b, std = 1 + dt * c, dt * d, 0.0
        elif method in ("sde", "dance"):
            if method == "sde":  # Flow-GRPO: g² = a²σ/(1-σ'), σ' = sigmas[1] where σ = 1
                g2 = eta**2 * sg / (1 - (sigmas[1] if sg == 1 else sg))
            else:  # DanceGRPO: constant diffusion η
                g2 = eta**2
            # mean = x + dt·[v + g²/(2σ)·(x + (1-σ)v)]
            a = 1 + dt * (c + g2 / (2 * sg) * (1 + (1 - sg) * c))
            b = dt * (d + g2 / (2 * sg) * (1 - sg) * d)
            std = math.sqrt(g2 * -dt)
        else:  # cps: (1-σ')·(x - σv) + sqrt(σ'² - std²)·(x + (1-σ)v) + std·ε
            std = sn * math.sin(eta * math.pi / 2)
            nc = math.sqrt(max(sn**2 - std**2, 0.0))
            a = (1 - sn) * (1 - sg * c) + nc * (1 + (1 - sg) * c)
            b = -(1 - sn) * sg * d + nc * (1 - sg) * d
        alpha.append(a * alpha[-1] + b)
        var.append(a * a * var[-1] + std**2)
    return np.array(alpha), np.array(var)


def _standardized_moments(states, alpha, var):
    """Pooled mean and variance of (x_k - α_k μ)/sqrt(var_k) over batch and pixels, per k."""
    z = (
        np.asarray(states, np.float64) - alpha[:, None, None, None, None] * np.asarray(MU)
    ) / np.sqrt(var[:, None, None, None, None])
    return z.mean(axis=(1, 2, 3, 4)), z.var(axis=(1, 2, 3, 4))


def _sample_jit(velocity_fn, x, sigmas, key, **kwargs):
    return jax.jit(lambda x, key: sampling.sample(velocity_fn, x, sigmas, key, **kwargs))(x, key)


# ---------------------------------------------------------------------------------------------
# (a) Marginals on Gaussian data.
# ---------------------------------------------------------------------------------------------

# 2048 samples × 16 independent pixels = 32768 standardized draws per state. Standard errors:
# 1/sqrt(n) = 0.0055 for the mean and sqrt(2/n) = 0.0078 for the variance. Tolerances of 4.5
# standard errors keep a seed change from failing a correct sampler (p < 1e-5 per check).
N_MC = 2048
MEAN_TOL = 4.5 / math.sqrt(N_MC * H * W * C)
VAR_TOL = 4.5 * math.sqrt(2.0 / (N_MC * H * W * C))
# Distance to the continuous-time target: the sampler must converge at first order, with the
# discretization error of the variance at most 4/N (the exact recursion gives 2.9/N for Euler,
# 2.5/N for DanceGRPO and < 0.6/N for Flow-GRPO on this problem). At N = 40 that is 0.10.
FIRST_ORDER_CONSTANT = 4.0


@pytest.mark.parametrize("method", ["ode", "sde", "dance"])
def test_samplers_carry_noise_to_the_gaussian_data(method):
    sigmas = flow.inference_sigmas(40, shift=1.0)
    x_init = jax.random.normal(jax.random.key(10), (N_MC, H, W, C))
    traj = _sample_jit(
        gaussian_velocity(MU, DATA_STD), x_init, sigmas, jax.random.key(11), method=method
    )

    # Monte-Carlo moments of every state (intermediate marginals included) equal the exact
    # propagated moments of this discrete sampler.
    alpha, var = _moment_recursion(method, sigmas, DATA_STD, NOISE_LEVELS[method])
    z_mean, z_var = _standardized_moments(traj.states, alpha, var)
    assert np.max(np.abs(z_mean)) < MEAN_TOL
    assert np.max(np.abs(z_var - 1.0)) < VAR_TOL

    # The final samples are N(μ, s²) up to the first-order discretization error.
    z = (np.asarray(traj.states[-1], np.float64) - np.asarray(MU)) / DATA_STD
    assert abs(z.mean()) < MEAN_TOL
    assert abs(z.var() - 1.0) < FIRST_ORDER_CONSTANT / 40 + VAR_TOL

    # ...and that error vanishes as the step count grows. For Euler and DanceGRPO it does so at
    # every intermediate level too (exact continuous marginal at σ: N((1-σ)μ, (1-σ)²s² + σ²)).
    # Flow-GRPO's first step is the exception: at σ = 1 it uses g = a/sqrt(1 - σ_1), so its std
    # g·sqrt(1 - σ_1) = a whatever N; the states right after it stay over-dispersed by ~10 %
    # for every N, and only the end of the trajectory converges.
    for n in (40, 80, 160):
        sig = flow.inference_sigmas(n, shift=1.0).astype(np.float64)
        alpha_n, var_n = _moment_recursion(method, sig, DATA_STD, NOISE_LEVELS[method])
        rel_err = np.abs(var_n / ((1 - sig) ** 2 * DATA_STD**2 + sig**2) - 1.0)
        np.testing.assert_allclose(alpha_n, 1 - sig, atol=1e-9)
        assert rel_err[-1] < FIRST_ORDER_CONSTANT / n, (method, n)
        if method == "sde":
            assert 0.08 < np.max(rel_err) < 0.13, n
        else:
            assert np.max(rel_err) < FIRST_ORDER_CONSTANT / n, (method, n)


def test_cps_is_exact_for_point_mass_data():
    """CPS keeps the interpolant's coefficients: with exact x0̂ (point-mass data) every state
    x_k is distributed exactly as (1-σ_k)μ + σ_k·ε, whatever the step count."""
    sigmas = flow.inference_sigmas(12, shift=3.0)
    x_init = jax.random.normal(jax.random.key(12), (N_MC, H, W, C))
    traj = _sample_jit(gaussian_velocity(MU, 0.0), x_init, sigmas, jax.random.key(13), method="cps")
    sig = np.asarray(sigmas, np.float64)[:-1]
    z_mean, z_var = _standardized_moments(traj.states[:-1], 1 - sig, sig**2)
    assert np.max(np.abs(z_mean)) < MEAN_TOL
    assert np.max(np.abs(z_var - 1.0)) < VAR_TOL
    np.testing.assert_allclose(
        traj.states[-1], jnp.broadcast_to(MU, traj.states[-1].shape), atol=1e-4
    )


def test_cps_moments_match_exact_recursion_on_spread_data():
    """For data with spread (s = 0.5) CPS follows its own exact moment recursion. Note that this
    recursion ends well below s² (≈0.6·s² at 40 steps): CPS preserves coefficients, not the
    marginal variance, when the posterior over x0 is not a point mass."""
    sigmas = flow.inference_sigmas(40, shift=1.0)
    x_init = jax.random.normal(jax.random.key(14), (N_MC, H, W, C))
    traj = _sample_jit(
        gaussian_velocity(MU, DATA_STD), x_init, sigmas, jax.random.key(15), method="cps"
    )
    alpha, var = _moment_recursion("cps", sigmas, DATA_STD, NOISE_LEVELS["cps"])
    z_mean, z_var = _standardized_moments(traj.states, alpha, var)
    assert np.max(np.abs(z_mean)) < MEAN_TOL
    assert np.max(np.abs(z_var - 1.0)) < VAR_TOL


# ---------------------------------------------------------------------------------------------
# Step rules against formulas written out independently.
# ---------------------------------------------------------------------------------------------


def _random_step_inputs(seed, batch=5, shape=(3, 2, 2)):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (batch, *shape))
    v = jax.random.normal(keys[1], (batch, *shape))
    noise = jax.random.normal(keys[2], (batch, *shape))
    sigmas = flow.inference_sigmas(10, shift=3.0)
    idx = np.array([0, 3, 5, 8, 9])[:batch]  # includes σ = 1 and the last step to σ = 0
    return x, v, noise, jnp.asarray(sigmas[idx]), jnp.asarray(sigmas[idx + 1]), float(sigmas[1])


def _np(a):
    return np.asarray(a, np.float64)


def _bcast(a):
    return _np(a).reshape(-1, 1, 1, 1)


def _gaussian_log_prob_ref(x_next, mean, std):
    return norm.logpdf(x_next, mean, jnp.reshape(std, (-1, 1, 1, 1))).mean(axis=(1, 2, 3))


def test_flow_grpo_step_matches_reference_arrangement():
    x, v, noise, sig, sig_next, sigma_max = _random_step_inputs(0)
    out = sampling.flow_grpo_sde_step(
        x, v, sig, sig_next, sigma_max=sigma_max, noise_level=0.7, noise=noise
    )
    s, sn = _bcast(sig), _bcast(sig_next)
    # Written as in the reference: x·(1 + g²/(2σ)·dt) + v·(1 + g²(1-σ)/(2σ))·dt.
    g = 0.7 * np.sqrt(s / (1 - np.where(s == 1, sigma_max, s)))
    dt = sn - s
    mean = _np(x) * (1 + g**2 / (2 * s) * dt) + _np(v) * (1 + g**2 * (1 - s) / (2 * s)) * dt
    std = g * np.sqrt(-dt)
    np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std, std.ravel(), rtol=1e-6)
    np.testing.assert_allclose(out.x_next, mean + std * _np(noise), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out.log_prob, _gaussian_log_prob_ref(out.x_next, out.mean, out.std), rtol=1e-5
    )
    np.testing.assert_allclose(
        sampling.flow_grpo_noise_scale(sig, sigma_max, 0.7), g.ravel(), rtol=1e-6
    )
    assert np.isfinite(out.std[0]) and float(sig[0]) == 1.0  # σ = 1 uses sigma_max


def test_dance_step_matches_reference_arrangement():
    x, v, noise, sig, sig_next, _ = _random_step_inputs(1)
    eta = 0.3
    out = sampling.dance_sde_step(x, v, sig, sig_next, noise_level=eta, noise=noise)
    s, sn = _bcast(sig), _bcast(sig_next)
    x0_hat = _np(x) - s * _np(v)
    score = -(_np(x) - x0_hat * (1 - s)) / s**2
    mean = _np(x) + (sn - s) * _np(v) + (-0.5 * eta**2 * score) * (sn - s)
    std = eta * np.sqrt(s - sn)
    np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std, std.ravel(), rtol=1e-6)
    np.testing.assert_allclose(
        out.log_prob, _gaussian_log_prob_ref(out.x_next, out.mean, out.std), rtol=1e-5
    )
    no_const = sampling.dance_sde_step(
        x, v, sig, sig_next, noise_level=eta, x_next=out.x_next, include_constants=False
    )
    quad = -((_np(out.x_next) - _np(out.mean)) ** 2) / (2 * std**2)
    np.testing.assert_allclose(no_const.log_prob, quad.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_cps_step_formula_and_log_probs():
    x, v, noise, sig, sig_next, _ = _random_step_inputs(2)
    eta = 0.8
    out = sampling.cps_step(x, v, sig, sig_next, noise_level=eta, noise=noise)
    s, sn = _bcast(sig), _bcast(sig_next)
    std = sn * math.sin(eta * math.pi / 2)
    mean = (1 - sn) * (_np(x) - s * _np(v)) + np.sqrt(sn**2 - std**2) * (_np(x) + (1 - s) * _np(v))
    np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std, std.ravel(), rtol=1e-6)
    # Default: the reference's -mean((x_next - mean)²).
    np.testing.assert_allclose(
        out.log_prob, -((_np(out.x_next) - mean) ** 2).mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-10
    )
    assert float(out.log_prob[-1]) == 0.0  # last step: σ_next = 0, std = 0
    # True density: Gaussian log-pdf where std > 0, defined as 0 at the last step.
    true = sampling.cps_step(
        x, v, sig, sig_next, noise_level=eta, x_next=out.x_next, true_density=True
    )
    ref = _gaussian_log_prob_ref(out.x_next[:-1], out.mean[:-1], out.std[:-1])
    np.testing.assert_allclose(true.log_prob[:-1], ref, rtol=1e-5)
    assert float(true.log_prob[-1]) == 0.0
    # No NaN in the gradient either, even through the degenerate last step.
    grad = jax.grad(
        lambda v: sampling.cps_step(
            x, v, sig, sig_next, x_next=out.x_next, true_density=True
        ).log_prob.sum()
    )(v)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_cps_preserves_coefficients_with_oracle_velocity():
    """With v = ε - x0 exactly, the CPS mean is (1-σ')x0 + σ'cos(ηπ/2)ε (no x0/ε leakage)."""
    k1, k2 = jax.random.split(jax.random.key(3))
    x0 = jax.random.uniform(k1, (4, 3, 3, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    sigma, sigma_next, eta = 0.7, 0.55, 0.6
    x = flow.interpolate(x0, eps, sigma)
    out = sampling.cps_step(
        x, flow.velocity_target(x0, eps), sigma, sigma_next, noise_level=eta, x_next=x
    )
    expected = (1 - sigma_next) * x0 + sigma_next * math.cos(eta * math.pi / 2) * eps
    np.testing.assert_allclose(out.mean, expected, atol=2e-6)


def test_ode_step_is_euler_and_deterministic():
    x, v, noise, sig, sig_next, _ = _random_step_inputs(4)
    out = sampling.ode_step(x, v, sig, sig_next, noise=noise)
    np.testing.assert_allclose(
        out.x_next, _np(x) + (_bcast(sig_next) - _bcast(sig)) * _np(v), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(out.mean, out.x_next)
    np.testing.assert_array_equal(out.log_prob, np.zeros(5))
    np.testing.assert_array_equal(out.std, np.zeros(5))


def test_flow_grpo_kl_normalisation():
    """With the step's std it is the exact Gaussian KL (checked by quadrature); with g it is the
    reference's value, i.e. the exact KL times (σ - σ_next)."""
    mean_a = jnp.array([[[[0.3]], [[-0.2]]]])  # (1, 2, 1, 1)
    mean_b = jnp.array([[[[0.1]], [[0.4]]]])
    std = 0.35
    grid = np.linspace(-6, 6, 200001)
    kls = []
    for a, b in zip(np.ravel(mean_a), np.ravel(mean_b)):
        p = np.exp(-((grid - a) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi))
        log_ratio = (-((grid - a) ** 2) + (grid - b) ** 2) / (2 * std**2)
        kls.append(np.trapezoid(p * log_ratio, grid))
    np.testing.assert_allclose(
        sampling.flow_grpo_kl(mean_a, mean_b, std), [np.mean(kls)], rtol=1e-6
    )

    sigma, sigma_next, sigma_max = 0.6, 0.5, 0.95
    g = sampling.flow_grpo_noise_scale(sigma, sigma_max, 0.7)
    step_std = g * math.sqrt(sigma - sigma_next)
    np.testing.assert_allclose(
        sampling.flow_grpo_kl(mean_a, mean_b, g),
        sampling.flow_grpo_kl(mean_a, mean_b, step_std) * (sigma - sigma_next),
        rtol=1e-5,
    )


def test_mixed_step_batch_equals_per_sample_calls():
    """A (B,) σ batch mixing steps gives the same result as scalar σ per sample."""
    x, v, noise, sig, sig_next, sigma_max = _random_step_inputs(5)
    options = {"ode": {}, "sde": {"sigma_max": sigma_max}, "cps": {}, "dance": {},
               "memoryless": {}}
    for name, step in sampling.STEP_FNS.items():
        batched = step(x, v, sig, sig_next, noise=noise, **options[name])
        for i in range(x.shape[0]):
            single = step(
                x[i : i + 1],
                v[i : i + 1],
                sig[i],
                sig_next[i],
                noise=noise[i : i + 1],
                **options[name],
            )
            np.testing.assert_allclose(
                batched.x_next[i], single.x_next[0], rtol=1e-5, atol=1e-6, err_msg=name
            )
            np.testing.assert_allclose(
                batched.log_prob[i], single.log_prob[0], rtol=1e-5, atol=1e-6, err_msg=name
            )
            np.testing.assert_allclose(batched.std[i], single.std, rtol=1e-6, err_msg=name)


def test_scoring_gradient_flows_into_v_but_not_x_next():
    x, v, noise, sig, sig_next, sigma_max = _random_step_inputs(6)
    sig, sig_next = sig[:-1], sig_next[:-1]  # strictly positive σ_next: all rules are stochastic
    x, v, noise = x[:-1], v[:-1], noise[:-1]
    options = {"sde": {"sigma_max": sigma_max}, "cps": {}, "dance": {}}
    for name, extra in options.items():
        step = sampling.STEP_FNS[name]
        x_next = step(x, v, sig, sig_next, noise=noise, **extra).x_next
        lp = lambda v, xn: step(
            x, v, sig, sig_next, x_next=xn, **extra
        ).log_prob.sum()  # noqa: E731
        g_v, g_xn = jax.jit(jax.grad(lp, argnums=(0, 1)))(v + 0.1, x_next)
        assert float(jnp.abs(g_v).max()) > 1e-3, name
        np.testing.assert_array_equal(g_xn, np.zeros(x_next.shape), err_msg=name)


def test_stochastic_step_needs_noise_or_x_next():
    x = jnp.zeros((2, 2, 2, 1))
    with pytest.raises(ValueError):
        sampling.dance_sde_step(x, x, 0.5, 0.4)


# ---------------------------------------------------------------------------------------------
# (b) Trajectory log-probs: recomputation and gradients.
# ---------------------------------------------------------------------------------------------

SMALL = (6, 3, 3, 1)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("sde", {}),
        ("sde", {"sde_window": (2, 5)}),
        ("cps", {}),
        ("cps", {"cps_true_density": True}),
        ("dance", {"noise_level": 0.5}),
        ("ode", {}),
    ],
)
def test_recompute_reproduces_sampled_log_probs(method, kwargs):
    params = {"scale": jnp.float32(1.0), "bias": jnp.float32(0.0)}
    vfn = parametric_velocity(params)
    sigmas = flow.inference_sigmas(8, shift=3.0)
    x_init = jax.random.normal(jax.random.key(20), SMALL)
    traj = _sample_jit(vfn, x_init, sigmas, jax.random.key(21), method=method, **kwargs)
    assert traj.states.shape == (9, *SMALL) and traj.means.shape == (8, *SMALL)
    assert (
        traj.log_probs.shape == (8, SMALL[0])
        and traj.stds.shape == (8,)
        and traj.stochastic.shape == (8,)
    )
    assert traj.velocities is None
    np.testing.assert_array_equal(traj.states[0], x_init)
    recompute_kwargs = {k: v for k, v in kwargs.items() if k != "sde_window"}
    steps = jax.jit(lambda t: sampling.recompute_steps(vfn, t, method, **recompute_kwargs))(traj)
    np.testing.assert_allclose(steps.log_prob, traj.log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(steps.mean, traj.means, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        sampling.recompute_log_probs(vfn, traj, method, **recompute_kwargs).shape,
        traj.log_probs.shape,
    )
    if method != "ode":
        # Log-probs are independent Gaussian densities computed from the stored means and stds
        # (in float64 NumPy, with the log-pdf written out).
        states, means, stds = _np(traj.states), _np(traj.means), _np(traj.stds)
        for k in np.flatnonzero(np.asarray(traj.stochastic)):
            sq = (states[k + 1] - means[k]) ** 2
            if method == "cps" and not kwargs.get("cps_true_density"):
                expected = -sq.mean(axis=(1, 2, 3))
            elif stds[k] == 0.0:
                expected = np.zeros(SMALL[0])
            else:
                logpdf = -sq / (2 * stds[k] ** 2) - np.log(stds[k]) - 0.5 * np.log(2 * np.pi)
                expected = logpdf.mean(axis=(1, 2, 3))
            np.testing.assert_allclose(traj.log_probs[k], expected, rtol=1e-4, atol=1e-5)
        # A different velocity gives different log-probs on the stochastic steps.
        other = sampling.recompute_log_probs(
            parametric_velocity({"scale": 1.1, "bias": 0.05}), traj, method, **recompute_kwargs
        )
        assert float(jnp.abs(other - traj.log_probs).max()) > 1e-4


@pytest.mark.parametrize("method", ["sde", "cps", "dance"])
def test_log_prob_gradient_matches_finite_differences(method):
    with jax.enable_x64(True):
        sigmas = flow.inference_sigmas(6, shift=3.0)
        x_init = jax.random.normal(jax.random.key(30), (3, 2, 2, 1), dtype=jnp.float64)
        p0 = {"scale": jnp.float64(1.0), "bias": jnp.float64(0.0)}
        traj = sampling.sample(
            parametric_velocity(p0), x_init, sigmas, jax.random.key(31), method=method
        )
        kw = {"cps_true_density": True} if method == "cps" else {}

        @jax.jit
        def objective(params):
            return jnp.sum(
                sampling.recompute_log_probs(parametric_velocity(params), traj, method, **kw)
            )

        p1 = {"scale": jnp.float64(1.05), "bias": jnp.float64(0.02)}
        grad = jax.jit(jax.grad(objective))(p1)
        for name in p1:
            h = 1e-5
            up = dict(p1, **{name: p1[name] + h})
            down = dict(p1, **{name: p1[name] - h})
            fd = (objective(up) - objective(down)) / (2 * h)
            assert abs(float(fd)) > 1e-3, (method, name)
            np.testing.assert_allclose(
                float(grad[name]), float(fd), rtol=1e-5, err_msg=f"{method}/{name}"
            )


# ---------------------------------------------------------------------------------------------
# Windows, noise reproducibility, renormalisation inside the sampler.
# ---------------------------------------------------------------------------------------------


def test_sde_window_makes_only_window_steps_stochastic():
    vfn = gaussian_velocity(mu_like(jnp.zeros(SMALL)), DATA_STD)
    sigmas = flow.inference_sigmas(8, shift=3.0)
    x_init = jax.random.normal(jax.random.key(40), SMALL)
    traj = sampling.sample(vfn, x_init, sigmas, jax.random.key(41), method="sde", sde_window=(2, 5))
    np.testing.assert_array_equal(
        traj.stochastic, [False, False, True, True, True, False, False, False]
    )
    for k in range(8):
        sigma_b = jnp.full((SMALL[0],), sigmas[k])
        euler = traj.states[k] + (sigmas[k + 1] - sigmas[k]) * vfn(traj.states[k], sigma_b)
        if traj.stochastic[k]:
            assert float(traj.stds[k]) > 0 and float(jnp.abs(traj.log_probs[k]).min()) > 0
            assert float(jnp.abs(traj.states[k + 1] - euler).max()) > 1e-3
        else:
            assert float(traj.stds[k]) == 0.0
            np.testing.assert_array_equal(traj.log_probs[k], np.zeros(SMALL[0]))
            np.testing.assert_allclose(traj.states[k + 1], euler, rtol=1e-5, atol=1e-6)
    # A traced window (e.g. drawn at random each iteration) gives the same trajectory under jit.
    traced = jax.jit(
        lambda start, end: sampling.sample(
            vfn, x_init, sigmas, jax.random.key(41), method="sde", sde_window=(start, end)
        )
    )(jnp.int32(2), jnp.int32(5))
    np.testing.assert_allclose(traced.states, traj.states, rtol=1e-6, atol=1e-6)


def test_step_noise_is_drawn_from_fold_in_of_the_step_index():
    vfn = gaussian_velocity(mu_like(jnp.zeros(SMALL)), DATA_STD)
    sigmas = flow.inference_sigmas(5, shift=3.0)
    key = jax.random.key(50)
    traj = sampling.sample(
        vfn, jax.random.normal(jax.random.key(51), SMALL), sigmas, key, method="dance"
    )
    for k in range(5):
        noise = jax.random.normal(jax.random.fold_in(key, k), SMALL)
        np.testing.assert_allclose(
            (traj.states[k + 1] - traj.means[k]) / traj.stds[k], noise, rtol=1e-3, atol=1e-3
        )


def test_sampler_renormalizes_to_reference_norm():
    vfn = parametric_velocity({"scale": 1.3, "bias": 0.1})
    ref = gaussian_velocity(mu_like(jnp.zeros(SMALL)), DATA_STD)
    sigmas = flow.inference_sigmas(5, shift=3.0)
    traj = sampling.sample(
        vfn,
        jax.random.normal(jax.random.key(52), SMALL),
        sigmas,
        jax.random.key(53),
        method="ode",
        ref_velocity_fn=ref,
        renormalize=True,
        return_velocities=True,
    )
    assert traj.velocities.shape == (5, *SMALL)
    for k in range(5):
        sigma_b = jnp.full((SMALL[0],), sigmas[k])
        v_ref = ref(traj.states[k], sigma_b)
        norms = jnp.linalg.norm(traj.velocities[k].reshape(SMALL[0], -1), axis=1)
        np.testing.assert_allclose(
            norms, jnp.linalg.norm(v_ref.reshape(SMALL[0], -1), axis=1), rtol=1e-5
        )
    with pytest.raises(ValueError):
        sampling.sample(vfn, jnp.zeros(SMALL), sigmas, jax.random.key(0), renormalize=True)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown sampling method"):
        sampling.sample(
            lambda x, s: x,
            jnp.zeros(SMALL),
            flow.inference_sigmas(2),
            jax.random.key(0),
            method="ddim",
        )
    assert set(sampling.STEP_FNS) == {"ode", "sde", "cps", "dance", "memoryless"}


# ---------------------------------------------------------------------------------------------
# (e) jit, vmap, grad, sharding.
# ---------------------------------------------------------------------------------------------


def test_sample_jit_matches_eager_and_vmaps_over_keys():
    vfn = gaussian_velocity(mu_like(jnp.zeros(SMALL)), DATA_STD)
    sigmas = flow.inference_sigmas(4, shift=3.0)
    x_init = jax.random.normal(jax.random.key(60), SMALL)
    keys = jax.random.split(jax.random.key(61), 2)
    run = lambda key: sampling.sample(vfn, x_init, sigmas, key, method="sde")  # noqa: E731
    eager = [run(k) for k in keys]
    batched = jax.jit(jax.vmap(run))(keys)
    for i in range(2):
        np.testing.assert_allclose(batched.states[i], eager[i].states, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.log_probs[i], eager[i].log_probs, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(batched.states[0, -1] - batched.states[1, -1]).max()) > 1e-2  # keys matter


def test_step_functions_vmap_over_samples():
    x, v, noise, sig, sig_next, sigma_max = _random_step_inputs(7)
    step = lambda x, v, s, sn, n: sampling.flow_grpo_sde_step(  # noqa: E731
        x[None], v[None], s, sn, sigma_max=sigma_max, noise=n[None]
    )
    per_sample = jax.vmap(step)(x, v, sig, sig_next, noise)
    batched = sampling.flow_grpo_sde_step(x, v, sig, sig_next, sigma_max=sigma_max, noise=noise)
    np.testing.assert_allclose(per_sample.x_next[:, 0], batched.x_next, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_sample.log_prob[:, 0], batched.log_prob, rtol=1e-5, atol=1e-5)


def test_grad_through_the_ode_sampler_matches_finite_differences():
    with jax.enable_x64(True):
        sigmas = flow.inference_sigmas(5, shift=3.0)
        x_init = jax.random.normal(jax.random.key(62), (2, 2, 2, 1), dtype=jnp.float64)

        @jax.jit
        def final_mean(scale):
            vfn = parametric_velocity({"scale": scale, "bias": jnp.float64(0.0)})
            return jnp.mean(sampling.sample(vfn, x_init, sigmas, jax.random.key(0)).states[-1] ** 2)

        grad = jax.grad(final_mean)(jnp.float64(1.0))
        h = 1e-6
        fd = (final_mean(jnp.float64(1.0 + h)) - final_mean(jnp.float64(1.0 - h))) / (2 * h)
        np.testing.assert_allclose(float(grad), float(fd), rtol=1e-6)


def test_batch_sharded_trajectory_equals_unsharded():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("data",))
    vfn = parametric_velocity({"scale": jnp.float32(1.1), "bias": jnp.float32(0.05)})
    sigmas = flow.inference_sigmas(6, shift=3.0)
    x_init = jax.random.normal(jax.random.key(70), (16, 3, 3, 1))
    run = jax.jit(
        lambda x, key: sampling.sample(vfn, x, sigmas, key, method="sde", sde_window=(1, 4))
    )
    plain = run(x_init, jax.random.key(71))
    sharded = run(
        jax.device_put(x_init, NamedSharding(mesh, PartitionSpec("data"))), jax.random.key(71)
    )
    assert not sharded.states.sharding.is_fully_replicated
    for field in ("states", "means", "log_probs", "stds"):
        np.testing.assert_allclose(
            getattr(sharded, field), getattr(plain, field), rtol=1e-6, atol=1e-6, err_msg=field
        )
    # Recomputing log-probs on the sharded trajectory also agrees.
    lp = jax.jit(lambda t: sampling.recompute_log_probs(vfn, t, "sde"))(sharded)
    np.testing.assert_allclose(lp, plain.log_probs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance and renormalisation.
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 3
TOY = {
    "w": jnp.array([0.5, -1.0, 2.0, 0.25]),  # index 3 = null class
    "b": jnp.array([0.1, 0.3, -0.2, 0.0]),
}


def toy_velocity(params, x, sigma, cond, calls=None):
    """Linear toy model v = w[c]·x + b[c] + σ, and records the batch sizes it is called with."""
    if calls is not None:
        calls.append(x.shape[0])
    per = lambda a: a[cond].reshape(-1, 1, 1, 1)  # noqa: E731
    return per(params["w"]) * x + per(params["b"]) + sigma.reshape(-1, 1, 1, 1)


def _toy_inputs():
    x = jax.random.normal(jax.random.key(80), (4, 3, 3, 2))
    return x, jnp.array([0.9, 0.5, 0.3, 0.1]), jnp.array([0, 1, 2, 1], jnp.int32)


def test_cfg_scale_one_is_conditional_in_one_pass():
    x, sigma, cond = _toy_inputs()
    calls = []
    velocity = lambda p, x, s, c: toy_velocity(p, x, s, c, calls)  # noqa: E731
    v = sampling.guided_velocity(
        velocity, TOY, x, sigma, cond, guidance_scale=1.0, null_class=NUM_CLASSES
    )
    np.testing.assert_allclose(v, toy_velocity(TOY, x, sigma, cond), rtol=1e-6)
    assert calls == [4]  # no null pass
    calls.clear()
    sampling.guided_velocity(
        velocity, TOY, x, sigma, cond, guidance_scale=4.5, null_class=NUM_CLASSES
    )
    assert calls == [8]  # one call on [cond; null]


def test_cfg_closed_form_on_linear_toy_model():
    x, sigma, cond = _toy_inputs()
    w = 3.0
    v = sampling.guided_velocity(
        toy_velocity, TOY, x, sigma, cond, guidance_scale=w, null_class=NUM_CLASSES
    )
    wc, bc = _bcast(TOY["w"][cond]), _bcast(TOY["b"][cond])
    s = _bcast(sigma)
    v_c = wc * _np(x) + bc + s
    v_u = 0.25 * _np(x) + 0.0 + s
    np.testing.assert_allclose(v, v_u + w * (v_c - v_u), rtol=1e-5, atol=1e-5)
    # φ = 0 is plain CFG; jit with a traced scale gives the same.
    v0 = sampling.guided_velocity(
        toy_velocity, TOY, x, sigma, cond, guidance_scale=w, rescale_phi=0.0, null_class=NUM_CLASSES
    )
    np.testing.assert_allclose(v0, v, rtol=1e-6)
    traced = jax.jit(
        lambda g, phi: sampling.guided_velocity(
            toy_velocity,
            TOY,
            x,
            sigma,
            cond,
            guidance_scale=g,
            rescale_phi=phi,
            null_class=NUM_CLASSES,
        )
    )(jnp.float32(w), jnp.float32(0.0))
    np.testing.assert_allclose(traced, v, rtol=1e-5, atol=1e-5)
    # Scalar σ is broadcast to the batch.
    v_scalar = sampling.guided_velocity(
        toy_velocity, TOY, x, 0.5, cond, guidance_scale=w, null_class=NUM_CLASSES
    )
    v_vec = sampling.guided_velocity(
        toy_velocity, TOY, x, jnp.full((4,), 0.5), cond, guidance_scale=w, null_class=NUM_CLASSES
    )
    np.testing.assert_allclose(v_scalar, v_vec, rtol=1e-6)


def test_cfg_rescale():
    x, sigma, cond = _toy_inputs()
    w, phi = 5.0, 0.7
    v = sampling.guided_velocity(
        toy_velocity, TOY, x, sigma, cond, guidance_scale=w, rescale_phi=phi, null_class=NUM_CLASSES
    )
    s = _bcast(sigma)
    v_c = _bcast(TOY["w"][cond]) * _np(x) + _bcast(TOY["b"][cond]) + s
    v_u = 0.25 * _np(x) + s
    v_cfg = v_u + w * (v_c - v_u)
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1).reshape(-1, 1, 1, 1)  # noqa: E731
    expected = phi * v_cfg * std(v_c) / std(v_cfg) + (1 - phi) * v_cfg
    np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-5)
    # φ = 1: per-sample std equals that of the conditional velocity, direction of v_cfg kept.
    v1 = sampling.guided_velocity(
        toy_velocity, TOY, x, sigma, cond, guidance_scale=w, rescale_phi=1.0, null_class=NUM_CLASSES
    )
    np.testing.assert_allclose(std(_np(v1)), std(v_c), rtol=1e-5)
    np.testing.assert_allclose(_np(v1) / std(_np(v1)), v_cfg / std(v_cfg), rtol=1e-4, atol=1e-5)


def test_renormalize_velocity():
    k1, k2 = jax.random.split(jax.random.key(90))
    v = jax.random.normal(k1, (5, 3, 3, 2))
    v_ref = 3.0 * jax.random.normal(k2, (5, 3, 3, 2))
    out = sampling.renormalize_velocity(v, v_ref)
    flat = lambda a: _np(a).reshape(5, -1)  # noqa: E731
    out_norm = np.linalg.norm(flat(out), axis=1)
    np.testing.assert_allclose(out_norm, np.linalg.norm(flat(v_ref), axis=1), rtol=1e-5)
    # Same direction: unit vectors agree (cosine similarity 1).
    np.testing.assert_allclose(
        flat(out) / out_norm[:, None], flat(v) / np.linalg.norm(flat(v), axis=1)[:, None], atol=1e-6
    )
    # A zero velocity stays zero instead of producing NaN.
    zero = sampling.renormalize_velocity(jnp.zeros_like(v), v_ref)
    np.testing.assert_array_equal(zero, np.zeros(v.shape))

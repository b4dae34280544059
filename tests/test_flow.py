"""Tests for normguard_jax.flow: interpolant algebra, time shift, σ samplers, inference schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import flow


def _images(seed, shape=(3, 4, 4, 2)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0), jax.random.normal(k2, shape)


# ---------------------------------------------------------------------------------------------
# Interpolant and targets.
# ---------------------------------------------------------------------------------------------


def test_broadcast_to_batch_shapes():
    x = jnp.zeros((3, 4, 5, 2))
    assert flow.broadcast_to_batch(jnp.ones((3,)), x).shape == (3, 1, 1, 1)
    assert flow.broadcast_to_batch(0.5, x).shape == ()
    assert flow.broadcast_to_batch(jnp.ones((3, 1, 1, 1)), x).shape == (3, 1, 1, 1)  # idempotent
    with pytest.raises(ValueError):
        flow.broadcast_to_batch(jnp.ones((4,)), x)
    with pytest.raises(ValueError):
        flow.broadcast_to_batch(jnp.ones((4, 1, 1, 1)), x)


def test_interpolate_endpoints_and_per_sample_sigma():
    x0, eps = _images(0)
    np.testing.assert_allclose(flow.interpolate(x0, eps, 0.0), x0)
    np.testing.assert_allclose(flow.interpolate(x0, eps, 1.0), eps)
    sigma = jnp.array([0.0, 0.25, 1.0])
    xs = flow.interpolate(x0, eps, sigma)
    # Each sample uses its own σ: compare with scalar calls sample by sample.
    for i in range(3):
        np.testing.assert_allclose(xs[i], (1 - sigma[i]) * x0[i] + sigma[i] * eps[i], rtol=1e-6)


def test_estimates_invert_the_interpolant():
    """With the true velocity ε - x0, x0̂ and ε̂ recover x0 and ε exactly at any σ."""
    x0, eps = _images(1)
    sigma = jnp.array([0.1, 0.5, 0.93])
    x = flow.interpolate(x0, eps, sigma)
    v = flow.velocity_target(x0, eps)
    np.testing.assert_allclose(v, eps - x0)
    np.testing.assert_allclose(flow.x0_from_velocity(x, v, sigma), x0, atol=2e-6)
    np.testing.assert_allclose(flow.noise_from_velocity(x, v, sigma), eps, atol=2e-6)


def test_velocity_is_the_sigma_derivative_of_the_interpolant():
    x0, eps = _images(2)
    dx_dsigma = jax.jvp(
        lambda s: flow.interpolate(x0, eps, s), (jnp.float32(0.3),), (jnp.float32(1.0),)
    )[1]
    np.testing.assert_allclose(dx_dsigma, flow.velocity_target(x0, eps), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Time shift.
# ---------------------------------------------------------------------------------------------


def test_time_shift_closed_form_properties():
    sigma = jnp.linspace(0.01, 0.99, 50)
    for s in (0.5, 1.0, 3.0, 7.0):
        shifted = flow.time_shift(sigma, s)
        # logit(shift(σ)) = logit(σ) + log s (float32 logit near 1 is good to ~1e-5 relative).
        logit = lambda p: jnp.log(p) - jnp.log1p(-p)  # noqa: E731
        np.testing.assert_allclose(logit(shifted), logit(sigma) + math.log(s), atol=1e-4)
        # shift(·, 1/s) inverts shift(·, s); shifts compose multiplicatively.
        np.testing.assert_allclose(flow.time_shift(shifted, 1.0 / s), sigma, atol=1e-6)
        np.testing.assert_allclose(
            flow.time_shift(shifted, 2.0), flow.time_shift(sigma, 2.0 * s), atol=1e-6
        )
        assert bool(jnp.all(jnp.diff(shifted) > 0))
        np.testing.assert_allclose(flow.time_shift(jnp.array([0.0, 1.0]), s), [0.0, 1.0])
    np.testing.assert_allclose(flow.time_shift(sigma, 1.0), sigma)


# ---------------------------------------------------------------------------------------------
# Training-time σ samplers.
# ---------------------------------------------------------------------------------------------


def test_sampler_registry_shapes_and_ranges():
    assert set(flow.TIMESTEP_SAMPLERS) == {"uniform", "logit_normal"}
    for name, sampler in flow.TIMESTEP_SAMPLERS.items():
        s = sampler(jax.random.key(0), 257)
        assert s.shape == (257,) and s.dtype == jnp.float32, name
        assert bool(jnp.all((s >= 0) & (s <= 1))), name
        s2 = jax.jit(sampler, static_argnums=1)(jax.random.key(0), 257)
        np.testing.assert_allclose(s, s2, atol=1e-6)


def test_uniform_sampler_moments():
    # n = 40000: standard error of the mean is sqrt(1/12/n) = 1.4e-3 and of the variance about
    # sqrt(1/180/n) = 3.7e-4; tolerances are ~4.5 standard errors.
    s = np.asarray(flow.TIMESTEP_SAMPLERS["uniform"](jax.random.key(3), 40000))
    assert abs(s.mean() - 0.5) < 6.5e-3
    assert abs(s.var() - 1.0 / 12.0) < 1.7e-3


def test_logit_normal_sampler_moments():
    mean, std, n = 0.3, 0.8, 40000
    s = flow.TIMESTEP_SAMPLERS["logit_normal"](jax.random.key(4), n, mean=mean, std=std)
    z = np.asarray(jnp.log(s) - jnp.log1p(-s), np.float64)
    # Standard errors: std/sqrt(n) = 4e-3 for the mean, std·sqrt(1/(2n)) = 2.8e-3 for the std.
    assert abs(z.mean() - mean) < 0.018
    assert abs(z.std() - std) < 0.013


def test_sampler_shift_equals_shifting_the_draws():
    key = jax.random.key(5)
    for name, sampler in flow.TIMESTEP_SAMPLERS.items():
        np.testing.assert_allclose(
            sampler(key, 64, shift=3.0),
            flow.time_shift(sampler(key, 64), 3.0),
            atol=1e-6,
            err_msg=name,
        )
    # For the logit-normal, a shift s is the same as adding log s to the mean (same z draws).
    ln = flow.TIMESTEP_SAMPLERS["logit_normal"]
    np.testing.assert_allclose(ln(key, 64, shift=3.0), ln(key, 64, mean=math.log(3.0)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Inference schedule.
# ---------------------------------------------------------------------------------------------


def test_schedule_pinned_values():
    s = flow.inference_sigmas(10, shift=3.0)
    assert s.shape == (11,) and s.dtype == np.float32
    # Shifts compose multiplicatively, so the last non-zero σ is
    # shift_3(shift_3(1/1000)) = shift_9(1/1000) = 0.009 / 1.008 = 1/112 = 0.00892857...
    assert abs(float(s[-2]) - 0.0089286) < 1e-6
    assert abs(float(s[-2]) - 1.0 / 112.0) < 1e-8
    # Three steps: σ_min = shift_3(0.001) = 3/1002; the middle point of linspace(1, σ_min, 3) is
    # 1005/2004, and shift_3(1005/2004) = 3015/4014 = 335/446 by hand.
    s3 = flow.inference_sigmas(3, shift=3.0)
    np.testing.assert_allclose(s3, [1.0, 335.0 / 446.0, 1.0 / 112.0, 0.0], rtol=1e-7, atol=0)


def test_schedule_structure():
    for n, shift in [(1, 3.0), (4, 1.0), (10, 3.0), (28, 3.0), (40, 2.0)]:
        s = flow.inference_sigmas(n, shift)
        assert s.shape == (n + 1,) and s.dtype == np.float32
        assert s[0] == 1.0 and s[-1] == 0.0
        assert np.all(np.diff(s) < 0), (n, shift)
        assert not s.flags.writeable


def test_schedule_shift_one_is_linspace():
    for n in (2, 10, 40):
        s = flow.inference_sigmas(n, shift=1.0)
        np.testing.assert_allclose(s[:-1], np.linspace(1.0, 0.001, n), rtol=2e-7, atol=0)


def test_schedule_matches_exact_rational_formula_to_float32_precision():
    """σ_i = shift_s(1 - i·(1 - shift_s(1/1000))/(N - 1)) evaluated in exact float64 arithmetic.

    The library takes σ_min from a float32 table, so it may differ from this exact formula by
    float32 rounding only: at most one float32 ulp of each value.
    """
    for n, shift in [(10, 3.0), (28, 3.0), (40, 1.0), (1000, 3.0)]:
        s = flow.inference_sigmas(n, shift)
        sigma_min = shift * 0.001 / (1.0 + (shift - 1.0) * 0.001)
        grid = 1.0 - np.arange(n) * (1.0 - sigma_min) / (n - 1)
        exact = shift * grid / (1.0 + (shift - 1.0) * grid)
        ulp = np.spacing(exact.astype(np.float32))
        assert np.all(np.abs(s[:-1].astype(np.float64) - exact) <= ulp), (n, shift)


def test_schedule_validates_arguments():
    with pytest.raises(ValueError):
        flow.inference_sigmas(0)
    with pytest.raises(ValueError):
        flow.inference_sigmas(10, shift=0.0)

"""Rectified-flow maths shared by every part of normguard_jax.

Conventions (see DESIGN.md, "Conventions"):

* Images are NHWC float32 arrays, batch axis first.
* Interpolant ``x_σ = (1 - σ)·x0 + σ·ε`` with σ ∈ [0, 1]: σ = 1 is pure noise, σ = 0 is data.
* Velocity ``v = ε - x0`` (= dx_σ/dσ). Sampling integrates σ downwards from 1 to 0.
* ``σ`` arrays have shape ``(B,)`` (one value per sample) or are scalars shared by the batch;
    :func:`broadcast_to_batch` lifts them over the non-batch axes.

Everything here is a pure function of arrays (jit-, vmap- and grad-friendly) except
:func:`inference_sigmas`, which builds a static NumPy schedule once, outside any trace.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def broadcast_to_batch(sigma: jax.Array | float, x: jax.Array) -> jax.Array:
    """Reshapes per-sample values so they broadcast against a batched array.

    Args:
        sigma: a scalar, or an array of shape ``(B,)`` (any leading shape that is a prefix of
            ``x.shape`` also works), or an array already shaped to broadcast against ``x``
            (same number of dimensions, e.g. ``(B, 1, 1, 1)``), which is returned unchanged.
        x: the batched array, e.g. ``(B, H, W, C)``.

    Returns:
        ``sigma`` unchanged if it is a scalar or already has ``x.ndim`` dimensions, otherwise
        ``sigma`` reshaped to ``sigma.shape + (1,) * (x.ndim - sigma.ndim)``, e.g. ``(B, 1, 1, 1)``.
    """
    sigma = jnp.asarray(sigma)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == x.ndim:
        if np.broadcast_shapes(sigma.shape, x.shape) != x.shape:
            raise ValueError(
                f"sigma of shape {sigma.shape} does not broadcast over x of shape {x.shape}"
            )
        return sigma
    if sigma.ndim > x.ndim or sigma.shape != x.shape[: sigma.ndim]:
        raise ValueError(f"cannot broadcast sigma of shape {sigma.shape} over x of shape {x.shape}")
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Point on the straight path between data and noise: ``(1 - σ)·x0 + σ·noise``.

    Args:
        x0: clean images ``(B, H, W, C)``.
        noise: standard normal noise, same shape as ``x0``.
        sigma: scalar or ``(B,)`` noise level in [0, 1].

    Returns:
        ``x_σ`` with the shape of ``x0``.
    """
    s = broadcast_to_batch(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Flow-matching regression target ``v = noise - x0`` (independent of σ)."""
    return noise - x0


def x0_from_velocity(x: jax.Array, v: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Clean-image estimate ``x0̂ = x - σ·v`` from a state ``x`` at level σ and a velocity ``v``."""
    return x - broadcast_to_batch(sigma, x) * v


def noise_from_velocity(x: jax.Array, v: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Noise estimate ``ε̂ = x + (1 - σ)·v`` from a state ``x`` at level σ and a velocity ``v``."""
    return x + (1.0 - broadcast_to_batch(sigma, x)) * v


def time_shift(sigma: jax.Array | float, shift: float) -> jax.Array:
    """SD3 resolution shift ``s·σ / (1 + (s - 1)·σ)``.

    Maps [0, 1] onto itself monotonically, fixes 0 and 1, and adds ``log s`` to ``logit σ``
    (so ``shift > 1`` spends more steps at high noise). ``time_shift(·, 1/s)`` is its inverse.
    Works on scalars and arrays of any shape; the dtype follows ``sigma``.
    """
    sigma = jnp.asarray(sigma)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


# ----------------------------------------------------------------------------------------------
# Training-time σ samplers. Signature: (key, batch_size, **kwargs) -> (batch_size,) float32.
# ----------------------------------------------------------------------------------------------


def uniform_sigmas(key: jax.Array, batch_size: int, *, shift: float = 1.0) -> jax.Array:
    """σ ~ U[0, 1), then ``time_shift(σ, shift)`` (shift 1 leaves σ uniform).

    Returns:
        ``(batch_size,)`` float32 array in [0, 1).
    """
    sigma = jax.random.uniform(key, (batch_size,), dtype=jnp.float32)
    return time_shift(sigma, shift)


def logit_normal_sigmas(
    key: jax.Array, batch_size: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> jax.Array:
    """Logit-normal σ (SD3): ``σ = sigmoid(mean + std·z)``, z ~ N(0, 1), then ``time_shift``.

    Because ``logit(time_shift(σ, s)) = logit(σ) + log s``, a shift is the same as adding
    ``log s`` to ``mean``.

    Returns:
        ``(batch_size,)`` float32 array in (0, 1).
    """
    z = jax.random.normal(key, (batch_size,), dtype=jnp.float32)
    return time_shift(jax.nn.sigmoid(mean + std * z), shift)


# Config name -> sampler. Call as ``TIMESTEP_SAMPLERS[name](key, batch_size, **kwargs)``.
TIMESTEP_SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "uniform": uniform_sigmas,
    "logit_normal": logit_normal_sigmas,
}


# ----------------------------------------------------------------------------------------------
# Inference schedule.
# ----------------------------------------------------------------------------------------------


def _float32_shift(sigma: np.float32, shift: float) -> np.float32:
    """``time_shift`` evaluated op by op in float32 (how the training table is built)."""
    sigma = np.float32(sigma)
    s = np.float32(shift)
    return np.float32(s * sigma) / np.float32(
        np.float32(1.0) + np.float32(s - np.float32(1.0)) * sigma
    )


@functools.lru_cache(maxsize=64)
def _inference_sigmas_cached(num_steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    # Ends of the shifted training table, computed in float32 like the reference
    # (table = arange(1, N+1)/N as float32, shifted element-wise in float32).
    sigma_max = float(_float32_shift(np.float32(1.0), shift))
    sigma_min = float(_float32_shift(np.float32(1.0) / np.float32(num_train_timesteps), shift))
    # The inference grid is linear in float64 between those (already shifted) ends and is
    # shifted a second time, still in float64; only then is it rounded to float32.
    timesteps = np.linspace(
        sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps
    )
    sigmas = timesteps / num_train_timesteps
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    sigmas = np.concatenate([sigmas.astype(np.float32), np.zeros((1,), np.float32)])
    sigmas.setflags(write=False)
    return sigmas


def inference_sigmas(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000
) -> np.ndarray:
    """The N-step sampling schedule of a shifted flow-matching Euler scheduler (static shift).

    Reproduces ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(N)``
    of diffusers to float32 precision:

    1. ``σ_min = shift(1 / num_train_timesteps)`` and ``σ_max = shift(1) = 1``, in float32;
    2. ``σ_i = shift(linspace(σ_max, σ_min, N)_i)`` in float64 — the shift is applied a second
          time, to values whose low end was already shifted;
    3. cast to float32 and append a terminal 0.

    Example: ``shift=3, num_steps=10`` gives ``σ_9 = shift(shift(0.001)) ≈ 0.0089286``; with
    ``shift=1`` the schedule is ``linspace(1, 0.001, N)`` followed by 0.

    Args:
        num_steps: number of sampling steps N ≥ 1.
        shift: time-shift factor s (3.0 is the SD3 default).
        num_train_timesteps: size of the discrete training table (1000).

    Returns:
        Read-only NumPy float32 array of shape ``(N + 1,)``, strictly decreasing from 1.0 to 0.0.
        Sampling step k goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return _inference_sigmas_cached(int(num_steps), float(shift), int(num_train_timesteps))


# ----------------------------------------------------------------------------------------------
# Re-noised training batches (DiffusionNFT, AWM, RAM, online DPO).
# ----------------------------------------------------------------------------------------------


def schedule_sigma_sampler(sigmas) -> Callable[[jax.Array, int], jax.Array]:
    """σ sampler drawing uniformly among the levels of a sampling schedule.

    Args:
      sigmas: ``(T+1,)`` schedule ending in 0 (:func:`inference_sigmas`); the terminal 0 is
        excluded, so σ ∈ {sigmas[0], …, sigmas[T-1]} as in the references (their training
        levels are the rollout's timesteps / 1000).

    Returns:
      ``(key, batch_size) -> (batch_size,)`` float32 sampler, usable wherever a
      ``TIMESTEP_SAMPLERS`` entry (with its options bound) is.
    """
    levels = jnp.asarray(sigmas, jnp.float32)[:-1]

    def sampler(key, batch_size: int) -> jax.Array:
        return jax.random.choice(key, levels, (batch_size,))

    return sampler


def renoised_batch(key, x0, cond, advantage, *, sigma_sampler) -> dict:
    """Fresh noise and σ for clean samples: the batch layout of the forward-process objectives.

    Args:
      key: typed PRNG key.
      x0: (B, H, W, C) clean samples in [-1, 1] drawn from the sampling policy.
      cond: (B,) int32 labels used to draw them, or a conditioning pytree (leading axis B).
      advantage: (B,) float32 advantages (e.g. from ``advantages.group_advantages``).
      sigma_sampler: ``(key, B) -> (B,)`` in [0, 1], e.g. ``TIMESTEP_SAMPLERS[name]`` (with its
        options bound) or :func:`schedule_sigma_sampler`.

    Returns:
      ``{"x0", "noise", "sigma", "cond", "advantage"}``; the objective forms
      ``x_σ = interpolate(x0, noise, sigma)`` itself.
    """
    k_noise, k_sigma = jax.random.split(key)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    sigma = sigma_sampler(k_sigma, x0.shape[0]).astype(jnp.float32)
    return {"x0": x0, "noise": noise, "sigma": sigma, "cond": cond,
            "advantage": jnp.asarray(advantage, jnp.float32)}

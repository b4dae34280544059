"""Analyses of a fine-tuned generator against its frozen reference.

``velocity_norm_ratios`` measures the velocity-norm inflation that NormGuard penalises: it runs
the deterministic sampler with the fine-tuned parameters θ and, on every state x_k of that
trajectory, evaluates both θ and the reference θ_ref, giving

    ρ_k(b) = ‖v_θ(x_k, σ_k, c_b)‖₂ / ‖v_ref(x_k, σ_k, c_b)‖₂      (per sample b, norms over H·W·C)

with the same classifier-free guidance on both sides (the velocity that actually moves x).

``adjoint_sensitivity`` asks whether the reward *wants* larger velocities: for a differentiable
reward R it returns, per sample and step, g_k = dR/dε_k at ε = 0 where the sampler uses
(1 + ε_k)·v_k at step k; ``sensitivity_summary`` reduces it to per-step mean, std, t-statistic
and sign fraction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import flow, normguard, sampling


@functools.partial(jax.jit, static_argnames=(
    "velocity", "image_shape", "num_steps", "shift", "guidance_scale", "null_class",
    "renormalize_phi", "renormalize_sigma_max"))
def velocity_norm_ratios(velocity, params, ref_params, labels, key, *, image_shape,
                         num_steps: int, shift: float, guidance_scale: float,
                         null_class: int, null_condition=None, renormalize_phi: float = 0.0,
                         renormalize_sigma_max: float = 1.0) -> jax.Array:
    """Per-step, per-sample ρ_k = ‖v_θ(x_k)‖ / ‖v_ref(x_k)‖ on θ's own ODE trajectory.

    With ``renormalize_phi > 0`` the trajectory is instead the renormalised sampler's
    (:func:`sampling.sample` with those options, θ_ref the reference) and the numerator is the
    velocity that sampler applied, so ρ_k is the norm ratio the renormalised samples were
    actually made with (exactly 1 up to rounding at full-strength steps).

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)`` (static).
      params: fine-tuned parameters θ (drive the trajectory).
      ref_params: reference parameters θ_ref (evaluated on θ's states).
      labels: (B,) int32 class labels, or a text conditioning pytree (leading axis B).
      key: typed key; the initial noise is ``fold_in(key, 0)`` as in
        :func:`sampling.generate_images`, so the states are those of the sample grids.
      image_shape: (H, W, C).
      num_steps: ODE steps on ``flow.inference_sigmas(num_steps, shift)``.
      shift: schedule time shift.
      guidance_scale: CFG scale applied to both θ and θ_ref (1 = conditional velocity).
      null_class: the unconditional label.
      null_condition: a text model's null conditioning (an argument; replaces
        ``null_class``).
      renormalize_phi, renormalize_sigma_max: the renormalisation of the sampler (static;
        0 = the plain ODE).

    Returns:
      (num_steps, B) float32 ratios; step k is the velocity at σ_k (k = 0 is pure noise).
    """
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    batch = sampling.cond_batch_size(labels)
    x = sampling.initial_noise(jax.random.fold_in(key, 0), batch, image_shape)
    guided = functools.partial(
        sampling.conditional_velocity_fn, velocity, cond=labels, guidance_scale=guidance_scale,
        null_class=null_class if null_condition is None else null_condition)
    ref_fn = guided(ref_params)
    traj = sampling.sample(guided(params), x, sigmas, jax.random.fold_in(key, 1), method="ode",
                           return_velocities=True, ref_velocity_fn=ref_fn,
                           renormalize=renormalize_phi > 0, renormalize_phi=renormalize_phi,
                           renormalize_sigma_max=renormalize_sigma_max)

    def ref_norm(state, sigma):
        return normguard.per_sample_norm(ref_fn(state, jnp.full((state.shape[0],), sigma)))

    ref_norms = jax.lax.map(lambda args: ref_norm(*args), (traj.states[:-1], sigmas[:-1]))
    theta_norms = jax.vmap(normguard.per_sample_norm)(traj.velocities)
    return theta_norms / ref_norms


def scaled_velocity_sample(velocity_fn, x_init: jax.Array, sigmas: jax.Array,
                           eps: jax.Array) -> jax.Array:
    """Euler (ODE) sampling with the velocity of step k scaled per sample by ``1 + eps[k]``.

    Args:
      velocity_fn: ``(x (B,H,W,C), sigma (B,)) -> v`` with parameters, labels and CFG closed over.
      x_init: (B, H, W, C) initial noise at σ = sigmas[0].
      sigmas: (T+1,) decreasing schedule.
      eps: (T, B) per-step, per-sample scale perturbations (0 = the plain sampler).

    Returns:
      (B, H, W, C) final states.
    """
    def body(x, inputs):
        sigma, sigma_next, e = inputs
        v = velocity_fn(x, jnp.full((x.shape[0],), sigma, jnp.float32))
        scale = (1.0 + e).reshape((-1,) + (1,) * (x.ndim - 1))
        return x + (sigma_next - sigma) * scale * v, None

    x_final, _ = jax.lax.scan(body, x_init, (sigmas[:-1], sigmas[1:], eps))
    return x_final


@functools.partial(jax.jit, static_argnames=(
    "velocity", "reward_fn", "image_shape", "num_steps", "shift", "guidance_scale",
    "null_class"))
def adjoint_sensitivity(velocity, params, labels, key, *, reward_fn, image_shape,
                        num_steps: int, shift: float, guidance_scale: float,
                        null_class: int) -> jax.Array:
    """g_k = dR/dε_k at ε = 0: first-order effect on the reward of scaling step k's velocity.

    Sampling is the deterministic Euler ODE of :func:`sampling.generate_images` (same initial
    noise ``fold_in(key, 0)``) with ``v_k → (1 + ε_k)·v_k``; the derivative is taken by reverse
    mode through the whole sampler. Samples are independent, so the gradient of the batch sum
    gives every sample's own derivative.

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)`` (static).
      params: generator parameters.
      labels: (B,) int32 class labels.
      key: typed key.
      reward_fn: differentiable ``(images (B,H,W,C), labels (B,)) -> (B,)`` (static, hashable).
      image_shape, num_steps, shift, guidance_scale, null_class: sampler settings.

    Returns:
      (num_steps, B) float32: g[k, b] = ∂R_b/∂ε_{k,b}. g > 0 means a larger velocity norm at
      step k would raise sample b's reward.
    """
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    batch = sampling.cond_batch_size(labels)
    x = sampling.initial_noise(jax.random.fold_in(key, 0), batch, image_shape)
    vfn = sampling.conditional_velocity_fn(velocity, params, labels,
                                           guidance_scale=guidance_scale, null_class=null_class)

    def total_reward(eps):
        return jnp.sum(reward_fn(scaled_velocity_sample(vfn, x, sigmas, eps), labels))

    return jax.grad(total_reward)(jnp.zeros((num_steps, batch), jnp.float32))


def sensitivity_summary(g) -> dict[str, list[float]]:
    """Per-step statistics of (T, B) sensitivities across the batch.

    Returns ``{"mean", "std", "t_stat", "frac_positive"}``, each a length-T list: the batch mean,
    the sample standard deviation (ddof = 1), the one-sample t-statistic ``mean / (std/√B)``
    (0 where std = 0) and the fraction of samples with g > 0.
    """
    g = np.asarray(g, np.float64)
    b = g.shape[1]
    mean, std = g.mean(axis=1), g.std(axis=1, ddof=1)
    t = np.where(std > 0, mean / np.where(std > 0, std, 1.0) * np.sqrt(b), 0.0)
    return {"mean": mean.tolist(), "std": std.tolist(), "t_stat": t.tolist(),
            "frac_positive": (g > 0).mean(axis=1).tolist()}

"""Analyses of a fine-tuned generator against its frozen reference.

``velocity_norm_ratios`` measures the velocity-norm inflation that NormGuard penalises: it runs
the deterministic sampler with the fine-tuned parameters θ and, on every state x_k of that
trajectory, evaluates both θ and the reference θ_ref, giving

    ρ_k(b) = ‖v_θ(x_k, σ_k, c_b)‖₂ / ‖v_ref(x_k, σ_k, c_b)‖₂      (per sample b, norms over H·W·C)

with the same classifier-free guidance on both sides (the velocity that actually moves x).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from normguard_jax import flow, generate, normguard, sampling


@functools.partial(jax.jit, static_argnames=(
    "velocity", "image_shape", "num_steps", "shift", "guidance_scale", "null_class"))
def velocity_norm_ratios(velocity, params, ref_params, labels, key, *, image_shape,
                         num_steps: int, shift: float, guidance_scale: float,
                         null_class: int) -> jax.Array:
    """Per-step, per-sample ρ_k = ‖v_θ(x_k)‖ / ‖v_ref(x_k)‖ on θ's own ODE trajectory.

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)`` (static).
      params: fine-tuned parameters θ (drive the trajectory).
      ref_params: reference parameters θ_ref (evaluated on θ's states).
      labels: (B,) int32 class labels.
      key: typed key; the initial noise is ``fold_in(key, 0)`` as in
        :func:`generate.generate_images`, so the states are those of the sample grids.
      image_shape: (H, W, C).
      num_steps: ODE steps on ``flow.inference_sigmas(num_steps, shift)``.
      shift: schedule time shift.
      guidance_scale: CFG scale applied to both θ and θ_ref (1 = conditional velocity).
      null_class: the unconditional label.

    Returns:
      (num_steps, B) float32 ratios; step k is the velocity at σ_k (k = 0 is pure noise).
    """
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    x = generate.initial_noise(jax.random.fold_in(key, 0), labels.shape[0], image_shape)
    guided = functools.partial(sampling.guided_velocity, velocity, cond=labels,
                               guidance_scale=guidance_scale, null_class=null_class)
    traj = sampling.sample(functools.partial(guided, params), x, sigmas,
                           jax.random.fold_in(key, 1), method="ode", return_velocities=True)

    def ref_norm(state, sigma):
        v_ref = guided(ref_params, state, jnp.full((state.shape[0],), sigma))
        return normguard.per_sample_norm(v_ref)

    ref_norms = jax.lax.map(lambda args: ref_norm(*args), (traj.states[:-1], sigmas[:-1]))
    theta_norms = jax.vmap(normguard.per_sample_norm)(traj.velocities)
    return theta_norms / ref_norms

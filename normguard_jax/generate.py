"""Image generation from a class-conditional generator, with fixed seeds.

Thin glue between a pure ``velocity(params, x, sigma, cond)`` and :func:`sampling.sample`: it
closes over the parameters, labels and classifier-free guidance, draws the initial noise from
a key, and returns the final states. Used for sample grids, evaluation and RL rollouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import flow, sampling


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels ``[0]*per_class + [1]*per_class + …``: (num_classes·per_class,) int32.

    Tiled with ``ncols=per_class``, each row of the grid is one class.
    """
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def conditional_velocity_fn(velocity, params, cond, *, guidance_scale: float,
                            null_class: int, rescale_phi: float = 0.0):
    """``(x, sigma_b) -> v`` for fixed params and labels, with classifier-free guidance.

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)``.
      params: generator parameters.
      cond: (B,) int32 labels.
      guidance_scale: CFG scale w (1.0 = plain conditional velocity, one model call).
      null_class: the unconditional label.
      rescale_phi: CFG-rescale φ in [0, 1].
    """
    return functools.partial(sampling.guided_velocity, velocity, params, cond=cond,
                             guidance_scale=guidance_scale, rescale_phi=rescale_phi,
                             null_class=null_class)


def initial_noise(key: jax.Array, batch: int, image_shape) -> jax.Array:
    """Standard normal (B, H, W, C) float32 starting states (σ = 1)."""
    return jax.random.normal(key, (batch, *image_shape), jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    "velocity", "image_shape", "num_steps", "shift", "guidance_scale", "null_class",
    "method", "noise_level", "rescale_phi"))
def generate_images(velocity, params, labels, key, *, image_shape, num_steps: int,
                    shift: float, guidance_scale: float, null_class: int,
                    method: str = "ode", noise_level: float | None = None,
                    rescale_phi: float = 0.0, renormalize_to=None) -> jax.Array:
    """Samples one image per label.

    Args:
      velocity: pure velocity function (static: hashable).
      params: generator parameters.
      labels: (B,) int32 class labels.
      key: typed key; initial noise uses ``fold_in(key, 0)``, sampler noise ``fold_in(key, 1)``.
      image_shape: (H, W, C).
      num_steps: sampler steps on the ``flow.inference_sigmas(num_steps, shift)`` schedule.
      shift: time shift of the schedule.
      guidance_scale, null_class, rescale_phi: classifier-free guidance.
      method: a key of ``sampling.STEP_FNS`` ("ode", "sde", "cps", "dance").
      noise_level: the stochastic sampler's noise level (None: the method's default).
      renormalize_to: reference parameters θ_ref, or None. When given, the (guided) velocity of
        every step is rescaled per sample to the norm of θ_ref's guided velocity on the same
        state (inference-time renormalisation).

    Returns:
      (B, H, W, C) float32 final states (not clipped; data lives in [-1, 1]).
    """
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    x = initial_noise(jax.random.fold_in(key, 0), labels.shape[0], image_shape)
    vfn = conditional_velocity_fn(velocity, params, labels, guidance_scale=guidance_scale,
                                  null_class=null_class, rescale_phi=rescale_phi)
    ref_fn = None if renormalize_to is None else conditional_velocity_fn(
        velocity, renormalize_to, labels, guidance_scale=guidance_scale, null_class=null_class,
        rescale_phi=rescale_phi)
    traj = sampling.sample(vfn, x, sigmas, jax.random.fold_in(key, 1), method=method,
                           noise_level=noise_level, ref_velocity_fn=ref_fn,
                           renormalize=renormalize_to is not None)
    return traj.states[-1]

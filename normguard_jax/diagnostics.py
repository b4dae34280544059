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

The paper's claim is about the batch, not the step: rescaling the velocity magnitude carries no
*coherent first-order* reward signal. Two directions in ε-space make that testable:

- the uniform rescale ε_k = ε for every k, whose derivative is the global
  G_b = Σ_k g_{k,b} (per sample);
- the renormalisation direction. Rescaling v_θ to ‖v_ref‖ at step k multiplies it by
  s_{k,b} = 1/ρ_{k,b}, i.e. ε_{k,b} = 1/ρ_{k,b} − 1, so to first order
  ΔR_b ≈ Σ_k g_{k,b}·ε_{k,b}.

``renormalisation_first_order`` returns both derivatives together with the measured ΔR_b of
sampling with those scales and of the library's renormalised sampler, on the same initial noise;
``batch_level_summary`` reduces per-sample values of several independent batches to the batch
means, their sign consistency and a t-statistic over batches, and ``first_order_agreement``
compares a prediction with a measurement sample by sample.
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


@functools.partial(jax.jit, static_argnames=(
    "velocity", "reward_fn", "image_shape", "num_steps", "shift", "guidance_scale",
    "null_class"))
def renormalisation_first_order(velocity, params, ref_params, labels, key, *, reward_fn,
                                image_shape, num_steps: int, shift: float,
                                guidance_scale: float, null_class: int) -> dict[str, jax.Array]:
    """Batch-level first-order reward signal of rescaling θ's velocity, and renormalisation.

    On one batch (initial noise ``fold_in(key, 0)``, the noise of
    :func:`sampling.generate_images`, of :func:`velocity_norm_ratios` and of
    :func:`adjoint_sensitivity`), with the deterministic Euler sampler and the guided velocity:

    - ``g`` (T, B): g_{k,b} = ∂R_b/∂ε_{k,b} at ε = 0 (as :func:`adjoint_sensitivity`);
    - ``global_derivative`` (B,): G_b = Σ_k g_{k,b}, the derivative along a uniform rescale
      v → (1 + ε)·v of every step;
    - ``eps`` (T, B): ε_{k,b} = 1/ρ_{k,b} − 1 with ρ from :func:`velocity_norm_ratios` on θ's
      own (plain) trajectory: the per-step scale that renormalisation applies there;
    - ``predicted`` (B,): Σ_k g_{k,b}·ε_{k,b}, the first-order prediction of renormalisation's
      effect on the reward;
    - ``measured`` (B,): R(sampled with v_k → (1 + ε_k)·v_k) − R(plain), the effect of those
      fixed scales (the move the prediction linearises);
    - ``renormalised`` (B,): R(``generate_images(..., renormalize_to=ref_params)``) − R(plain),
      the effect of the renormalised sampler, which recomputes the scale on its own states.
      The two measurements differ only because ρ is read on the plain trajectory in one and
      on the renormalised one in the other: a second-order difference in (ρ − 1). They are equal
      whenever ρ does not depend on the state (e.g. θ a rescaled copy of θ_ref);
    - ``reward`` (B,): R(plain).

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)`` (static).
      params: fine-tuned parameters θ.
      ref_params: reference parameters θ_ref (only their velocity norm is used).
      labels: (B,) int32 class labels.
      key: typed key.
      reward_fn: differentiable ``(images (B,H,W,C), labels (B,)) -> (B,)`` (static, hashable).
      image_shape, num_steps, shift, guidance_scale, null_class: sampler settings, shared by θ
        and θ_ref.

    Returns:
      dict of float32 arrays with the keys above. With θ = θ_ref, ε, ``predicted``,
      ``measured`` and ``renormalised`` are 0 and ``global_derivative`` is the base's.
    """
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    batch = sampling.cond_batch_size(labels)
    x = sampling.initial_noise(jax.random.fold_in(key, 0), batch, image_shape)
    vfn = sampling.conditional_velocity_fn(velocity, params, labels,
                                           guidance_scale=guidance_scale, null_class=null_class)
    settings = dict(image_shape=image_shape, num_steps=num_steps, shift=shift,
                    guidance_scale=guidance_scale, null_class=null_class)

    def total_reward(eps):
        r = reward_fn(scaled_velocity_sample(vfn, x, sigmas, eps), labels)
        return jnp.sum(r), r

    g, reward = jax.grad(total_reward, has_aux=True)(jnp.zeros((num_steps, batch), jnp.float32))
    ratios = velocity_norm_ratios(velocity, params, ref_params, labels, key, **settings)
    eps = 1.0 / ratios - 1.0
    scaled = reward_fn(scaled_velocity_sample(vfn, x, sigmas, eps), labels)
    renormalised = reward_fn(sampling.generate_images(velocity, params, labels, key,
                                                      renormalize_to=ref_params, **settings),
                             labels)
    return {"g": g, "global_derivative": jnp.sum(g, axis=0), "eps": eps,
            "predicted": jnp.sum(g * eps, axis=0), "measured": scaled - reward,
            "renormalised": renormalised - reward, "reward": reward}


def batch_level_summary(per_sample) -> dict:
    """Coherence of a per-sample quantity across N independent batches.

    Args:
      per_sample: (N, B) values, one row per batch (e.g. G_b, or a ΔR_b), B ≥ 1 samples each.

    Returns:
      ``batch_means`` (length-N list); ``mean`` (the grand mean, the mean of the batch means);
      ``std_over_batches`` (sample std of the batch means, ddof = 1; 0 for N = 1);
      ``t_stat`` = mean / (std_over_batches / √N), 0 where that std is 0;
      ``sign`` (+1, −1 or 0: the sign of ``mean``);
      ``frac_batches_with_sign`` / ``frac_samples_with_sign``: the fraction of batch means /
      of all N·B samples whose sign is ``sign`` (0 when ``sign`` is 0).
    """
    v = np.asarray(per_sample, np.float64)
    if v.ndim != 2:
        raise ValueError(f"per_sample must be (batches, samples), got shape {v.shape}")
    n = v.shape[0]
    means = v.mean(axis=1)
    mean = float(means.mean())
    std = float(means.std(ddof=1)) if n > 1 else 0.0
    sign = float(np.sign(mean))
    return {"batch_means": means.tolist(), "mean": mean, "std_over_batches": std,
            "t_stat": mean / std * np.sqrt(n) if std > 0 else 0.0, "sign": sign,
            "frac_batches_with_sign": float(np.mean(np.sign(means) == sign)) if sign else 0.0,
            "frac_samples_with_sign": float(np.mean(np.sign(v) == sign)) if sign else 0.0}


def first_order_agreement(predicted, measured) -> dict[str, float]:
    """How well a first-order prediction matches a measured change, over all samples.

    Args:
      predicted, measured: arrays of the same shape (any, e.g. (N, B)), flattened.

    Returns:
      ``predicted_mean``, ``measured_mean``; ``slope``: least-squares slope of measured on
      predicted through the origin (1 = the first order explains the change; 0 when every
      prediction is 0); ``correlation``: Pearson correlation (0 when either is constant);
      ``sign_agreement``: fraction of samples where the signs agree; ``rel_error_of_mean``:
      |mean measured − mean predicted| / |mean measured| (inf when the measured mean is 0 and the
      predicted is not, 0 when both are).
    """
    p = np.asarray(predicted, np.float64).ravel()
    m = np.asarray(measured, np.float64).ravel()
    pp = float(p @ p)
    sp, sm = p.std(), m.std()
    corr = float(np.mean((p - p.mean()) * (m - m.mean())) / (sp * sm)) if sp > 0 and sm > 0 else 0.0
    diff = abs(m.mean() - p.mean())
    rel = diff / abs(m.mean()) if m.mean() != 0 else (0.0 if diff == 0 else float("inf"))
    return {"predicted_mean": float(p.mean()), "measured_mean": float(m.mean()),
            "slope": float(p @ m) / pp if pp > 0 else 0.0, "correlation": corr,
            "sign_agreement": float(np.mean(np.sign(p) == np.sign(m))),
            "rel_error_of_mean": float(rel)}

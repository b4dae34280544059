"""Samplers for flow-matching generators, with per-step Gaussian log-probabilities.

One sampling step maps a state ``x`` at level ``σ`` to ``x_next`` at ``σ_next < σ`` using a
velocity ``v`` (conventions of ``normguard_jax.flow``: ``x_σ = (1-σ)·x0 + σ·ε``, ``v = ε - x0``,
``dt = σ_next - σ < 0``). Five step rules are provided, each a pure function with the signature
``step(x, v, sigma, sigma_next, *, noise=None, x_next=None, **options) -> StepOutput``:

* ``"ode"`` — :func:`ode_step`: Euler ``x + dt·v``, deterministic;
* ``"sde"`` — :func:`flow_grpo_sde_step`: Flow-GRPO's reverse SDE, default level a = 0.7;
* ``"cps"`` — :func:`cps_step`: Coefficients-Preserving Sampling, default level η = 0.8;
* ``"dance"`` — :func:`dance_sde_step`: DanceGRPO's reverse SDE, default level η = 0.3.
* ``"memoryless"`` — :func:`memoryless_step`: the memoryless SDE of Adjoint Matching
  (DDPM's ancestral step in this parametrisation; no noise level).

Shapes: ``x``, ``v``, ``noise``, ``x_next`` are ``(B, H, W, C)``; ``sigma`` and ``sigma_next``
are scalars or ``(B,)`` arrays (a training batch may mix steps of different trajectories).
``StepOutput.log_prob`` is ``(B,)`` and is always a **mean over the non-batch axes** (per-pixel
average), never a sum — exactly what the reference implementations store and use in their
likelihood ratios.

Every step function works in two modes:

* sampling (``x_next=None``): ``x_next = mean + std·noise`` with the given standard-normal noise;
* scoring (``x_next`` given): the stored transition is re-evaluated, e.g. under new parameters.
  The log-prob is differentiable through ``mean`` (hence through ``v`` and the parameters that
  produced it) but never through ``x_next``, which is wrapped in ``stop_gradient``.

:func:`sample` runs a whole trajectory inside one ``lax.scan`` and returns a time-major
:class:`Trajectory`; :func:`recompute_log_probs` re-scores every stored transition.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.flow import (broadcast_to_batch, inference_sigmas, noise_from_velocity,
                                x0_from_velocity)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOutput(NamedTuple):
    """Result of one sampling step.

    Attributes:
      x_next: ``(B, H, W, C)`` next state (the given ``x_next`` when scoring a stored step).
      mean: ``(B, H, W, C)`` mean of the Gaussian transition ``p(x_next | x)``.
      std: standard deviation of the transition, scalar or ``(B,)`` (the shape of ``sigma``);
        0 for deterministic steps.
      log_prob: ``(B,)`` per-pixel mean log-probability of ``x_next`` (see each step function
        for whether constants are included); 0 for deterministic steps.
    """

    x_next: jax.Array
    mean: jax.Array
    std: jax.Array
    log_prob: jax.Array


def _pixel_mean(a: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def _as_sigma(sigma) -> jax.Array:
    return jnp.asarray(sigma, dtype=jnp.float32)


def _gaussian_log_prob(x_next: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Per-pixel mean of log N(x_next; mean, std²), constants included. std: scalar or (B,)."""
    s = broadcast_to_batch(std, mean)
    log_density = -jnp.square(x_next - mean) / (2.0 * jnp.square(s)) - jnp.log(s) - _HALF_LOG_2PI
    return _pixel_mean(log_density)


def _next_state(mean: jax.Array, std: jax.Array, noise, x_next) -> tuple[jax.Array, jax.Array]:
    """Returns (x_next, x_next with gradients stopped) for sampling or scoring mode."""
    if x_next is None:
        if noise is None:
            raise ValueError(
                "a stochastic step needs either `noise` (to sample) or `x_next` (to score)"
            )
        x_next = mean + broadcast_to_batch(std, mean) * noise
    else:
        x_next = jnp.asarray(x_next)
    return x_next, jax.lax.stop_gradient(x_next)


def ode_step(x, v, sigma, sigma_next, *, noise=None, x_next=None) -> StepOutput:
    """Deterministic Euler step ``x_next = x + (σ_next - σ)·v`` (diffusers' flow-match Euler).

    ``noise`` is ignored. When ``x_next`` is given it is returned unchanged (scoring mode).
    ``std`` is 0 with the shape of ``sigma``; ``log_prob`` is ``(B,)`` zeros.
    """
    del noise
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    dt = broadcast_to_batch(sigma_next - sigma, x)
    mean = x + dt * v
    x_next = mean if x_next is None else jnp.asarray(x_next)
    std = jnp.zeros_like(sigma - sigma_next)
    return StepOutput(x_next, mean, std, jnp.zeros(x.shape[:1], jnp.float32))


def flow_grpo_noise_scale(sigma, sigma_max, noise_level: float = 0.7) -> jax.Array:
    """Flow-GRPO's diffusion coefficient ``g = a·sqrt(σ / (1 - σ'))``.

    ``σ' = σ`` except where ``σ == 1`` exactly, where ``σ' = sigma_max`` (the schedule's second
    value ``sigmas[1]``) so that the first step stays finite.

    Args:
      sigma: scalar or ``(B,)`` current level in (0, 1].
      sigma_max: scalar, the schedule's ``sigmas[1]``.
      noise_level: the scale ``a``.

    Returns:
      ``g`` with the shape of ``sigma``. The step's actual standard deviation is
      ``g·sqrt(σ - σ_next)``.
    """
    sigma = _as_sigma(sigma)
    denominator = 1.0 - jnp.where(sigma == 1.0, _as_sigma(sigma_max), sigma)
    return noise_level * jnp.sqrt(sigma / denominator)


def flow_grpo_sde_step(
    x, v, sigma, sigma_next, *, sigma_max, noise_level: float = 0.7, noise=None, x_next=None
) -> StepOutput:
    """Flow-GRPO's SDE step (``sde_step_with_logprob`` with ``sde_type="sde"``).

    With ``dt = σ_next - σ`` and ``g = flow_grpo_noise_scale(σ, sigma_max, a)``::

      mean   = x + dt·[v + g²/(2σ)·(x + (1-σ)·v)]     # Euler–Maruyama of the reverse SDE
      std    = g·sqrt(-dt)
      x_next = mean + std·ε

    The drift adds ``-½g²·score`` to ``v``, with the score ``-(x + (1-σ)v)/σ`` implied by ``v``,
    so the marginals of the ODE are preserved as the step size goes to 0. The reference default
    is ``a = 0.7`` (Flow-GRPO's ``config.sample.noise_level``).

    Args:
      x, v: ``(B, H, W, C)`` state and velocity at ``sigma``.
      sigma, sigma_next: scalars or ``(B,)``; ``0 < σ_next < σ ≤ 1`` or ``σ_next = 0``.
      sigma_max: the schedule's ``sigmas[1]``, used in place of σ where σ == 1.
      noise_level: ``a``.
      noise: standard-normal ``(B, H, W, C)`` noise (sampling mode).
      x_next: stored next state (scoring mode); no gradient flows into it.

    Returns:
      :class:`StepOutput`; ``log_prob`` is the per-pixel mean of the Gaussian log-density of
      ``x_next`` under ``N(mean, std²)``, constants included (as in the reference).
    """
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    g = flow_grpo_noise_scale(sigma, sigma_max, noise_level)
    dt = sigma_next - sigma
    g_b, s_b, dt_b = (broadcast_to_batch(a, x) for a in (g, sigma, dt))
    mean = x + dt_b * (v + jnp.square(g_b) / (2.0 * s_b) * noise_from_velocity(x, v, s_b))
    std = g * jnp.sqrt(-dt)
    x_next, x_next_sg = _next_state(mean, std, noise, x_next)
    return StepOutput(x_next, mean, std, _gaussian_log_prob(x_next_sg, mean, std))


def flow_grpo_kl(mean_theta: jax.Array, mean_ref: jax.Array, std) -> jax.Array:
    """Flow-GRPO's KL penalty between two Gaussian transitions sharing ``std``.

    Returns ``mean_pixels((μ_θ - μ_ref)²) / (2·std²)``, shape ``(B,)``.

    Normalisation: with ``std`` equal to the step's true standard deviation
    (``StepOutput.std = g·sqrt(-dt)``) this is the exact per-pixel-mean KL divergence
    ``KL(N(μ_θ, std²) || N(μ_ref, std²))``. Flow-GRPO's ``train_sd3.py`` instead divides by
    ``2·g²`` — it passes the diffusion coefficient ``g = flow_grpo_noise_scale(...)`` without the
    ``sqrt(-dt)`` factor — which equals the exact KL multiplied by ``(σ - σ_next)``. Pass ``g`` to
    reproduce the reference's numbers (its ``beta`` values are tuned for that scale).

    Args:
      mean_theta, mean_ref: ``(B, H, W, C)`` transition means under the policy and reference.
      std: scalar or ``(B,)``.
    """
    s = broadcast_to_batch(_as_sigma(std), mean_theta)
    return _pixel_mean(jnp.square(mean_theta - mean_ref) / (2.0 * jnp.square(s)))


def cps_step(
    x,
    v,
    sigma,
    sigma_next,
    *,
    noise_level: float = 0.8,
    true_density: bool = False,
    noise=None,
    x_next=None,
) -> StepOutput:
    """Coefficients-Preserving Sampling step (Flow-GRPO's ``sde_type="cps"``).

    With ``x0̂ = x - σ·v`` and ``ε̂ = x + (1-σ)·v``::

      std    = σ_next·sin(η·π/2)
      mean   = (1-σ_next)·x0̂ + sqrt(σ_next² - std²)·ε̂
      x_next = mean + std·ε

    so ``x_next`` keeps the interpolant's coefficients ``(1-σ_next, σ_next)`` exactly. The
    reference configs use ``η = 0.8``.

    Log-prob (``(B,)``, per-pixel mean):

    * ``true_density=False`` (default, the reference's value): ``-mean((x_next - mean)²)`` — no
      variance and no constants. It is *not* a normalised density; its ratios differ from the
      true Gaussian ratios by the factor ``1/(2·std²)`` in the exponent.
    * ``true_density=True``: the Gaussian log-density of ``x_next`` under ``N(mean, std²)``,
      constants included.

    At the last step (``σ_next = 0``) ``std = 0`` and the step is deterministic: the default
    log-prob is 0 there, and the true density is defined as 0 too (instead of ±inf/NaN).

    Args:
      x, v: ``(B, H, W, C)`` state and velocity at ``sigma``.
      sigma, sigma_next: scalars or ``(B,)``.
      noise_level: η ∈ [0, 1]; 0 is DDIM-like deterministic, 1 discards ε̂ entirely.
      true_density: which log-prob to return (see above).
      noise, x_next: sampling / scoring mode, see the module docstring.
    """
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    std = sigma_next * jnp.sin(noise_level * (math.pi / 2.0))
    x0_hat = x0_from_velocity(x, v, sigma)
    eps_hat = noise_from_velocity(x, v, sigma)
    noise_coef = jnp.sqrt(jnp.maximum(jnp.square(sigma_next) - jnp.square(std), 0.0))
    mean = (
        broadcast_to_batch(1.0 - sigma_next, x) * x0_hat
        + broadcast_to_batch(noise_coef, x) * eps_hat
    )
    x_next, x_next_sg = _next_state(mean, std, noise, x_next)
    if true_density:
        positive = std > 0
        safe_std = jnp.where(positive, std, 1.0)
        log_prob = jnp.where(positive, _gaussian_log_prob(x_next_sg, mean, safe_std), 0.0)
    else:
        log_prob = -_pixel_mean(jnp.square(x_next_sg - mean))
    return StepOutput(x_next, mean, std, log_prob)


def dance_sde_step(
    x,
    v,
    sigma,
    sigma_next,
    *,
    noise_level: float = 0.3,
    include_constants: bool = True,
    noise=None,
    x_next=None,
) -> StepOutput:
    """DanceGRPO's SDE step (``flux_step`` with ``sde_solver=True``).

    With ``dσ = σ_next - σ``, ``x0̂ = x - σ·v`` and the score ``-(x - (1-σ)·x0̂)/σ²``::

      mean   = x + dσ·v + dσ·(-½η²·score)
      std    = η·sqrt(σ - σ_next)
      x_next = mean + std·ε

    This is the same reverse SDE as Flow-GRPO's with a constant diffusion coefficient η. The
    reference training scripts use ``η = 0.3``.

    Log-prob (``(B,)``, per-pixel mean): the Gaussian log-density of ``x_next`` under
    ``N(mean, std²)``, constants included, as in the reference. ``include_constants=False``
    keeps only the quadratic term ``-(x_next - mean)²/(2·std²)``; the dropped terms do not depend
    on the parameters, so likelihood ratios are identical either way.

    Args:
      x, v: ``(B, H, W, C)`` state and velocity at ``sigma``.
      sigma, sigma_next: scalars or ``(B,)``, ``σ > 0``.
      noise_level: η.
      include_constants: whether ``log_prob`` includes ``-log std - ½log 2π``.
      noise, x_next: sampling / scoring mode, see the module docstring.
    """
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    s_b = broadcast_to_batch(sigma, x)
    dsigma = broadcast_to_batch(sigma_next - sigma, x)
    score = -(x - (1.0 - s_b) * x0_from_velocity(x, v, s_b)) / jnp.square(s_b)
    mean = x + dsigma * v + dsigma * (-0.5 * noise_level**2 * score)
    std = noise_level * jnp.sqrt(sigma - sigma_next)
    x_next, x_next_sg = _next_state(mean, std, noise, x_next)
    log_prob = _gaussian_log_prob(x_next_sg, mean, std)
    if not include_constants:
        log_prob = log_prob + jnp.log(std) + _HALF_LOG_2PI
    return StepOutput(x_next, mean, std, log_prob)


def memoryless_coefficients(sigma, sigma_next):
    """``(c_x, c_0, std)`` of the memoryless step ``mean = c_x·x + c_0·x0̂``, ``x_next = mean +
    std·ε`` (see :func:`memoryless_step`); scalars or ``(B,)`` like ``sigma``."""
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    a = (1.0 - sigma) / (1.0 - sigma_next)                  # forward signal ratio σ' -> σ
    s2 = jnp.maximum(jnp.square(sigma) - jnp.square(a * sigma_next), 0.0)  # forward variance
    c_x = a * jnp.square(sigma_next) / jnp.square(sigma)
    c_0 = (1.0 - sigma_next) * s2 / jnp.square(sigma)
    std = jnp.sqrt(s2) * sigma_next / sigma
    return c_x, c_0, std


def memoryless_step(x, v, sigma, sigma_next, *, noise=None, x_next=None) -> StepOutput:
    """The memoryless SDE step (Adjoint Matching's noise schedule, ``g² = 2σ/(1-σ)``).

    The reverse of the forward noising SDE ``dx = -x/(1-σ)·dσ + sqrt(2σ/(1-σ))·dW`` whose
    marginals are ``x_σ = (1-σ)·x0 + σ·ε``; discretised exactly as DDPM's ancestral step, the
    posterior ``q(x_σ' | x_σ, x0)`` of that forward process at ``x0 = x0̂ = x - σ·v``::

      a      = (1-σ)/(1-σ'),  s² = σ² - a²·σ'²       # forward transition σ' -> σ
      mean   = a·σ'²/σ²·x + (1-σ')·s²/σ²·x0̂
      std    = s·σ'/σ
      x_next = mean + std·ε

    As the step size goes to 0 this is Euler–Maruyama of the memoryless SDE (the ``"sde"`` rule
    with ``a = √2``), but it stays exact at σ = 1, where the SDE's diffusion is infinite: the
    first step forgets x entirely (``mean = (1-σ')·x0̂``, ``std = σ'``), and the last step
    (σ' = 0) returns ``x0̂`` with std 0. ``log_prob``: per-pixel mean Gaussian log-density,
    constants included; 0 where std = 0. No noise level (the schedule is fixed).
    """
    sigma, sigma_next = _as_sigma(sigma), _as_sigma(sigma_next)
    c_x, c_0, std = memoryless_coefficients(sigma, sigma_next)
    x0_hat = x0_from_velocity(x, v, broadcast_to_batch(sigma, x))
    mean = broadcast_to_batch(c_x, x) * x + broadcast_to_batch(c_0, x) * x0_hat
    x_next, x_next_sg = _next_state(mean, std, noise, x_next)
    positive = std > 0
    log_prob = _gaussian_log_prob(x_next_sg, mean, jnp.where(positive, std, 1.0))
    return StepOutput(x_next, mean, std, jnp.where(positive, log_prob, 0.0))


# Config name -> step rule. All share ``(x, v, sigma, sigma_next, *, noise, x_next, ...)``.
STEP_FNS: dict[str, Callable[..., StepOutput]] = {
    "ode": ode_step,
    "sde": flow_grpo_sde_step,
    "cps": cps_step,
    "dance": dance_sde_step,
    "memoryless": memoryless_step,
}

# Noise level used by :func:`sample` when none is given (the references' defaults).
DEFAULT_NOISE_LEVELS: dict[str, float] = {"ode": 0.0, "sde": 0.7, "cps": 0.8, "dance": 0.3,
                                          "memoryless": 0.0}  # memoryless: no level

# Methods whose step never draws noise (their log-prob is identically 0).
DETERMINISTIC_METHODS = frozenset({"ode"})

# Method-specific keyword options of the step rules, built from the sampler's arguments.
_STEP_OPTIONS: dict[str, Callable[..., dict]] = {
    "ode": lambda noise_level, sigma_max, cps_true_density: {},
    "sde": lambda noise_level, sigma_max, cps_true_density: {
        "noise_level": noise_level,
        "sigma_max": sigma_max,
    },
    "cps": lambda noise_level, sigma_max, cps_true_density: {
        "noise_level": noise_level,
        "true_density": cps_true_density,
    },
    "dance": lambda noise_level, sigma_max, cps_true_density: {"noise_level": noise_level},
    "memoryless": lambda noise_level, sigma_max, cps_true_density: {},
}


# ----------------------------------------------------------------------------------------------
# Guidance and renormalisation of velocities.
# ----------------------------------------------------------------------------------------------


def _per_sample_std(a: jax.Array) -> jax.Array:
    """Standard deviation over non-batch axes, keeping dims: (B, ...) -> (B, 1, ..., 1)."""
    return jnp.std(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def tree_concat(a, b):
    """Concatenates two conditionings (pytrees of arrays with a leading batch axis) along it."""
    return jax.tree.map(lambda u, w: jnp.concatenate([u, w], axis=0), a, b)


def cond_batch_size(cond) -> int:
    """The batch size of a conditioning: the leading axis of its (first) array."""
    return jax.tree.leaves(cond)[0].shape[0]


def null_condition(cond, null_class):
    """The unconditional conditioning of a batch, for classifier-free guidance.

    Args:
      cond: the batch's conditioning: ``(B,)`` int32 class labels, or a pytree of arrays with a
        leading batch axis (text models: ``{"text": (B, L, D), "pooled": (B, P)}``).
      null_class: for labels, the null label (``num_classes``); for a pytree, the negative (or
        empty-prompt) conditioning with the same structure and a leading axis of 1 (or B).

    Returns:
      A conditioning of ``cond``'s structure, shapes and dtypes.
    """
    if isinstance(null_class, int):
        return jax.tree.map(lambda c: jnp.full_like(c, null_class), cond)
    return jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape).astype(c.dtype),
                        null_class, cond)


def guided_velocity(
    velocity: Callable,
    params,
    x: jax.Array,
    sigma,
    cond: jax.Array,
    *,
    guidance_scale,
    rescale_phi=0.0,
    null_class: int,
) -> jax.Array:
    """Classifier-free guided velocity ``v_u + w·(v_c - v_u)``, optionally CFG-rescaled.

    The conditional and unconditional velocities come from ONE call of ``velocity`` on the
    concatenated batch ``[x; x]`` with conditioning ``[cond; null]``. When ``guidance_scale`` is
    the Python number 1.0 the result is the plain conditional velocity and the null pass is
    skipped altogether.

    CFG-rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed"): ``v_r = v·std(v_c)/std(v)`` with per-sample standard deviations over the non-batch
    axes (population or Bessel-corrected std give the same ratio), then
    ``v = φ·v_r + (1-φ)·v``. ``φ = 0`` is plain CFG.

    Args:
      velocity: ``velocity(params, x, sigma, cond) -> v``.
      params: generator parameters.
      x: ``(B, H, W, C)`` states.
      sigma: scalar or ``(B,)`` levels in [0, 1] (broadcast to ``(B,)`` before the call).
      cond: ``(B,)`` int32 class labels, or a conditioning pytree (see :func:`null_condition`).
      guidance_scale: ``w`` (Python float or traced scalar); 1 means no guidance.
      rescale_phi: ``φ`` ∈ [0, 1].
      null_class: the unconditional label (``num_classes``), or for a pytree ``cond`` the
        negative / empty-prompt conditioning (:func:`null_condition`).

    Returns:
      ``(B, H, W, C)`` guided velocity.
    """
    batch = x.shape[0]
    sigma = jnp.broadcast_to(_as_sigma(sigma), (batch,))
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
        return velocity(params, x, sigma, cond)
    both = velocity(
        params,
        jnp.concatenate([x, x], axis=0),
        jnp.concatenate([sigma, sigma], axis=0),
        tree_concat(cond, null_condition(cond, null_class)),
    )
    v_cond, v_uncond = both[:batch], both[batch:]
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    if isinstance(rescale_phi, (int, float)) and rescale_phi == 0.0:
        return v
    v_rescaled = v * (_per_sample_std(v_cond) / _per_sample_std(v))
    return rescale_phi * v_rescaled + (1.0 - rescale_phi) * v


def renormalize_velocity(v: jax.Array, v_ref: jax.Array, phi=1.0, eps: float = 1e-12
                         ) -> jax.Array:
    """Moves each sample of ``v`` towards the L2 norm of the matching sample of ``v_ref``.

    With norms over all non-batch axes and ``r = ‖v_ref‖ / max(‖v‖, eps)`` per sample::

      v ← v · (1 + φ·(r - 1))  =  (1 - φ)·v + φ·v·r

    The direction of ``v`` is kept, only its per-sample length changes: ``φ = 1`` rescales it
    to ``‖v_ref‖`` exactly (the inference-time renormalisation baseline), ``φ = 0`` leaves it
    unchanged, and ``0 < φ < 1`` moves the norm linearly towards ``‖v_ref‖`` (the norm becomes
    ``(1 - φ)·‖v‖ + φ·‖v_ref‖``). The interpolation is the one CFG-rescale's φ uses
    (:func:`guided_velocity`): the same convention for a partial rescale everywhere. The Python
    value ``φ = 1`` computes ``v·r`` with no interpolation, bit for bit what full
    renormalisation computed before φ existed. Gradients are not stopped (wrap ``v_ref`` in
    ``stop_gradient`` if needed).

    Args:
      v, v_ref: ``(B, H, W, C)`` velocities.
      phi: strength φ ∈ [0, 1], a Python number or a traced scalar.
      eps: floor on ``‖v‖`` to avoid dividing by zero.

    Returns:
      ``(B, H, W, C)`` rescaled velocity.
    """
    axes = tuple(range(1, v.ndim))
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
    ref_norm = jnp.sqrt(jnp.sum(jnp.square(v_ref), axis=axes, keepdims=True))
    ratio = ref_norm / jnp.maximum(norm, eps)
    if isinstance(phi, (int, float)) and phi == 1.0:
        return v * ratio
    return v * (1.0 + phi * (ratio - 1.0))


def check_renormalize_options(phi, sigma_max) -> None:
    """Raises ValueError unless ``0 ≤ φ ≤ 1`` and ``σ_max ≥ 0`` (Python numbers only; traced
    values are not checked)."""
    if isinstance(phi, (int, float)) and not 0.0 <= phi <= 1.0:
        raise ValueError(f"renormalize_phi must be in [0, 1], got {phi!r}")
    if isinstance(sigma_max, (int, float)) and not sigma_max >= 0.0:
        raise ValueError(f"renormalize_sigma_max must be >= 0, got {sigma_max!r}")


# ----------------------------------------------------------------------------------------------
# Trajectories.
# ----------------------------------------------------------------------------------------------


class Trajectory(NamedTuple):
    """A sampled trajectory, time-major (axis 0 is the step, axis 1 the batch).

    With T sampling steps and step k going from ``sigmas[k]`` to ``sigmas[k+1]``:

    Attributes:
      states: ``(T+1, B, H, W, C)``; ``states[0]`` is the initial noise, ``states[T]`` the sample.
      means: ``(T, B, H, W, C)``; mean of the transition ``states[k] -> states[k+1]``.
      log_probs: ``(T, B)`` per-pixel mean log-probs of the transitions (0 on ODE steps).
      stds: ``(T,)`` transition standard deviations (0 on ODE steps).
      stochastic: ``(T,)`` bool, whether step k was a stochastic (scored) step.
      sigmas: ``(T+1,)`` float32 schedule.
      velocities: ``(T, B, H, W, C)`` velocities used at each step, or None.
    """

    states: jax.Array
    means: jax.Array
    log_probs: jax.Array
    stds: jax.Array
    stochastic: jax.Array
    sigmas: jax.Array
    velocities: Optional[jax.Array]


def _resolve_step(method: str, noise_level, sigmas: jax.Array, cps_true_density: bool):
    if method not in STEP_FNS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {sorted(STEP_FNS)}")
    if noise_level is None:
        noise_level = DEFAULT_NOISE_LEVELS[method]
    options = _STEP_OPTIONS[method](noise_level, sigmas[1], cps_true_density)
    return STEP_FNS[method], options


def _stochastic_mask(method: str, num_steps: int, sde_window) -> jax.Array:
    steps = jnp.arange(num_steps)
    if method in DETERMINISTIC_METHODS:  # never draws noise, whatever the window says
        return jnp.zeros((num_steps,), bool)
    if sde_window is None:
        return jnp.ones((num_steps,), bool)
    start, end = sde_window
    return (steps >= start) & (steps < end)


def _step_velocity(velocity_fn, ref_velocity_fn, renormalize: bool, x: jax.Array,
                   sigma: jax.Array, phi=1.0, sigma_max=1.0):
    """The velocity of one step: ``velocity_fn``'s, renormalised (:func:`renormalize_velocity`
    with strength ``phi``) when ``renormalize`` and ``sigma <= sigma_max``.

    Python values ``phi = 0`` (no reference call at all) and ``sigma_max >= 1`` (every step of
    a schedule starting at σ = 1, no select) keep the plain and the every-step programs exactly
    as they were before these options existed."""
    sigma_b = jnp.full((x.shape[0],), sigma, dtype=jnp.float32)
    v = velocity_fn(x, sigma_b)
    if not renormalize or (isinstance(phi, (int, float)) and phi == 0.0):
        return v
    v_renorm = renormalize_velocity(v, ref_velocity_fn(x, sigma_b), phi)
    if isinstance(sigma_max, (int, float)) and sigma_max >= 1.0:
        return v_renorm
    return jnp.where(sigma <= sigma_max, v_renorm, v)


def _windowed_step(
    step_fn, options, masked: bool, x, v, sigma, sigma_next, is_stochastic, **io
) -> StepOutput:
    """Applies ``step_fn``; where ``is_stochastic`` is False (only if ``masked``) uses Euler."""
    out = step_fn(x, v, sigma, sigma_next, **options, **io)
    if not masked:
        return out
    euler = ode_step(x, v, sigma, sigma_next, x_next=io.get("x_next"))
    return StepOutput(
        x_next=jnp.where(is_stochastic, out.x_next, euler.x_next),
        mean=jnp.where(is_stochastic, out.mean, euler.mean),
        std=jnp.where(is_stochastic, out.std, 0.0),
        log_prob=jnp.where(is_stochastic, out.log_prob, 0.0),
    )


def _check_renormalize(renormalize: bool, ref_velocity_fn, phi=1.0, sigma_max=1.0) -> None:
    if renormalize and ref_velocity_fn is None:
        raise ValueError("renormalize=True needs ref_velocity_fn")
    check_renormalize_options(phi, sigma_max)


def sample(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    sigmas,
    key: jax.Array,
    *,
    method: str = "ode",
    noise_level: Optional[float] = None,
    sde_window: Optional[Sequence] = None,
    ref_velocity_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    renormalize: bool = False,
    renormalize_phi=1.0,
    renormalize_sigma_max=1.0,
    return_velocities: bool = False,
    cps_true_density: bool = False,
) -> Trajectory:
    """Integrates ``x_init`` from ``sigmas[0]`` down to ``sigmas[-1]`` in one ``lax.scan``.

    Step k uses ``v = velocity_fn(states[k], σ_k·1_B)`` and the rule ``STEP_FNS[method]``; its
    standard-normal noise is ``jax.random.normal(jax.random.fold_in(key, k), x.shape)``, so any
    single step can be reproduced on its own.

    Args:
      velocity_fn: ``(x (B,H,W,C), sigma (B,)) -> v``; parameters, labels and guidance are
        closed over by the caller (e.g. with :func:`guided_velocity`).
      x_init: ``(B, H, W, C)`` initial state, normally standard-normal noise at σ = 1.
      sigmas: ``(T+1,)`` decreasing schedule, e.g. ``flow.inference_sigmas(T)``. Its second value
        is Flow-GRPO's ``sigma_max``.
      key: typed PRNG key (``jax.random.key``).
      method: ``"ode"``, ``"sde"`` (Flow-GRPO), ``"cps"`` or ``"dance"`` (static).
      noise_level: the rule's noise level; None uses ``DEFAULT_NOISE_LEVELS[method]``.
      sde_window: ``(start, end)``: only steps ``start <= k < end`` are stochastic, the others are
        Euler steps with log-prob 0 (Flow-GRPO's window). Python ints or traced int scalars
        (a random window does not recompile). None makes every step stochastic.
      ref_velocity_fn: reference velocity, same signature as ``velocity_fn``.
      renormalize: rescale v to the per-sample norm of ``ref_velocity_fn(x, σ)`` evaluated on
        the same state (inference-time baseline), at the steps and with the strength below.
      renormalize_phi: strength φ ∈ [0, 1] of the renormalisation
        (:func:`renormalize_velocity`: the norm moves linearly from ‖v‖ (φ = 0, the plain
        sampler) to ‖v_ref‖ (φ = 1, full renormalisation)).
      renormalize_sigma_max: renormalise only the steps whose level ``σ_k <= this`` (the late,
        low-noise steps); 1 renormalises every step. Python floats or traced scalars.
      return_velocities: also store the (possibly renormalised) velocities.
      cps_true_density: for ``method="cps"``, score with the true Gaussian density instead of
        the reference's ``-mean((x_next - mean)²)``.

    Returns:
      A time-major :class:`Trajectory`.
    """
    _check_renormalize(renormalize, ref_velocity_fn, renormalize_phi, renormalize_sigma_max)
    sigmas = jnp.asarray(sigmas, dtype=jnp.float32)
    num_steps = sigmas.shape[0] - 1
    step_fn, options = _resolve_step(method, noise_level, sigmas, cps_true_density)
    stochastic = _stochastic_mask(method, num_steps, sde_window)
    deterministic = method in DETERMINISTIC_METHODS
    masked = not deterministic and sde_window is not None

    def body(x, inputs):
        k, sigma, sigma_next, is_stochastic = inputs
        v = _step_velocity(velocity_fn, ref_velocity_fn, renormalize, x, sigma,
                           renormalize_phi, renormalize_sigma_max)
        noise = (
            None
            if deterministic
            else jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
        )
        out = _windowed_step(
            step_fn, options, masked, x, v, sigma, sigma_next, is_stochastic, noise=noise
        )
        x_next = out.x_next.astype(x.dtype)
        return x_next, (x_next, out.mean, out.std, out.log_prob, v if return_velocities else None)

    inputs = (jnp.arange(num_steps), sigmas[:-1], sigmas[1:], stochastic)
    _, (states, means, stds, log_probs, velocities) = jax.lax.scan(body, x_init, inputs)
    return Trajectory(
        states=jnp.concatenate([x_init[None], states], axis=0),
        means=means,
        log_probs=log_probs,
        stds=stds,
        stochastic=stochastic,
        sigmas=sigmas,
        velocities=velocities,
    )


def recompute_steps(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    trajectory: Trajectory,
    method: str,
    *,
    noise_level: Optional[float] = None,
    ref_velocity_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    renormalize: bool = False,
    renormalize_phi=1.0,
    renormalize_sigma_max=1.0,
    cps_true_density: bool = False,
) -> StepOutput:
    """Re-scores every stored transition ``states[k] -> states[k+1]`` under ``velocity_fn``.

    Uses the trajectory's own ``sigmas`` and ``stochastic`` mask; the options must match those
    given to :func:`sample`. Gradients flow into the parameters closed over by ``velocity_fn``
    (through the transition means) but not into the stored states.

    Returns:
      :class:`StepOutput` with a leading time axis: ``x_next`` and ``mean``
      ``(T, B, H, W, C)``, ``std`` ``(T,)``, ``log_prob`` ``(T, B)`` (0 where not stochastic).
    """
    _check_renormalize(renormalize, ref_velocity_fn, renormalize_phi, renormalize_sigma_max)
    step_fn, options = _resolve_step(method, noise_level, trajectory.sigmas, cps_true_density)
    masked = method not in DETERMINISTIC_METHODS

    def body(carry, inputs):
        x, x_next, sigma, sigma_next, is_stochastic = inputs
        v = _step_velocity(velocity_fn, ref_velocity_fn, renormalize, x, sigma,
                           renormalize_phi, renormalize_sigma_max)
        out = _windowed_step(
            step_fn, options, masked, x, v, sigma, sigma_next, is_stochastic, x_next=x_next
        )
        return carry, out

    states, sigmas = trajectory.states, trajectory.sigmas
    inputs = (states[:-1], states[1:], sigmas[:-1], sigmas[1:], trajectory.stochastic)
    _, out = jax.lax.scan(body, None, inputs)
    return out


def recompute_log_probs(
    velocity_fn: Callable[[jax.Array, jax.Array], jax.Array],
    trajectory: Trajectory,
    method: str,
    *,
    noise_level: Optional[float] = None,
    ref_velocity_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    renormalize: bool = False,
    renormalize_phi=1.0,
    renormalize_sigma_max=1.0,
    cps_true_density: bool = False,
) -> jax.Array:
    """``(T, B)`` log-probs of the stored transitions under ``velocity_fn``.

    Same arguments as :func:`recompute_steps`; with the sampling velocity it reproduces
    ``trajectory.log_probs``.
    """
    return recompute_steps(
        velocity_fn,
        trajectory,
        method,
        noise_level=noise_level,
        ref_velocity_fn=ref_velocity_fn,
        renormalize=renormalize,
        renormalize_phi=renormalize_phi,
        renormalize_sigma_max=renormalize_sigma_max,
        cps_true_density=cps_true_density,
    ).log_prob


# ----------------------------------------------------------------------------------------------
# Images for labels at fixed seeds: sample grids, evaluation sets and RL rollouts.
# ----------------------------------------------------------------------------------------------


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
      cond: (B,) int32 labels, or a conditioning pytree.
      guidance_scale: CFG scale w (1.0 = plain conditional velocity, one model call).
      null_class: the unconditional label, or for a pytree the null conditioning
        (:func:`null_condition`).
      rescale_phi: CFG-rescale φ in [0, 1].
    """
    return functools.partial(guided_velocity, velocity, params, cond=cond,
                             guidance_scale=guidance_scale, rescale_phi=rescale_phi,
                             null_class=null_class)


def initial_noise(key: jax.Array, batch: int, image_shape) -> jax.Array:
    """Standard normal (B, H, W, C) float32 starting states (σ = 1)."""
    return jax.random.normal(key, (batch, *image_shape), jnp.float32)


@functools.partial(jax.jit, static_argnames=(
    "velocity", "image_shape", "num_steps", "shift", "guidance_scale", "null_class",
    "method", "noise_level", "rescale_phi", "renormalize_phi", "renormalize_sigma_max"))
def generate_images(velocity, params, labels, key, *, image_shape, num_steps: int,
                    shift: float, guidance_scale: float, null_class: int,
                    method: str = "ode", noise_level: float | None = None,
                    rescale_phi: float = 0.0, renormalize_to=None,
                    renormalize_phi: float = 1.0, renormalize_sigma_max: float = 1.0,
                    null_condition=None) -> jax.Array:
    """Samples one image per label (or prompt).

    Args:
      velocity: pure velocity function (static: hashable).
      params: generator parameters.
      labels: (B,) int32 class labels, or a text conditioning pytree (leading axis B).
      key: typed key; initial noise uses ``fold_in(key, 0)``, sampler noise ``fold_in(key, 1)``.
      image_shape: (H, W, C).
      num_steps: sampler steps on the ``inference_sigmas(num_steps, shift)`` schedule.
      shift: time shift of the schedule.
      guidance_scale, null_class, rescale_phi: classifier-free guidance.
      null_condition: for a text conditioning, the empty prompt's arrays (leading axis 1), an
        argument; it replaces ``null_class``.
      method: a key of ``sampling.STEP_FNS`` ("ode", "sde", "cps", "dance").
      noise_level: the stochastic sampler's noise level (None: the method's default).
      renormalize_to: reference parameters θ_ref, or None. When given, the (guided) velocity is
        rescaled per sample towards the norm of θ_ref's guided velocity on the same state
        (inference-time renormalisation), with the two options below (static).
      renormalize_phi: strength φ ∈ [0, 1] (:func:`renormalize_velocity`; 1 = full).
      renormalize_sigma_max: only the steps with σ_k <= this (1 = every step).

    Returns:
      (B, H, W, C) float32 final states (not clipped; data lives in [-1, 1]).
    """
    sigmas = jnp.asarray(inference_sigmas(num_steps, shift))
    x = initial_noise(jax.random.fold_in(key, 0), cond_batch_size(labels), image_shape)
    null = null_class if null_condition is None else null_condition
    vfn = conditional_velocity_fn(velocity, params, labels, guidance_scale=guidance_scale,
                                  null_class=null, rescale_phi=rescale_phi)
    ref_fn = None if renormalize_to is None else conditional_velocity_fn(
        velocity, renormalize_to, labels, guidance_scale=guidance_scale, null_class=null,
        rescale_phi=rescale_phi)
    traj = sample(vfn, x, sigmas, jax.random.fold_in(key, 1), method=method,
                           noise_level=noise_level, ref_velocity_fn=ref_fn,
                           renormalize=renormalize_to is not None,
                           renormalize_phi=renormalize_phi,
                           renormalize_sigma_max=renormalize_sigma_max)
    return traj.states[-1]

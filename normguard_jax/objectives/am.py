"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen, 2024, arXiv 2409.08861).

"Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with Memoryless Stochastic
Optimal Control", for rectified flow, written in this library's convention. Everything below
is our own translation of the paper's formulas; every choice the paper leaves open (or that
the translation forces) is stated.

Goal. Tilt the base model's sample law by the reward: ``p*(x0) ∝ p_base(x0)·exp(r(x0)/λ)``
(λ = ``kl_weight``; a reward multiplier, as in the paper's experiments, is 1/λ). This is
the solution of ``max E[r(x0)] - λ·KL(P_θ ‖ P_base)`` over path laws *provided the sampling
SDE is memoryless* (its initial noise independent of its final sample).

Time. The paper runs t from noise (t = 0) to data (t = 1) with ``X_t = t·X_1 + (1-t)·X_0``
(``X_1`` data). Here σ = 1 - t: ``x_σ = (1-σ)·x0 + σ·ε``, data at σ = 0, sampling runs σ
downwards, ``v = ε - x0 = -v_paper``.

Memoryless SDE. The paper's memoryless diffusion for flow matching, ``g(t)² = 2(1-t)/t``,
is ``g(σ)² = 2σ/(1-σ)`` here; its drift ``b = 2·v_paper - x/t`` becomes, per unit of -σ,
``dx/dσ = 2v + x/(1-σ)`` (the Flow-GRPO SDE of ``sampling.flow_grpo_sde_step`` with
a = √2 is its Euler–Maruyama step). It is the time reversal of the forward noising SDE
``dx = -x/(1-σ)·dσ + g·dW``, so its exact one-step discretisation is DDPM's ancestral
step at ``x0̂ = x - σ·v``; we sample with that (``sampling.memoryless_step``,
``config.rollout.sampler = "memoryless"``) because Euler–Maruyama is wrong at σ = 1 where g
is infinite. With ``a = (1-σ)/(1-σ')`` and ``s² = σ² - a²σ'²`` for a step σ → σ' < σ::

    mean_θ(x) = a·σ'²/σ²·x + c_0·(x - σ·v_θ(x)),   c_0 = (1-σ')·s²/σ²,   std = s·σ'/σ.

Control. Fine-tuned and base steps differ only in their means, ``mean_θ - mean_base =
-h·(v_θ - v_base)`` with ``h = c_0·σ``. The discrete control (mean shift per unit of
noise) is ``u = (mean_θ - mean_base)/std``; its continuous limit is the paper's
``u = (b_θ - b_base)/g = -(2/g)·(v_θ - v_base)``.

Lean adjoint (base drift only, the control terms dropped). With ``F_k(x) = mean_base`` of
step k (σ_k → σ_{k+1}) evaluated with the frozen base velocity v_ref::

    ã_T = -∇r(x_T)/λ,          ã_k = (∂F_k/∂x (x_k))ᵀ·ã_{k+1},

solved backwards along the states ``x_k`` sampled from the *current* model: the discrete form
of ``dã/dt = -ãᵀ·∇_x b_base(X_t, t)``, ``ã(1) = -∇r(X_1)/λ`` (σ-time: ``dã/dσ =
-ãᵀ·∂(2v_ref + x/(1-σ))/∂x``). The adjoint is linear in its terminal value, so the batch
stores it for λ = 1 and the objective divides by λ.

Loss (the paper's ``Σ_t ‖u(X_t, t) + g(t)·ã(t)‖²``, discretely, per step k of a stored
trajectory, with the adjoint of the state the step leads to, ``ã_{k+1}``: the control of step k
acts on x_{k+1})::

    L_k = mean_pixels( ( (h/std)·(v_θ(x_k) - v_ref(x_k)) - std·ã_{k+1} )² )
        = w_k · mean_pixels( (v_θ - target)² ),
    target = sg[v_ref + γ_k·ã_{k+1}],   γ_k = std²/h = σ'²/(σ·(1-σ')),
    w_k    = (h/std)² = (1-σ')²·s²/σ'².

Continuous limits (step Δ → 0): ``γ → σ/(1-σ) = g²/2`` — the target is ``v_ref + (g²/2)·ã``, which
is the zero of the paper's ``u + g·ã`` with ``u = -(2/g)·(v_θ - v_base)`` (our sign of v) — and ``w → 4Δ/g²``,
the paper's ``‖(2/g)(v_θ - v_base) - g·ã‖²·dt``. Check on Gaussian data N(μ, s²) with
``r = α·x``: ``ã(σ) = -(α/λ)·s²·(1-σ)/V(σ)``, ``V = (1-σ)²s² + σ²``, so the target's
correction is ``-(α·s²/λ)·σ/V``: exactly the difference between the rectified-flow velocities
of N(μ + α·s²/λ, s²) and N(μ, s²) (the tilted law), as the theory demands.

Choices:

* ``weighting = "control"`` (default) is the paper's loss above (steps weighted by w_k, which
  carries the step size, so the sum over steps is the time integral). On a coarse step into a
  small σ' (e.g. the shifted schedule's step into σ_min ≈ 0.003) w_k ≈ (σ/σ')² is large: that
  is the discrete path KL of that step, and it dominates the loss there; ``"velocity"`` avoids
  it. A deterministic step
  (std = 0: the last one, σ' = 0) admits no control; its rows get weight 0. ``"velocity"``
  drops w_k: a plain per-pixel regression onto the same target, every trained step weighted 1
  (the last step's target is v_ref). Both have the same minimiser per point.
* Every trained step (``spec.trained_steps``: the stochastic window, by default the whole
  trajectory) gives one row per sample; the paper subsamples time steps, here
  ``config.train.minibatch_size`` and ``inner_epochs`` decide how many rows an update sees.
  ``validate`` requires the window to start at step 0 (the memoryless first step forgets the
  initial noise). A window ending before the last step (``sde_window_end``) leaves Euler steps
  of θ at the data end: they are not trained and the lean adjoint crosses them with the base's
  Euler map, an approximation offered for speed; the default (-1) has none.
* Errors are per-pixel means (not sums) as everywhere in the library; r is a per-image reward,
  so ∇r per pixel is small and λ must be small accordingly (``configs/rl_am.py``).
* ∇r is the gradient of the combined reward ``config.rewards`` (the sum of the per-sample
  rewards differentiated w.r.t. the final images), computed in the batch builder; only
  rewards whose registry flag ``differentiable`` is true are accepted (classifier_logprob,
  classifier_prob, contrast, stroke_weight, saturation, compressibility, shapes_colour,
  shapes_shape, shapes_rule); the others (classifier_correct, jpeg_zeros, shapes_correct)
  are refused by ``validate`` with a ConfigError naming ``config.rewards.<name>``. The
  advantages of the rollout are not used.
* No classifier-free guidance (``rollout.guidance_scale`` must be 1): the tilt is of the
  conditional base model, and the adjoint is of the conditional base velocity.
* The objective evaluates v_ref itself (one frozen forward per row), so the points carry it
  and NormGuard reuses it; the batch holds no reference velocities.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections

from normguard_jax import config_checks, flow, rewards, sampling
from normguard_jax.objectives.base import (Aux, BatchSpec, Context, Method, Rollout,
                                           VelocityPoints, check_field, pixel_mean)

_WEIGHTINGS = ("control", "velocity")


@dataclasses.dataclass(frozen=True)
class AMConfig:
    """Hyper-parameters of Adjoint Matching (static).

    Attributes:
      kl_weight: λ > 0; the tilt is ``exp(r/λ)`` and the adjoint's terminal value ``-∇r/λ``.
      weighting: "control" (the paper's loss, weights (h/std)²) or "velocity" (unit weights).
    """

    kl_weight: float = 1.0
    weighting: Literal["control", "velocity"] = "control"

    def __post_init__(self):
        check_field(self.kl_weight > 0, "kl_weight", "> 0", self.kl_weight)
        check_field(self.weighting in _WEIGHTINGS, "weighting", f"one of {list(_WEIGHTINGS)}",
                    self.weighting)


def step_factors(sigma, sigma_next):
    """``(γ, w)`` of memoryless steps σ → σ': target factor ``σ'²/(σ(1-σ'))`` and control
    weight ``(1-σ')²·s²/σ'²`` (0 where σ' = 0). Shapes: those of ``sigma``."""
    sigma, sigma_next = jnp.asarray(sigma, jnp.float32), jnp.asarray(sigma_next, jnp.float32)
    gamma = jnp.square(sigma_next) / (sigma * (1.0 - sigma_next))
    a = (1.0 - sigma) / (1.0 - sigma_next)
    s2 = jnp.maximum(jnp.square(sigma) - jnp.square(a * sigma_next), 0.0)
    positive = sigma_next > 0
    safe = jnp.where(positive, sigma_next, 1.0)
    weight = jnp.where(positive, jnp.square(1.0 - sigma_next) * s2 / jnp.square(safe), 0.0)
    return gamma, weight


def base_step_mean(velocity, ref_params, x, sigma, sigma_next, cond, stochastic=True):
    """``F_k(x)``: the mean of a sampler step under the base velocity (memoryless where
    ``stochastic``, else Euler). ``sigma``, ``sigma_next``: scalars."""
    v = velocity(ref_params, x, jnp.full((x.shape[0],), sigma, jnp.float32), cond)
    c_x, c_0, _ = sampling.memoryless_coefficients(sigma, sigma_next)
    memoryless = c_x * x + c_0 * flow.x0_from_velocity(x, v, sigma)
    euler = x + (sigma_next - sigma) * v
    return jnp.where(stochastic, memoryless, euler)


def lean_adjoint(velocity, ref_params, states, sigmas, cond, terminal, stochastic=None):
    """Solves the lean adjoint backwards along a stored trajectory.

    Args:
      velocity: pure ``velocity(params, x, sigma, cond)``.
      ref_params: the base model θ_ref (its drift defines the adjoint).
      states: (T+1, B, H, W, C) time-major states (``Trajectory.states``).
      sigmas: (T+1,) schedule.
      cond: (B,) labels or a pytree with leading axis B.
      terminal: (B, H, W, C) ``ã_T`` (``-∇r(x_T)/λ``).
      stochastic: (T,) bool, memoryless (True) or Euler steps; None = all memoryless.

    Returns:
      (T+1, B, H, W, C) adjoints ``ã_k``, ``ã_T = terminal``.
    """
    num_steps = sigmas.shape[0] - 1
    if stochastic is None:
        stochastic = jnp.ones((num_steps,), bool)

    def body(a_next, inputs):
        x, sigma, sigma_next, stoch = inputs
        fn = lambda y: base_step_mean(velocity, ref_params, y, sigma, sigma_next, cond, stoch)
        _, vjp = jax.vjp(fn, x)
        (a,) = vjp(a_next)
        return a, a

    inputs = (states[:-1], sigmas[:-1], sigmas[1:], stochastic)
    _, adjoints = jax.lax.scan(body, terminal, inputs, reverse=True)
    return jnp.concatenate([adjoints, terminal[None]], axis=0)


def reward_gradient(reward_fn, images, cond):
    """∇r of a reward ``(images, cond) -> ((N,), components)`` at each image: (N, H, W, C)."""
    return jax.grad(lambda im: jnp.sum(reward_fn(im, cond)[0]))(images)


def training_batch(rollout: Rollout, key: jax.Array, spec: BatchSpec) -> dict:
    """One row per (trained step k, sample): ``x`` = x_k, ``sigma`` σ_k, ``sigma_next``
    σ_{k+1}, ``cond``, ``adjoint`` = ã_{k+1} for λ = 1 (step-major: row ``j·N + i``).

    Needs ``rollout.trajectory``, ``rollout.ref_params``, ``spec.velocity`` and
    ``spec.reward_fn`` (``rl.build_programs`` and ``rl.train_iteration`` fill them).
    """
    del key
    missing = [name for name, value in (("rollout.trajectory", rollout.trajectory),
                                        ("rollout.ref_params", rollout.ref_params),
                                        ("spec.velocity", spec.velocity),
                                        ("spec.reward_fn", spec.reward_fn)) if value is None]
    if missing:
        raise ValueError(f"adjoint matching's training batch needs {', '.join(missing)}")
    traj = rollout.trajectory
    requests = rollout.labels if rollout.requests is None else rollout.requests
    grad_r = reward_gradient(spec.reward_fn, traj.states[-1], requests)
    adjoints = lean_adjoint(spec.velocity, rollout.ref_params, traj.states, traj.sigmas,
                            rollout.labels, -grad_r, traj.stochastic)
    steps = jnp.asarray(spec.trained_steps, jnp.int32)
    n = traj.states.shape[1]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    per_row = lambda s: jnp.repeat(s, n)
    tile = lambda a: jnp.tile(a, (len(spec.trained_steps),) + (1,) * (a.ndim - 1))
    return {"x": flat(traj.states[steps]), "sigma": per_row(traj.sigmas[steps]),
            "sigma_next": per_row(traj.sigmas[steps + 1]),
            "cond": jax.tree.map(tile, rollout.labels), "adjoint": flat(adjoints[steps + 1])}


def rows(spec: BatchSpec) -> int:
    """Rows of :func:`training_batch`: trained steps × G·K."""
    return len(spec.trained_steps) * spec.samples


def make_objective(cfg: AMConfig):
    """Returns the Adjoint Matching objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (:func:`training_batch`): ``x`` (B, H, W, C) states x_k of the current model's
    memoryless rollouts; ``sigma``, ``sigma_next`` (B,) their step; ``cond``; ``adjoint``
    (B, H, W, C) the lean adjoint ã_{k+1} for λ = 1.

    Context: ``ctx.velocity``, ``ctx.ref_params``.

    Metrics: ``am/loss``; ``am/matching_error`` (unweighted mean ``(v_θ - target)²``);
    ``am/correction`` (mean squared ``γ·ã/λ``, the target's reward correction);
    ``am/adjoint`` (mean squared ``ã/λ``); ``am/ref_deviation`` (mean ``(v_θ - v_ref)²``).

    Points: ``v_θ`` at ``(x_k, σ_k, cond)`` with ``v_ref`` filled.
    """

    def objective(params, batch: dict, ctx: Context):
        t = _terms(cfg, params, batch, ctx)
        sg = jax.lax.stop_gradient
        loss = jnp.mean(t["loss"])
        metrics = {
            "am/loss": sg(loss),
            "am/matching_error": sg(jnp.mean(t["error"])),
            "am/correction": sg(jnp.mean(pixel_mean(jnp.square(t["correction"])))),
            "am/adjoint": sg(jnp.mean(pixel_mean(jnp.square(t["adjoint"])))),
            "am/ref_deviation": sg(jnp.mean(pixel_mean(jnp.square(t["v"] - t["v_ref"])))),
        }
        points = VelocityPoints(v_theta=t["v"], x=batch["x"], sigma=batch["sigma"],
                                cond=batch["cond"], v_ref=t["v_ref"])
        return loss, Aux(metrics=metrics, points=points)

    return objective


def _terms(cfg: AMConfig, params, batch: dict, ctx: Context) -> dict:
    x, sigma, cond = batch["x"], batch["sigma"], batch["cond"]
    sg = jax.lax.stop_gradient
    v = ctx.velocity(params, x, sigma, cond)
    v_ref = sg(ctx.velocity(ctx.ref_params, x, sigma, cond))
    gamma, control_weight = step_factors(sigma, batch["sigma_next"])
    adjoint = batch["adjoint"] / cfg.kl_weight
    correction = flow.broadcast_to_batch(gamma, x) * adjoint
    target = sg(v_ref + correction)
    error = pixel_mean(jnp.square(v - target))
    weight = control_weight if cfg.weighting == "control" else jnp.ones_like(error)
    return {"v": v, "v_ref": v_ref, "adjoint": adjoint, "correction": correction,
            "target": target, "error": error, "weight": weight, "loss": weight * error}


def make_per_sample(cfg: AMConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of per-row arrays before reduction.

    Keys: (B, H, W, C) ``v``, ``v_ref``, ``adjoint`` (ã/λ), ``correction`` (γ·ã/λ),
    ``target``; (B,) ``error`` (``mean_pixels((v_θ - target)²)``), ``weight`` (the control
    weight, or 1) and ``loss`` (``weight·error``; the objective is its mean).
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)


def validate(config: ml_collections.ConfigDict) -> None:
    """Adjoint matching needs memoryless rollouts on every step, no CFG and a differentiable
    reward; raises ``config_checks.ConfigError`` naming the field otherwise."""
    err = config_checks.ConfigError
    r = config.rollout
    if r.sampler != "memoryless":
        raise err(f"config.rollout.sampler must be 'memoryless' for adjoint matching (the "
                  f"reward tilt needs the memoryless SDE), got {r.sampler!r}")
    if r.sde_window_start != 0:
        raise err("config.rollout.sde_window_start must be 0 for adjoint matching (the first, "
                  "memoryless step is what makes the sample independent of the initial noise), "
                  f"got {r.sde_window_start}")
    if r.guidance_scale != 1.0:
        raise err("config.rollout.guidance_scale must be 1 for adjoint matching (the tilt and "
                  f"the lean adjoint are of the conditional base model), got {r.guidance_scale}")
    accepted = sorted(n for n, e in rewards.REWARDS.items() if e.differentiable)
    weights, fields = rewards.config_weights(config)
    for name, weight in weights.items():
        try:
            entry = rewards.lookup(name)
        except rewards.UnknownRewardError:
            continue   # reported with the dataset's rewards when the run builds them
        if weight != 0 and not entry.differentiable:
            raise err(f"{fields[name]} is not differentiable (its gradient is zero almost "
                      f"everywhere) and adjoint matching needs ∇r; set it to 0 or use "
                      f"differentiable rewards: {accepted}")


METHOD = Method(name="am", config_cls=AMConfig, make_objective=make_objective,
                training_batch=training_batch, rows=rows, needs_trajectory=True,
                validate=validate, make_per_sample=make_per_sample)

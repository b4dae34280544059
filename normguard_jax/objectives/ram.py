"""Reinforce Adjoint Matching (RAM, arXiv 2605.10759): reward-corrected flow-matching regression.

Loss. A clean endpoint ``x0`` is drawn from the current model, scored (advantage ``A``), noised
with fresh ε exactly as in pretraining, ``x_σ = (1-σ)·x0 + σ·ε``, and the policy regresses onto a
corrected target:

    u        = ε - x0                                  (the pretraining target)
    target   = sg[v_ref(x_σ) + m·A·(u - v_old(x_σ))]
    loss     = mean_i mean_pixels((v_θ(x_σ) - target)²)

``m`` is the scale of the reward correction (``scale``), ``v_ref`` the frozen reference and
``v_old`` the velocity of the model that drew ``x0``.

Why this target (our derivation; the paper reaches the same structure through the adjoint-
matching optimality condition and a REINFORCE identity):

1. KL-regularised reward maximisation, ``max E[r(x0)] - λ·KL(P‖P_ref)`` over generative
   processes, is solved by tilting only the clean-endpoint law, ``p*(x0) ∝ p_ref(x0)·e^{r(x0)/λ}``;
   the noising law ``x_σ | x0`` stays the reference's.
2. Flow matching under the tilted endpoint law therefore has the marginal velocity
   ``v*(x, σ) = E*[u | x_σ = x]``, a reweighting of the reference posterior with weight
   ``e^{r/λ}``; to first order in ``1/λ``,
   ``v* ≈ v_ref + (1/λ)·Cov(r, u | x_σ = x) = v_ref + (1/λ)·E[(r - b(x))·(u - v̄(x)) | x]``
   for any baseline ``b`` and the conditional mean ``v̄ = E[u | x]``.
3. REINFORCE-style single-sample estimate: the group-normalised advantage ``A`` replaces
   ``r - b``, the sampling model's own velocity ``v_old`` (its exact ``E[u | x]``) replaces ``v̄``,
   and ``m`` absorbs ``1/λ`` and the reward normalisation. Since ``E[u - v_old | x] = 0`` for
   samples of that model, the regression's minimiser is
   ``E[target | x] = v_ref + m·Cov(A, u | x)``: no correction without a reward signal, and with
   ``A = 0`` the loss is plain distillation onto ``v_ref``.

Choices made here (the formula above leaves them open):

* ``old_velocity = "self"`` (default) uses ``sg(v_θ)``: on-policy it equals the sampling model's
  velocity and costs no extra pass; ``"old"`` uses ``ctx.old_params`` (θ at rollout time), the
  exact control variate when several optimiser steps reuse one rollout.
* ``m`` is constant in σ; advantages are clipped to ``±adv_clip_max`` (5, as elsewhere).
* ``scale = 0.1`` is the dataclass default: with unit-variance advantages and
  ``|u - v_old| = O(1)`` per pixel it keeps each sample's correction a fraction of the target.
  The regression averages that noise away and keeps only ``m·Cov(A, u | x)``, which is small,
  so ``configs/rl_ram.py`` uses m = 4 (measured there); tune it as ``1/λ``.
* Errors are per-pixel means (not sums), batch mean on top; σ comes from the caller
  (``flow.renoised_batch``).

The reference velocity is always computed, so the points carry ``v_ref`` and NormGuard reuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from normguard_jax import flow
from normguard_jax.objectives.base import (Aux, Context, Method, VelocityPoints, check_field,
                                           pixel_mean, renoised_rollout_batch, renoised_rows)



_OLD_VELOCITY = ("self", "old")


@dataclasses.dataclass(frozen=True)
class RAMConfig:
    """Hyper-parameters of RAM (static).

    Attributes:
      scale: m ≥ 0, the reward-correction scale (plays the role of 1/λ).
      adv_clip_max: advantages are clipped to ±adv_clip_max.
      old_velocity: "self" (``sg(v_θ)``) or "old" (``ctx.old_params``) as the control variate.
    """

    scale: float = 0.1
    adv_clip_max: float = 5.0
    old_velocity: Literal["self", "old"] = "self"

    def __post_init__(self):
        check_field(self.scale >= 0, "scale", ">= 0", self.scale)
        check_field(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        check_field(self.old_velocity in _OLD_VELOCITY, "old_velocity", f"one of {list(_OLD_VELOCITY)}",
               self.old_velocity)


def ram_target(v_ref, v_old, x0, noise, advantage, scale: float) -> jax.Array:
    """``v_ref + m·A·((ε - x0) - v_old)`` (no stop-gradient here).

    Args:
      v_ref, v_old, x0, noise: (B, H, W, C). advantage: (B,). scale: m.

    Returns:
      (B, H, W, C) regression target.
    """
    a = flow.broadcast_to_batch(advantage, x0)
    return v_ref + scale * a * (flow.velocity_target(x0, noise) - v_old)


def make_objective(cfg: RAMConfig):
    """Returns the RAM objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per (rollout sample, noise draw); ``flow.renoised_batch`` builds it):
      ``x0`` (B, H, W, C) clean samples drawn from the current model; ``noise`` (B, H, W, C)
      fresh standard normal; ``sigma`` (B,) in (0, 1]; ``cond`` (B,) int32;
      ``advantage`` (B,) float32.

    Context: ``ctx.velocity``, ``ctx.ref_params``; ``ctx.old_params`` if ``old_velocity="old"``.

    Metrics: ``ram/loss``, ``ram/correction`` (mean squared norm per pixel of the reward
    correction ``m·A·(u - v_old)``), ``ram/ref_deviation`` (mean ``(v_θ - v_ref)²``),
    ``ram/matching_error`` (mean ``(v_θ - u)²``, the pretraining loss on these samples).

    Points: ``v_θ`` at ``(x_σ, σ, cond)`` with ``v_ref`` filled.
    """

    def objective(params, batch: dict, ctx: Context):
        t, points = _terms(cfg, params, batch, ctx)
        v, target, v_ref = t["v"], t["target"], points.v_ref
        x0, noise = batch["x0"], batch["noise"]
        sg = jax.lax.stop_gradient
        loss = jnp.mean(t["loss"])
        metrics = {
            "ram/loss": sg(loss),
            "ram/correction": sg(jnp.mean(pixel_mean(jnp.square(target - v_ref)))),
            "ram/ref_deviation": sg(jnp.mean(pixel_mean(jnp.square(v - v_ref)))),
            "ram/matching_error": sg(jnp.mean(pixel_mean(
                jnp.square(v - flow.velocity_target(x0, noise))))),
        }
        return loss, Aux(metrics=metrics, points=points)

    return objective


def _terms(cfg: RAMConfig, params, batch: dict, ctx: Context) -> tuple[dict, VelocityPoints]:
    """Per-row terms (see :func:`make_per_sample`) and the velocity points."""
    x0, noise, sigma, cond = batch["x0"], batch["noise"], batch["sigma"], batch["cond"]
    x = flow.interpolate(x0, noise, sigma)
    v = ctx.velocity(params, x, sigma, cond)
    sg = jax.lax.stop_gradient
    v_ref = sg(ctx.velocity(ctx.ref_params, x, sigma, cond))
    if cfg.old_velocity == "old":
        if ctx.old_params is None:
            raise ValueError("RAM with old_velocity='old' needs ctx.old_params")
        v_old = sg(ctx.velocity(ctx.old_params, x, sigma, cond))
    else:
        v_old = sg(v)
    adv = jnp.clip(batch["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
    target = sg(ram_target(v_ref, v_old, x0, noise, adv, cfg.scale))
    terms = {"v": v, "v_ref": v_ref, "v_old": v_old, "target": target, "advantage": adv,
             "loss": pixel_mean(jnp.square(v - target))}
    return terms, VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)


def make_per_sample(cfg: RAMConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of per-row arrays before reduction.

    Keys: (B, H, W, C) ``v``, ``v_ref``, ``v_old`` (the control variate), ``target``; (B,)
    ``advantage`` (clipped) and ``loss`` (``mean_pixels((v_θ - target)²)``; the objective is
    its mean).
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)[0]


METHOD = Method(name="ram", config_cls=RAMConfig, make_objective=make_objective,
                training_batch=renoised_rollout_batch, rows=renoised_rows,
                make_per_sample=make_per_sample, rollout_policy="old")

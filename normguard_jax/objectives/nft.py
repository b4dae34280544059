"""DiffusionNFT: negative-aware fine-tuning on the forward (noising) process.

Training needs only the clean rollout samples ``x0``, their advantages and fresh noise: it is
solver-agnostic (any sampler, even a deterministic ODE, may produce ``x0``). At ``x_σ = (1-σ)·x0
+ σ·ε`` the current velocity ``v_θ`` and the old (sampling) policy's ``v_old`` define an implicit
positive and an implicit negative policy

    v⁺ = β·v_θ + (1-β)·v_old          v⁻ = (1+β)·v_old - β·v_θ          (v_old under stop-grad)

whose clean-image predictions ``x0̂± = x_σ - σ·v±`` are regressed onto ``x0`` with the reference's
adaptive weighting

    L±_i = mean_pixels((x0̂± - x0)²) / sg(max(mean_pixels|x0̂± - x0|, 1e-5)).

With ``A_i = clip(advantage_i, ±A_max)`` and ``r_i = clip(A_i/(2·A_max) + ½, 0, 1)`` (the
probability that sample i is "positive"), the loss is

    loss = A_max · mean_i([r_i·L⁺_i + (1-r_i)·L⁻_i] / β)
           + kl_weight · mean_i(mean_pixels((v_θ - v_ref)²))

exactly as NVlabs' ``scripts/train_nft_sd3.py`` computes it (``config.beta`` is β, default 1;
``config.train.beta`` is ``kl_weight``, 1e-4 in its SD3 configs; ``train.adv_clip_max = 5``).
When ``θ = θ_old``, ``v⁺ = v⁻ = v_old``: the loss no longer depends on the advantage and the
gradient of sample i is proportional to ``2·r_i - 1`` (zero for a zero advantage).

The reference trains every rollout sample at every level of the sampling schedule (σ from the
inference timesteps, a random permutation per sample) with one fresh noise draw per level;
:func:`make_renoised_batch` with :func:`schedule_sigma_sampler` reproduces one such draw.

The old policy follows the reference's schedule: after each rollout epoch
``θ_old ← decay·θ_old + (1 - decay)·θ`` with ``decay = old_policy_decay(step)``, ``step`` the
number of optimiser steps so far (:func:`update_old_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from normguard_jax import flow
from normguard_jax.objectives.base import (Aux, Context, Method, VelocityPoints, check_field,
                                           pixel_mean, renoised_rollout_batch, renoised_rows)



# Advantage modes of the reference (``train.adv_mode``), applied after clipping to ±A_max.
ADVANTAGE_MODES: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    "all": lambda a, a_max: a,
    "positive_only": lambda a, a_max: jnp.clip(a, 0.0, a_max),
    "negative_only": lambda a, a_max: jnp.clip(a, -a_max, 0.0),
    "one_only": lambda a, a_max: jnp.where(a > 0, 1.0, 0.0),
    "binary": lambda a, a_max: jnp.sign(a),
}


@dataclasses.dataclass(frozen=True)
class NFTConfig:
    """Hyper-parameters of DiffusionNFT (static; defaults are the reference's SD3 defaults).

    Attributes:
      beta: β ∈ (0, ∞), the strength of the implicit guidance direction (reference
        ``config.beta``: 1.0; 0.1 for its OCR and multi-reward runs).
      adv_clip_max: A_max; advantages are clipped to ±A_max and mapped to r ∈ [0, 1].
      kl_weight: weight of ``mean((v_θ - v_ref)²)`` (reference ``train.beta = 1e-4``); 0 skips the
        reference pass inside the objective.
      advantage_mode: one of ``ADVANTAGE_MODES`` (reference ``train.adv_mode``, "all").
      weight_floor: floor of the adaptive weight ``mean|x0̂ - x0|`` (reference 1e-5).
    """

    beta: float = 1.0
    adv_clip_max: float = 5.0
    kl_weight: float = 1e-4
    advantage_mode: str = "all"
    weight_floor: float = 1e-5

    def __post_init__(self):
        check_field(self.beta > 0, "beta", "> 0", self.beta)
        check_field(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        check_field(self.kl_weight >= 0, "kl_weight", ">= 0", self.kl_weight)
        check_field(self.advantage_mode in ADVANTAGE_MODES, "advantage_mode",
               f"one of {sorted(ADVANTAGE_MODES)}", self.advantage_mode)
        check_field(self.weight_floor > 0, "weight_floor", "> 0", self.weight_floor)


def adaptive_x0_loss(x0_hat: jax.Array, x0: jax.Array, floor: float) -> tuple[jax.Array, jax.Array]:
    """``mean((x0̂ - x0)²) / sg(max(mean|x0̂ - x0|, floor))`` per sample.

    Args:
      x0_hat, x0: (B, H, W, C).
      floor: lower bound of the stop-gradient weight.

    Returns:
      ``(loss, mse)``, each (B,): the weighted loss and the raw per-pixel mean squared error.
    """
    d = x0_hat - x0
    weight = jax.lax.stop_gradient(jnp.maximum(pixel_mean(jnp.abs(d)), floor))
    mse = pixel_mean(jnp.square(d))
    return mse / weight, mse


def make_objective(cfg: NFTConfig):
    """Returns the DiffusionNFT objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per (rollout sample, noise draw)):
      ``x0`` (B, H, W, C) float32 clean rollout samples in [-1, 1];
      ``noise`` (B, H, W, C) standard normal; ``sigma`` (B,) levels in (0, 1];
      ``cond`` (B,) int32 labels; ``advantage`` (B,) float32.
    (:func:`make_renoised_batch` builds the noise and σ.)

    Context: ``ctx.velocity``, ``ctx.old_params`` (θ_old, required), ``ctx.ref_params`` when
    ``kl_weight > 0``.

    Metrics: ``nft/policy_loss`` (the A_max-scaled first term), ``nft/positive_loss``,
    ``nft/negative_loss`` (batch means of L⁺, L⁻), ``nft/kl`` (mean ``(v_θ - v_ref)²``, only when
    ``kl_weight > 0``), ``nft/old_deviation`` (mean ``(v_θ - v_old)²``), ``nft/implicit_acc``
    (fraction of samples with a non-zero advantage whose preferred implicit policy fits x0
    better: ``A·(mse⁻ - mse⁺) > 0``; 0 at θ = θ_old, rises as the policy learns the reward
    direction).

    Points: ``v_θ`` at ``(x_σ, σ, cond)``; ``v_ref`` filled when ``kl_weight > 0``.
    """

    def objective(params, batch: dict, ctx: Context):
        t, points = _terms(cfg, params, batch, ctx)
        adv, mse_pos, mse_neg, v, v_old = t["advantage"], t["mse_pos"], t["mse_neg"], t["v"], t["v_old"]
        policy_loss = cfg.adv_clip_max * jnp.mean(t["loss"])
        sg = jax.lax.stop_gradient
        nonzero = (adv != 0).astype(jnp.float32)
        correct = ((adv * (mse_neg - mse_pos)) > 0).astype(jnp.float32)
        metrics = {
            "nft/policy_loss": sg(policy_loss),
            "nft/positive_loss": sg(jnp.mean(t["loss_pos"])),
            "nft/negative_loss": sg(jnp.mean(t["loss_neg"])),
            "nft/old_deviation": sg(jnp.mean(jnp.square(v - v_old))),
            "nft/implicit_acc": sg(jnp.sum(correct * nonzero) / jnp.maximum(jnp.sum(nonzero), 1)),
        }
        loss = policy_loss
        if cfg.kl_weight > 0:
            kl = jnp.mean(t["kl"])
            loss = loss + cfg.kl_weight * kl
            metrics["nft/kl"] = sg(kl)
        return loss, Aux(metrics=metrics, points=points)

    return objective


def _terms(cfg: NFTConfig, params, batch: dict, ctx: Context) -> tuple[dict, VelocityPoints]:
    """Per-row terms (see :func:`make_per_sample`) and the velocity points."""
    if ctx.old_params is None:
        raise ValueError("DiffusionNFT needs ctx.old_params (the old / sampling policy)")
    mode = ADVANTAGE_MODES[cfg.advantage_mode]
    x0, noise, sigma, cond = batch["x0"], batch["noise"], batch["sigma"], batch["cond"]
    x = flow.interpolate(x0, noise, sigma)
    v = ctx.velocity(params, x, sigma, cond)
    v_old = jax.lax.stop_gradient(ctx.velocity(ctx.old_params, x, sigma, cond))
    adv = mode(jnp.clip(batch["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max),
               cfg.adv_clip_max)
    r = jnp.clip(adv / (2.0 * cfg.adv_clip_max) + 0.5, 0.0, 1.0)
    v_pos = cfg.beta * v + (1.0 - cfg.beta) * v_old
    v_neg = (1.0 + cfg.beta) * v_old - cfg.beta * v
    x0_pos = flow.x0_from_velocity(x, v_pos, sigma)
    x0_neg = flow.x0_from_velocity(x, v_neg, sigma)
    loss_pos, mse_pos = adaptive_x0_loss(x0_pos, x0, cfg.weight_floor)
    loss_neg, mse_neg = adaptive_x0_loss(x0_neg, x0, cfg.weight_floor)
    sg = jax.lax.stop_gradient
    terms = {
        "v": v, "v_old": v_old, "v_pos": v_pos, "v_neg": v_neg, "x0_pos": x0_pos,
        "x0_neg": x0_neg, "advantage": adv, "r": r,
        "weight_pos": sg(jnp.maximum(pixel_mean(jnp.abs(x0_pos - x0)), cfg.weight_floor)),
        "weight_neg": sg(jnp.maximum(pixel_mean(jnp.abs(x0_neg - x0)), cfg.weight_floor)),
        "mse_pos": mse_pos, "mse_neg": mse_neg, "loss_pos": loss_pos, "loss_neg": loss_neg,
        "loss": (r * loss_pos + (1.0 - r) * loss_neg) / cfg.beta,
    }
    v_ref = None
    if cfg.kl_weight > 0:
        v_ref = sg(ctx.velocity(ctx.ref_params, x, sigma, cond))
        terms["kl"] = pixel_mean(jnp.square(v - v_ref))
    return terms, VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)


def make_per_sample(cfg: NFTConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of per-row arrays before reduction.

    Keys: (B, H, W, C) ``v`` (v_θ), ``v_old``, ``v_pos`` / ``v_neg`` (v±), ``x0_pos`` /
    ``x0_neg`` (x0̂±); (B,) ``advantage`` (clipped, mode applied), ``r``, ``weight_pos`` /
    ``weight_neg`` (the stop-gradient adaptive weights), ``mse_pos`` / ``mse_neg``,
    ``loss_pos`` / ``loss_neg`` (L±), ``loss`` (``[r·L⁺ + (1-r)·L⁻]/β``) and, with
    ``kl_weight > 0``, ``kl``. The objective is ``A_max·mean(loss) + kl_weight·mean(kl)``.
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)[0]


METHOD = Method(name="nft", config_cls=NFTConfig, make_objective=make_objective,
                training_batch=renoised_rollout_batch, rows=renoised_rows,
                make_per_sample=make_per_sample, rollout_policy="old")

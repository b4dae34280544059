"""Advantage Weighted Matching (AWM, arXiv 2509.25050): policy gradient with a matching "log-prob".

AWM keeps the pretraining regression: clean rollout samples are re-noised, ``x_σ = (1-σ)·x0 +
σ·ε``, and the velocity-matching error ``e = mean_pixels((v_θ(x_σ) - (ε - x0))²)`` plays the role
of a negative log-likelihood. Its "log-prob" is a σ-weighted transform of ``e``; a PPO-style
clipped ratio against the old policy turns it into an advantage-weighted matching loss:

    ratio_i  = exp(logp_i - sg(old_logp_i))
    A_i      = clip(advantage_i, ±adv_clip_max) · advantage_max / adv_clip_max
    loss     = mean_i max(-A_i·ratio_i, -A_i·clip(ratio_i, 1 ± ε))
               + kl_weight · mean_i kl_i(v_θ, v_ref) + ema_kl_weight · mean_i kl_i(v_θ, v_old)

On-policy (the reference default, ``off_policy = False``) the old log-prob is the current one
under stop-gradient, so ``ratio ≡ 1``, the value is ``-mean(A)`` plus the KL terms and the
gradient is ``-mean(A·∇logp)``: matching is pulled towards high-advantage samples and pushed away
from low-advantage ones. ``off_policy = True`` takes the old log-prob from ``ctx.old_params`` (the
reference then also samples the rollouts with that EMA policy).

Weightings of the "log-prob" (``weighting``; ``e`` as above, σ the noise level,
p = ``ghuber_power``):

* ``"uniform"``:  ``logp = -e`` (the paper reports it works best);
* ``"t"``:        ``logp = -σ·e``;
* ``"t2"``:       ``logp = -σ²·e``;
* ``"huber"``:    ``logp = -σ·(sqrt(e + 1e-10) - 1e-5)`` (a pseudo-Huber / L2-norm error);
* ``"ghuber"``:   ``logp = -σ·((e + 1e-10)^p - (1e-10)^p) / p`` — the generalised Huber of power p
  (p = 1 is "t", p = ½ is twice "huber", p → 0 tends to ``-σ·log(e/1e-10)``); the official code's
  default, with p = 0.25. Its gradient ``σ·e^(p-1)·∇e`` up-weights samples with small errors
  relative to "t", and σ down-weights the nearly clean levels.

KL terms, each with a time weighting: ``"uniform"`` is ``mean_pixels((v_θ - v')²)``; ``"elbo"``
divides that by ``2·s²`` with ``s = 0.7·sqrt(σ/(1 - min(σ, 0.99)))``, the reference's
Flow-GRPO-style SDE coefficient. Names map to the official config as: ``kl_weight`` = its
``train.beta`` (0.003 in the README), ``kl_time_weighting`` = its ``train.kl_weight`` ("Uniform"),
``ema_kl_weight`` = its ``train.ema_beta`` (1; the "KL-EMA" trust region to the lagged policy
``ctx.old_params``, updated with ``rl_state.update_old_params`` and the "awm" preset
``min(0.3, 0.001·step)``), ``ema_kl_time_weighting`` = its ``train.kl_ema_weight``. Other
defaults: ``clip_range = 1``, ``adv_clip_max = 5``, ``advantage_max = 1``, "ghuber" with p = 0.25.
Differences from the reference: its EMA-KL is only active when ``train.beta > 0`` (nested); here
the two terms are independent. σ comes from the caller: the reference's default
("discrete_wo_init") draws stratified levels of the sampling schedule other than the first, which
``flow.schedule_sigma_sampler`` approximates (uniform over all levels). Only its
``loss_type = "exp_first"`` (one ratio per (sample, σ) row) is implemented. Errors are float32
(the reference casts to float64). No CFG during training (the official SD3 runs train the
conditional field).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from normguard_jax import flow
from normguard_jax.objectives.base import (Aux, Context, Method, VelocityPoints, check_field,
                                           pixel_mean, renoised_rollout_batch, renoised_rows)

_TINY = 1e-10


# weighting name -> (per-sample error e (B,), sigma (B,), power p) -> log-prob (B,)
WEIGHTINGS: dict[str, Callable[[jax.Array, jax.Array, float], jax.Array]] = {
    "uniform": lambda e, s, p: -e,
    "t": lambda e, s, p: -e * s,
    "t2": lambda e, s, p: -e * jnp.square(s),
    "huber": lambda e, s, p: -(jnp.sqrt(e + _TINY) - 1e-5) * s,
    "ghuber": lambda e, s, p: -(jnp.power(e + _TINY, p) - _TINY**p) * s / p,
}


def _elbo_std(sigma: jax.Array) -> jax.Array:
    return 0.7 * jnp.sqrt(sigma / (1.0 - jnp.clip(sigma, 0.0, 0.99)))


# KL time weighting name -> (v, v', sigma) -> (B,)
KL_WEIGHTINGS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "uniform": lambda v, w, s: pixel_mean(jnp.square(v - w)),
    "elbo": lambda v, w, s: pixel_mean(jnp.square(v - w)) / (2.0 * jnp.square(_elbo_std(s))),
}


@dataclasses.dataclass(frozen=True)
class AWMConfig:
    """Hyper-parameters of AWM (static; defaults follow the official code / README).

    Attributes:
      weighting: "log-prob" weighting, one of ``WEIGHTINGS`` (see the module docstring).
      ghuber_power: p of the "ghuber" weighting, > 0.
      clip_range: PPO ratio clip ε (reference 1.0; on-policy the ratio is 1 anyway).
      adv_clip_max: advantages are clipped to ±adv_clip_max, then
      advantage_max: rescaled by ``advantage_max / adv_clip_max`` (reference 5 and 1).
      kl_weight: weight of the KL to the frozen reference (reference ``train.beta``, 0.003).
      kl_time_weighting: "uniform" or "elbo" for that term (reference "Uniform").
      ema_kl_weight: weight of the KL to ``ctx.old_params`` (reference ``ema_beta``, 1); 0 = off.
      ema_kl_time_weighting: "uniform" or "elbo" for that term.
      off_policy: take the ratio's denominator from ``ctx.old_params`` instead of the current
        parameters under stop-gradient (reference ``train.off_policy``, False).
    """

    weighting: str = "ghuber"
    ghuber_power: float = 0.25
    clip_range: float = 1.0
    adv_clip_max: float = 5.0
    advantage_max: float = 1.0
    kl_weight: float = 0.003
    kl_time_weighting: str = "uniform"
    ema_kl_weight: float = 1.0
    ema_kl_time_weighting: str = "uniform"
    off_policy: bool = False

    def __post_init__(self):
        check_field(self.weighting in WEIGHTINGS, "weighting", f"one of {sorted(WEIGHTINGS)}",
               self.weighting)
        check_field(self.ghuber_power > 0, "ghuber_power", "> 0", self.ghuber_power)
        check_field(self.clip_range > 0, "clip_range", "> 0", self.clip_range)
        check_field(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        check_field(self.advantage_max > 0, "advantage_max", "> 0", self.advantage_max)
        check_field(self.kl_weight >= 0, "kl_weight", ">= 0", self.kl_weight)
        check_field(self.kl_time_weighting in KL_WEIGHTINGS, "kl_time_weighting",
               f"one of {sorted(KL_WEIGHTINGS)}", self.kl_time_weighting)
        check_field(self.ema_kl_weight >= 0, "ema_kl_weight", ">= 0", self.ema_kl_weight)
        check_field(self.ema_kl_time_weighting in KL_WEIGHTINGS, "ema_kl_time_weighting",
               f"one of {sorted(KL_WEIGHTINGS)}", self.ema_kl_time_weighting)

    @property
    def needs_old(self) -> bool:
        """Whether the objective evaluates ``ctx.old_params``."""
        return self.off_policy or self.ema_kl_weight > 0


def matching_log_prob(v: jax.Array, target: jax.Array, sigma: jax.Array, weighting: str,
                      power: float) -> jax.Array:
    """AWM's "log-prob": minus the weighted velocity-matching error.

    Args:
      v: (B, H, W, C) predicted velocity. target: (B, H, W, C), ``ε - x0``.
      sigma: (B,) noise levels. weighting: a key of ``WEIGHTINGS``. power: ghuber p.

    Returns:
      (B,) float32; ``e`` is the per-pixel MEAN squared error, not a sum.
    """
    e = pixel_mean(jnp.square(v - target))
    return WEIGHTINGS[weighting](e, sigma, power)


def make_objective(cfg: AWMConfig):
    """Returns the AWM objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per (rollout sample, noise draw); ``flow.renoised_batch`` builds it):
      ``x0`` (B, H, W, C) clean samples; ``noise`` (B, H, W, C) standard normal;
      ``sigma`` (B,) in (0, 1]; ``cond`` (B,) int32; ``advantage`` (B,) float32.

    Context: ``ctx.velocity``; ``ctx.ref_params`` when ``kl_weight > 0``; ``ctx.old_params``
    when ``off_policy`` or ``ema_kl_weight > 0``.

    Metrics: ``awm/policy_loss``, ``awm/log_prob`` (mean weighted "log-prob"),
    ``awm/matching_error`` (mean ``e``), ``awm/ratio``, ``awm/clipfrac``, and ``awm/kl`` /
    ``awm/ema_kl`` when those terms are on.

    Points: ``v_θ`` at ``(x_σ, σ, cond)``; ``v_ref`` filled when ``kl_weight > 0``.
    """

    def objective(params, batch: dict, ctx: Context):
        x0, noise, sigma, cond = batch["x0"], batch["noise"], batch["sigma"], batch["cond"]
        if cfg.needs_old and ctx.old_params is None:
            raise ValueError("AWM with off_policy or ema_kl_weight > 0 needs ctx.old_params")
        x = flow.interpolate(x0, noise, sigma)
        target = flow.velocity_target(x0, noise)
        v = ctx.velocity(params, x, sigma, cond)
        log_prob = matching_log_prob(v, target, sigma, cfg.weighting, cfg.ghuber_power)

        sg = jax.lax.stop_gradient
        v_old = sg(ctx.velocity(ctx.old_params, x, sigma, cond)) if cfg.needs_old else None
        if cfg.off_policy:
            old_log_prob = matching_log_prob(v_old, target, sigma, cfg.weighting,
                                             cfg.ghuber_power)
        else:
            old_log_prob = sg(log_prob)
        ratio = jnp.exp(log_prob - old_log_prob)
        adv = (jnp.clip(batch["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
               * (cfg.advantage_max / cfg.adv_clip_max))
        unclipped = -adv * ratio
        clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
        policy_loss = jnp.mean(jnp.maximum(unclipped, clipped))
        loss = policy_loss
        metrics = {
            "awm/policy_loss": sg(policy_loss),
            "awm/log_prob": sg(jnp.mean(log_prob)),
            "awm/matching_error": sg(jnp.mean(pixel_mean(jnp.square(v - target)))),
            "awm/ratio": sg(jnp.mean(ratio)),
            "awm/clipfrac": jnp.mean((jnp.abs(sg(ratio) - 1.0) > cfg.clip_range)
                                     .astype(jnp.float32)),
        }
        v_ref = None
        if cfg.kl_weight > 0:
            v_ref = sg(ctx.velocity(ctx.ref_params, x, sigma, cond))
            kl = jnp.mean(KL_WEIGHTINGS[cfg.kl_time_weighting](v, v_ref, sigma))
            loss = loss + cfg.kl_weight * kl
            metrics["awm/kl"] = sg(kl)
        if cfg.ema_kl_weight > 0:
            ema_kl = jnp.mean(KL_WEIGHTINGS[cfg.ema_kl_time_weighting](v, v_old, sigma))
            loss = loss + cfg.ema_kl_weight * ema_kl
            metrics["awm/ema_kl"] = sg(ema_kl)
        points = VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)
        return loss, Aux(metrics=metrics, points=points)

    return objective


METHOD = Method(name="awm", config_cls=AWMConfig, make_objective=make_objective,
                training_batch=renoised_rollout_batch, rows=renoised_rows)

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
``flow.schedule_sigma_sampler`` approximates (uniform over all levels). Both ratio forms of its
``loss_type``: ``"exp_first"`` (default here, today's behaviour: one ratio per (sample, σ) row)
and ``"sum_first"`` (the per-level log-probs of a sample are summed before the exponential:
``ratio_i = exp(Σ_d logp_id - Σ_d old_logp_id)``, one ratio per sample over its D =
``train.renoise_draws`` levels; the batch then holds one row per sample with D noise draws).
Parameter sets: θ_old, the ratio's denominator when ``off_policy`` (``old_params``), and θ_EMA,
the KL-EMA anchor (``ema_params``), are each "ema" (``ctx.old_params``, the lagged EMA; the
reference's off-policy setting uses the EMA for both, the default) or "rollout"
(``ctx.rollout_params``, θ when the rollout was sampled). Errors are float32
(the reference casts to float64). No CFG during training (the official SD3 runs train the
conditional field).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from normguard_jax import flow
from normguard_jax.objectives.base import (Aux, BatchSpec, Context, Method, Rollout,
                                           VelocityPoints, check_field, pixel_mean,
                                           renoised_rollout_batch, renoised_rows)

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


# Where θ_old / θ_EMA come from in the Context.
PARAM_SETS: dict[str, Callable] = {"ema": lambda ctx: ctx.old_params,
                                   "rollout": lambda ctx: ctx.rollout_params}
LOSS_TYPES = ("exp_first", "sum_first")


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
      off_policy: take the ratio's denominator from θ_old (``old_params``) instead of the
        current parameters under stop-gradient (reference ``train.off_policy``, False).
      old_params: θ_old when ``off_policy``: "ema" (``ctx.old_params``, reference) or
        "rollout" (``ctx.rollout_params``).
      ema_params: θ_EMA, the anchor of the ``ema_kl_weight`` term: "ema" (reference) or
        "rollout".
      loss_type: "exp_first" (one ratio per (sample, σ) row) or "sum_first" (per-level
        log-probs summed over a sample's D draws before the exponential; see the module
        docstring).
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
    old_params: str = "ema"
    ema_params: str = "ema"
    loss_type: str = "exp_first"

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
        check_field(self.old_params in PARAM_SETS, "old_params", f"one of {sorted(PARAM_SETS)}",
                    self.old_params)
        check_field(self.ema_params in PARAM_SETS, "ema_params", f"one of {sorted(PARAM_SETS)}",
                    self.ema_params)
        check_field(self.loss_type in LOSS_TYPES, "loss_type", f"one of {list(LOSS_TYPES)}",
                    self.loss_type)

    @property
    def needs_old(self) -> bool:
        """Whether the objective evaluates θ_old or θ_EMA."""
        return self.off_policy or self.ema_kl_weight > 0

    @property
    def needs_rollout_params(self) -> bool:
        """Whether the objective reads ``ctx.rollout_params``."""
        return ((self.off_policy and self.old_params == "rollout")
                or (self.ema_kl_weight > 0 and self.ema_params == "rollout"))


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


def _flatten_draws(batch: dict) -> tuple:
    """sum_first batch ``noise`` (N, D, ...), ``sigma`` (N, D) -> (N·D) rows, sample-major."""
    noise, sigma = batch["noise"], batch["sigma"]
    n, d = sigma.shape
    rep = lambda a: jnp.repeat(a, d, axis=0)
    return (rep(batch["x0"]), noise.reshape((n * d,) + noise.shape[2:]), sigma.reshape(-1),
            jax.tree.map(rep, batch["cond"]), rep(batch["advantage"]), d)


def _terms(cfg: AWMConfig, params, batch: dict, ctx: Context) -> tuple[dict, VelocityPoints]:
    """Per-row terms (see :func:`make_per_sample`) and the velocity points."""
    if cfg.loss_type == "sum_first":
        x0, noise, sigma, cond, _, draws = _flatten_draws(batch)
    else:
        x0, noise, sigma, cond, draws = batch["x0"], batch["noise"], batch["sigma"], batch["cond"], 1
    if cfg.needs_old:
        for name, on in (("old_params", cfg.off_policy), ("ema_params", cfg.ema_kl_weight > 0)):
            which = getattr(cfg, name)
            if on and PARAM_SETS[which](ctx) is None:
                raise ValueError(f"AWM with {name}={which!r} needs ctx."
                                 f"{'old_params' if which == 'ema' else 'rollout_params'}")
    x = flow.interpolate(x0, noise, sigma)
    target = flow.velocity_target(x0, noise)
    v = ctx.velocity(params, x, sigma, cond)
    log_prob = matching_log_prob(v, target, sigma, cfg.weighting, cfg.ghuber_power)

    sg = jax.lax.stop_gradient
    velocities = {}     # one pass per distinct parameter set

    def velocity_of(which):
        if which not in velocities:
            velocities[which] = sg(ctx.velocity(PARAM_SETS[which](ctx), x, sigma, cond))
        return velocities[which]

    if cfg.off_policy:
        old_log_prob = matching_log_prob(velocity_of(cfg.old_params), target, sigma,
                                         cfg.weighting, cfg.ghuber_power)
    else:
        old_log_prob = sg(log_prob)
    terms = {"log_prob": log_prob, "old_log_prob": old_log_prob,
             "matching_error": pixel_mean(jnp.square(v - target)),
             "kl_std": _elbo_std(sigma)}
    if cfg.loss_type == "sum_first":
        n = log_prob.shape[0] // draws
        ratio = jnp.exp(jnp.sum(log_prob.reshape(n, draws), axis=1)
                        - jnp.sum(old_log_prob.reshape(n, draws), axis=1))
        advantage = batch["advantage"]
    else:
        ratio = jnp.exp(log_prob - old_log_prob)
        advantage = batch["advantage"]
    adv = (jnp.clip(advantage, -cfg.adv_clip_max, cfg.adv_clip_max)
           * (cfg.advantage_max / cfg.adv_clip_max))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    terms.update(ratio=ratio, advantage=adv, unclipped=unclipped, clipped=clipped,
                 policy_loss=jnp.maximum(unclipped, clipped))
    v_ref = None
    if cfg.kl_weight > 0:
        v_ref = sg(ctx.velocity(ctx.ref_params, x, sigma, cond))
        terms["kl"] = KL_WEIGHTINGS[cfg.kl_time_weighting](v, v_ref, sigma)
    if cfg.ema_kl_weight > 0:
        terms["ema_kl"] = KL_WEIGHTINGS[cfg.ema_kl_time_weighting](
            v, velocity_of(cfg.ema_params), sigma)
    return terms, VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)


def make_per_sample(cfg: AWMConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of per-row arrays before reduction.

    Per velocity row (B = batch rows; N·D with "sum_first"): ``log_prob``, ``old_log_prob``,
    ``matching_error`` (e), ``kl_std`` (the per-level std ``0.7·sqrt(σ/(1 - min(σ, 0.99)))`` of
    the "elbo" KL weighting), and ``kl`` / ``ema_kl`` when those terms are on. Per ratio row
    (B; N samples with "sum_first"): ``ratio``, ``advantage`` (clipped and rescaled),
    ``unclipped``, ``clipped``, ``policy_loss``. The objective is ``mean(policy_loss) +
    kl_weight·mean(kl) + ema_kl_weight·mean(ema_kl)``.
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)[0]


def make_objective(cfg: AWMConfig):
    """Returns the AWM objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per (rollout sample, noise draw); ``flow.renoised_batch`` builds it):
      ``x0`` (B, H, W, C) clean samples; ``noise`` (B, H, W, C) standard normal;
      ``sigma`` (B,) in (0, 1]; ``cond`` (B,) int32; ``advantage`` (B,) float32.
    With ``loss_type = "sum_first"`` one row per sample: ``noise`` (B, D, H, W, C) and
    ``sigma`` (B, D), the D levels whose log-probs are summed (:func:`training_batch`).

    Context: ``ctx.velocity``; ``ctx.ref_params`` when ``kl_weight > 0``; ``ctx.old_params``
    / ``ctx.rollout_params`` as ``old_params`` (when ``off_policy``) and ``ema_params`` (when
    ``ema_kl_weight > 0``) say.

    Metrics: ``awm/policy_loss``, ``awm/log_prob`` (mean weighted "log-prob"),
    ``awm/matching_error`` (mean ``e``), ``awm/ratio``, ``awm/clipfrac``, and ``awm/kl`` /
    ``awm/ema_kl`` when those terms are on.

    Points: ``v_θ`` at ``(x_σ, σ, cond)``; ``v_ref`` filled when ``kl_weight > 0``.
    """

    def objective(params, batch: dict, ctx: Context):
        t, points = _terms(cfg, params, batch, ctx)
        sg = jax.lax.stop_gradient
        ratio = t["ratio"]
        policy_loss = jnp.mean(t["policy_loss"])
        loss = policy_loss
        metrics = {
            "awm/policy_loss": sg(policy_loss),
            "awm/log_prob": sg(jnp.mean(t["log_prob"])),
            "awm/matching_error": sg(jnp.mean(t["matching_error"])),
            "awm/ratio": sg(jnp.mean(ratio)),
            "awm/clipfrac": jnp.mean((jnp.abs(sg(ratio) - 1.0) > cfg.clip_range)
                                     .astype(jnp.float32)),
        }
        if cfg.kl_weight > 0:
            kl = jnp.mean(t["kl"])
            loss = loss + cfg.kl_weight * kl
            metrics["awm/kl"] = sg(kl)
        if cfg.ema_kl_weight > 0:
            ema_kl = jnp.mean(t["ema_kl"])
            loss = loss + cfg.ema_kl_weight * ema_kl
            metrics["awm/ema_kl"] = sg(ema_kl)
        return loss, Aux(metrics=metrics, points=points)

    return objective


def training_batch(rollout: Rollout, key: jax.Array, spec: BatchSpec) -> dict:
    """``renoised_rollout_batch`` (D·N rows, draw-major) for "exp_first"; for "sum_first" the
    same draws regrouped as N rows with ``noise`` (N, D, ...) and ``sigma`` (N, D)."""
    batch = renoised_rollout_batch(rollout, key, spec)
    cfg = spec.objective if spec.objective is not None else AWMConfig()
    if cfg.loss_type == "exp_first":
        return batch
    n, d = spec.samples, spec.renoise_draws
    by_sample = lambda a: jnp.swapaxes(a.reshape((d, n) + a.shape[1:]), 0, 1)
    return {"x0": batch["x0"][:n], "noise": by_sample(batch["noise"]),
            "sigma": by_sample(batch["sigma"]), "cond": jax.tree.map(lambda c: c[:n],
                                                                     batch["cond"]),
            "advantage": batch["advantage"][:n]}


def rows(spec: BatchSpec) -> int:
    """D·N rows ("exp_first") or N ("sum_first")."""
    cfg = spec.objective if spec.objective is not None else AWMConfig()
    return renoised_rows(spec) if cfg.loss_type == "exp_first" else spec.samples


METHOD = Method(name="awm", config_cls=AWMConfig, make_objective=make_objective,
                training_batch=training_batch, rows=rows, make_per_sample=make_per_sample,
                rollout_policy="current")

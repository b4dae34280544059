"""Flow-GRPO: clipped policy gradient on stored stochastic sampling transitions.

A rollout with a stochastic sampler (Flow-GRPO's SDE, or CPS) stores, for every trained step of
every sample, the state ``x`` at ``σ``, the next state ``x_next`` at ``σ_next`` and the per-pixel
mean log-probability of that transition under the sampling (old) policy. Training re-scores the
same transition under the current parameters and applies PPO's clipped surrogate:

    ratio_i  = exp(log p_θ(x_next | x) - old_log_prob_i)
    A_i      = clip(advantage_i, -adv_clip_max, adv_clip_max)
    policy_i = max(-A_i·ratio_i, -A_i·clip(ratio_i, 1 - ε, 1 + ε))
    loss     = mean_i(policy_i) + kl_weight · mean_i(kl_i)

as in Flow-GRPO's ``scripts/train_sd3.py`` (one transition per row here; the reference loops over
steps and averages per step, which gives the same mean when every sample contributes the same
steps). Defaults are the reference's: ``ε = clip_range = 1e-4``, ``adv_clip_max = 5``,
``kl_weight = 0`` (``train.beta``), noise level 0.7 for the SDE and 0.8 for CPS.

KL term (only when ``kl_weight > 0``; one extra reference pass at the same points):
``kl_i = mean_pixels((μ_θ - μ_ref)²) / (2·s²)`` exactly as the reference computes it, i.e. with
``s`` the ``std_dev_t`` that its step function returns: for the SDE that is the diffusion
coefficient ``g = a·sqrt(σ/(1-σ'))`` WITHOUT the ``sqrt(σ - σ_next)`` factor (so the value is the
exact Gaussian KL times ``σ - σ_next``), for CPS it is the true step std ``σ_next·sin(η·π/2)``.
Where that std is 0 (CPS's last step) the KL is defined as 0.

Log-probs come from :mod:`normguard_jax.sampling` in scoring mode (``x_next=`` given): per-pixel
means; the SDE's includes the Gaussian constants; CPS's is ``-mean((x_next - μ)²)`` unless
``cps_true_density`` is set. The stored ``old_log_prob`` must have been computed with the same
sampler options.

Classifier-free guidance during training (``guidance_scale != 1``, Flow-GRPO's ``train.cfg``)
replaces the velocity by the guided one, for the policy and for the reference alike. The
velocity points exposed to NormGuard are then the guided velocities, and the guided reference is
always computed and filled in (one reference pass, also with ``kl_weight = 0``) so that a
velocity-local penalty compares like with like.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp

import ml_collections

from normguard_jax import config_checks, sampling
from normguard_jax.objectives.base import (Aux, BatchSpec, Context, Method, Rollout,
                                           VelocityPoints, check_field)



# Sampler name -> (step function, builder of its keyword options, KL std rule).
def _sde_options(cfg: "GRPOConfig", batch: dict) -> dict:
    return {"noise_level": cfg.resolved_noise_level, "sigma_max": batch["sigma_max"]}


def _cps_options(cfg: "GRPOConfig", batch: dict) -> dict:
    return {"noise_level": cfg.resolved_noise_level, "true_density": cfg.cps_true_density}


def _sde_kl_std(cfg: "GRPOConfig", batch: dict, step: sampling.StepOutput) -> jax.Array:
    # The reference divides by its std_dev_t, the diffusion coefficient g (no sqrt(-dt)).
    return sampling.flow_grpo_noise_scale(batch["sigma"], batch["sigma_max"],
                                          cfg.resolved_noise_level)


def _cps_kl_std(cfg: "GRPOConfig", batch: dict, step: sampling.StepOutput) -> jax.Array:
    return step.std


_SAMPLERS: dict[str, tuple[Callable, Callable, Callable]] = {
    "sde": (sampling.flow_grpo_sde_step, _sde_options, _sde_kl_std),
    "cps": (sampling.cps_step, _cps_options, _cps_kl_std),
}


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of Flow-GRPO (static; defaults are the reference's).

    Attributes:
      sampler: "sde" (Flow-GRPO's reverse SDE) or "cps" (coefficients-preserving sampling); must
        be the sampler that produced the stored transitions.
      noise_level: the sampler's noise level (``a`` for "sde", ``η`` for "cps"); None uses the
        reference default (0.7 / 0.8, ``sampling.DEFAULT_NOISE_LEVELS``).
      cps_true_density: for "cps", score with the true Gaussian density instead of the
        reference's ``-mean((x_next - μ)²)``.
      clip_range: PPO ratio clip ε (reference ``train.clip_range = 1e-4``).
      adv_clip_max: advantages are clipped to ``±adv_clip_max`` (reference 5).
      kl_weight: β of the KL-to-reference term (reference ``train.beta``, 0 = off).
      guidance_scale: classifier-free guidance during training; 1 = off (reference uses the
        sampling guidance scale when ``train.cfg`` is set).
      null_class: label of the unconditional class; required (>= 0) when guidance is on.
    """

    sampler: Literal["sde", "cps"] = "sde"
    noise_level: Optional[float] = None
    cps_true_density: bool = False
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    kl_weight: float = 0.0
    guidance_scale: float = 1.0
    null_class: int = -1

    def __post_init__(self):
        check_field(self.sampler in _SAMPLERS, "sampler", f"one of {sorted(_SAMPLERS)}", self.sampler)
        check_field(self.noise_level is None or self.noise_level >= 0, "noise_level",
               ">= 0 or None", self.noise_level)
        check_field(self.clip_range > 0, "clip_range", "> 0", self.clip_range)
        check_field(self.adv_clip_max > 0, "adv_clip_max", "> 0", self.adv_clip_max)
        check_field(self.kl_weight >= 0, "kl_weight", ">= 0", self.kl_weight)
        check_field(self.guidance_scale >= 0, "guidance_scale", ">= 0", self.guidance_scale)
        check_field(self.guidance_scale == 1.0 or self.null_class >= 0, "null_class",
               ">= 0 (the null label) when guidance_scale != 1", self.null_class)

    @property
    def resolved_noise_level(self) -> float:
        """The noise level in use: ``noise_level`` or the sampler's reference default."""
        if self.noise_level is None:
            return sampling.DEFAULT_NOISE_LEVELS[self.sampler]
        return self.noise_level

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is applied during training."""
        return self.guidance_scale != 1.0


def _velocity(cfg: GRPOConfig, ctx: Context, params, x, sigma, cond) -> jax.Array:
    if cfg.guided:
        return sampling.guided_velocity(ctx.velocity, params, x, sigma, cond,
                                        guidance_scale=cfg.guidance_scale,
                                        null_class=(cfg.null_class if ctx.null_condition is None
                                                    else ctx.null_condition))
    return ctx.velocity(params, x, sigma, cond)


def clipped_policy_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantage: jax.Array,
                        clip_range: float, adv_clip_max: float) -> jax.Array:
    """Flow-GRPO's clipped surrogate per row, on given log-probs (no SDE step is re-run).

    ``max(-A·ratio, -A·clip(ratio, 1 - ε, 1 + ε))`` with ``ratio = exp(log_prob - old_log_prob)``
    and ``A = clip(advantage, ±adv_clip_max)``; gradients flow through ``log_prob`` only if the
    caller's ``old_log_prob`` is constant.

    Args:
      log_prob, old_log_prob, advantage: (B,) float32.
      clip_range: ε. adv_clip_max: the advantage clip.

    Returns:
      (B,) per-row policy loss (the objective's ``grpo/policy_loss`` is its mean).
    """
    ratio = jnp.exp(log_prob - old_log_prob)
    adv = jnp.clip(advantage, -adv_clip_max, adv_clip_max)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.maximum(unclipped, clipped)


def _terms(cfg: GRPOConfig, params, batch: dict, ctx: Context) -> tuple[dict, VelocityPoints]:
    """Per-row terms of the objective (see :func:`make_per_sample`) and its velocity points."""
    step_fn, options_fn, kl_std_fn = _SAMPLERS[cfg.sampler]
    needs_ref = cfg.kl_weight > 0 or cfg.guided
    x, sigma, cond = batch["x"], batch["sigma"], batch["cond"]
    options = options_fn(cfg, batch)
    v = _velocity(cfg, ctx, params, x, sigma, cond)
    new = step_fn(x, v, sigma, batch["sigma_next"], x_next=batch["x_next"], **options)
    old_log_prob = batch["old_log_prob"]
    log_ratio = new.log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    adv = jnp.clip(batch["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    terms = {"log_prob": new.log_prob, "old_log_prob": old_log_prob, "log_ratio": log_ratio,
             "ratio": ratio, "advantage": adv, "unclipped": unclipped, "clipped": clipped,
             "policy_loss": jnp.maximum(unclipped, clipped), "mean": new.mean}
    v_ref = None
    if needs_ref:
        v_ref = jax.lax.stop_gradient(_velocity(cfg, ctx, ctx.ref_params, x, sigma, cond))
    if cfg.kl_weight > 0:
        ref = step_fn(x, v_ref, sigma, batch["sigma_next"], x_next=batch["x_next"], **options)
        std = kl_std_fn(cfg, batch, new)
        positive = std > 0
        safe_std = jnp.where(positive, std, 1.0)
        terms["kl"] = jnp.where(positive, sampling.flow_grpo_kl(new.mean, ref.mean, safe_std),
                                0.0)
        terms["ref_mean"] = ref.mean
    return terms, VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref,
                                 guided=cfg.guided)


def make_per_sample(cfg: GRPOConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of (B, ...) arrays, before reduction.

    Keys: ``log_prob`` (new), ``old_log_prob``, ``log_ratio``, ``ratio``, ``advantage``
    (clipped), ``unclipped`` (``-A·ratio``), ``clipped`` (``-A·clip(ratio)``), ``policy_loss``
    (their maximum, :func:`clipped_policy_loss`), ``mean`` (B, H, W, C: the step mean μ_θ),
    and with ``kl_weight > 0`` ``kl`` (B,) and ``ref_mean``. Batch and context: as
    :func:`make_objective`; its loss is ``mean(policy_loss) + kl_weight·mean(kl)``.
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)[0]


def make_objective(cfg: GRPOConfig):
    """Returns the Flow-GRPO objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per stored stochastic transition; B = samples × trained steps):
      ``x`` (B, H, W, C) float32: state at ``sigma``;
      ``x_next`` (B, H, W, C): the stored next state (no gradient flows into it);
      ``sigma``, ``sigma_next`` (B,) float32: the step's levels (``σ_next < σ``);
      ``sigma_max``: the schedule's ``sigmas[1]`` (only read by the "sde" sampler). A scalar works
        unsharded; give it as a (B,) array (every entry equal) to shard the batch.
      ``cond`` (B,) int32 labels;
      ``old_log_prob`` (B,) float32: log-prob stored at sampling time (same sampler options);
      ``advantage`` (B,) float32: the sample's advantage, repeated over its steps.
    Only transitions of stochastic steps belong in the batch (Euler steps outside an SDE
    window have no density).

    Context: ``ctx.velocity``; ``ctx.ref_params`` when ``kl_weight > 0`` or guidance is on.

    Metrics (batch means): ``grpo/policy_loss``, ``grpo/kl`` (the un-weighted KL term, 0 when
    ``kl_weight == 0``), ``grpo/approx_kl`` (``½·mean((new - old)²)`` as the reference logs it),
    ``grpo/clipfrac`` (``|ratio - 1| > ε``), ``grpo/ratio``, ``grpo/log_prob``.

    Points: the policy velocity at ``(x, σ, cond)`` (guided if guidance is on, then marked
    ``guided=True``); ``v_ref`` filled whenever the reference was evaluated.
    """

    def objective(params, batch: dict, ctx: Context):
        terms, points = _terms(cfg, params, batch, ctx)
        policy_loss = jnp.mean(terms["policy_loss"])
        kl = jnp.zeros_like(policy_loss)
        if cfg.kl_weight > 0:
            kl = jnp.mean(terms["kl"])
            loss = policy_loss + cfg.kl_weight * kl
        else:
            loss = policy_loss
        sg = jax.lax.stop_gradient
        ratio = terms["ratio"]
        metrics = {
            "grpo/policy_loss": sg(policy_loss),
            "grpo/kl": sg(kl),
            "grpo/approx_kl": sg(0.5 * jnp.mean(jnp.square(terms["log_ratio"]))),
            "grpo/clipfrac": jnp.mean((jnp.abs(sg(ratio) - 1.0) > cfg.clip_range)
                                      .astype(jnp.float32)),
            "grpo/ratio": sg(jnp.mean(ratio)),
            "grpo/log_prob": sg(jnp.mean(terms["log_prob"])),
        }
        return loss, Aux(metrics=metrics, points=points)

    return objective


def training_batch(rollout: Rollout, key: jax.Array, spec: BatchSpec) -> dict:
    """Every stored stochastic transition becomes a row (B = N·len(spec.trained_steps)).

    ``spec.trained_steps`` are the (static) indices k of the stochastic steps; row layout is
    step-major (row ``j·N + i`` is sample i at step ``trained_steps[j]``). Keys: see
    :func:`make_objective`.
    """
    del key
    traj = rollout.trajectory
    ks = jnp.asarray(spec.trained_steps, jnp.int32)
    n = rollout.rewards.shape[0]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    sig = traj.sigmas
    return {
        "x": flat(traj.states[ks]),
        "x_next": flat(traj.states[ks + 1]),
        "sigma": jnp.repeat(sig[ks], n),
        "sigma_next": jnp.repeat(sig[ks + 1], n),
        "sigma_max": jnp.full((ks.shape[0] * n,), sig[1], jnp.float32),
        "cond": jax.tree.map(lambda c: jnp.tile(c, (ks.shape[0],) + (1,) * (c.ndim - 1)),
                             rollout.labels),
        "old_log_prob": flat(traj.log_probs[ks]),
        "advantage": jnp.tile(rollout.advantages, ks.shape[0]),
    }


def validate(config: ml_collections.ConfigDict) -> None:
    """The rollouts must use a sampler whose transitions have log-probs (``sde`` or ``cps``), and
    the objective's CFG scale must be the rollout's: the stored old log-probs were computed with
    the rollout's (guided) velocity, so a different ``objective.guidance_scale`` would compare
    log-probs of two different velocity fields (a ratio ≠ 1 before any update)."""
    if config.rollout.sampler not in _SAMPLERS:
        raise config_checks.ConfigError(
            f"config.rollout.sampler must be one of {sorted(_SAMPLERS)} for method 'grpo' "
            f"(its log-probs), got {config.rollout.sampler!r}")
    objective_scale = dict(config.objective).get("guidance_scale", config.rollout.guidance_scale)
    if objective_scale != config.rollout.guidance_scale:
        raise config_checks.ConfigError(
            f"config.objective.guidance_scale={objective_scale!r} must equal "
            f"config.rollout.guidance_scale={config.rollout.guidance_scale!r} for method 'grpo': "
            "the old log-probs come from the rollout's velocity (set both, or leave "
            "objective.guidance_scale out and it is taken from the rollout)")


METHOD = Method(name="grpo", config_cls=GRPOConfig, make_objective=make_objective,
                training_batch=training_batch,
                rows=lambda spec: spec.samples * len(spec.trained_steps),
                needs_trajectory=True, validate=validate, make_per_sample=make_per_sample,
                rollout_policy="current")

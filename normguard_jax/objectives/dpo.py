"""Online flow DPO (Diffusion-DPO with the rectified-flow velocity error).

For each prompt the rollout's best and worst samples form a pair (``advantages.dpo_pairs``). The
winner ``x0_w`` and loser ``x0_l`` are noised with the SAME noise ε and level σ, and the
per-pixel mean squared velocity errors ``e = mean_pixels((v - (ε - x0))²)`` of the policy and of a
reference model give the implicit reward margin

    inside_i = -½·β·[(e_θ^w - e_ref^w) - (e_θ^l - e_ref^l)]
    loss     = mean_i valid_i · (-log σ(inside_i))          (jax.nn.log_sigmoid)

as in Flow-GRPO's ``scripts/train_sd3_dpo.py`` (its SD3 config uses β = ``train.beta`` = 100; the
per-pair loss is averaged, as in the original Diffusion-DPO, not the log-sigmoid of a batch
mean). With θ = θ_ref every pair has ``inside = 0`` and the loss is ``log 2``.

Which parameters are "the reference" of the log-ratio (``reference``):

* ``"ref"`` (default): the frozen ``ctx.ref_params``; the reference velocities are then exactly
  the ``v_ref`` NormGuard needs and are exposed in the velocity points.
* ``"old"``: ``ctx.old_params``, which the RL loop refreshes to the current policy every few
  steps (Flow-GRPO's ``train.ref_update_step``, "Online DPO"). The points then carry no
  ``v_ref`` and NormGuard evaluates the frozen reference itself.

Tied groups (all rewards equal), ``ties``: ``"drop"`` (default) gives the pair ``valid = 0`` so it
contributes nothing; the batch mean still divides by the number of rows, so the loss is a
per-example mean and shards exactly. ``"pair"`` is Flow-GRPO's tracker rule (its default, the
only one it has): member 1 is the winner, member 0 the loser, trained as a real preference
(``advantages.dpo_pairs``). "drop" stays the default here because an arbitrary preference on
a tie is pure noise in the gradient; set ``ties="pair"`` to reproduce the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from normguard_jax import advantages as advantages_lib
from normguard_jax import flow, sampling
from normguard_jax.objectives.base import (Aux, BatchSpec, Context, Method, Rollout,
                                           VelocityPoints, check_field, pixel_mean)



_REFERENCES = {"ref": lambda ctx: ctx.ref_params, "old": lambda ctx: ctx.old_params}


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Hyper-parameters of online flow DPO (static).

    Attributes:
      beta: β > 0, the inverse temperature of the preference model (Flow-GRPO's SD3 DPO config:
        100; it multiplies per-pixel MEAN errors).
      reference: "ref" (frozen reference) or "old" (periodically refreshed policy copy).
      ties: "drop" (tied groups give an invalid pair of weight 0) or "pair" (the reference
        tracker's rule: member 1 beats member 0); see ``advantages.dpo_pairs``.
    """

    beta: float = 100.0
    reference: Literal["ref", "old"] = "ref"
    ties: Literal["drop", "pair"] = "drop"

    def __post_init__(self):
        check_field(self.beta > 0, "beta", "> 0", self.beta)
        check_field(self.reference in _REFERENCES, "reference", f"one of {sorted(_REFERENCES)}",
               self.reference)
        check_field(self.ties in advantages_lib.DPO_TIE_RULES, "ties",
                    f"one of {list(advantages_lib.DPO_TIE_RULES)}", self.ties)


def _terms(cfg: DPOConfig, params, batch: dict, ctx: Context) -> tuple[dict, VelocityPoints]:
    """Per-pair terms (see :func:`make_per_sample`) and the velocity points (2B rows)."""
    reference_params = _REFERENCES[cfg.reference]
    x0 = jnp.concatenate([batch["x0_w"], batch["x0_l"]], axis=0)
    noise = jnp.concatenate([batch["noise"], batch["noise"]], axis=0)
    sigma = jnp.concatenate([batch["sigma"], batch["sigma"]], axis=0)
    cond = sampling.tree_concat(batch["cond"], batch["cond"])
    x = flow.interpolate(x0, noise, sigma)
    target = flow.velocity_target(x0, noise)
    v = ctx.velocity(params, x, sigma, cond)
    v_base = jax.lax.stop_gradient(ctx.velocity(reference_params(ctx), x, sigma, cond))
    b = batch["sigma"].shape[0]
    err = pixel_mean(jnp.square(v - target))
    err_base = pixel_mean(jnp.square(v_base - target))
    inside = -0.5 * cfg.beta * ((err[:b] - err_base[:b]) - (err[b:] - err_base[b:]))
    valid = jnp.asarray(batch["valid"], jnp.float32)
    terms = {"policy_error_w": err[:b], "policy_error_l": err[b:],
             "ref_error_w": err_base[:b], "ref_error_l": err_base[b:], "inside": inside,
             "valid": valid, "loss": valid * -jax.nn.log_sigmoid(inside)}
    v_ref = v_base if cfg.reference == "ref" else None
    return terms, VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)


def make_per_sample(cfg: DPOConfig):
    """Returns ``per_sample(params, batch, ctx) -> dict`` of (B,) per-pair arrays.

    Keys: ``policy_error_w`` / ``policy_error_l`` (e_θ of winner and loser), ``ref_error_w`` /
    ``ref_error_l`` (e of the reference of the log-ratio, ``reference``), ``inside`` (the
    implicit reward margin), ``valid`` and ``loss`` (``valid·(-log σ(inside))``; the objective's
    loss is its mean). Batch and context: as :func:`make_objective`.
    """
    return lambda params, batch, ctx: _terms(cfg, params, batch, ctx)[0]


def make_objective(cfg: DPOConfig):
    """Returns the online flow DPO objective ``(params, batch, ctx) -> (loss, Aux)``.

    Batch (one row per preference pair; :func:`make_dpo_batch` builds it):
      ``x0_w``, ``x0_l`` (B, H, W, C): winner and loser clean samples of the same prompt;
      ``noise`` (B, H, W, C): ONE standard-normal draw shared by winner and loser;
      ``sigma`` (B,) in (0, 1], shared; ``cond`` (B,) int32 label of the pair;
      ``valid`` (B,) float32 (or bool): 1 for a real preference, 0 for a tied group.

    Context: ``ctx.velocity`` and ``ctx.ref_params`` / ``ctx.old_params`` (see ``reference``).

    Metrics (means over valid pairs): ``dpo/implicit_acc`` (fraction with ``inside > 0``),
    ``dpo/reward_margin`` (mean ``inside``, the implicit reward of the winner minus that of the
    loser), ``dpo/policy_error_w`` / ``dpo/policy_error_l`` and ``dpo/ref_error_w`` /
    ``dpo/ref_error_l`` (mean velocity errors), ``dpo/valid_frac``.

    Points: winners then losers concatenated along the batch axis (2B rows); ``v_ref`` filled
    when ``reference == "ref"``.
    """
    def objective(params, batch: dict, ctx: Context):
        terms, points = _terms(cfg, params, batch, ctx)
        valid, inside = terms["valid"], terms["inside"]
        loss = jnp.mean(terms["loss"])
        sg = jax.lax.stop_gradient
        n_valid = jnp.maximum(jnp.sum(valid), 1.0)

        def valid_mean(a):
            return sg(jnp.sum(valid * a) / n_valid)

        metrics = {
            "dpo/implicit_acc": valid_mean((inside > 0).astype(jnp.float32)),
            "dpo/reward_margin": valid_mean(inside),
            "dpo/policy_error_w": valid_mean(terms["policy_error_w"]),
            "dpo/policy_error_l": valid_mean(terms["policy_error_l"]),
            "dpo/ref_error_w": valid_mean(terms["ref_error_w"]),
            "dpo/ref_error_l": valid_mean(terms["ref_error_l"]),
            "dpo/valid_frac": jnp.mean(valid),
        }
        return loss, Aux(metrics=metrics, points=points)

    return objective


def make_dpo_batch(key, x0, cond, rewards, *, sigma_sampler, ties: str = "drop") -> dict:
    """Pairs the best and worst sample of every group and draws their shared noise and σ.

    Args:
      key: typed PRNG key.
      x0: (G, K, H, W, C) clean rollout samples, K per prompt.
      cond: (G,) int32 label of each group, or a conditioning pytree with leading axis G.
      rewards: (G, K) rewards.
      sigma_sampler: ``(key, G) -> (G,)`` σ sampler (``flow.TIMESTEP_SAMPLERS`` entry with its
        options bound, or ``flow.schedule_sigma_sampler``).

    Returns:
      The batch of :func:`make_objective` with B = G rows.
    """
    winner, loser, valid = advantages_lib.dpo_pairs(rewards, ties=ties)
    groups = jnp.arange(x0.shape[0])
    k_noise, k_sigma = jax.random.split(key)
    x0_w, x0_l = x0[groups, winner], x0[groups, loser]
    return {
        "x0_w": x0_w,
        "x0_l": x0_l,
        "noise": jax.random.normal(k_noise, x0_w.shape, jnp.float32),
        "sigma": sigma_sampler(k_sigma, x0.shape[0]).astype(jnp.float32),
        "cond": cond,
        "valid": valid.astype(jnp.float32),
    }


def training_batch(rollout: Rollout, key: jax.Array, spec: BatchSpec) -> dict:
    """The best and worst sample of every group with shared noise and σ (B = G rows); tied
    groups follow ``spec.objective.ties`` (:class:`DPOConfig`)."""
    cfg = spec.objective if spec.objective is not None else DPOConfig()
    k = spec.group_size
    x0 = rollout.images.reshape((-1, k) + rollout.images.shape[1:])
    first = jax.tree.map(lambda a: a[::k], rollout.labels)   # one conditioning per group
    return make_dpo_batch(key, x0, first, rollout.rewards.reshape(-1, k),
                          sigma_sampler=spec.sigma_sampler, ties=cfg.ties)


METHOD = Method(name="dpo", config_cls=DPOConfig, make_objective=make_objective,
                training_batch=training_batch, rows=lambda spec: spec.prompts,
                make_per_sample=make_per_sample, rollout_policy="current")

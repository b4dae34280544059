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

Invalid pairs (all rewards of the group tied) have ``valid = 0`` and contribute nothing; the
batch mean still divides by the number of rows, so the loss is a per-example mean and shards
exactly (Flow-GRPO instead trains such groups on an arbitrary pair).
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
    """

    beta: float = 100.0
    reference: Literal["ref", "old"] = "ref"

    def __post_init__(self):
        check_field(self.beta > 0, "beta", "> 0", self.beta)
        check_field(self.reference in _REFERENCES, "reference", f"one of {sorted(_REFERENCES)}",
               self.reference)


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
    reference_params = _REFERENCES[cfg.reference]

    def objective(params, batch: dict, ctx: Context):
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
        loss = jnp.mean(valid * -jax.nn.log_sigmoid(inside))

        sg = jax.lax.stop_gradient
        n_valid = jnp.maximum(jnp.sum(valid), 1.0)

        def valid_mean(a):
            return sg(jnp.sum(valid * a) / n_valid)

        metrics = {
            "dpo/implicit_acc": valid_mean((inside > 0).astype(jnp.float32)),
            "dpo/reward_margin": valid_mean(inside),
            "dpo/policy_error_w": valid_mean(err[:b]),
            "dpo/policy_error_l": valid_mean(err[b:]),
            "dpo/ref_error_w": valid_mean(err_base[:b]),
            "dpo/ref_error_l": valid_mean(err_base[b:]),
            "dpo/valid_frac": jnp.mean(valid),
        }
        v_ref = v_base if cfg.reference == "ref" else None
        points = VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond, v_ref=v_ref)
        return loss, Aux(metrics=metrics, points=points)

    return objective


def make_dpo_batch(key, x0, cond, rewards, *, sigma_sampler) -> dict:
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
    winner, loser, valid = advantages_lib.dpo_pairs(rewards)
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
    """The best and worst sample of every group with shared noise and σ (B = G rows)."""
    k = spec.group_size
    x0 = rollout.images.reshape((-1, k) + rollout.images.shape[1:])
    first = jax.tree.map(lambda a: a[::k], rollout.labels)   # one conditioning per group
    return make_dpo_batch(key, x0, first, rollout.rewards.reshape(-1, k),
                          sigma_sampler=spec.sigma_sampler)


METHOD = Method(name="dpo", config_cls=DPOConfig, make_objective=make_objective,
                training_batch=training_batch, rows=lambda spec: spec.prompts)

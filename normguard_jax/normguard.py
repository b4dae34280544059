"""NormGuard: a one-sided hinge on the policy velocity norm, added to any velocity-local loss.

RL fine-tuning of a flow-matching generator tends to inflate ``‖v_θ‖`` above the frozen
reference ``‖v_ref‖``. NormGuard penalises only the excess:

    penalty_i = max(0, excess_i) ** power
    excess_i  = ‖v_θ,i‖ / ‖sg v_ref,i‖ - 1 - margin      (form="relative", the default)
              = ‖v_θ,i‖ - ‖sg v_ref,i‖ - margin          (form="absolute")
    loss      = base_loss + weight · mean_i(penalty_i)

Norms are L2 over all non-batch axes (H·W·C) of one sample; ``sg`` is stop-gradient, so only
``v_θ`` is pushed. ``v_ref`` is taken at the *same* (x_σ, σ, cond) points as the base loss: the
objective exposes them (:class:`normguard_jax.objectives.base.VelocityPoints`) and, when it
already computed ``v_ref``, the transform reuses it instead of running the reference model again.

Which velocity is guarded (``velocity``): "points" (default of the transform) compares the
velocities the objective evaluated (conditional ones, or guided ones where the objective itself
trains with CFG); "conditional" compares the conditional ``v_θ(x, σ, c)`` with
``v_ref(x, σ, c)``; "guided" compares the classifier-free guided
velocities ``v_u + w·(v_c - v_u)`` of θ and of the reference (``guidance_scale`` w, the null
conditioning from ``null_class`` or ``ctx.null_condition``): what a sampler with CFG w actually
integrates, and what ρ is measured on when rollouts use CFG. The RL loop picks the one its
rollouts sample with (``config.normguard.velocity = "auto"``). Objectives whose points are
already guided (``points.guided``, Flow-GRPO trained with CFG) are used as they are for
"guided"; for "conditional" the transform then evaluates the conditional velocities itself.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from normguard_jax import sampling
from normguard_jax.objectives.base import Aux, Context, Objective, VelocityPoints


@dataclasses.dataclass(frozen=True)
class NormGuardConfig:
    """Hyper-parameters of the penalty (static: part of the compiled program).

    Attributes:
      weight: λ ≥ 0. With ``weight == 0`` the loss and its gradient are exactly the base
        objective's; the diagnostics are still computed and logged.
      form: "relative" (ratio of norms, scale-free) or "absolute" (difference of norms).
      power: 1 (hinge) or 2 (squared hinge; smooth at the kink).
      margin: slack ≥ 0 before the hinge activates (in ratio units for "relative", in norm
        units for "absolute").
      eps: floor on ``‖v_ref‖`` in the relative form, to avoid dividing by zero.
      velocity: "points", "conditional" or "guided": which velocity of θ and of the reference
        the hinge (and the logged ratio) compares (see the module docstring).
      guidance_scale: w of the "guided" velocity (1 makes it the conditional one).
      null_class: the null label of the "guided" velocity for class-label conditioning
        (``ctx.null_condition``, when given, is used instead, e.g. for a pytree conditioning).
    """

    weight: float = 0.0
    form: Literal["relative", "absolute"] = "relative"
    power: int = 1
    margin: float = 0.0
    eps: float = 1e-6
    velocity: Literal["points", "conditional", "guided"] = "points"
    guidance_scale: float = 1.0
    null_class: int = -1

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"normguard.weight must be >= 0, got {self.weight!r}")
        if self.form not in _EXCESS:
            raise ValueError(f"normguard.form must be one of {sorted(_EXCESS)}, got {self.form!r}")
        if self.power not in (1, 2):
            raise ValueError(f"normguard.power must be 1 or 2, got {self.power!r}")
        if not self.margin >= 0:
            raise ValueError(f"normguard.margin must be >= 0, got {self.margin!r}")
        if not self.eps > 0:
            raise ValueError(f"normguard.eps must be > 0, got {self.eps!r}")
        if self.velocity not in VELOCITIES:
            raise ValueError(f"normguard.velocity must be one of {list(VELOCITIES)}, got "
                             f"{self.velocity!r}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"normguard.guidance_scale must be >= 0, got {self.guidance_scale!r}")

    @property
    def guided(self) -> bool:
        """Whether the hinge compares guided velocities (w ≠ 1)."""
        return self.velocity == "guided" and self.guidance_scale != 1.0


VELOCITIES = ("points", "conditional", "guided")


def _null(ctx: Context, config: NormGuardConfig):
    return ctx.null_condition if ctx.null_condition is not None else config.null_class


def guarded_velocities(params, points: VelocityPoints, ctx: Context, config: NormGuardConfig):
    """``(v_θ, v_ref)`` the hinge compares, at the objective's points (v_ref: stop-gradient).

    Reuses ``points.v_theta`` (and ``points.v_ref`` when filled) where they are already the
    velocity asked for; otherwise evaluates the missing passes: for "guided" on conditional
    points, θ's unconditional velocity (differentiable) and the reference's guided velocity;
    for "conditional" on guided points, both conditional velocities.
    """
    sg = jax.lax.stop_gradient
    x, sigma, cond = points.x, points.sigma, points.cond
    if config.guided and not points.guided:
        v_u = ctx.velocity(params, x, sigma, sampling.null_condition(cond, _null(ctx, config)))
        v_theta = v_u + config.guidance_scale * (points.v_theta - v_u)
        v_ref = sg(sampling.guided_velocity(ctx.velocity, ctx.ref_params, x, sigma, cond,
                                            guidance_scale=config.guidance_scale,
                                            null_class=_null(ctx, config)))
        return v_theta, v_ref
    if points.guided and config.velocity == "conditional":
        return (ctx.velocity(params, x, sigma, cond),
                sg(ctx.velocity(ctx.ref_params, x, sigma, cond)))
    v_ref = points.v_ref
    if v_ref is None:
        v_ref = ctx.velocity(ctx.ref_params, x, sigma, cond)
    return points.v_theta, v_ref


def per_sample_norm(v: jax.Array) -> jax.Array:
    """L2 norm over all non-batch axes: (B, ...) -> (B,).

    Differentiable everywhere: at ``v = 0`` the gradient is 0 rather than NaN (so an inactive
    hinge on an all-zero velocity cannot poison the gradient with 0·NaN).
    """
    sq = jnp.sum(jnp.square(v.astype(jnp.float32)), axis=tuple(range(1, v.ndim)))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _relative_excess(n_theta, n_ref, margin, eps):
    return n_theta / jnp.maximum(n_ref, eps) - 1.0 - margin


def _absolute_excess(n_theta, n_ref, margin, eps):
    del eps
    return n_theta - n_ref - margin


_EXCESS = {"relative": _relative_excess, "absolute": _absolute_excess}


def hinge_penalty(v_theta: jax.Array, v_ref: jax.Array, config: NormGuardConfig):
    """Per-sample NormGuard penalty.

    Args:
      v_theta: (B, H, W, C) policy velocity (gradients flow through it).
      v_ref: (B, H, W, C) reference velocity at the same points (stop-gradient is applied here).
      config: the :class:`NormGuardConfig` (``weight`` is not used here).

    Returns:
      ``(penalty, ratio, active)``, each (B,): the un-weighted penalty ``max(0, excess)**power``,
      the norm ratio ``‖v_θ‖/‖v_ref‖`` (for logging, whatever the form) and a boolean mask of
      samples whose hinge is active (``excess > 0``).
    """
    n_theta = per_sample_norm(v_theta)
    n_ref = per_sample_norm(jax.lax.stop_gradient(v_ref))
    excess = _EXCESS[config.form](n_theta, n_ref, config.margin, config.eps)
    # where, not maximum: at excess == 0 the gradient must be 0 (maximum would split it 50/50).
    penalty = jnp.where(excess > 0, excess, 0.0) ** config.power
    ratio = jax.lax.stop_gradient(n_theta / jnp.maximum(n_ref, config.eps))
    return penalty, ratio, excess > 0


def with_normguard(objective: Objective, config: NormGuardConfig) -> Objective:
    """Wraps a velocity-local objective so that it adds ``weight · mean(penalty)``.

    The wrapped objective has the same signature ``(params, batch, ctx) -> (loss, aux)``. It
    reads ``aux.points`` of the base objective; where ``points.v_ref`` is None it evaluates the
    reference once, ``ctx.velocity(ctx.ref_params, x, σ, cond)``, under stop-gradient. With
    ``config.velocity = "guided"`` the compared velocities are the guided ones
    (:func:`guarded_velocities`).

    Metrics added to ``aux.metrics`` (batch means over all velocity points):
      ``normguard/ratio`` (mean ‖v_θ‖/‖v_ref‖), ``normguard/active_frac``,
      ``normguard/penalty`` (un-weighted), ``loss/base`` (the base objective's loss) and
      ``loss/total``.

    Args:
      objective: any objective following :mod:`normguard_jax.objectives.base`.
      config: a :class:`NormGuardConfig`; ``weight == 0`` leaves loss and gradient exactly
        unchanged (the penalty is not added at all, only logged).

    Returns:
      The wrapped objective.
    """

    def guarded(params, batch, ctx: Context):
        base_loss, aux = objective(params, batch, ctx)
        points = aux.points
        if points is None:
            raise ValueError(
                "NormGuard needs a velocity-local objective: the base objective returned "
                "aux.points=None, so there is no v_θ to compare with the reference."
            )
        v_theta, v_ref = guarded_velocities(params, points, ctx, config)
        penalty, ratio, active = hinge_penalty(v_theta, v_ref, config)
        mean_penalty = jnp.mean(penalty)
        loss = base_loss if config.weight == 0 else base_loss + config.weight * mean_penalty
        metrics = dict(aux.metrics)
        metrics.update({
            "normguard/ratio": jnp.mean(ratio),
            "normguard/active_frac": jnp.mean(active.astype(jnp.float32)),
            "normguard/penalty": jax.lax.stop_gradient(mean_penalty),
            "loss/base": jax.lax.stop_gradient(base_loss),
            "loss/total": jax.lax.stop_gradient(loss),
        })
        if v_theta is points.v_theta:
            points = points._replace(v_ref=v_ref)
        return loss, Aux(metrics=metrics, points=points)

    return guarded

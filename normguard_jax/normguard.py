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

Guard variants (each one field of :class:`NormGuardConfig`; the defaults give the formula above
exactly, bit for bit):

- ``aggregate``: over which velocity points one hinge is taken. "sample" (default): one hinge per
  sample, as above. "batch": one hinge on the batch-level ratio of mean norms,
  ``mean_i ‖v_θ,i‖ / mean_i ‖sg v_ref,i‖ - 1 - margin`` (absolute form: the difference of the
  means). "sigma_bins": the points are split into ``sigma_bins`` equal-width σ bins over [0, 1]
  (σ = 1 falls in the last one), one hinge per non-empty bin on that bin's ratio of mean norms,
  and the penalty is the mean over non-empty bins (empty bins contribute nothing). A group
  hinge lets individual samples exceed ``‖v_ref‖`` as long as the group's mean norm does not,
  so it does not push every sample below the reference the way the per-sample hinge does.
  The batch is the one the objective sees: under ``jit`` with sharding, the global minibatch;
  under ``shard_map``/``pmap``, each device's shard.
- ``sigma_ramp`` (with ``ramp_low``): each hinge is multiplied by a weight ``w(σ)`` that is 1 at
  σ = 1 and ``ramp_low`` at σ = 0, so the low-σ (near-data) points are guarded less: "none"
  (w = 1), "linear" (``w = ramp_low + (1 - ramp_low)·σ``) or "cosine"
  (``w = ramp_low + (1 - ramp_low)·sin²(πσ/2)``, flat at both ends).
- ``sigma_margin``: extra slack that grows towards low σ, ``margin(σ) = margin +
  sigma_margin·(1 - σ)``.
  For a group hinge ("batch", "sigma_bins") ``w`` and ``margin`` are taken at the group's mean σ.
- ``velocity = "guided"``: the guard on the classifier-free guided velocity (above).

With ``log_grad_norms`` the RL update also logs the gradient norms of the base loss and of the
penalty separately (:func:`grad_norm_metrics`), from which :func:`lambda_for_fraction` sets λ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal

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
      aggregate: "sample" (one hinge per sample), "batch" (one hinge on the batch's ratio of
        mean norms) or "sigma_bins" (one hinge per non-empty σ bin, averaged over them); see
        the module docstring.
      sigma_bins: number of equal-width σ bins over [0, 1] of ``aggregate="sigma_bins"`` (≥ 1;
        static, so the binning compiles to segment sums of fixed size).
      sigma_ramp: "none", "linear" or "cosine": the σ-dependent weight of each hinge, 1 at σ = 1
        and ``ramp_low`` at σ = 0.
      ramp_low: the ramp's weight at σ = 0, in [0, 1] (unused with ``sigma_ramp="none"``).
      sigma_margin: extra margin ≥ 0 at σ = 0, decreasing linearly to 0 at σ = 1
        (``margin(σ) = margin + sigma_margin·(1 - σ)``).
      log_grad_norms: whether the RL update logs the gradient norms of the base loss and of the
        penalty separately (extra backward passes; :func:`grad_norm_metrics`). It does not
        change the loss or the update.
    """

    weight: float = 0.0
    form: Literal["relative", "absolute"] = "relative"
    power: int = 1
    margin: float = 0.0
    eps: float = 1e-6
    velocity: Literal["points", "conditional", "guided"] = "points"
    guidance_scale: float = 1.0
    null_class: int = -1
    aggregate: Literal["sample", "batch", "sigma_bins"] = "sample"
    sigma_bins: int = 4
    sigma_ramp: Literal["none", "linear", "cosine"] = "none"
    ramp_low: float = 0.0
    sigma_margin: float = 0.0
    log_grad_norms: bool = False

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
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"normguard.aggregate must be one of {list(AGGREGATES)}, got "
                             f"{self.aggregate!r}")
        if isinstance(self.sigma_bins, bool) or not isinstance(self.sigma_bins, int) or (
                self.sigma_bins < 1):
            raise ValueError(f"normguard.sigma_bins must be an integer >= 1, got "
                             f"{self.sigma_bins!r}")
        if self.sigma_ramp not in RAMPS:
            raise ValueError(f"normguard.sigma_ramp must be one of {list(RAMPS)}, got "
                             f"{self.sigma_ramp!r}")
        if not (_real(self.ramp_low) and 0 <= self.ramp_low <= 1):
            raise ValueError(f"normguard.ramp_low must be in [0, 1], got {self.ramp_low!r}")
        if not (_real(self.sigma_margin) and math.isfinite(self.sigma_margin)
                and self.sigma_margin >= 0):
            raise ValueError(f"normguard.sigma_margin must be a finite number >= 0, got "
                             f"{self.sigma_margin!r}")
        if not isinstance(self.log_grad_norms, bool):
            raise ValueError(f"normguard.log_grad_norms must be True or False, got "
                             f"{self.log_grad_norms!r}")

    @property
    def guided(self) -> bool:
        """Whether the hinge compares guided velocities (w ≠ 1)."""
        return self.velocity == "guided" and self.guidance_scale != 1.0


VELOCITIES = ("points", "conditional", "guided")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _linear_ramp(sigma, low):
    return low + (1.0 - low) * sigma


def _cosine_ramp(sigma, low):
    return low + (1.0 - low) * jnp.square(jnp.sin(0.5 * jnp.pi * sigma))


# sigma_ramp name -> w(σ, ramp_low) with w(1) = 1 and w(0) = ramp_low; "none": no weight at all.
RAMPS: dict[str, Callable | None] = {"none": None, "linear": _linear_ramp, "cosine": _cosine_ramp}


def ramp_weight(sigma: jax.Array, config: NormGuardConfig) -> jax.Array:
    """The weight of a hinge at noise level σ: (...) -> (...) float32.

    1 everywhere for ``sigma_ramp="none"``; otherwise ``w(σ)`` with ``w(1) = 1`` and
    ``w(0) = ramp_low`` (σ = 1 pure noise, σ = 0 data), so low-σ hinges count less.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    ramp = RAMPS[config.sigma_ramp]
    return jnp.ones_like(sigma) if ramp is None else ramp(sigma, config.ramp_low)


def margin_at(sigma: jax.Array, config: NormGuardConfig):
    """The hinge's margin at noise level σ: ``margin + sigma_margin·(1 - σ)``, (...) -> (...).

    With ``sigma_margin == 0`` this is the Python float ``config.margin`` itself (the formula
    of the default config is then exactly the σ-independent one).
    """
    if config.sigma_margin == 0:
        return config.margin
    return config.margin + config.sigma_margin * (1.0 - jnp.asarray(sigma, jnp.float32))


def sigma_bin(sigma: jax.Array, num_bins: int) -> jax.Array:
    """Index of the equal-width σ bin over [0, 1]: (B,) float -> (B,) int32 in [0, num_bins).

    Bin k holds ``k/n ≤ σ < (k+1)/n``; σ = 1 (and anything above) falls in the last bin, σ < 0
    in the first.
    """
    k = jnp.floor(jnp.asarray(sigma, jnp.float32) * num_bins).astype(jnp.int32)
    return jnp.clip(k, 0, num_bins - 1)


def hinge_penalty(v_theta: jax.Array, v_ref: jax.Array, config: NormGuardConfig,
                  sigma: jax.Array | None = None):
    """Per-sample NormGuard penalty.

    Args:
      v_theta: (B, H, W, C) policy velocity (gradients flow through it).
      v_ref: (B, H, W, C) reference velocity at the same points (stop-gradient is applied here).
      config: the :class:`NormGuardConfig` (``weight``, ``aggregate`` and ``sigma_ramp`` are not
        used here).
      sigma: (B,) noise levels of the points; needed only when ``config.sigma_margin > 0``
        (the per-sample margin ``margin_at(σ)``).

    Returns:
      ``(penalty, ratio, active)``, each (B,): the un-weighted penalty ``max(0, excess)**power``,
      the norm ratio ``‖v_θ‖/‖v_ref‖`` (for logging, whatever the form) and a boolean mask of
      samples whose hinge is active (``excess > 0``).
    """
    if config.sigma_margin != 0 and sigma is None:
        raise ValueError("normguard.sigma_margin > 0 needs the points' σ: pass sigma=")
    n_theta = per_sample_norm(v_theta)
    n_ref = per_sample_norm(jax.lax.stop_gradient(v_ref))
    excess = _EXCESS[config.form](n_theta, n_ref, margin_at(sigma, config), config.eps)
    # where, not maximum: at excess == 0 the gradient must be 0 (maximum would split it 50/50).
    penalty = jnp.where(excess > 0, excess, 0.0) ** config.power
    ratio = jax.lax.stop_gradient(n_theta / jnp.maximum(n_ref, config.eps))
    return penalty, ratio, excess > 0


def group_hinge(n_theta: jax.Array, n_ref: jax.Array, sigma: jax.Array, group: jax.Array,
                num_groups: int, config: NormGuardConfig):
    """One hinge per group of points, on the group's mean norms.

    For each non-empty group g: ``excess_g`` is the configured form of
    ``(mean_{i∈g} n_θ,i, mean_{i∈g} n_ref,i)`` with margin ``margin_at(σ̄_g)``, and its hinge is
    ``ramp_weight(σ̄_g) · max(0, excess_g)**power``, σ̄_g the group's mean σ. Jit-safe: segment
    sums with a static ``num_groups``; an empty group has no hinge and is not counted.

    Args:
      n_theta: (B,) policy norms ‖v_θ,i‖ (gradients flow through them).
      n_ref: (B,) reference norms ‖v_ref,i‖ (treated as constants by the caller).
      sigma: (B,) noise levels of the points.
      group: (B,) int32 group index in ``[0, num_groups)``.
      num_groups: the number of groups (static).
      config: the :class:`NormGuardConfig`.

    Returns:
      ``(penalty, active)``: the scalar mean of the hinges over non-empty groups, and a (B,)
      bool mask of the points whose group hinge is active.
    """
    segment_sum = functools.partial(jax.ops.segment_sum, segment_ids=group,
                                    num_segments=num_groups)
    count = segment_sum(jnp.ones_like(n_theta))
    per = jnp.maximum(count, 1.0)
    mean_theta, mean_ref = segment_sum(n_theta) / per, segment_sum(n_ref) / per
    mean_sigma = segment_sum(jnp.asarray(sigma, jnp.float32)) / per
    excess = _EXCESS[config.form](mean_theta, mean_ref, margin_at(mean_sigma, config),
                                  config.eps)
    nonempty = count > 0
    on = nonempty & (excess > 0)
    hinge = jnp.where(on, excess, 0.0) ** config.power * ramp_weight(mean_sigma, config)
    penalty = jnp.sum(hinge) / jnp.maximum(jnp.sum(nonempty.astype(jnp.float32)), 1.0)
    return penalty, on[group]


def _one_group(sigma, config):
    del config
    return jnp.zeros(sigma.shape, jnp.int32), 1


def _sigma_bin_groups(sigma, config):
    return sigma_bin(sigma, config.sigma_bins), config.sigma_bins


# aggregate name -> (σ, config) -> (group index (B,), number of groups); "sample": per-sample.
AGGREGATES: dict[str, Callable | None] = {"sample": None, "batch": _one_group,
                                          "sigma_bins": _sigma_bin_groups}


def guard_penalty(v_theta: jax.Array, v_ref: jax.Array, sigma: jax.Array,
                  config: NormGuardConfig):
    """The un-weighted penalty of the configured variant (what ``weight`` λ multiplies).

    Args:
      v_theta: (B, H, W, C) policy velocity (gradients flow through it).
      v_ref: (B, H, W, C) reference velocity at the same points (stop-gradient is applied here).
      sigma: (B,) noise levels of the points, in [0, 1].
      config: the :class:`NormGuardConfig`.

    Returns:
      ``(penalty, ratio, active)``: the scalar penalty — ``mean_i w(σ_i)·penalty_i`` for
      ``aggregate="sample"`` (exactly ``mean_i penalty_i`` of :func:`hinge_penalty` without a
      ramp), the mean of the group hinges of :func:`group_hinge` otherwise —, the (B,)
      per-sample ratio ``‖v_θ‖/‖v_ref‖`` (stop-gradient, for logging) and the (B,) mask of the
      points under an active hinge.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma), v_theta.shape[:1])
    grouping = AGGREGATES[config.aggregate]
    if grouping is None:
        penalty, ratio, active = hinge_penalty(v_theta, v_ref, config, sigma=sigma)
        if RAMPS[config.sigma_ramp] is not None:
            penalty = penalty * ramp_weight(sigma, config)
        return jnp.mean(penalty), ratio, active
    n_theta = per_sample_norm(v_theta)
    n_ref = per_sample_norm(jax.lax.stop_gradient(v_ref))
    group, num_groups = grouping(sigma, config)
    penalty, active = group_hinge(n_theta, n_ref, sigma, group, num_groups, config)
    ratio = jax.lax.stop_gradient(n_theta / jnp.maximum(n_ref, config.eps))
    return penalty, ratio, active


def guard_terms(objective: Objective, config: NormGuardConfig):
    """The two terms of the guarded loss, kept apart: ``(params, batch, ctx) -> ((base_loss,
    penalty), aux)``.

    ``penalty`` is the un-weighted scalar of :func:`guard_penalty` (differentiable), so
    ``base_loss + weight·penalty`` is the loss of :func:`with_normguard`, and the two gradients
    can be taken separately (:func:`grad_norm_metrics`). ``aux.metrics`` holds the base
    objective's metrics and ``normguard/ratio``, ``normguard/active_frac``, ``normguard/penalty``
    and ``loss/base``; ``aux.points`` gains the ``v_ref`` the hinge used (when it compared the
    objective's own velocities).
    """

    def terms(params, batch, ctx: Context):
        base_loss, aux = objective(params, batch, ctx)
        points = aux.points
        if points is None:
            raise ValueError(
                "NormGuard needs a velocity-local objective: the base objective returned "
                "aux.points=None, so there is no v_θ to compare with the reference."
            )
        v_theta, v_ref = guarded_velocities(params, points, ctx, config)
        penalty, ratio, active = guard_penalty(v_theta, v_ref, points.sigma, config)
        metrics = dict(aux.metrics)
        metrics.update({
            "normguard/ratio": jnp.mean(ratio),
            "normguard/active_frac": jnp.mean(active.astype(jnp.float32)),
            "normguard/penalty": jax.lax.stop_gradient(penalty),
            "loss/base": jax.lax.stop_gradient(base_loss),
        })
        if v_theta is points.v_theta:
            points = points._replace(v_ref=v_ref)
        return (base_loss, penalty), Aux(metrics=metrics, points=points)

    return terms


def with_normguard(objective: Objective, config: NormGuardConfig) -> Objective:
    """Wraps a velocity-local objective so that it adds ``weight · penalty``.

    The wrapped objective has the same signature ``(params, batch, ctx) -> (loss, aux)``. It
    reads ``aux.points`` of the base objective; where ``points.v_ref`` is None it evaluates the
    reference once, ``ctx.velocity(ctx.ref_params, x, σ, cond)``, under stop-gradient. With
    ``config.velocity = "guided"`` the compared velocities are the guided ones
    (:func:`guarded_velocities`). ``penalty`` is the configured variant's
    (:func:`guard_penalty`; by default ``mean_i max(0, excess_i)**power``).

    Metrics added to ``aux.metrics`` (batch means over all velocity points):
      ``normguard/ratio`` (mean per-sample ‖v_θ‖/‖v_ref‖), ``normguard/active_frac`` (fraction
      of points under an active hinge), ``normguard/penalty`` (un-weighted), ``loss/base`` (the
      base objective's loss) and ``loss/total``.

    Args:
      objective: any objective following :mod:`normguard_jax.objectives.base`.
      config: a :class:`NormGuardConfig`; ``weight == 0`` leaves loss and gradient exactly
        unchanged (the penalty is not added at all, only logged).

    Returns:
      The wrapped objective.
    """
    terms = guard_terms(objective, config)

    def guarded(params, batch, ctx: Context):
        (base_loss, penalty), aux = terms(params, batch, ctx)
        loss = base_loss if config.weight == 0 else base_loss + config.weight * penalty
        metrics = dict(aux.metrics, **{"loss/total": jax.lax.stop_gradient(loss)})
        return loss, aux._replace(metrics=metrics)

    return guarded


def grad_norm_metrics(terms: Callable, params, config: NormGuardConfig) -> dict:
    """Gradient norms of the base loss and of the weighted penalty, taken separately.

    One forward pass of ``terms`` and two backward passes (a VJP with cotangents (1, 0) and
    (0, 1)) at the same params (and the batch and context ``terms`` closes over).

    Args:
      terms: ``params -> ((base_loss, penalty), aux)``: :func:`guard_terms` of the objective
        with the batch and context bound.
      params: the pytree differentiated (θ, or a LoRA adapter).
      config: the :class:`NormGuardConfig` (its ``weight`` λ scales the penalty's gradient).

    Returns:
      float32 scalars, global L2 norms over the whole pytree: ``normguard/grad_norm_base``
      ‖∇ base_loss‖, ``normguard/grad_norm_penalty`` ‖∇ λ·penalty‖ = λ·‖∇ penalty‖,
      ``normguard/grad_norm_penalty_unweighted`` ‖∇ penalty‖ (measured whatever λ, also with
      λ = 0: what :func:`lambda_for_fraction` needs) and ``normguard/grad_norm_ratio``
      ``grad_norm_penalty / grad_norm_base`` (0 when the base gradient is 0).
    """
    (base_loss, penalty), vjp, _ = jax.vjp(terms, params, has_aux=True)
    (g_base,) = vjp((jnp.ones_like(base_loss), jnp.zeros_like(penalty)))
    (g_pen,) = vjp((jnp.zeros_like(base_loss), jnp.ones_like(penalty)))
    norm_base, norm_pen = _global_norm(g_base), _global_norm(g_pen)
    weighted = config.weight * norm_pen
    safe_base = jnp.where(norm_base > 0, norm_base, 1.0)
    return {"normguard/grad_norm_base": norm_base,
            "normguard/grad_norm_penalty": weighted,
            "normguard/grad_norm_penalty_unweighted": norm_pen,
            "normguard/grad_norm_ratio": jnp.where(norm_base > 0, weighted / safe_base, 0.0)}


def _global_norm(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves, jnp.float32(0.0)))


def lambda_for_fraction(fraction: float, grad_norm_base: float,
                        grad_norm_penalty_unweighted: float) -> float:
    """The λ at which the penalty's gradient is ``fraction`` of the base loss's.

    ``λ = fraction · ‖∇ base_loss‖ / ‖∇ penalty‖``, from the norms logged with
    ``normguard.log_grad_norms`` (``normguard/grad_norm_base`` and
    ``normguard/grad_norm_penalty_unweighted``, which is measured whatever λ, also with λ = 0).
    Use norms from updates where the hinge is active (``normguard/active_frac > 0``; averaged
    over such iterations): an inactive hinge has no gradient, and with the per-sample hinge the
    penalty's gradient grows with the active fraction, so λ is calibrated for the activity
    seen when the norms were measured.

    Args:
      fraction: the wanted ratio ‖∇ λ·penalty‖ / ‖∇ base_loss‖, > 0.
      grad_norm_base: ‖∇ base_loss‖ (> 0).
      grad_norm_penalty_unweighted: ‖∇ penalty‖ (> 0).

    Returns:
      λ as a Python float.

    Raises:
      ValueError: when an argument is not a finite positive number (e.g. a penalty gradient of
        0, measured where the hinge was never active).
    """
    for name, value in (("fraction", fraction), ("grad_norm_base", grad_norm_base),
                        ("grad_norm_penalty_unweighted", grad_norm_penalty_unweighted)):
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"lambda_for_fraction: {name} must be a finite number > 0, got "
                             f"{value!r}" + (" (the hinge was never active where it was "
                                             "measured)" if name.startswith("grad_norm_pen")
                                             else ""))
    return float(fraction) * float(grad_norm_base) / float(grad_norm_penalty_unweighted)

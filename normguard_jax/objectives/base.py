"""The contract every training objective follows.

An objective is a pure function

    objective(params, batch, ctx) -> (loss, aux)

- ``params``: the trainable generator parameters (a pytree).
- ``batch``: a dict of arrays whose leading axis is the (per-device or global) batch.
- ``ctx``: a :class:`Context` holding everything else the loss may read — the pure velocity
  function, frozen reference parameters, old/EMA parameters and a PRNG key.
- ``loss``: a float32 scalar, already averaged over the batch (objectives are per-example
  functions followed by a batch mean, so they run unchanged under ``jit`` with sharding,
  ``shard_map`` or ``pmap``).
- ``aux``: an :class:`Aux` with scalar ``metrics`` and the :class:`VelocityPoints` at which the
  loss evaluated the policy velocity. Exposing the points is what lets
  :func:`normguard_jax.normguard.with_normguard` add its penalty to *any* velocity-local
  objective without editing it, and reuse ``v_ref`` where the objective already computed it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from normguard_jax import flow, sampling

Params = Any
VelocityFn = Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]


class VelocityPoints(NamedTuple):
    """Where an objective evaluated the policy velocity.

    Attributes:
      v_theta: (B, H, W, C) policy velocity ``v_θ(x, σ, cond)``, differentiable w.r.t. params.
      x: (B, H, W, C) the states ``x_σ`` the velocity was evaluated at.
      sigma: (B,) noise levels in [0, 1] (σ = 1 is pure noise).
      cond: the conditioning: (B,) int32 class labels (``num_classes`` is the null class), or
        a pytree of arrays with leading axis B (text models: ``{"text", "pooled"}``).
      v_ref: optional (B, H, W, C) frozen reference velocity at the same points. ``None`` when
        the objective did not need it; the NormGuard transform then computes it once.
      guided: (a Python bool) whether ``v_theta`` / ``v_ref`` are classifier-free GUIDED
        velocities (Flow-GRPO trained with CFG) rather than the conditional ones.
    """

    v_theta: jax.Array
    x: jax.Array
    sigma: jax.Array
    cond: jax.Array
    v_ref: Optional[jax.Array] = None
    guided: bool = False


class Aux(NamedTuple):
    """Auxiliary output of an objective.

    Attributes:
      metrics: dict of float32 scalars to log (batch means).
      points: the :class:`VelocityPoints` of the loss, or ``None`` for an objective that is not
        velocity-local (NormGuard then refuses to wrap it).
    """

    metrics: dict
    points: Optional[VelocityPoints]


@flax.struct.dataclass
class Context:
    """Read-only inputs of an objective besides the trainable params and the batch.

    Attributes:
      velocity: pure ``velocity(params, x, sigma, cond) -> v`` shared by θ, θ_ref and θ_old
        (a static field: it is part of the compiled program, not traced data).
      ref_params: frozen reference parameters θ_ref (pytree).
      old_params: the old / EMA policy parameters θ_old (pytree), or None.
      key: typed PRNG key for objectives that draw noise or timesteps.
      rollout_params: θ as it was when this iteration's rollout was sampled (before its
        optimiser steps), or None; read only by objectives configured to use it (AWM's
        ``old_params`` / ``ema_params = "rollout"``).
      null_condition: the unconditional conditioning for a pytree ``cond`` (see
        ``sampling.null_condition``), or None; NormGuard's guided velocity reads it (class
        labels use ``NormGuardConfig.null_class`` instead).
    """

    velocity: VelocityFn = flax.struct.field(pytree_node=False)
    ref_params: Params = None
    old_params: Params = None
    key: Optional[jax.Array] = None
    rollout_params: Params = None
    null_condition: Any = None


def pixel_mean(a: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def check_field(ok: bool, field: str, requirement: str, value) -> None:
    """Raises ``ValueError("config.objective.<field> must be <requirement>, got <value>")``."""
    if not ok:
        raise ValueError(f"config.objective.{field} must be {requirement}, got {value!r}")


Objective = Callable[[Params, dict, Context], tuple[jax.Array, Aux]]


# ----------------------------------------------------------------------------------------------
# From a rollout to a method's training batch, and the Method record.
# ----------------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """One RL iteration's samples, rewards and advantages.

    ``N = G·K`` samples: G prompts, K samples per prompt, grouped contiguously (sample ``i``
    belongs to group ``i // K``).

    Attributes:
      labels: the conditioning of each sample (group-contiguous): (N,) int32 requested
        classes, or a pytree of arrays with leading axis N (e.g. text embeddings).
      images: (N, H, W, C) final samples (σ = 0).
      rewards: (N,) float32 combined reward.
      advantages: (N,) float32 per-prompt normalised, clipped advantages.
      trajectory: the sampler's :class:`sampling.Trajectory` (time-major), or None when the
        method only needs the final samples.
      ref_params: the frozen reference θ_ref (the base model), filled by ``rl.train_iteration``
        for batch builders that evaluate the base model (Adjoint Matching's lean adjoint);
        None otherwise (optional, defaults to None).
      requests: what the reward was asked to check (``conditioning.PromptTable.request``: the
        request dict of a text table), or None when ``labels`` are class labels and their
        own request (batch builders that call the reward use it: Adjoint Matching).
    """

    labels: jax.Array
    images: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    trajectory: Optional[sampling.Trajectory]
    ref_params: Any = None
    requests: Any = None


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """How one iteration's rollout becomes training rows (static: part of the compiled program).

    Attributes:
      prompts: G, prompts per iteration.
      group_size: K, samples per prompt.
      renoise_draws: D, noise/σ draws per sample for the re-noised batches.
      trained_steps: indices k of the stored stochastic sampler steps (trajectory methods).
      sigma_sampler: ``(key, B) -> (B,)`` σ of re-noised rows, or None where only the row count
        is asked for.
      velocity: the generator's pure ``velocity(params, x, sigma, cond)``, for batch builders
        that evaluate the base model (Adjoint Matching); None where no builder needs it.
      reward_fn: the rollout's reward ``(images, cond) -> ((N,), components)``, for batch
        builders that differentiate it (Adjoint Matching); None where no builder needs it.
      objective: the method's frozen config dataclass (``Method.config_cls`` instance) for the
        methods whose batch layout depends on it (DPO's tie rule, AWM's ``loss_type``), or None
        for that class's defaults.
    """

    prompts: int
    group_size: int
    renoise_draws: int = 1
    trained_steps: tuple[int, ...] = ()
    sigma_sampler: Optional[Callable[[jax.Array, int], jax.Array]] = None
    velocity: Optional[VelocityFn] = None
    reward_fn: Optional[Callable] = None
    objective: Any = None

    @property
    def samples(self) -> int:
        """N = G·K, the rollout's samples."""
        return self.prompts * self.group_size


def renoised_rollout_batch(rollout: Rollout, key: jax.Array, spec: BatchSpec) -> dict:
    """The final samples re-noised at fresh σ (B = D·N rows): DiffusionNFT, AWM and RAM.

    Each sample appears ``spec.renoise_draws`` = D times (draw-major: row ``d·N + i`` is sample
    i), every copy with its own noise and σ, as the references train each sample at several
    levels. Keys: see :func:`normguard_jax.flow.renoised_batch`.
    """
    tile = lambda a: jnp.tile(a, (spec.renoise_draws,) + (1,) * (a.ndim - 1))
    return flow.renoised_batch(key, tile(rollout.images), jax.tree.map(tile, rollout.labels),
                               tile(rollout.advantages), sigma_sampler=spec.sigma_sampler)


def renoised_rows(spec: BatchSpec) -> int:
    """Rows of :func:`renoised_rollout_batch`: D·G·K."""
    return spec.renoise_draws * spec.samples


def no_extra_checks(config: ml_collections.ConfigDict) -> None:
    """A method without config constraints beyond its config class and the shared RL fields."""
    del config


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything the RL loop needs to know about one method.

    Attributes:
      name: the config name (``config.method``).
      config_cls: frozen dataclass of its hyper-parameters (``config.objective``), validated on
        construction with errors naming ``config.objective.<field>``.
      make_objective: ``config_cls instance -> objective(params, batch, ctx) -> (loss, Aux)``.
      training_batch: ``(rollout, key, spec) -> dict`` of arrays with a common leading axis of
        ``rows(spec)`` rows, which the loop shuffles and cuts into minibatches.
      rows: ``spec -> int``, the rows of ``training_batch``.
      needs_trajectory: whether ``training_batch`` reads ``rollout.trajectory`` (the rollout
        then keeps every state and log-prob).
      validate: ``config -> None``; checks of the whole RL config that only this method needs,
        raising ``config_checks.ConfigError`` naming the field.
      make_per_sample: ``config_cls instance -> per_sample(params, batch, ctx) -> dict`` of the
        objective's per-row terms and intermediates before any batch reduction (arrays with a
        leading axis of the batch's rows); the objective's loss is a reduction of these.
      rollout_policy: which parameters the reference samples the rollouts with by default:
        "current" (θ) or "old" (θ_old, the lagged / EMA policy); ``config.rollout.policy``
        ("default" picks this) overrides it.
    """

    name: str
    config_cls: type
    make_objective: Callable[[Any], Objective]
    training_batch: Callable[[Rollout, jax.Array, BatchSpec], dict]
    rows: Callable[[BatchSpec], int]
    needs_trajectory: bool = False
    validate: Callable[[ml_collections.ConfigDict], None] = no_extra_checks
    make_per_sample: Optional[Callable[[Any], Callable]] = None
    rollout_policy: str = "current"

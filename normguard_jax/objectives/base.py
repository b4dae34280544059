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

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

Params = Any
VelocityFn = Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]


class VelocityPoints(NamedTuple):
    """Where an objective evaluated the policy velocity.

    Attributes:
      v_theta: (B, H, W, C) policy velocity ``v_θ(x, σ, cond)``, differentiable w.r.t. params.
      x: (B, H, W, C) the states ``x_σ`` the velocity was evaluated at.
      sigma: (B,) noise levels in [0, 1] (σ = 1 is pure noise).
      cond: (B,) int32 class labels (``num_classes`` is the null class).
      v_ref: optional (B, H, W, C) frozen reference velocity at the same points. ``None`` when
        the objective did not need it; the NormGuard transform then computes it once.
    """

    v_theta: jax.Array
    x: jax.Array
    sigma: jax.Array
    cond: jax.Array
    v_ref: Optional[jax.Array] = None


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
    """

    velocity: VelocityFn = flax.struct.field(pytree_node=False)
    ref_params: Params = None
    old_params: Params = None
    key: Optional[jax.Array] = None


def pixel_mean(a: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def check_field(ok: bool, field: str, requirement: str, value) -> None:
    """Raises ``ValueError("config.objective.<field> must be <requirement>, got <value>")``."""
    if not ok:
        raise ValueError(f"config.objective.{field} must be {requirement}, got {value!r}")


Objective = Callable[[Params, dict, Context], tuple[jax.Array, Aux]]

"""The state of an RL run and the schedule of its old (sampling / EMA) policy θ_old.

Everything of a run that changes is one :class:`RLState` pytree (one Orbax checkpoint). θ_old
follows θ by an exponential moving average applied once per iteration, after that iteration's
optimiser steps, with a decay that grows with the number of optimiser steps taken
(:func:`old_policy_decay`); the presets are the reference codebases' schedules.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RLState:
    """Everything of an RL run that changes, as one checkpointable pytree.

    Attributes:
      iteration: int32, completed iterations (also the prompt position).
      updates: int32, optimizer steps taken (drives the old-policy EMA schedule).
      params: policy θ.
      old_params: old / EMA policy θ_old.
      opt_state: optax state.
      rng: uint32 key data of the run's base key.
    """

    iteration: jax.Array
    updates: jax.Array
    params: object
    old_params: object
    opt_state: object
    rng: jax.Array

    def key(self) -> jax.Array:
        """The run's typed base key."""
        return jax.random.wrap_key_data(self.rng)


def initial_state(base_params, optimizer, seed: int) -> RLState:
    """The state before iteration 0: θ = θ_old = copies of the base parameters.

    θ, θ_old and θ_ref start equal but must not share buffers: θ is donated to the update.
    """
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return RLState(
        iteration=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
        params=copy(base_params), old_params=copy(base_params),
        opt_state=optimizer.init(base_params),
        rng=jax.random.key_data(jax.random.key(seed)))


# The references' old-policy schedules as (flat, rate, max_decay): DiffusionNFT's
# ``decay_type`` presets and AWM's "linear" KL-EMA schedule (``min(0.3, 0.001·step)``).
OLD_POLICY_DECAY_PRESETS: dict[str, tuple[int, float, float]] = {
    "copy": (0, 0.0, 0.0),        # NFT decay_type 0: θ_old = θ after every epoch
    "nft": (0, 0.001, 0.5),       # NFT decay_type 1 (its default)
    "nft_slow": (75, 0.0075, 0.999),  # NFT decay_type 2 (its OCR config)
    "awm": (0, 0.001, 0.3),       # AWM kl_ema_decay_type "linear", kl_ema_decay 0.3
}


def old_policy_decay(step, *, flat: int = 0, rate: float = 0.001, max_decay: float = 0.5):
    """EMA decay of the old policy: 0 before ``flat`` steps, then ``min((step - flat)·rate, max)``.

    Args:
      step: number of optimiser steps taken so far (int or int array; jit-friendly).
      flat, rate, max_decay: schedule; the defaults are DiffusionNFT's ``decay_type = 1``.

    Returns:
      float32 decay in [0, max_decay].
    """
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum((step - flat) * rate, max_decay)
    return jnp.where(step < flat, 0.0, decay).astype(jnp.float32)


def update_old_params(old_params, new_params, step, *, flat: int = 0, rate: float = 0.001,
                      max_decay: float = 0.5):
    """``θ_old ← decay·θ_old + (1 - decay)·θ`` with ``decay = old_policy_decay(step, ...)``.

    The references apply it once per rollout epoch, after that epoch's optimiser steps.
    Leaves keep their dtypes. Pure: returns the new pytree.
    """
    decay = old_policy_decay(step, flat=flat, rate=rate, max_decay=max_decay)
    return jax.tree.map(
        lambda o, n: (decay * o + (1.0 - decay) * n).astype(o.dtype), old_params, new_params)

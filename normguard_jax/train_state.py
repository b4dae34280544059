"""The state of a pretraining run, as one pytree (what a checkpoint holds)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Pretraining state.

    Attributes:
      step: int32 scalar, the number of completed optimizer steps. The batch, noise and σ of
        step ``s`` are functions of ``(seed, s)`` only, so this is also the data position.
      params: generator parameters θ.
      ema_params: exponential moving average of θ (used for samples and as the RL base).
      opt_state: optax state.
      rng: uint32 key data of the run's base key (``jax.random.key_data``); typed keys are
        derived with :meth:`key` so the checkpoint holds plain integers.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, key: jax.Array):
        """Step 0 state: EMA initialised to θ, a fresh optimizer state, key data from ``key``."""
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   ema_params=jax.tree.map(jnp.copy, params),
                   opt_state=optimizer.init(params), rng=jax.random.key_data(key))

    def key(self) -> jax.Array:
        """The run's typed base key."""
        return jax.random.wrap_key_data(self.rng)

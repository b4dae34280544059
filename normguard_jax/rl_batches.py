"""From a grouped rollout to the training batch of each RL method.

A rollout of one iteration holds ``N = G·K`` samples (G prompts, K samples per prompt, grouped
contiguously: sample ``i`` belongs to group ``i // K``). Each method trains on a different view
of it; ``TRAINING_BATCHES[method](rollout, key, sigma_sampler, trained_steps=...,
group_size=K)`` returns a dict of arrays with
a common leading axis, which the RL loop shuffles and cuts into minibatches.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from normguard_jax import sampling
from normguard_jax.objectives import dpo, nft


class Rollout(NamedTuple):
    """One iteration's samples, rewards and advantages.

    Attributes:
      labels: (N,) int32 requested classes (group-contiguous).
      images: (N, H, W, C) final samples (σ = 0).
      rewards: (N,) float32 combined reward.
      advantages: (N,) float32 per-prompt normalised, clipped advantages.
      trajectory: the sampler's :class:`sampling.Trajectory` (time-major), or None when the
        method only needs the final samples.
    """

    labels: jax.Array
    images: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    trajectory: Optional[sampling.Trajectory]


def grpo_batch(rollout: Rollout, key, sigma_sampler, *, trained_steps, **_) -> dict:
    """Flow-GRPO: every stored stochastic transition becomes a row (B = N·len(trained_steps)).

    ``trained_steps`` are the (static) indices k of the stochastic steps; row layout is
    step-major. See :func:`normguard_jax.objectives.grpo.make_objective` for the keys.
    """
    del key, sigma_sampler
    traj = rollout.trajectory
    ks = jnp.asarray(trained_steps, jnp.int32)
    n = rollout.labels.shape[0]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    sig = traj.sigmas
    return {
        "x": flat(traj.states[ks]),
        "x_next": flat(traj.states[ks + 1]),
        "sigma": jnp.repeat(sig[ks], n),
        "sigma_next": jnp.repeat(sig[ks + 1], n),
        "sigma_max": jnp.full((ks.shape[0] * n,), sig[1], jnp.float32),
        "cond": jnp.tile(rollout.labels, ks.shape[0]),
        "old_log_prob": flat(traj.log_probs[ks]),
        "advantage": jnp.tile(rollout.advantages, ks.shape[0]),
    }


def renoised_batch(rollout: Rollout, key, sigma_sampler, *, renoise_draws: int = 1, **_
                   ) -> dict:
    """DiffusionNFT, AWM and RAM: the final samples, re-noised at fresh σ (B = D·N).

    Each sample appears ``renoise_draws`` = D times (draw-major: row ``d·N + i`` is sample i),
    every copy with its own noise and σ, as the references train each sample at several levels.
    """
    tile = lambda a: jnp.tile(a, (renoise_draws,) + (1,) * (a.ndim - 1))
    return nft.make_renoised_batch(key, tile(rollout.images), tile(rollout.labels),
                                   tile(rollout.advantages), sigma_sampler=sigma_sampler)


def dpo_batch(rollout: Rollout, key, sigma_sampler, *, group_size, **_) -> dict:
    """Online DPO: the best and worst sample of every group, shared noise and σ (B = G)."""
    k = group_size
    x0 = rollout.images.reshape((-1, k) + rollout.images.shape[1:])
    return dpo.make_dpo_batch(key, x0, rollout.labels[::k], rollout.rewards.reshape(-1, k),
                              sigma_sampler=sigma_sampler)


TRAINING_BATCHES = {
    "grpo": grpo_batch,
    "nft": renoised_batch,
    "awm": renoised_batch,
    "ram": renoised_batch,
    "dpo": dpo_batch,
}

# Which methods need the whole trajectory (stored transitions) rather than final samples.
NEEDS_TRAJECTORY = frozenset({"grpo"})

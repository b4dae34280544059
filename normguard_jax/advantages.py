"""Per-prompt (per-class) advantage normalisation and preference pairing.

A rollout draws K samples for each of G prompts (here: class labels). Group-relative advantages
compare each reward with the other samples of the same prompt:

    A_i = clip((r_i - mean_g(i)) / (std + eps), -clip, clip)

with the POPULATION standard deviation (``ddof = 0``) of the group (``std = std_g(i)``) or of the
whole batch (``global_std=True``), ``eps = 1e-4`` added to the std (not under the square root).
This is the statistic of Flow-GRPO's ``PerPromptStatTracker`` (its ``type="grpo"`` branch), as a
pure function of a fixed layout instead of a stateful tracker keyed by prompt strings. Two
deliberate differences:

* The tracker does not clip; Flow-GRPO clips in the training loop (``train.adv_clip_max = 5``).
  Here the clip is part of the function (``clip=None`` disables it), so the RL loop stores
  already-clipped advantages; clipping again in the objectives is then a no-op.
* A group whose rewards all tie gets advantages of exactly 0. The tracker computes
  ``(r - mean)/(0 + 1e-4)``, which is 0 only up to the rounding of the mean (in float32 that
  rounding, divided by 1e-4, can reach 1e-3).

Everything here is pure ``jax.numpy`` and works under ``jit``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _normalise_grouped(rewards: jax.Array, global_std: bool, eps: float, clip) -> jax.Array:
    """(G, K) rewards -> (G, K) advantages; statistics along axis 1."""
    mean = jnp.mean(rewards, axis=1, keepdims=True)
    if global_std:
        std = jnp.std(rewards)  # population std of every reward of the batch
    else:
        std = jnp.std(rewards, axis=1, keepdims=True)
    adv = (rewards - mean) / (std + eps)
    tied = jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)
    adv = jnp.where(tied, 0.0, adv)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv


def _normalise_by_ids(rewards, group_ids, num_groups: int, global_std: bool, eps: float, clip):
    """(N,) rewards with (N,) integer group ids -> (N,) advantages (segment statistics)."""
    ones = jnp.ones_like(rewards)
    count = jax.ops.segment_sum(ones, group_ids, num_segments=num_groups)
    safe_count = jnp.maximum(count, 1.0)
    total = jax.ops.segment_sum(rewards, group_ids, num_segments=num_groups)
    mean = (total / safe_count)[group_ids]
    centred = rewards - mean
    if global_std:
        std = jnp.std(rewards)
    else:
        var = jax.ops.segment_sum(jnp.square(centred), group_ids, num_segments=num_groups)
        std = jnp.sqrt(var / safe_count)[group_ids]
    adv = centred / (std + eps)
    g_max = jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)[group_ids]
    g_min = jax.ops.segment_min(rewards, group_ids, num_segments=num_groups)[group_ids]
    adv = jnp.where(g_max == g_min, 0.0, adv)
    if clip is not None:
        adv = jnp.clip(adv, -clip, clip)
    return adv


def group_advantages(
    rewards: jax.Array,
    group_ids: Optional[jax.Array] = None,
    *,
    num_groups: Optional[int] = None,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
) -> jax.Array:
    """Group-relative advantages ``(r - mean_group) / (std + eps)``, clipped to ``±clip``.

    Two layouts are accepted:

    * ``rewards`` of shape ``(G, K)`` and ``group_ids=None``: row g holds the K rewards of prompt g
      (the layout of a rollout that repeats every prompt K times). Returns ``(G, K)``.
    * ``rewards`` of shape ``(N,)`` and ``group_ids`` of shape ``(N,)``, integers in
      ``[0, num_groups)`` (e.g. class labels), samples of a group anywhere in the batch and
      groups of unequal size. Returns ``(N,)``. ``num_groups`` defaults to N; it must be a static
      Python int larger than every id (ids outside the range would be silently dropped by the
      segment sums, so concrete ids are checked).

    Args:
      rewards: float rewards, layout as above.
      group_ids: optional ``(N,)`` int group index of each reward.
      num_groups: number of segments for the ``(N,)`` layout.
      global_std: divide by the population std of ALL rewards (Flow-GRPO's
        ``sample.global_std``) instead of the group's own std; the mean is always per group.
      eps: added to the std (Flow-GRPO: 1e-4).
      clip: clip advantages to ``[-clip, clip]``; None keeps them unclipped.

    Returns:
      float32 advantages with the layout of ``rewards``. Within a group of size K with untied
      rewards they have zero mean and population std ``std/(std + eps)`` (1 up to eps) before
      clipping; a group whose rewards all tie gets exactly 0; a group of size 1 gets 0.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_ids is None:
        if rewards.ndim != 2:
            raise ValueError(
                f"without group_ids, rewards must have the (num_groups, group_size) layout; "
                f"got shape {rewards.shape}"
            )
        return _normalise_grouped(rewards, global_std, eps, clip)
    if rewards.ndim != 1 or jnp.shape(group_ids) != rewards.shape:
        raise ValueError(
            f"with group_ids, rewards and group_ids must both be (N,); got {rewards.shape} and "
            f"{jnp.shape(group_ids)}"
        )
    num_groups = rewards.shape[0] if num_groups is None else int(num_groups)
    ids = _concrete_or_none(group_ids)
    if ids is not None and ids.size:
        if ids.min() < 0 or ids.max() >= num_groups:
            raise ValueError(f"group_ids must lie in [0, {num_groups}); got range "
                             f"[{ids.min()}, {ids.max()}]")
    group_ids = jnp.asarray(group_ids, jnp.int32)
    return _normalise_by_ids(rewards, group_ids, num_groups, global_std, eps, clip)


def _concrete_or_none(a):
    """NumPy copy of ``a``, or None when ``a`` is traced (values unknown at trace time)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


DPO_TIE_RULES = ("drop", "pair")


def dpo_pairs(rewards: jax.Array, ties: str = "drop") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Best-vs-worst preference pair of every group.

    Args:
      rewards: ``(G, K)`` rewards, row g = the K samples of prompt g.
      ties: what a group whose rewards all tie gives (``DPO_TIE_RULES``):

        * ``"drop"`` (default here): ``valid = False`` and ``winner == loser`` (both the first
          index); the pair carries no preference and the DPO objective gives it weight 0.
        * ``"pair"``: Flow-GRPO's ``PerPromptStatTracker`` (``type="dpo"``) rule: when
          ``argmax == argmin`` it sets ``max_idx, min_idx = 1, 0``, i.e. +1 to member 1 and -1
          to member 0; the pair is trained as a real (arbitrary) preference (``valid = True``).

    Returns:
      ``(winner_idx, loser_idx, valid)``, each ``(G,)``: the within-group indices (in
      ``[0, K)``) of the highest and the lowest reward (first occurrence on ties, like
      ``argmax``/``argmin``), and ``valid = max > min`` (always True with ``ties="pair"``).
      Gather the images with ``x[jnp.arange(G), winner_idx]`` from a ``(G, K, H, W, C)`` array.
    """
    if ties not in DPO_TIE_RULES:
        raise ValueError(f"ties must be one of {DPO_TIE_RULES}, got {ties!r}")
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (num_groups, group_size); got shape {rewards.shape}")
    winner = jnp.argmax(rewards, axis=1).astype(jnp.int32)
    loser = jnp.argmin(rewards, axis=1).astype(jnp.int32)
    valid = jnp.max(rewards, axis=1) > jnp.min(rewards, axis=1)
    if ties == "pair":
        if rewards.shape[1] < 2:
            raise ValueError("ties='pair' needs groups of at least 2 samples")
        tied = winner == loser
        winner = jnp.where(tied, 1, winner).astype(jnp.int32)
        loser = jnp.where(tied, 0, loser).astype(jnp.int32)
        valid = jnp.ones_like(valid)
    return winner, loser, valid

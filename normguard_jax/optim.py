"""The optimizer, built in one place from the config.

``optax.chain(clip_by_global_norm, adamw(schedule))`` with a linear warm-up followed by a cosine
or constant schedule, wrapped in ``optax.MultiSteps`` when gradients are accumulated over
``cfg.accumulate_steps`` micro-steps. The learning-rate schedule is returned too, so that it can
be logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warm-up then ``cfg.schedule`` ("cosine" decays to ``cfg.final_lr_fraction``·lr; "constant").

    Args:
      cfg: the ``optim`` block (fields ``lr``, ``warmup_steps``, ``schedule``, ``final_lr_fraction``).
      total_steps: length of the run, over which the cosine decays.
    """
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    after = {
        "cosine": lambda: optax.cosine_decay_schedule(
            cfg.lr, max(total_steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_fraction),
        "constant": lambda: optax.constant_schedule(cfg.lr),
    }[cfg.schedule]()
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def accumulate_steps(cfg: ml_collections.ConfigDict) -> int:
    """Micro-steps per optimizer update (``cfg.accumulate_steps``; 1 in configs recorded
    before the field existed)."""
    return int(cfg.accumulate_steps) if "accumulate_steps" in cfg else 1


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """Returns ``(optimizer, schedule)`` for the ``optim`` config block.

    The chain is: global-norm clipping at ``cfg.grad_clip`` (skipped when 0), then AdamW with
    ``cfg.b1``, ``cfg.b2``, ``cfg.eps`` and decoupled ``cfg.weight_decay``.

    With ``k = cfg.accumulate_steps > 1`` the chain is wrapped in ``optax.MultiSteps``: each
    call of ``update`` is a micro-step that adds its gradient to an accumulator and returns zero
    updates, and every k-th applies the chain to the mean of the k gradients (so k micro-batches
    of equal size equal one step on their union when the losses are batch means). Clipping,
    Adam's moments and the schedule then see only these real updates. ``total_steps`` counts
    micro-steps (what the loops call); the returned ``schedule`` maps a micro-step index to the
    rate of the real update it belongs to. A micro-step skipped for non-finite values must not
    call ``update`` at all (:func:`nonfinite.apply_if`): the accumulator and its counter then
    stay as they were and the skipped gradient is not averaged in.
    """
    k = accumulate_steps(cfg)
    real = learning_rate_schedule(cfg, max(total_steps // k, 1))
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(real, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    chain = optax.chain(*parts)
    if k == 1:
        return chain, real
    return optax.MultiSteps(chain, every_k_schedule=k), lambda step: real(step // k)


def if_updated(optimizer: optax.GradientTransformation, opt_state, new, old):
    """``new`` if the last ``optimizer.update`` (which returned ``opt_state``) changed the
    parameters, else ``old`` (pytrees of one structure). Without accumulation every update
    does, and ``new`` is returned as is; with ``optax.MultiSteps`` only the k-th micro-step
    does (e.g. an EMA of θ should move only then)."""
    if not isinstance(optimizer, optax.MultiSteps):
        return new
    moved = optimizer.has_updated(opt_state)
    return jax.tree.map(lambda n, o: jnp.where(moved, n, o), new, old)


SCHEDULES = ("cosine", "constant")

"""The optimizer, built in one place from the config.

``optax.chain(clip_by_global_norm, adamw(schedule))`` with a linear warm-up followed by a cosine
or constant schedule. The learning-rate schedule is returned too, so that it can be logged.
"""

from __future__ import annotations

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


def build_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    """Returns ``(optimizer, schedule)`` for the ``optim`` config block.

    The chain is: global-norm clipping at ``cfg.grad_clip`` (skipped when 0), then AdamW with
    ``cfg.b1``, ``cfg.b2``, ``cfg.eps`` and decoupled ``cfg.weight_decay``.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


SCHEDULES = ("cosine", "constant")

"""Gradient accumulation (optim.accumulate_steps, optax.MultiSteps) through rl.update and
pretrain.train_step: k micro-batches = one step on their union, the schedule counts real
updates, a skipped micro-step leaves the accumulator alone."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from normguard_jax import optim, pretrain, rl
from normguard_jax.objectives.base import Aux, VelocityPoints
from normguard_jax.train_state import TrainState


def _optim_cfg(k, warmup=3):
    return ml_collections.ConfigDict(dict(
        lr=0.05, warmup_steps=warmup, schedule="cosine", final_lr_fraction=0.1, b1=0.9, b2=0.99,
        eps=1e-8, weight_decay=0.01, grad_clip=0.5, accumulate_steps=k))


def _objective(params, batch, ctx):
    """Least squares, a batch mean: (x @ w + b - y)² averaged over rows."""
    del ctx
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss = jnp.mean(err ** 2)
    return loss, Aux(metrics={}, points=VelocityPoints(v_theta=err, x=err, sigma=err, cond=err))


def _batches(n, rows, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (n, rows, 3))
    y = jax.random.normal(jax.random.fold_in(key, 1), (n, rows))
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def _run(batches, k, total, oks=None):
    optimizer, schedule = optim.build_optimizer(_optim_cfg(k), total)
    params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.05)}
    state = optimizer.init(params)
    upd = jax.jit(functools.partial(rl.update, objective=_objective, optimizer=optimizer,
                                    velocity=None))
    oks = oks or [True] * len(batches)
    skipped = []
    for batch, ok in zip(batches, oks):
        params, state, m = upd(params, state, None, None, batch, jnp.asarray(ok))
        skipped.append(float(m["skipped"]))
    return params, schedule, skipped


def _union(batches):
    return jax.tree.map(lambda *a: jnp.concatenate(a), *batches)


def test_k_micro_batches_equal_one_step_on_their_union():
    small = _batches(6, 4)
    big = [_union(small[i:i + 3]) for i in (0, 3)]
    accumulated, sched_k, _ = _run(small, 3, total=6)
    direct, sched_1, _ = _run(big, 1, total=2)
    moved = float(jnp.abs(direct["w"] - jnp.array([0.3, -0.2, 0.1])).max())
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The schedule counts real updates: micro-steps 0-2 are update 0, 3-5 update 1.
    for micro in range(6):
        assert float(sched_k(micro)) == float(sched_1(micro // 3))
    assert float(sched_1(1)) > float(sched_1(0))    # warm-up: the count matters


def test_a_skipped_micro_step_does_not_enter_the_accumulator():
    good = _batches(4, 4)
    bad = dict(good[0], y=good[0]["y"].at[0].set(jnp.nan))     # non-finite loss
    reference, _, _ = _run(good, 2, total=4)
    # A NaN batch and a rollout with non-finite rewards, between and inside accumulations.
    got, _, skipped = _run([good[0], bad, good[1], good[2], good[0], good[3]], 2, total=4,
                           oks=[True, True, True, True, False, True])
    assert skipped == [0, 1, 0, 0, 1, 0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def _pretrain_step(k):
    optimizer, schedule = optim.build_optimizer(_optim_cfg(k, warmup=0), 4)

    def velocity(params, x, sigma, cond):
        del cond
        return params["scale"] * x + params["shift"] * sigma[:, None, None, None]

    step = jax.jit(functools.partial(
        pretrain.train_step, velocity=velocity, optimizer=optimizer, schedule=schedule,
        sampler=lambda key, n: jax.random.uniform(key, (n,)), null_class=2, label_dropout=0.0,
        ema_decay=0.9, accumulate_steps=k))
    params = {"scale": jnp.array(0.5), "shift": jnp.array(0.1)}
    return step, TrainState.create(params, optimizer, jax.random.key(0))


@pytest.mark.parametrize("k", [1, 2])
def test_pretraining_ema_moves_only_on_real_updates(k):
    step, state = _pretrain_step(k)
    images = jax.random.uniform(jax.random.key(1), (4, 2, 2, 1), minval=-1, maxval=1)
    batch = {"image": images, "label": jnp.zeros((4,), jnp.int32)}
    emas = []
    for i in range(4):
        state, m = step(state, dict(batch, image=images * (1 + i)))
        emas.append(float(state.ema_params["scale"]))
        assert float(m["skipped"]) == 0
    moved = [emas[0] != 0.5] + [a != b for a, b in zip(emas[1:], emas[:-1])]
    assert moved == ([True] * 4 if k == 1 else [False, True, False, True])
    # A non-finite micro-step: parameters, EMA and the accumulator unchanged bit for bit.
    before = state
    state, m = step(state, dict(batch, image=images.at[0].set(jnp.nan)))
    assert float(m["skipped"]) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
        np.testing.assert_array_equal(a, b)

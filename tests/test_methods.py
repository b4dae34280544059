"""The method registry and one RL iteration on its own.

Every method of ``objectives.METHODS`` must be complete: its config class builds with defaults
and from its ``configs/rl_<name>.py``, its training batch has exactly ``rows(spec)`` rows with
every key its objective reads, and ``tests/test_objectives.py`` has a case for it.
``rl.train_iteration`` is checked as a function: deterministic in its state, counters and θ_old
moved as documented, and every update skipped (θ bit-identical) when a reward is not finite.
"""

import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import flow, generators, rl, rl_state, sharding
from normguard_jax.objectives import METHODS
from normguard_jax.objectives.base import Context

from conftest import REPO, load_config_file
from test_objectives import CASES, NULL, P_REF, P_THETA, SHAPE, jx, toy_velocity

NUM_CLASSES = NULL  # the toy generator's classes are 0..2 and 3 is the null label


def toy_reward(images, labels):
    """A pure reward ``(N, H, W, C), (N,) -> ((N,), components)`` without learned nets."""
    del labels
    brightness = jnp.mean(images, axis=(1, 2, 3))
    return brightness, {"brightness": brightness}


class Unparametrised(NamedTuple):
    """A reward ``fn(images, labels) -> ((N,), components)`` in the form the RL programs take
    (``rewards.CombinedReward``'s ``params`` and ``apply(params, images, request)``)."""

    fn: Callable
    params: Any = None

    def apply(self, params, images, labels):
        del params
        return self.fn(images, labels)


def tiny_config(name):
    config = load_config_file(f"rl_{name}.py")
    config.rollout.update(prompts_per_iter=4, group_size=4, num_steps=3, guidance_scale=1.0)
    if METHODS[name].needs_trajectory:
        config.rollout.sde_window_end = 2
    config.train.update(renoise_draws=2, iterations=3)
    config.train.minibatch_size = min(16, rl.rows_per_iteration(config))
    return config


def toy_rollout(config, method):
    sigmas = jnp.asarray(flow.inference_sigmas(config.rollout.num_steps, config.rollout.shift))
    window = rl.trained_steps(config)
    n = config.rollout.prompts_per_iter * config.rollout.group_size
    labels = jnp.repeat(jnp.arange(config.rollout.prompts_per_iter) % NUM_CLASSES,
                        config.rollout.group_size).astype(jnp.int32)
    ro, _ = rl.rollout(jx(P_THETA), labels, jax.random.key(0), velocity=toy_velocity,
                       image_shape=SHAPE, sigmas=sigmas, method=config.rollout.sampler,
                       noise_level=None, sde_window=(window[0], window[-1] + 1),
                       guidance_scale=1.0, null_class=NULL,
                       reward_fn=Unparametrised(toy_reward).apply,
                       group_size=config.rollout.group_size, adv_clip=5.0, global_std=False,
                       keep_trajectory=method.needs_trajectory)
    assert ro.images.shape == (n,) + SHAPE
    return ro._replace(ref_params=jx(P_REF)), sigmas   # as rl.train_iteration fills it


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_is_complete(name):
    method = METHODS[name]
    assert method.name == name
    assert callable(method.make_objective(method.config_cls()))
    assert os.path.isfile(REPO / "configs" / f"rl_{name}.py"), f"configs/rl_{name}.py is missing"
    config = load_config_file(f"rl_{name}.py")
    assert config.method == name
    rl.validate(config, num_devices=1)
    assert isinstance(rl.objective_config(config, null_class=NULL), method.config_cls)
    assert name in CASES, f"tests/test_objectives.py has no CASES[{name!r}]"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_batch_has_the_rows_and_keys_its_objective_reads(name):
    method = METHODS[name]
    config = tiny_config(name)
    ro, sigmas = toy_rollout(config, method)
    spec = rl.batch_spec(config, rl.sigma_sampler_for(config, sigmas), velocity=toy_velocity,
                         reward_fn=toy_reward)
    batch = method.training_batch(ro, jax.random.key(1), spec)
    rows = method.rows(spec)
    assert rows == rl.rows_per_iteration(config)
    for key, leaf in batch.items():
        assert leaf.shape[0] == rows, key
    objective = method.make_objective(rl.objective_config(config, null_class=NULL))
    ctx = Context(velocity=toy_velocity, ref_params=jx(P_REF), old_params=jx(P_THETA),
                  key=jax.random.key(2))
    loss, aux = objective(jx(P_THETA), jax.tree.map(lambda a: a[:8], batch), ctx)
    assert np.isfinite(float(loss))
    assert aux.points.v_theta.shape == (8,) + SHAPE


def test_a_method_whose_sampler_has_no_log_probs_is_refused():
    config = load_config_file("rl_grpo.py")
    config.rollout.sampler = "ode"
    with pytest.raises(ValueError, match="config.rollout.sampler must be one of"):
        rl.validate(config, num_devices=1)


# ----------------------------------------------------------------------------------------------
# One iteration as a function.
# ----------------------------------------------------------------------------------------------


def _iteration_setup(reward_fn=toy_reward):
    config = tiny_config("nft")
    config.train.inner_epochs = 2
    base = generators.Pretrained(velocity=toy_velocity, params=jx(P_THETA), config=None,
                                 image_shape=SHAPE, num_classes=NUM_CLASSES, step=0)
    mesh = sharding.make_mesh(-1, 1)
    optimizer, schedule = rl.build_optimizer(config)
    programs = rl.build_programs(config, base, mesh, Unparametrised(reward_fn), optimizer)
    state0 = rl_state.initial_state(base.params, optimizer, config.seed)
    run = functools.partial(
        rl.train_iteration, ref_params=jx(P_REF), programs=programs, num_classes=NUM_CLASSES,
        prompts=config.rollout.prompts_per_iter, group_size=config.rollout.group_size,
        inner_epochs=config.train.inner_epochs, rows=rl.rows_per_iteration(config),
        minibatch_size=config.train.minibatch_size, schedule=schedule)
    return config, state0, run


def _copy(state):
    return jax.tree.map(jnp.copy, state)  # updates donate θ and the optimizer state


def test_train_iteration_is_deterministic_and_moves_counters_and_old_policy():
    config, state0, run = _iteration_setup()
    a, metrics, skipped = run(_copy(state0))
    b, _, _ = run(_copy(state0))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    updates = rl.updates_per_iteration(config)
    assert updates == 2 * rl.rows_per_iteration(config) // config.train.minibatch_size
    assert int(a.iteration) == 1 and int(a.updates) == updates and int(skipped) == 0
    assert float(jnp.abs(a.params["a"] - state0.params["a"])) > 0
    # θ_old ← d·θ_old + (1 - d)·θ with d from the preset at the new update count.
    flat, rate, max_decay = rl_state.OLD_POLICY_DECAY_PRESETS[config.train.old_policy]
    d = min(max((updates - flat) * rate, 0.0), max_decay)
    np.testing.assert_allclose(a.old_params["c"], d * state0.old_params["c"]
                               + (1 - d) * a.params["c"], rtol=1e-6)
    for name in ("train/loss", "train/normguard/ratio", "reward/mean", "reward/brightness",
                 "lr"):
        assert np.isfinite(float(metrics[name])), name
    # the next iteration draws other prompts and noise: the state's iteration keys it
    c, _, _ = run(_copy(a))
    assert int(c.iteration) == 2
    assert float(jnp.abs(c.params["a"] - a.params["a"])) > 0


def test_train_iteration_skips_every_update_when_a_reward_is_not_finite():
    def nan_reward(images, labels):
        total, parts = toy_reward(images, labels)
        return total.at[3].set(jnp.nan), parts

    config, state0, run = _iteration_setup(nan_reward)
    after, metrics, skipped = run(_copy(state0))
    assert int(skipped) == rl.updates_per_iteration(config)
    np.testing.assert_array_equal(float(metrics["train/skipped"]), 1.0)
    jax.tree.map(np.testing.assert_array_equal, after.params, state0.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, state0.opt_state)
    assert int(after.iteration) == 1


# ----------------------------------------------------------------------------------------------
# Conditioning as a pytree: the same maths as class labels.
# ----------------------------------------------------------------------------------------------


def onehot_velocity(params, x, sigma, cond):
    """``toy_velocity`` reading the class from a dict conditioning ``{"onehot": (B, 4)}``."""
    shift = cond["onehot"] @ params["c"]                       # (B, 1) = c[label]
    return params["a"] * x + params["b"] * sigma[:, None, None, None] + shift[:, None, None, :]


def as_dict(labels):
    return {"onehot": jax.nn.one_hot(labels, NUM_CLASSES + 1, dtype=jnp.float32)}


def test_guidance_with_a_pytree_conditioning_matches_labels():
    from normguard_jax import sampling
    x = jax.random.normal(jax.random.key(0), (6,) + SHAPE)
    sigma = jnp.linspace(0.1, 0.9, 6)
    labels = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    with_labels = sampling.guided_velocity(toy_velocity, jx(P_THETA), x, sigma, labels,
                                           guidance_scale=3.0, null_class=NULL)
    with_dict = sampling.guided_velocity(onehot_velocity, jx(P_THETA), x, sigma,
                                         as_dict(labels), guidance_scale=3.0,
                                         null_class=as_dict(jnp.array([NULL])))
    np.testing.assert_allclose(with_dict, with_labels, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_the_same_on_a_pytree_conditioning(name):
    method = METHODS[name]
    config = tiny_config(name)
    ro, sigmas = toy_rollout(config, method)
    ro_dict = ro._replace(labels=as_dict(ro.labels))
    spec_for = lambda velocity: rl.batch_spec(config, rl.sigma_sampler_for(config, sigmas),
                                              velocity=velocity, reward_fn=toy_reward)
    batch = method.training_batch(ro, jax.random.key(1), spec_for(toy_velocity))
    batch_dict = method.training_batch(ro_dict, jax.random.key(1), spec_for(onehot_velocity))
    assert batch_dict["cond"]["onehot"].shape[0] == batch["cond"].shape[0]
    objective = method.make_objective(rl.objective_config(config, null_class=NULL))
    losses = []
    for velocity, b in ((toy_velocity, batch), (onehot_velocity, batch_dict)):
        ctx = Context(velocity=velocity, ref_params=jx(P_REF), old_params=jx(P_THETA),
                      key=jax.random.key(2))
        guarded = normguard_wrap(objective)
        (loss, aux), grads = jax.value_and_grad(guarded, has_aux=True)(
            jx(P_THETA), jax.tree.map(lambda a: a[:8], b), ctx)
        losses.append((loss, grads))
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda g1, g0: np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6),
                 losses[1][1], losses[0][1])


def normguard_wrap(objective):
    from normguard_jax import normguard
    return normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.5))


def test_label_dropout_replaces_a_pytree_conditioning_by_the_empty_one():
    from normguard_jax.objectives.flow_matching import make_flow_matching_batch
    labels = jnp.arange(64, dtype=jnp.int32) % NUM_CLASSES
    kwargs = dict(sigma_sampler=flow.TIMESTEP_SAMPLERS["uniform"], label_dropout=0.3)
    plain = make_flow_matching_batch(jax.random.key(0), jnp.zeros((64,) + SHAPE), labels,
                                     null_class=NULL, **kwargs)
    tree = make_flow_matching_batch(jax.random.key(0), jnp.zeros((64,) + SHAPE),
                                    as_dict(labels), null_class=as_dict(jnp.array([NULL])),
                                    **kwargs)
    np.testing.assert_array_equal(tree["cond"]["onehot"], as_dict(plain["cond"])["onehot"])
    assert 0 < int(jnp.sum(plain["cond"] == NULL)) < 64

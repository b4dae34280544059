"""The method registry and one RL iteration on its own.

Every method of ``objectives.METHODS`` must be complete: its config class builds with defaults
and from its ``configs/rl_<name>.py``, its training batch has exactly ``rows(spec)`` rows with
every key its objective reads, and ``tests/test_objectives.py`` has a case for it.
``rl.train_iteration`` is checked as a function: deterministic in its state, counters and θ_old
moved as documented, and every update skipped (θ bit-identical) when a reward is not finite.
"""

import functools
import os

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
                       guidance_scale=1.0, null_class=NULL, reward_fn=toy_reward,
                       group_size=config.rollout.group_size, adv_clip=5.0, global_std=False,
                       keep_trajectory=method.needs_trajectory)
    assert ro.images.shape == (n,) + SHAPE
    return ro, sigmas


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
    spec = rl.batch_spec(config, rl.sigma_sampler_for(config, sigmas))
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
    programs = rl.build_programs(config, base, mesh, reward_fn, optimizer)
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

"""Parameter sharding over the fsdp axis: the rule, and that sharding changes nothing but layout.

On the 8 fake CPU devices of conftest: a pretraining step and an RL iteration with everything
sharded 8 ways equal the replicated ones; each device stores 1/8 of every large array; a
checkpoint written sharded restores into the sharded layout with equal values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from normguard_jax import (checkpointing, config_checks, data, generators, optim, pretrain, rl,
                           sharding)
from normguard_jax.rl_state import initial_state
from normguard_jax.train_state import TrainState

from conftest import load_config_file
from test_methods import Unparametrised
from test_pretrain import tiny_config

MIN_SIZE = 256  # small enough that most arrays of the tiny models are sharded


@pytest.mark.parametrize("shape, fsdp, min_size, spec", [
    ((1024, 4096), 8, 1, P(None, "fsdp")),        # the largest divisible axis
    ((4096, 1024), 8, 1, P("fsdp", None)),
    ((512, 512), 8, 1, P("fsdp", None)),          # a tie: the first axis
    ((12, 1536), 8, 1, P(None, "fsdp")),
    ((1536, 12), 8, 1, P("fsdp", None)),
    ((3, 3, 16, 24), 8, 1, P(None, None, None, "fsdp")),
    ((1536, 7), 8, 1, P("fsdp", None)),
    ((9, 7), 8, 1, P()),                          # no divisible axis
    ((1536,), 8, 4096, P()),                      # below the size threshold
    ((), 8, 1, P()),                              # scalars
    ((4096, 4096), 1, 1, P()),                    # no fsdp axis: replicated
])
def test_param_spec_rule(shape, fsdp, min_size, spec):
    assert sharding.param_spec(shape, fsdp, min_size) == spec


def test_optimizer_state_follows_the_parameters_layout():
    mesh = sharding.make_mesh(data=1, fsdp=8)
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,)), "odd": jnp.zeros((5, 3))}
    optimizer_state = jax.eval_shape(optax.adam(1e-3).init, params)
    p_sh = sharding.tree_shardings(params, mesh, 16)
    o_sh = sharding.tree_shardings(optimizer_state, mesh, 16)
    assert o_sh[0].mu["w"] == p_sh["w"] and o_sh[0].nu["b"] == p_sh["b"]
    assert p_sh["w"].spec == P("fsdp", None) and p_sh["odd"].spec == P()
    assert o_sh[0].count.spec == P()


def _pretrain_setup(config, mesh):
    split = data.load_split(config.data.name, "train", config.data.data_dir)
    _, params, velocity = generators.build_generator(config, split.image_shape, split.num_classes)
    # Random non-zero weights everywhere (adaLN-Zero starts some maps at 0).
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                for x, k in zip(leaves, keys)])
    optimizer, schedule = optim.build_optimizer(config.optim, config.train.steps)
    state = TrainState.create(params, optimizer, jax.random.key(config.seed))
    step, state_sh = pretrain.jit_train_step(config, mesh, state, velocity=velocity,
                                             optimizer=optimizer, schedule=schedule,
                                             null_class=split.num_classes)
    batch = data.local_batch(split, 0, config.train.batch_size, config.seed, 0, 1)
    return jax.device_put(state, state_sh), sharding.global_batch(batch, mesh), step


def _assert_each_device_holds_an_eighth(tree, min_size):
    large = [x for x in jax.tree.leaves(tree) if x.size >= min_size
             and any(d % 8 == 0 for d in x.shape)]
    assert large
    for x in large:
        sizes = {s.data.size for s in x.addressable_shards}
        assert sizes == {x.size // 8}, (x.shape, sizes)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = sharding.bytes_per_device(tree)
    assert len(per_device) == 8
    large_ids = {id(x) for x in large}
    small = sum(x.nbytes for x in jax.tree.leaves(tree) if id(x) not in large_ids)
    for nbytes in per_device.values():
        assert nbytes == pytest.approx((total - small) / 8 + small)


def test_sharded_pretraining_step_equals_the_replicated_one(data_dir):
    config = tiny_config(data_dir, "dit")
    config.mesh.min_shard_size = MIN_SIZE
    s8, b8, f8 = _pretrain_setup(config, sharding.make_mesh(data=1, fsdp=8))
    s1, b1, f1 = _pretrain_setup(config, sharding.make_mesh(data=8, fsdp=1))
    _assert_each_device_holds_an_eighth(s8.params, MIN_SIZE)
    for _ in range(2):
        s8, m8 = f8(s8, b8)
        s1, m1 = f1(s1, b1)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves((s8.params, s8.ema_params, s8.opt_state)),
                    jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The step keeps the layout: outputs are as sharded as the inputs were.
    _assert_each_device_holds_an_eighth((s8.params, s8.ema_params), MIN_SIZE)
    for leaf in jax.tree.leaves(s8.opt_state):
        if leaf.size >= MIN_SIZE and leaf.ndim and any(d % 8 == 0 for d in leaf.shape):
            assert not leaf.sharding.is_fully_replicated, leaf.shape


def test_checkpoint_written_sharded_restores_sharded_and_equal(data_dir, tmp_path):
    config = tiny_config(data_dir, "dit")
    config.mesh.min_shard_size = MIN_SIZE
    mesh = sharding.make_mesh(data=1, fsdp=8)
    state, _, _ = _pretrain_setup(config, mesh)
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"))
    checkpointing.save(manager, 0, state, {"step": 0})
    manager.wait_until_finished()
    # A shape-only template laid out by the rule, as a fresh run lays out its state.
    template = sharding.abstract_tree(state, mesh, MIN_SIZE)
    step, restored, meta = checkpointing.restore_latest(manager, template)
    manager.close()
    assert step == 0 and meta["step"] == 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    _assert_each_device_holds_an_eighth(restored.params, MIN_SIZE)


def _rl_iteration(config, mesh, base, reward_fn, ref_params):
    optimizer, schedule = rl.build_optimizer(config)
    programs = rl.build_programs(config, base, mesh, Unparametrised(reward_fn), optimizer)
    ref = sharding.shard_tree(ref_params, mesh, config.mesh.min_shard_size)
    state = sharding.shard_tree(initial_state(base.params, optimizer, config.seed), mesh,
                                config.mesh.min_shard_size)
    state, metrics, _ = rl.train_iteration(
        state, ref, programs=programs, num_classes=base.num_classes,
        prompts=config.rollout.prompts_per_iter, group_size=config.rollout.group_size,
        inner_epochs=config.train.inner_epochs, rows=rl.rows_per_iteration(config),
        minibatch_size=config.train.minibatch_size, schedule=schedule)
    return state, metrics


@pytest.mark.slow
def test_sharded_rl_iteration_equals_the_replicated_one(data_dir):
    pconfig = tiny_config(data_dir, "dit")
    split = data.load_split(pconfig.data.name, "train", pconfig.data.data_dir)
    _, params, velocity = generators.build_generator(pconfig, split.image_shape,
                                                     split.num_classes)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                for x, k in zip(leaves, keys)])
    base = generators.Pretrained(velocity=velocity, params=params, config=pconfig,
                                 image_shape=split.image_shape, num_classes=split.num_classes,
                                 step=0)
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=4, group_size=4, num_steps=3)
    config.train.minibatch_size = 8
    config.normguard.weight = 0.5
    config.mesh.min_shard_size = MIN_SIZE

    def reward_fn(images, labels):
        del labels
        r = jnp.mean(images, axis=(1, 2, 3))
        return r, {"brightness": r}

    # θ_ref ≠ θ: at θ = θ_ref every norm ratio is 1 up to rounding, on the hinge's kink, where
    # the two layouts' last-bit differences would switch the penalty's gradient on or off.
    ref_params = jax.tree.map(lambda x: 0.9 * x, params)
    s8, m8 = _rl_iteration(config, sharding.make_mesh(data=1, fsdp=8), base, reward_fn,
                           ref_params)
    s1, m1 = _rl_iteration(config, sharding.make_mesh(data=8, fsdp=1), base, reward_fn,
                           ref_params)
    np.testing.assert_allclose(m8["train/loss"], m1["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["reward/mean"], m1["reward/mean"], rtol=1e-5)
    assert m1["train/normguard/active_frac"] > 0
    for a, b in zip(jax.tree.leaves((s8.params, s8.old_params, s8.opt_state)),
                    jax.tree.leaves((s1.params, s1.old_params, s1.opt_state))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    moved = max(float(jnp.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(params)))
    assert moved > 1e-6
    _assert_each_device_holds_an_eighth((s8.params, s8.old_params), MIN_SIZE)


def test_bad_min_shard_size_names_the_field(data_dir):
    config = tiny_config(data_dir, "dit")
    config.mesh.min_shard_size = 0
    with pytest.raises(config_checks.ConfigError, match="mesh.min_shard_size"):
        pretrain.validate(config, 8)

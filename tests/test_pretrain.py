"""Pretraining: the step learns, sharding does not change it, resume is exact, bad configs fail."""

import functools

import jax
import numpy as np
import pytest

from normguard_jax import config_checks, data, generators, optim, pretrain, sharding
from normguard_jax.train_state import TrainState

from conftest import load_config_file


def tiny_config(data_dir, arch="dit", **train):
    config = load_config_file(f"pretrain_mnist_{arch}.py")
    config.data.name = "digits_sklearn"      # 8×8 digits: the smallest real dataset
    config.data.data_dir = data_dir
    config.model.size = "tiny"
    config.train.update(batch_size=16, steps=6, log_every=1, sample_every=1000,
                        checkpoint_every=2, keep_checkpoints=10)
    config.train.update(train)
    config.optim.warmup_steps = 2
    config.sample.update(num_steps=2, per_class=1)
    return config


def _step_setup(config, mesh):
    split = data.load_split(config.data.name, "train", config.data.data_dir)
    _, params, velocity = generators.build_generator(config, split.image_shape, split.num_classes)
    optimizer, schedule = optim.build_optimizer(config.optim, config.train.steps)
    state = TrainState.create(params, optimizer, jax.random.key(config.seed))
    repl = sharding.replicated(mesh)
    step = jax.jit(functools.partial(
        pretrain.train_step, velocity=velocity, optimizer=optimizer, schedule=schedule,
        sampler=pretrain.sigma_sampler(config), null_class=split.num_classes,
        label_dropout=config.flow.label_dropout, ema_decay=config.optim.ema_decay),
        in_shardings=(repl, sharding.batch_sharding(mesh)), out_shardings=(repl, repl))
    batch = data.local_batch(split, 0, config.train.batch_size, config.seed, 0, 1)
    return jax.device_put(state, repl), sharding.global_batch(batch, mesh), step


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_sharded_step_equals_single_device_step(data_dir, arch):
    config = tiny_config(data_dir, arch)
    mesh8 = sharding.make_mesh()
    mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
    assert mesh8.devices.size == 8
    s8, b8, f8 = _step_setup(config, mesh8)
    s1, b1, f1 = _step_setup(config, mesh1)
    for _ in range(2):
        s8, m8 = f8(s8, b8)
        s1, m1 = f1(s1, b1)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s8.params, s1.params)


def test_training_step_lowers_the_loss(data_dir):
    config = tiny_config(data_dir, steps=200)
    config.optim.lr = 3e-3
    state, batch, step = _step_setup(config, sharding.make_mesh())
    losses = []
    for _ in range(40):                       # the same batch: loss must go down
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert int(state.step) == 40


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(data_dir, tmp_path):
    config = tiny_config(data_dir)
    full = pretrain.run(config, str(tmp_path / "full"))

    def crash_at_5(step, state, metrics):     # after step 5; the last checkpoint is step 4
        if step == 5:
            raise _Crash()

    with pytest.raises(_Crash):
        pretrain.run(config, str(tmp_path / "resumed"), hooks=[crash_at_5])
    resumed_from = []
    resumed = pretrain.run(config, str(tmp_path / "resumed"),
                           hooks=[lambda s, *_: resumed_from.append(s)])
    assert resumed_from[0] == 5               # steps 5 and 6 were (re)computed
    assert int(resumed.step) == int(full.step) == 6
    for a, b in zip(jax.tree.leaves((full.params, full.ema_params, full.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.ema_params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "full" / "metrics.jsonl").exists()
    assert list((tmp_path / "full" / "samples").glob("samples_ema_*.png"))


@pytest.mark.parametrize("path, value, message", [
    ("train.steps", 0, "config.train.steps must be an integer >= 1"),
    ("optim.lr", -1.0, "config.optim.lr must be a finite number > 0"),
    ("model.arch", "resnet", "config.model.arch must be one of"),
    ("flow.label_dropout", 1.5, "config.flow.label_dropout must be a finite number"),
    ("train.batch_size", 12, "config.train.batch_size=12 must be divisible by the 8 devices"),
])
def test_bad_config_fails_before_anything_is_built(data_dir, tmp_path, path, value, message):
    config = tiny_config(data_dir)
    section, field = path.split(".")
    config[section][field] = value
    with pytest.raises(config_checks.ConfigError if "devices" not in message else ValueError,
                       match=message.replace("(", r"\(")):
        pretrain.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()

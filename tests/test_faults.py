"""Fault behaviour: non-finite updates are skipped and counted, K in a row stop the run with the
window named, the last good checkpoint stays restorable; a corrupted newest checkpoint falls
back with a warning; bad input fails before any model is built; SIGTERM checkpoints and exits
0; a run killed with SIGKILL resumes to bit-identical parameters.
"""

import functools
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from normguard_jax import (checkpointing, config_checks, data, nonfinite, normguard, pretrain,
                           reporting, rewards, rl, sharding)
from normguard_jax.train_state import TrainState

from conftest import REPO, load_config_file
from test_objectives import P_OLD, P_REF, P_THETA, build, jx, toy_velocity
from test_pretrain import _step_setup, tiny_config


def _leaves(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_trees_differ(a, b):
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


# ----------------------------------------------------------------------------------------------
# Non-finite updates: the jitted steps.
# ----------------------------------------------------------------------------------------------


def test_pretrain_step_with_nan_input_leaves_state_untouched(data_dir):
    config = tiny_config(data_dir)
    state, batch, step = _step_setup(config, sharding.make_mesh())
    state, metrics = step(state, batch)               # one clean step: moments are non-zero
    assert float(metrics["skipped"]) == 0.0
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    after, metrics = step(state, bad)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    _assert_trees_equal((after.params, after.ema_params, after.opt_state),
                        (state.params, state.ema_params, state.opt_state))
    assert int(after.step) == int(state.step) + 1    # the batch of that step is consumed
    clean, metrics = step(after, batch)
    assert float(metrics["skipped"]) == 0.0
    _assert_trees_differ(clean.params, after.params)


def test_rl_update_skips_on_nonfinite_reward_loss_or_gradient():
    objective, batch = build("nft")
    objective = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.3))
    optimizer = optax.adam(1e-2)
    params = jx(P_THETA)
    opt_state = optimizer.init(params)
    upd = jax.jit(functools.partial(rl.update, objective=objective, optimizer=optimizer,
                                    velocity=toy_velocity))
    args = (jx(P_OLD), jx(P_REF))
    p1, o1, m = upd(params, opt_state, *args, batch, jnp.array(True))
    assert float(m["skipped"]) == 0.0
    _assert_trees_differ(p1, params)
    for bad_batch, ok in ((batch, False),                                   # NaN reward
                          (dict(batch, x0=batch["x0"].at[2].set(jnp.inf)), True)):  # NaN loss
        p2, o2, m = upd(p1, o1, *args, bad_batch, jnp.array(ok))
        assert float(m["skipped"]) == 1.0
        _assert_trees_equal((p2, o2), (p1, o1))
    big = dict(jx(P_THETA), a=jnp.float32(3e38))                          # overflowing gradient
    p3, _, m = upd(big, opt_state, *args, batch, jnp.array(True))
    assert not np.isfinite(float(m["loss"])) and float(m["skipped"]) == 1.0
    _assert_trees_equal(p3, big)


def test_skip_counter_counts_resets_and_names_the_window():
    counter = nonfinite.SkipCounter(3, "step", "Last good checkpoint: /x.", total=4)
    counter.record(7, 1)
    counter.record(8, 1)
    counter.record(9, 0)                       # a clean step resets the run of skips
    assert counter.consecutive == 0 and counter.total == 6
    counter.record(10, 2)
    counter.record(11, 1)
    with pytest.raises(nonfinite.NonFiniteError, match=r"steps 10\.\.12\).*Last good checkpoint"):
        counter.record(12, 1)
    assert counter.total == 10
    assert bool(nonfinite.all_finite({"a": jnp.ones(3), "k": jnp.arange(2)}))
    assert not bool(nonfinite.all_finite({"a": jnp.array([1.0, jnp.nan])}))


# ----------------------------------------------------------------------------------------------
# Corrupted or partial newest checkpoint.
# ----------------------------------------------------------------------------------------------


def _state(x):
    return {"params": {"w": jnp.full((3, 2), x, jnp.float32)}, "step": jnp.int32(x)}


def _absl_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    manager = checkpointing.make_manager(directory, max_to_keep=5)
    for s in (1, 2, 3):
        checkpointing.save(manager, s, _state(float(s)), {"step": s})
    manager.wait_until_finished()
    manager.close()
    # Step 3: truncate every array file to half its size (a write cut short).
    for root, _, files in os.walk(os.path.join(directory, "3", "state")):
        for f in files:
            path = os.path.join(root, f)
            size = os.path.getsize(path)
            with open(path, "r+b") as fh:
                fh.truncate(size // 2)
    # Step 2: its JSON record is cut short too.
    for root, _, files in os.walk(os.path.join(directory, "2", "meta")):
        for f in files:
            with open(os.path.join(root, f), "w") as fh:
                fh.write('{"step": ')
    # An unfinished write of step 4 (Orbax writes to a temporary folder, then renames it).
    os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp-123", "state"))

    caplog.set_level(logging.WARNING)
    manager = checkpointing.make_manager(directory)
    assert checkpointing.read_latest_meta(manager) == (3, {"step": 3})
    step, state, meta = checkpointing.restore_latest(manager, _state(0.0))
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(state["params"]["w"], 1.0)
    warnings = _absl_warnings(caplog)
    assert any("step 3" in w and "unreadable" in w for w in warnings), warnings
    assert any("step 2" in w and "unreadable" in w for w in warnings), warnings


# ----------------------------------------------------------------------------------------------
# Bad input fails before any model is built (and so before anything compiles).
# ----------------------------------------------------------------------------------------------


def _unreachable(*args, **kwargs):
    raise AssertionError("a model was built although the input was invalid")


def _unwritable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return str(blocker / "workdir")      # cannot be created, whoever runs the test


def test_pretrain_rejects_an_unwritable_workdir(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "build_generator", _unreachable)
    with pytest.raises(config_checks.ConfigError, match="--workdir=.* is not a writable"):
        pretrain.run(tiny_config(data_dir), _unwritable(tmp_path))
    if os.geteuid() != 0:                # permissions do not bind root
        ro = tmp_path / "read_only"
        ro.mkdir(mode=0o500)
        with pytest.raises(config_checks.ConfigError, match="is not a writable"):
            pretrain.run(tiny_config(data_dir), str(ro))


def test_rl_rejects_an_unwritable_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "load_pretrained", _unreachable)
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    with pytest.raises(config_checks.ConfigError, match="--workdir=.* is not a writable"):
        rl.run(config, _unwritable(tmp_path))


def test_rl_rejects_negative_reward_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "load_pretrained", _unreachable)
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    config.rewards = {"contrast": 1.0, "stroke_weight": -0.5}
    with pytest.raises(config_checks.ConfigError,
                       match=r"config\.rewards\.stroke_weight must be a finite number >= 0"):
        rl.run(config, str(tmp_path / "rl"))
    assert not (tmp_path / "rl").exists()


def _fake_checkpoint(directory, meta):
    manager = checkpointing.make_manager(directory)
    checkpointing.save(manager, 1, {"x": jnp.zeros(2)}, meta, force=True)
    manager.wait_until_finished()
    manager.close()


@pytest.mark.parametrize("change, message", [
    ({"image_shape": [10, 10, 1]}, r"image shape \(8, 8, 1\) of config.data.name='digits_sklearn' "
                                   r"differs from the checkpoint's \(10, 10, 1\)"),
    ({"data": "digits_mnist"}, r"config.data.name='digits_sklearn' differs from the checkpoint"),
])
def test_pretrain_resume_against_another_dataset_fails_before_building(
        data_dir, tmp_path, monkeypatch, change, message):
    config = tiny_config(data_dir)
    old = config.to_dict()
    if "data" in change:
        old["data"]["name"] = change["data"]
    meta = {"config": old, "step": 1,
            "image_shape": change.get("image_shape", [8, 8, 1]), "num_classes": 10}
    _fake_checkpoint(str(tmp_path / "w" / "checkpoints"), meta)
    monkeypatch.setattr(pretrain, "build_generator", _unreachable)
    with pytest.raises(config_checks.ConfigError, match=message):
        pretrain.run(config, str(tmp_path / "w"))


def test_rl_resume_against_a_base_of_another_image_shape_fails_before_loading(
        tmp_path, monkeypatch):
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    config.base.workdir = str(tmp_path / "base")
    _fake_checkpoint(str(tmp_path / "base" / "checkpoints"), {"image_shape": [8, 8, 1]})
    _fake_checkpoint(str(tmp_path / "rl" / "checkpoints"),
                     {"config": config.to_dict(), "iteration": 1,
                      "image_shape": [32, 32, 1]})
    monkeypatch.setattr(pretrain, "load_pretrained", _unreachable)
    with pytest.raises(config_checks.ConfigError,
                       match=r"image shape \(8, 8, 1\) of the base model .* differs from the "
                             r"checkpoint's \(32, 32, 1\)"):
        rl.run(config, str(tmp_path / "rl"))

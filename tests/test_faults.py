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

from normguard_jax import (checkpointing, config_checks, data, generators, nonfinite, normguard,
                           pretrain, reporting, rewards, rl, sharding)

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
    monkeypatch.setattr(generators, "build_generator", _unreachable)
    with pytest.raises(config_checks.ConfigError, match="--workdir=.* is not a writable"):
        pretrain.run(tiny_config(data_dir), _unwritable(tmp_path))
    if os.geteuid() != 0:                # permissions do not bind root
        ro = tmp_path / "read_only"
        ro.mkdir(mode=0o500)
        with pytest.raises(config_checks.ConfigError, match="is not a writable"):
            pretrain.run(tiny_config(data_dir), str(ro))


def test_rl_rejects_an_unwritable_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    with pytest.raises(config_checks.ConfigError, match="--workdir=.* is not a writable"):
        rl.run(config, _unwritable(tmp_path))


def test_rl_rejects_negative_reward_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    config.rewards = {"contrast": 1.0, "stroke_weight": -0.5}
    with pytest.raises(config_checks.ConfigError,
                       match=r"config\.rewards\.stroke_weight must be a finite number >= 0"):
        rl.run(config, str(tmp_path / "rl"))
    assert not (tmp_path / "rl").exists()


def _fake_checkpoint(workdir, meta, step=1):
    """A checkpoint of a dummy state with the record ``meta``, in ``workdir``."""
    manager = checkpointing.open_manager(workdir)
    checkpointing.save(manager, step, {"x": jnp.zeros(2)}, meta, force=True)
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
    _fake_checkpoint(str(tmp_path / "w"), meta)
    monkeypatch.setattr(generators, "build_generator", _unreachable)
    with pytest.raises(config_checks.ConfigError, match=message):
        pretrain.run(config, str(tmp_path / "w"))


def test_rl_resume_against_a_base_of_another_image_shape_fails_before_loading(
        tmp_path, monkeypatch):
    config = load_config_file("rl_nft.py")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    config.base.workdir = str(tmp_path / "base")
    _fake_checkpoint(str(tmp_path / "base"), {"image_shape": [8, 8, 1]})
    _fake_checkpoint(str(tmp_path / "rl"),
                     {"config": config.to_dict(), "iteration": 1,
                      "image_shape": [32, 32, 1]})
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    with pytest.raises(config_checks.ConfigError,
                       match=r"image shape \(8, 8, 1\) of the base model .* differs from the "
                             r"checkpoint's \(32, 32, 1\)"):
        rl.run(config, str(tmp_path / "rl"))


# ----------------------------------------------------------------------------------------------
# Non-finite values inside real runs.
# ----------------------------------------------------------------------------------------------


def _param_recorder(store):
    def hook(done, state, metrics):
        store[done] = _leaves(state.params)    # copied now: the state is donated next step
    return hook


@pytest.mark.slow
def test_pretrain_run_skips_nan_steps_then_stops_and_keeps_a_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    nan_steps = {3, 4, 6, 7, 8, 9}               # 1-based; step 5 is clean
    real_local_batch = data.local_batch

    def poisoned(split, step, *args):
        batch = real_local_batch(split, step, *args)
        if step + 1 in nan_steps:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    monkeypatch.setattr(data, "local_batch", poisoned)
    config = tiny_config(data_dir, steps=10, checkpoint_every=2)
    config.train.max_nonfinite = 3
    workdir = str(tmp_path / "nan")
    params = {}
    with pytest.raises(nonfinite.NonFiniteError, match=r"steps 6\.\.8\)"):
        pretrain.run(config, workdir, hooks=[_param_recorder(params)])
    assert sorted(params) == [1, 2, 3, 4, 5, 6, 7]   # the error came at step 8, before hooks
    for skipped, before in ((3, 2), (4, 2), (6, 5), (7, 5)):
        _assert_trees_equal(params[skipped], params[before])
    _assert_trees_differ(params[5], params[4])
    rows = {r["step"]: r for r in reporting.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
    assert [s for s in sorted(rows) if rows[s]["skipped"] == 1.0] == [3, 4, 6, 7, 8]
    assert rows[8]["skipped_total"] == 5 and rows[5]["skipped"] == 0.0
    # The newest checkpoint (step 6, written before the stop) holds the last good parameters.
    restored = generators.load_pretrained(workdir, use_ema=False)
    assert restored.step == 6
    _assert_trees_equal(restored.params, params[5])
    assert all(np.isfinite(x).all() for x in _leaves(restored.params))


@pytest.fixture(scope="module")
def base_workdir(data_dir, tmp_path_factory):
    """A tiny pretrained DiT on 8×8 digits."""
    config = tiny_config(data_dir, steps=2, checkpoint_every=2)
    workdir = str(tmp_path_factory.mktemp("base"))
    pretrain.run(config, workdir)
    return workdir


@pytest.mark.slow
def test_rl_run_skips_iterations_with_nan_rewards_then_stops(base_workdir, tmp_path,
                                                              monkeypatch):
    calls = {"n": 0}
    nan_calls = {2, 4, 5}                     # rollouts (= iterations, 1-based) with a NaN reward

    def host_part(images):
        calls["n"] += 1
        value = np.nan if calls["n"] in nan_calls else 0.0
        return np.full(images.shape[:1], value, np.float32)

    def flaky(images, cond):
        del cond
        extra = jax.pure_callback(host_part, jax.ShapeDtypeStruct(images.shape[:1], jnp.float32),
                                  images)
        return rewards.contrast(images, None) + extra

    monkeypatch.setitem(rewards.REWARDS, "flaky", rewards.RewardEntry(
        build=rewards._static(flaky), differentiable=True, applies=lambda ctx: True,
        description="contrast, NaN at chosen rollouts"))
    config = load_config_file("rl_nft.py")
    config.base.workdir = base_workdir
    config.aux_dir = str(tmp_path / "aux")
    config.rewards = {"flaky": 1.0}
    config.rollout.update(prompts_per_iter=8, group_size=4, num_steps=2)
    config.train.update(iterations=6, minibatch_size=16, log_every=1, sample_every=1000,
                        checkpoint_every=1, max_nonfinite=2)
    config.optim.lr = 1e-3
    config.sample.update(num_steps=2, per_class=1)
    workdir = str(tmp_path / "rl")
    params = {}
    with pytest.raises(nonfinite.NonFiniteError, match=r"iterations 4\.\.5\)"):
        rl.run(config, workdir, hooks=[_param_recorder(params)])
    assert calls["n"] == 5
    _assert_trees_equal(params[2], params[1])          # iteration 2: every update skipped
    _assert_trees_differ(params[3], params[2])
    _assert_trees_equal(params[4], params[3])
    rows = {r["step"]: r for r in reporting.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
    assert [rows[i]["train/skipped"] for i in (1, 2, 3, 4, 5)] == [0.0, 1.0, 0.0, 1.0, 1.0]
    policy, _ = generators.load_policy(workdir)                 # newest checkpoint: iteration 4
    assert policy.step == 4
    _assert_trees_equal(policy.params, params[3])


# ----------------------------------------------------------------------------------------------
# Signals: a real run in a subprocess.
# ----------------------------------------------------------------------------------------------


def _cli(workdir, data_dir, steps, checkpoint_every):
    args = [sys.executable, "-m", "normguard_jax.main", "--config=configs/pretrain_mnist_dit.py",
            f"--workdir={workdir}", "--config.data.name=digits_sklearn",
            f"--config.data.data_dir={data_dir}", "--config.model.size=tiny",
            f"--config.train.steps={steps}", "--config.train.batch_size=16",
            "--config.train.log_every=1", "--config.train.sample_every=1000000",
            f"--config.train.checkpoint_every={checkpoint_every}",
            "--config.train.keep_checkpoints=100", "--config.optim.warmup_steps=2",
            "--config.sample.num_steps=2", "--config.sample.per_class=1"]
    # The same devices and compiler settings as this test process (conftest), so that runs
    # in and out of it compile to the same programs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return args, env


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _wait_for_checkpoint(proc, workdir, timeout=240):
    deadline = time.time() + timeout
    while not _checkpoint_steps(workdir):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)


def _wait_for_logged_step(proc, workdir, step, timeout=240):
    path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"step {step} was not logged"
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                logged = [int(m.group(1)) for m in re.finditer(r'"step": (\d+)', f.read())]
            if logged and max(logged) >= step:
                return
        time.sleep(0.01)


def _signal_cli_run(workdir, data_dir, sig, checkpoint_every, wait):
    """Starts a long pretraining CLI run, ``wait(proc, workdir)``, sends ``sig``; returns
    ``(returncode, stderr, seconds from the signal to the exit)``."""
    data.load_split("digits_sklearn", "train", data_dir)   # built before the subprocess reads it
    args, env = _cli(workdir, data_dir, steps=100000, checkpoint_every=checkpoint_every)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait(proc, workdir)
        sent = time.time()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        return proc.returncode, stderr, time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_exits_zero(data_dir, tmp_path):
    workdir = str(tmp_path / "term")
    returncode, stderr, elapsed = _signal_cli_run(workdir, data_dir, signal.SIGTERM, 5,
                                                  _wait_for_checkpoint)
    assert returncode == 0, stderr[-3000:]
    print(f"SIGTERM to exit: {elapsed:.2f} s")
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"   # loose: the CPU is shared
    reached = int(re.search(r"SIGTERM: checkpointing step (\d+)", stderr).group(1))
    assert _checkpoint_steps(workdir)[-1] == reached
    assert generators.load_pretrained(workdir).step == reached


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_a_step_boundary_and_exits_130_in_one_line(data_dir, tmp_path):
    workdir = str(tmp_path / "int")
    returncode, stderr, _ = _signal_cli_run(
        workdir, data_dir, signal.SIGINT, 1000,
        lambda proc, workdir: _wait_for_logged_step(proc, workdir, 2))
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: ")
    reached = int(re.search(r"Ctrl-C: checkpointing step (\d+)", stderr).group(1))
    assert reached >= 2 and _checkpoint_steps(workdir)[-1] == reached  # off the save interval
    assert generators.load_pretrained(workdir).step == reached


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(data_dir, tmp_path):
    steps = 30
    data.load_split("digits_sklearn", "train", data_dir)
    workdir = str(tmp_path / "killed")
    args, env = _cli(workdir, data_dir, steps=steps, checkpoint_every=3)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # A random moment after the first checkpoint: once a random step has been logged, plus a
    # random fraction of a step (so the kill may land inside a step or a checkpoint write).
    target, jitter = random.randint(4, steps // 2), random.uniform(0.0, 0.05)
    try:
        _wait_for_checkpoint(proc, workdir)
        _wait_for_logged_step(proc, workdir, target)
        time.sleep(jitter)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()                                          # SIGKILL: no handler runs
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint_steps(workdir)
    assert killed_at and killed_at[-1] < steps, (target, jitter, killed_at)
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {killed_at[-1]}" in resumed.stderr

    config = tiny_config(data_dir, steps=steps, log_every=1, checkpoint_every=3,
                         keep_checkpoints=100)
    full = pretrain.run(config, str(tmp_path / "full"))
    for use_ema in (False, True):
        got = generators.load_pretrained(workdir, use_ema=use_ema)
        assert got.step == steps
        _assert_trees_equal(got.params, full.ema_params if use_ema else full.params)

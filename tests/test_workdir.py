"""A workdir cannot be broken or silently mixed (issue 19): an unreadable newest checkpoint is
moved aside and every reader falls back the same way; a second process on a workdir is refused
at once and a dead holder's lock does not block; a resume with a changed config (or another
base model) is refused unless the changed fields are allowed, and then recorded; Ctrl-C in RL
checkpoints and resumes bit-identically.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import checkpointing, config_checks, generators, pretrain, rl

from conftest import REPO, load_config_file
from test_faults import _cli, _fake_checkpoint, _unreachable, _wait_for_checkpoint
from test_pretrain import tiny_config


def _leaves(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _truncate_state(workdir, step):
    """Cuts every array file of checkpoint ``step`` to half its size (a damaged write)."""
    root = os.path.join(checkpointing.directory(workdir), str(step), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert files
    for path in files:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)


def _moved_aside(workdir):
    folder = os.path.join(workdir, checkpointing.UNREADABLE_FOLDER)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def base_workdir(data_dir, tmp_path_factory):
    """A tiny pretrained DiT on 8×8 digits."""
    workdir = str(tmp_path_factory.mktemp("base"))
    pretrain.run(tiny_config(data_dir, steps=2, checkpoint_every=2), workdir)
    return workdir


def tiny_rl_config(base_workdir, tmp_path, **train):
    config = load_config_file("rl_nft.py")
    config.base.workdir = base_workdir
    config.aux_dir = str(tmp_path / "aux")
    config.rewards = {"contrast": 1.0, "stroke_weight": 0.5}     # no learned net: fast
    config.rollout.update(prompts_per_iter=8, group_size=4, num_steps=2)
    config.train.update(iterations=3, minibatch_size=16, log_every=1, sample_every=1000,
                        checkpoint_every=1, keep_checkpoints=5)
    config.train.update(train)
    config.optim.lr = 1e-3
    config.sample.update(num_steps=2, per_class=1)
    return config


# ----------------------------------------------------------------------------------------------
# 1. An unreadable final checkpoint: moved aside, retrained, and every reader agrees.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_rerun_after_a_corrupted_final_checkpoint_moves_it_aside_and_finishes(
        data_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    config = tiny_config(data_dir, steps=6, checkpoint_every=2)
    workdir = str(tmp_path / "run")
    full = pretrain.run(config, workdir)
    written = checkpointing.steps(workdir)
    assert written[-1] == 6
    _truncate_state(workdir, 6)

    # Readers skip the damaged step (with a warning) and move nothing.
    caplog.clear()
    assert generators.load_pretrained(workdir).step == 4
    generator, reference = generators.load_generator(workdir)
    assert (generator.step, reference) == (4, None)
    assert any("step 6" in w and "unreadable" in w for w in _warnings(caplog))
    assert checkpointing.steps(workdir) == written and _moved_aside(workdir) == []

    # The same command again: step 6 is moved aside, retrained and written again.
    resumed = pretrain.run(config, workdir)
    assert [name.split("-")[0] for name in _moved_aside(workdir)] == ["6"]
    assert checkpointing.steps(workdir) == written
    _assert_trees_equal((resumed.params, resumed.ema_params), (full.params, full.ema_params))
    # ...and again (it used to fail on every rerun with "checkpoint for step 6 already exists").
    pretrain.run(config, workdir)
    loaded = generators.load_pretrained(workdir, use_ema=False)
    assert loaded.step == 6
    _assert_trees_equal(loaded.params, full.params)


@pytest.mark.slow
def test_rl_rerun_after_a_corrupted_final_checkpoint_moves_it_aside_and_finishes(
        base_workdir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    config = tiny_rl_config(base_workdir, tmp_path)
    workdir = str(tmp_path / "rl")
    full = rl.run(config, workdir)
    _truncate_state(workdir, 3)

    caplog.clear()
    policy, _ = generators.load_policy(workdir)          # a reader: falls back, moves nothing
    assert policy.step == 2
    assert generators.load_generator(workdir)[0].step == 2
    assert any("step 3" in w and "unreadable" in w for w in _warnings(caplog))
    assert _moved_aside(workdir) == []

    resumed = rl.run(config, workdir)
    assert [name.split("-")[0] for name in _moved_aside(workdir)] == ["3"]
    _assert_trees_equal((resumed.params, resumed.old_params, resumed.opt_state),
                        (full.params, full.old_params, full.opt_state))
    policy, _ = generators.load_policy(workdir)
    assert policy.step == 3
    _assert_trees_equal(policy.params, full.params)


def test_no_readable_checkpoint_is_an_error_and_nothing_is_moved(tmp_path):
    manager = checkpointing.make_manager(str(tmp_path / "w" / "checkpoints"))
    checkpointing.save(manager, 1, {"x": jnp.arange(4.0)}, {"step": 1}, force=True)
    manager.wait_until_finished()
    _truncate_state(str(tmp_path / "w"), 1)
    with pytest.raises(RuntimeError, match="No readable checkpoint.*Nothing was moved"):
        checkpointing.restore_latest(manager, {"x": jnp.zeros(4)}, move_unreadable=True)
    assert checkpointing.steps(str(tmp_path / "w")) == [1]
    assert _moved_aside(str(tmp_path / "w")) == []


# ----------------------------------------------------------------------------------------------
# 2. The workdir lock.
# ----------------------------------------------------------------------------------------------

_HOLDER = ("import sys, time\n"
           "from normguard_jax import checkpointing\n"
           "lock = checkpointing.workdir_lock(sys.argv[1])\n"
           "lock.__enter__()\n"
           "print('locked', flush=True)\n"
           "time.sleep(600)\n")


def _start_holder(workdir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.communicate()[1][-3000:]
    return proc


def test_a_second_run_on_a_held_workdir_is_refused_at_once_and_a_dead_holder_does_not_block(
        data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generators, "build_generator", _unreachable)
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    workdir = str(tmp_path / "w")
    holder = _start_holder(workdir)
    try:
        named = rf"in use by process {holder.pid} on host '{socket.gethostname()}'"
        t0 = time.time()
        with pytest.raises(checkpointing.WorkdirInUseError, match=named):
            pretrain.run(tiny_config(data_dir), workdir)
        rl_config = tiny_rl_config(str(tmp_path / "base"), tmp_path)
        with pytest.raises(checkpointing.WorkdirInUseError, match=named):
            rl.run(rl_config, workdir)
        assert time.time() - t0 < 10
    finally:
        holder.kill()                          # SIGKILL: the holder cannot clean up
        holder.communicate(timeout=60)
    # The lock file still names the dead holder; it must not block a resume.
    caplog.set_level(logging.WARNING)
    with pytest.raises(AssertionError, match="a model was built"):   # got past the lock
        pretrain.run(tiny_config(data_dir), workdir)
    assert any(f"process {holder.pid}" in w and "no longer running" in w
               for w in _warnings(caplog))
    with checkpointing.workdir_lock(workdir):        # released by the run that got through
        pass


@pytest.mark.slow
def test_a_second_cli_run_on_the_same_workdir_exits_at_once_with_one_line(data_dir, tmp_path):
    from normguard_jax import data
    data.load_split("digits_sklearn", "train", data_dir)
    workdir = str(tmp_path / "w")
    args, env = _cli(workdir, data_dir, steps=100000, checkpoint_every=5)
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(first, workdir)
        second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "the first run stopped"
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={workdir} is in use by process {first.pid} on host")
    assert first.returncode == 0, first_err[-3000:]
    assert generators.load_pretrained(workdir).step > 0      # the first run was not disturbed


# ----------------------------------------------------------------------------------------------
# 3. Resuming with a changed config.
# ----------------------------------------------------------------------------------------------


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("changes", [
    {"optim.lr": 0.5}, {"seed": 7}, {"train.batch_size": 32}, {"train.steps": 12},
    {"optim.schedule": "constant", "train.log_every": 3},
])
def test_pretrain_resume_with_a_changed_config_is_refused_listing_the_fields(
        data_dir, tmp_path, monkeypatch, changes):
    config = tiny_config(data_dir)
    workdir = str(tmp_path / "w")
    _fake_checkpoint(workdir, {"config": config.to_dict(), "step": 1, "image_shape": [8, 8, 1],
                               "num_classes": 10})
    monkeypatch.setattr(generators, "build_generator", _unreachable)
    for path, value in changes.items():
        _set(config, path, value)
    with pytest.raises(config_checks.ConfigError) as error:
        pretrain.run(config, workdir)
    message = str(error.value)
    assert f"differs from the run in {workdir} (checkpoint 1) in {len(changes)} field" in message
    for path, value in changes.items():
        assert f"{path}: " in message and f"-> {value!r}" in message
    _, meta = checkpointing.read_meta(workdir)
    assert meta["config"] == tiny_config(data_dir).to_dict()      # the record is untouched


def _fake_rl_run(tmp_path, config):
    for name in ("base", "other_base"):
        _fake_checkpoint(str(tmp_path / name), {"image_shape": [8, 8, 1]})
    _fake_checkpoint(str(tmp_path / "rl"), {
        "config": config.to_dict(), "iteration": 1, "image_shape": [8, 8, 1],
        "base_workdir": os.path.abspath(config.base.workdir), "base_step": 1})


@pytest.mark.parametrize("changes", [
    {"optim.lr": 0.5}, {"seed": 7}, {"rollout.group_size": 8}, {"train.iterations": 9},
    {"normguard.weight": 0.3}, {"rewards.contrast": 2.0}, {"rewards.classifier_logprob": 1.0},
])
def test_rl_resume_with_a_changed_config_is_refused_listing_the_fields(
        tmp_path, monkeypatch, changes):
    config = tiny_rl_config(str(tmp_path / "base"), tmp_path)
    _fake_rl_run(tmp_path, config)
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    for path, value in changes.items():
        _set(config, path, value)
    with pytest.raises(config_checks.ConfigError, match=r"differs from the run in .* field") as e:
        rl.run(config, str(tmp_path / "rl"))
    for path in changes:
        assert f"{path}: " in str(e.value)
    safe = [p for p in changes if p in config_checks.RESUME_ALLOWED]
    assert (f"--allow_changed={','.join(safe)}" in str(e.value)) == bool(safe)


def test_rl_resume_on_another_base_with_the_same_architecture_is_refused(tmp_path, monkeypatch):
    config = tiny_rl_config(str(tmp_path / "base"), tmp_path)
    _fake_rl_run(tmp_path, config)
    monkeypatch.setattr(generators, "load_pretrained", _unreachable)
    config.base.workdir = str(tmp_path / "other_base")
    with pytest.raises(config_checks.ConfigError, match=r"base\.workdir: .*other_base"):
        rl.run(config, str(tmp_path / "rl"))
    with pytest.raises(config_checks.ConfigError, match="may not change"):
        rl.run(config, str(tmp_path / "rl"), allow_changed=("base.workdir",))


@pytest.mark.slow
def test_rl_resume_on_a_retrained_base_in_the_same_folder_is_refused(
        data_dir, base_workdir, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(base_workdir, base)
    config = tiny_rl_config(base, tmp_path, iterations=1)
    rl.run(config, str(tmp_path / "rl"))
    shutil.rmtree(base)                      # the same folder, the same step, another θ_ref
    other = tiny_config(data_dir, steps=2, checkpoint_every=2)
    other.seed = 1
    pretrain.run(other, base)
    config.train.iterations = 2
    with pytest.raises(config_checks.ConfigError,
                       match=r"not the one the run .* was trained from: parameters"):
        rl.run(config, str(tmp_path / "rl"), allow_changed=("train.iterations",))


@pytest.mark.slow
def test_pretrain_run_is_extended_only_when_allowed_and_the_change_is_recorded(
        data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    pretrain.run(tiny_config(data_dir, steps=4, checkpoint_every=2), workdir)
    longer = tiny_config(data_dir, steps=6, checkpoint_every=2)
    with pytest.raises(config_checks.ConfigError,
                       match=r"train\.steps: 4 -> 6.*--allow_changed=train\.steps"):
        pretrain.run(longer, workdir)
    with pytest.raises(config_checks.ConfigError, match=r"'optim\.lr' may not change"):
        pretrain.run(longer, workdir, allow_changed=("train.steps", "optim.lr"))
    assert checkpointing.read_meta(workdir)[1]["config"]["train"]["steps"] == 4
    state = pretrain.run(longer, workdir, allow_changed=("train.steps",))
    assert int(state.step) == 6
    step, meta = checkpointing.read_meta(workdir)
    assert step == 6 and meta["config"]["train"]["steps"] == 6
    assert [(h["step"], h["changed"]) for h in meta["history"]] == [
        (4, {"train.steps": [4, 6]})]
    pretrain.run(longer, workdir)              # the same config as the newest record: no change


# ----------------------------------------------------------------------------------------------
# 5. Ctrl-C in the RL loop.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_rl_checkpoints_the_iteration_and_resumes_bit_identical(base_workdir,
                                                                         tmp_path):
    config = tiny_rl_config(base_workdir, tmp_path, checkpoint_every=100)
    full = rl.run(config, str(tmp_path / "full"))

    def ctrl_c(i, state, metrics):
        if i == 2:
            raise KeyboardInterrupt

    workdir = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        rl.run(config, workdir, hooks=[ctrl_c])
    assert checkpointing.steps(workdir) == [1, 2]   # Orbax always keeps the first step
    resumed = rl.run(config, workdir)                    # the lock was released, too
    assert int(resumed.iteration) == 3
    _assert_trees_equal((resumed.params, resumed.old_params, resumed.opt_state),
                        (full.params, full.old_params, full.opt_state))

"""The RL loop: every method trains end to end, resume is exact, bad configs fail early."""

import jax
import numpy as np
import pytest

from normguard_jax import config_checks, generators, pretrain, rl
from normguard_jax.objectives import METHODS

from conftest import load_config_file


@pytest.fixture(scope="module")
def base_workdir(data_dir, tmp_path_factory):
    """A tiny pretrained DiT on 8×8 digits (a few steps: enough to have a base model)."""
    config = load_config_file("pretrain_mnist_dit.py")
    config.data.update(name="digits_sklearn", data_dir=data_dir)
    config.model.size = "tiny"
    config.train.update(batch_size=32, steps=4, log_every=2, sample_every=1000,
                        checkpoint_every=4)
    config.sample.update(num_steps=2, per_class=1)
    workdir = str(tmp_path_factory.mktemp("base"))
    pretrain.run(config, workdir)
    return workdir


def tiny_rl_config(method, base_workdir, tmp_path, **normguard):
    config = load_config_file(f"rl_{method}.py")
    config.base.workdir = base_workdir
    config.aux_dir = str(tmp_path / "aux")
    config.rewards = {"contrast": 1.0, "stroke_weight": 0.5}   # no learned net: fast tests
    config.rollout.update(prompts_per_iter=8, group_size=4, num_steps=3)
    if METHODS[method].needs_trajectory:
        config.rollout.sde_window_end = 2
    config.train.update(iterations=2, log_every=1, sample_every=1000, checkpoint_every=1)
    config.train.minibatch_size = min(16, rl.rows_per_iteration(config))
    config.sample.update(num_steps=2, per_class=1)
    config.normguard.update(normguard)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_normguard(method, base_workdir, tmp_path):
    config = tiny_rl_config(method, base_workdir, tmp_path, weight=0.5)
    config.optim.lr = 1e-3
    seen = []
    state = rl.run(config, str(tmp_path / method), hooks=[lambda i, s, m: seen.append(m)])
    assert int(state.iteration) == 2 and len(seen) == 2
    m = jax.device_get(seen[-1])
    for name in ("train/loss", "train/normguard/ratio", "train/normguard/active_frac",
                 "reward/mean", "reward/contrast", "reward/stroke_weight"):
        assert np.isfinite(m[name]), name
    np.testing.assert_allclose(m["reward/mean"],
                               m["reward/contrast"] + 0.5 * m["reward/stroke_weight"], rtol=1e-5)
    base = generators.load_pretrained(base_workdir)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(base.params)))
    assert moved > 0, "the policy did not change"


@pytest.mark.slow
def test_rl_run_with_a_guard_variant_logs_the_gradient_norms(base_workdir, tmp_path):
    config = tiny_rl_config("nft", base_workdir, tmp_path, weight=0.5, aggregate="sigma_bins",
                            sigma_ramp="linear", ramp_low=0.5, log_grad_norms=True)
    config.train.iterations = 1
    seen = []
    rl.run(config, str(tmp_path / "nft"), hooks=[lambda i, s, m: seen.append(m)])
    m = jax.device_get(seen[-1])
    for name in ("base", "penalty", "penalty_unweighted", "ratio"):
        assert np.isfinite(m[f"train/normguard/grad_norm_{name}"]), name
    assert m["train/normguard/grad_norm_base"] > 0
    np.testing.assert_allclose(m["train/normguard/grad_norm_penalty"],
                               0.5 * m["train/normguard/grad_norm_penalty_unweighted"],
                               rtol=1e-5)


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_interrupted_rl_run_resumes_bit_identical(base_workdir, tmp_path):
    config = tiny_rl_config("nft", base_workdir, tmp_path, weight=0.1)
    config.train.iterations = 3
    full = rl.run(config, str(tmp_path / "full"))

    def crash(i, state, metrics):
        if i == 2:                       # after iteration 2 ran but before it was checkpointed
            raise _Crash()

    with pytest.raises(_Crash):
        rl.run(config, str(tmp_path / "resumed"), hooks=[crash])
    resumed = rl.run(config, str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves((full.params, full.old_params, full.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.old_params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("path, value, message", [
    ("method", "ppo", "config.method must be one of"),
    ("train.iterations", 0, "config.train.iterations must be an integer >= 1"),
    ("rollout.group_size", 1, "config.rollout.group_size must be an integer >= 2"),
    ("train.minibatch_size", 12, "config.train.minibatch_size=12 must divide"),
    ("normguard.weight", -1.0, "config.normguard.weight must be >= 0"),
])
def test_bad_rl_config_fails_before_loading_anything(path, value, message, tmp_path):
    config = tiny_rl_config("nft", str(tmp_path / "no_base_needed"), tmp_path)
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        rl.run(config, str(tmp_path / "rl"))
    assert not (tmp_path / "rl").exists()

"""The quickstart job end to end on tiny sizes, and evaluation of RL checkpoints."""

import argparse
import json
import os

import jax
import numpy as np
import pytest

from experiments import norm_analyses, quickstart
from normguard_jax import config_checks, diagnostics, generators

from conftest import load_config_file


def tiny_quickstart_config(data_dir, aux_dir):
    config = load_config_file("quickstart.py")
    config.aux_dir = aux_dir
    p = config.pretrain
    p.data.update(name="digits_sklearn", data_dir=data_dir)
    p.model.size = "tiny"
    p.train.update(batch_size=32, steps=4, log_every=2, sample_every=1000, checkpoint_every=4)
    p.optim.warmup_steps = 1
    p.sample.update(num_steps=2, per_class=1)
    r = config.rl
    r.rewards = {"contrast": 1.0}                      # no learned reward net: fast
    r.rollout.update(prompts_per_iter=4, group_size=4, num_steps=3)
    r.train.update(iterations=2, minibatch_size=16, log_every=1, sample_every=1000,
                   checkpoint_every=1)
    r.optim.lr = 1e-3
    r.sample.update(num_steps=2, per_class=1)
    e = config.evaluate
    e.aux.preset = "tiny"
    e.sample.update(num_steps=3, per_class=6, batch_size=32)
    e.metrics.batch_size = 64
    return config


@pytest.mark.slow
def test_quickstart_runs_both_arms_and_reports_their_norm_ratio(data_dir, tmp_path):
    config = tiny_quickstart_config(data_dir, str(tmp_path / "aux"))
    workdir = str(tmp_path / "qs")
    results = quickstart.run(config, workdir)
    assert list(results) == ["base", "nft unguarded", "nft normguard"]
    assert results["base"]["norm_ratio"]["mean"] == 1.0
    text = open(os.path.join(workdir, "quickstart.md"), encoding="utf-8").read()
    assert text.count("\n| ") == 4  # header + 3 rows

    # The arms differ only in λ, and the guarded one recorded it.
    guarded, _ = generators.load_policy(os.path.join(workdir, "rl_normguard"))
    unguarded, base = generators.load_policy(os.path.join(workdir, "rl_unguarded"))
    assert guarded.config.normguard.weight == config.guard_weight
    assert unguarded.config.normguard.weight == 0.0
    assert guarded.step == unguarded.step == config.rl.train.iterations
    leaves = lambda p: [np.asarray(a) for a in jax.tree.leaves(p)]
    assert any(not np.array_equal(a, b) for a, b in
               zip(leaves(guarded.params), leaves(unguarded.params)))

    # The reported ρ is the diagnostic on the restored θ and θ_ref, computed independently here.
    e = config.evaluate
    labels = np.repeat(np.arange(base.num_classes, dtype=np.int32), e.sample.per_class)
    ratios = diagnostics.velocity_norm_ratios(
        unguarded.velocity, unguarded.params, base.params, labels[:e.sample.batch_size],
        jax.random.fold_in(jax.random.key(e.seed), 0), image_shape=base.image_shape,
        num_steps=e.sample.num_steps, shift=e.sample.shift,
        guidance_scale=e.sample.guidance_scale, null_class=base.num_classes)
    assert results["nft unguarded"]["norm_ratio"]["mean"] == pytest.approx(
        float(np.mean(ratios)), rel=1e-5)

    # evaluate loads an RL workdir as (θ at the asked step, θ_ref), a pretraining one as (θ, None).
    policy, ref = generators.load_generator(os.path.join(workdir, "rl_unguarded"), use_ema=True,
                                          step=1)
    assert policy.step == 1 and ref.step == config.pretrain.train.steps
    generator, none = generators.load_generator(os.path.join(workdir, "base"), use_ema=True,
                                              step=None)
    assert none is None
    for a, b in zip(leaves(generator.params), leaves(base.params)):
        np.testing.assert_array_equal(a, b)

    # norm_analyses' ρ over training (one velocity function for all checkpoints, the newest
    # checkpoint's profile reused) equals restoring each checkpoint on its own.
    run = os.path.join(workdir, "rl_unguarded")
    args = (labels[:8], 0, e.sample.num_steps, e.sample.shift, 1.0)
    newest = norm_analyses.ratio_profile(unguarded, base, *args)
    over = norm_analyses.ratio_over_training(run, unguarded, base, newest, *args)
    assert sorted(over) == [1, 2]
    for step, mean in over.items():
        fresh, fresh_base = generators.load_policy(run, step=step)
        assert mean == pytest.approx(
            float(norm_analyses.ratio_profile(fresh, fresh_base, *args).mean()), rel=1e-6)
    assert over[1] != over[2]
    # Restoring on a given base shares its velocity function and gives the same θ.
    older, same_base = generators.load_policy(run, step=1, base=base)
    fresh, _ = generators.load_policy(run, step=1)
    assert same_base is base and older.velocity is base.velocity
    for a, b in zip(leaves(older.params), leaves(fresh.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="trained from base step"):
        generators.load_policy(run, step=1, base=base._replace(step=base.step + 1))

    # A second call reuses every stage and reports the same numbers.
    again = quickstart.run(config, workdir)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))


def test_norm_analyses_table_renormalises_only_the_unguarded_run(tmp_path):
    def result(reward, fd, recall):
        return {"combined_reward": reward, "quality": {"fd": fd, "recall": recall}}

    def run(weight, evaluation):
        return {"method": "nft", "normguard_weight": weight, "ratio_per_step": [1.1, 0.9],
                "ratio_over_training": {"1": 1.0, "2": 1.0}, "evaluation": evaluation,
                "sensitivity": {}, "batch_level": {}}

    record = {"u": run(0.0, {"plain": result(-5.0, 7.25, 0.5),
                             "renormalised": result(-5.5, 6.0, 0.625)}),
              "g": run(0.1, {"plain": result(-6.0, 8.0, 0.25)})}
    args = argparse.Namespace(out=str(tmp_path / "na"), per_class=1, seed=0, num_steps=2,
                              renormalise_all=False)
    norm_analyses.write(args, record)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "na.md").read_text().splitlines()
            if line.startswith("| `")}
    # columns: method, λ, mean ρ, first / last, reward plain, renormalised, FD plain,
    # renormalised, recall plain, renormalised
    assert rows["`u`"][2:] == ["1.000", "1.100 / 0.900", "-5.000", "-5.500", "7.25", "6.00",
                               "0.500", "0.625"]
    assert rows["`g`"][4:] == ["-6.000", "—", "8.00", "—", "0.250", "—"]
    assert (tmp_path / "na_ratio.png").exists()


def test_bad_quickstart_config_fails_before_anything_runs(tmp_path):
    config = load_config_file("quickstart.py")
    config.rl.rollout.group_size = 1
    with pytest.raises(config_checks.ConfigError, match="config.rl.rollout.group_size"):
        quickstart.run(config, str(tmp_path / "qs"))
    assert not (tmp_path / "qs").exists()
    config = load_config_file("quickstart.py")
    config.arms = "unguarded,typo"
    with pytest.raises(config_checks.ConfigError, match="config.arms must be"):
        quickstart.run(config, str(tmp_path / "qs"))
    with pytest.raises(ValueError, match="quickstart method must be one of"):
        load_config_file("quickstart.py", "ppo")


def test_a_stage_stopped_by_sigterm_stops_the_quickstart(monkeypatch, tmp_path):
    # pretrain.run returns early (as after SIGTERM): no RL and no evaluation may start.
    config = load_config_file("quickstart.py")
    calls = []

    class Stopped:
        step = 3

    monkeypatch.setattr(quickstart.pretrain, "run", lambda c, w: calls.append("pretrain")
                        or Stopped())
    monkeypatch.setattr(quickstart.rl, "run", lambda c, w: calls.append("rl"))
    monkeypatch.setattr(quickstart.evaluate, "run", lambda c, w: calls.append("evaluate"))
    assert quickstart.run(config, str(tmp_path / "qs")) == {}
    assert calls == ["pretrain"]

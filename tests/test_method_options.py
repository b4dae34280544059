"""Method options of the issue "every method complete and faithful", each against an independent
NumPy computation or a closed form: the per-sample API (every objective is a reduction of its
per-row terms; Flow-GRPO's clipped loss on given log-probs), AWM's ``sum_first`` ratio and its
θ_old / θ_EMA parameter sets, the DPO tie rule of the reference tracker, the refusal of a
Flow-GRPO CFG mismatch, NormGuard on the guided velocity, and the configurable rollout policy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import advantages, config_checks, flow, normguard, rl, rl_state
from normguard_jax.objectives import METHODS, awm, dpo, grpo, nft
from normguard_jax.objectives.base import BatchSpec, Context, Rollout

from conftest import load_config_file
from test_objectives import (CASES, NULL, P_OLD, P_REF, P_THETA, SHAPE, _noised,
                             assert_grads_close, bc, ctx_for, dpo_batch, f64, fd_grad, forward_batch,
                             grpo_batch, jx, np_awm_log_prob, np_guided, np_velocity, pm,
                             toy_velocity, value_and_grad)


# ----------------------------------------------------------------------------------------------
# Per-sample API.
# ----------------------------------------------------------------------------------------------


def np_clipped(log_prob, old, adv, eps, adv_max):
    ratio = np.exp(np.float64(log_prob) - old)
    a = np.clip(adv, -adv_max, adv_max)
    return np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps))


def test_grpo_clipped_policy_loss_on_given_log_probs():
    rng = np.random.default_rng(0)
    lp, old = rng.normal(size=16) * 0.01, rng.normal(size=16) * 0.01
    adv = rng.normal(size=16) * 3
    got = grpo.clipped_policy_loss(jnp.float32(lp), jnp.float32(old), jnp.float32(adv),
                                   clip_range=0.005, adv_clip_max=5.0)
    assert got.shape == (16,)
    np.testing.assert_allclose(np.asarray(got), np_clipped(lp, old, adv, 0.005, 5.0),
                               rtol=1e-5, atol=1e-7)
    # its gradient is the surrogate's: -A·ratio where unclipped, 0 where the clip is active
    g = jax.grad(lambda l: jnp.sum(grpo.clipped_policy_loss(l, jnp.float32(old), jnp.float32(adv),
                                                            0.005, 5.0)))(jnp.float32(lp))
    ratio = np.exp(lp - old)
    a = np.clip(adv, -5, 5)
    active = -a * ratio >= -a * np.clip(ratio, 1 - 0.005, 1 + 0.005)
    np.testing.assert_allclose(np.asarray(g), np.where(active, -a * ratio, 0.0), rtol=1e-4,
                               atol=1e-7)


# method -> (per-sample key, reduction of the per-sample dict giving the objective's loss)
REDUCTIONS = {
    "grpo": lambda t, c: jnp.mean(t["policy_loss"]) + (c.kl_weight * jnp.mean(t["kl"])
                                                       if c.kl_weight > 0 else 0.0),
    "nft": lambda t, c: c.adv_clip_max * jnp.mean(t["loss"]) + (
        c.kl_weight * jnp.mean(t["kl"]) if c.kl_weight > 0 else 0.0),
    "awm": lambda t, c: jnp.mean(t["policy_loss"]) + c.kl_weight * jnp.mean(t["kl"])
    + c.ema_kl_weight * jnp.mean(t["ema_kl"]),
    "dpo": lambda t, c: jnp.mean(t["loss"]),
    "ram": lambda t, c: jnp.mean(t["loss"]),
    "am": lambda t, c: jnp.mean(t["weight"] * t["error"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_is_a_reduction_of_its_per_sample_terms(case):
    cfg, batch = CASES[case](8)
    method = next(m for m in METHODS.values() if isinstance(cfg, m.config_cls))
    if method.name not in REDUCTIONS:
        pytest.skip(f"no reduction written down here for method {method.name!r}")
    assert method.make_per_sample is not None, method.name
    ctx = ctx_for()
    terms = method.make_per_sample(cfg)(jx(P_THETA), jx(batch), ctx)
    rows = jax.tree.leaves(batch["cond"])[0].shape[0]
    for key, value in terms.items():
        assert value.shape[0] == rows, (key, value.shape)
    loss, _ = method.make_objective(cfg)(jx(P_THETA), jx(batch), ctx)
    if method.name == "awm":
        terms.setdefault("kl", jnp.zeros(rows))
        terms.setdefault("ema_kl", jnp.zeros(rows))
    reduced = REDUCTIONS[method.name](terms, cfg)
    assert float(reduced) == float(loss)    # the same operations: bit-identical


def test_per_sample_terms_match_numpy():
    # NFT: v±, x0̂±, weights, r
    cfg = nft.NFTConfig(beta=0.7, kl_weight=0.1)
    batch = forward_batch()
    t = nft.make_per_sample(cfg)(jx(P_THETA), jx(batch), ctx_for())
    b = f64(batch)
    x, _ = _noised(b)
    v = np_velocity(f64(P_THETA), x, b["sigma"], batch["cond"])
    v_old = np_velocity(f64(P_OLD), x, b["sigma"], batch["cond"])
    v_pos, v_neg = 0.7 * v + 0.3 * v_old, 1.7 * v_old - 0.7 * v
    x0_pos = x - bc(b["sigma"]) * v_pos
    np.testing.assert_allclose(np.asarray(t["v_pos"]), v_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t["v_neg"]), v_neg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t["x0_pos"]), x0_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t["weight_pos"]),
                               np.maximum(pm(np.abs(x0_pos - b["x0"])), 1e-5), rtol=1e-5)
    a = np.clip(b["advantage"], -5, 5)
    np.testing.assert_allclose(np.asarray(t["r"]), np.clip(a / 10 + 0.5, 0, 1), rtol=1e-6)
    # DPO: winner / loser errors
    db = dpo_batch()
    t = dpo.make_per_sample(dpo.DPOConfig())(jx(P_THETA), jx(db), ctx_for())
    d = f64(db)
    for key, x0 in (("w", d["x0_w"]), ("l", d["x0_l"])):
        xs = bc(1 - d["sigma"]) * x0 + bc(d["sigma"]) * d["noise"]
        for name, p in (("policy", P_THETA), ("ref", P_REF)):
            e = pm((np_velocity(f64(p), xs, d["sigma"], db["cond"]) - (d["noise"] - x0)) ** 2)
            np.testing.assert_allclose(np.asarray(t[f"{name}_error_{key}"]), e, rtol=1e-5)
    # AWM: per-step std of the elbo weighting
    t = awm.make_per_sample(awm.AWMConfig())(jx(P_THETA), jx(batch), ctx_for())
    np.testing.assert_allclose(np.asarray(t["kl_std"]),
                               0.7 * np.sqrt(b["sigma"] / (1 - np.clip(b["sigma"], 0, 0.99))),
                               rtol=1e-5)
    # GRPO: per-row clipped loss equals clipped_policy_loss on the row's log-probs
    gcfg = grpo.GRPOConfig(clip_range=0.01, kl_weight=0.3)
    t = grpo.make_per_sample(gcfg)(jx(P_THETA), jx(grpo_batch()), ctx_for())
    np.testing.assert_allclose(
        np.asarray(t["policy_loss"]),
        np_clipped(np.asarray(t["log_prob"]), grpo_batch()["old_log_prob"].astype(np.float64),
                   grpo_batch()["advantage"], 0.01, 5.0), rtol=1e-4, atol=1e-6)
    assert t["kl"].shape == (8,)


# ----------------------------------------------------------------------------------------------
# AWM: sum_first and the two parameter sets.
# ----------------------------------------------------------------------------------------------


def sum_first_batch(n=4, d=3, seed=5):
    rng = np.random.default_rng(seed)
    return {"x0": rng.uniform(-1, 1, size=(n,) + SHAPE).astype(np.float32),
            "noise": rng.normal(size=(n, d) + SHAPE).astype(np.float32),
            "sigma": rng.uniform(0.05, 0.95, size=(n, d)).astype(np.float32),
            "cond": (np.arange(n) % 3).astype(np.int32),
            "advantage": np.asarray([1.5, -0.7, 6.0, -2.0][:n], np.float32)}


def np_awm_sum_first(p, batch, cfg, p_old, p_ema, p_ref):
    b = f64(batch)
    n, d = b["sigma"].shape
    lps, old_lps, kl, ema_kl = [], [], [], []
    for j in range(d):
        s, eps_ = b["sigma"][:, j], b["noise"][:, j]
        x = bc(1 - s) * b["x0"] + bc(s) * eps_
        target = eps_ - b["x0"]
        v = np_velocity(p, x, s, batch["cond"])
        lps.append(np_awm_log_prob(v, target, s, cfg.weighting, cfg.ghuber_power))
        old_v = np_velocity(p_old, x, s, batch["cond"])
        old_lps.append(np_awm_log_prob(old_v, target, s, cfg.weighting, cfg.ghuber_power)
                       if cfg.off_policy else lps[-1])
        kl.append(pm((v - np_velocity(p_ref, x, s, batch["cond"])) ** 2))
        ema_kl.append(pm((v - np_velocity(p_ema, x, s, batch["cond"])) ** 2))
    ratio = np.exp(np.sum(lps, axis=0) - np.sum(old_lps, axis=0))
    adv = np.clip(b["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max) / cfg.adv_clip_max \
        * cfg.advantage_max
    e = cfg.clip_range
    loss = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - e, 1 + e)))
    return loss + cfg.kl_weight * np.mean(kl) + cfg.ema_kl_weight * np.mean(ema_kl), ratio


P_ROLL = {"a": np.float32(0.93), "b": np.float32(0.25),
          "c": np.asarray([0.12, -0.21, 0.31, 0.05], np.float32).reshape(4, 1)}


@pytest.mark.parametrize("old_params, ema_params", [("ema", "ema"), ("rollout", "ema"),
                                                    ("ema", "rollout")])
def test_awm_sum_first_and_parameter_sets_match_numpy(old_params, ema_params):
    cfg = awm.AWMConfig(weighting="t", off_policy=True, clip_range=0.05, kl_weight=0.2,
                        ema_kl_weight=0.5, loss_type="sum_first", old_params=old_params,
                        ema_params=ema_params)
    sets = {"ema": P_OLD, "rollout": P_ROLL}
    batch = sum_first_batch()
    ctx = Context(velocity=toy_velocity, ref_params=jx(P_REF), old_params=jx(P_OLD),
                  rollout_params=jx(P_ROLL))
    loss, aux, grads = value_and_grad(awm.make_objective(cfg), jx(P_THETA), jx(batch), ctx)
    f = lambda p: np_awm_sum_first(p, batch, cfg, f64(sets[old_params]),  # noqa: E731
                                   f64(sets[ema_params]), f64(P_REF))
    expected, ratio = f(f64(P_THETA))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(aux.metrics["awm/clipfrac"]),
                               np.mean(np.abs(ratio - 1) > 0.05))
    assert np.any(np.abs(ratio - 1) > 0.05), ratio      # the clip engages
    assert_grads_close(grads, fd_grad(lambda p: f(p)[0], P_THETA))
    terms = awm.make_per_sample(cfg)(jx(P_THETA), jx(batch), ctx)
    assert terms["ratio"].shape == (4,) and terms["log_prob"].shape == (12,)
    np.testing.assert_allclose(np.asarray(terms["ratio"]), ratio, rtol=1e-4)


def test_awm_sum_first_with_one_draw_equals_exp_first():
    cfg = awm.AWMConfig(off_policy=True, clip_range=0.2)
    batch = forward_batch()
    one = dict(batch, noise=batch["noise"][:, None], sigma=batch["sigma"][:, None])
    a = awm.make_objective(cfg)(jx(P_THETA), jx(batch), ctx_for())[0]
    b = awm.make_objective(awm.AWMConfig(off_policy=True, clip_range=0.2,
                                         loss_type="sum_first"))(jx(P_THETA), jx(one), ctx_for())[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_awm_sum_first_batch_regroups_the_draws_of_each_sample():
    n, d = 8, 3
    rng = np.random.default_rng(0)
    ro = Rollout(labels=jnp.arange(n) % 3, images=jnp.asarray(rng.normal(size=(n,) + SHAPE),
                                                              jnp.float32),
                 rewards=jnp.zeros(n), advantages=jnp.arange(n, dtype=jnp.float32),
                 trajectory=None)
    spec = BatchSpec(prompts=2, group_size=4, renoise_draws=d, sigma_sampler=flow.uniform_sigmas)
    flat = awm.training_batch(ro, jax.random.key(1), spec)
    spec_s = BatchSpec(prompts=2, group_size=4, renoise_draws=d, sigma_sampler=flow.uniform_sigmas,
                       objective=awm.AWMConfig(loss_type="sum_first"))
    grouped = awm.training_batch(ro, jax.random.key(1), spec_s)
    assert awm.rows(spec) == n * d and awm.rows(spec_s) == n
    assert grouped["noise"].shape == (n, d) + SHAPE and grouped["sigma"].shape == (n, d)
    for j in range(d):   # draw j of sample i is row j·N + i of the flat batch
        np.testing.assert_array_equal(grouped["noise"][:, j], flat["noise"][j * n:(j + 1) * n])
        np.testing.assert_array_equal(grouped["sigma"][:, j], flat["sigma"][j * n:(j + 1) * n])
    np.testing.assert_array_equal(grouped["x0"], ro.images)
    np.testing.assert_array_equal(grouped["advantage"], ro.advantages)


def test_awm_default_is_the_reference_off_policy_setting_with_both_sets_the_ema():
    cfg = awm.AWMConfig()
    assert (cfg.loss_type, cfg.old_params, cfg.ema_params) == ("exp_first", "ema", "ema")
    assert not cfg.needs_rollout_params


# ----------------------------------------------------------------------------------------------
# DPO tie rule.
# ----------------------------------------------------------------------------------------------


def np_tracker_dpo(rewards):
    """Flow-GRPO's PerPromptStatTracker, type "dpo", written out: +1 / -1 per group."""
    out = []
    for row in rewards:
        max_idx, min_idx = int(np.argmax(row)), int(np.argmin(row))
        if max_idx == min_idx:
            min_idx, max_idx = 0, 1
        a = np.zeros(len(row))
        a[max_idx], a[min_idx] = 1.0, -1.0
        out.append(a)
    return np.asarray(out)


def test_dpo_pairs_tie_rules():
    rewards = np.asarray([[0.1, 0.9, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0], [0.3, 0.1, 0.2, 0.8],
                          [2.0, 2.0, 2.0, 2.0]], np.float32)
    w, l, valid = advantages.dpo_pairs(jnp.asarray(rewards), ties="pair")
    tracker = np_tracker_dpo(rewards)
    np.testing.assert_array_equal(np.asarray(w), np.argmax(tracker, axis=1))
    np.testing.assert_array_equal(np.asarray(l), np.argmin(tracker, axis=1))
    assert np.all(np.asarray(valid))
    w, l, valid = advantages.dpo_pairs(jnp.asarray(rewards))          # default: drop
    np.testing.assert_array_equal(np.asarray(valid), [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(w), [1, 0, 3, 0])
    np.testing.assert_array_equal(np.asarray(l), [0, 0, 1, 0])
    with pytest.raises(ValueError, match="ties"):
        advantages.dpo_pairs(jnp.asarray(rewards), ties="random")


def test_dpo_training_batch_follows_the_configured_tie_rule():
    k = 4
    images = jnp.arange(8, dtype=jnp.float32)[:, None, None, None] * jnp.ones((1,) + SHAPE)
    rewards = jnp.asarray([0.1, 0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0])
    ro = Rollout(labels=jnp.asarray([0] * 4 + [1] * 4), images=images, rewards=rewards,
                 advantages=jnp.zeros(8), trajectory=None)
    for ties, winners, losers, valid in (("drop", [1, 4], [0, 4], [1, 0]),
                                         ("pair", [1, 5], [0, 4], [1, 1])):
        spec = BatchSpec(prompts=2, group_size=k, sigma_sampler=flow.uniform_sigmas,
                         objective=dpo.DPOConfig(ties=ties))
        batch = dpo.training_batch(ro, jax.random.key(0), spec)
        np.testing.assert_array_equal(batch["x0_w"][:, 0, 0, 0], winners)
        np.testing.assert_array_equal(batch["x0_l"][:, 0, 0, 0], losers)
        np.testing.assert_array_equal(batch["valid"], valid)
    assert dpo.DPOConfig().ties == "drop"
    assert load_config_file("rl_dpo.py").objective.ties == "drop"


# ----------------------------------------------------------------------------------------------
# Flow-GRPO: the objective's CFG scale is the rollout's.
# ----------------------------------------------------------------------------------------------


def test_grpo_refuses_a_cfg_mismatch_and_derives_the_scale_from_the_rollout():
    config = load_config_file("rl_grpo.py")
    config.rollout.guidance_scale = 2.0
    with pytest.raises(config_checks.ConfigError, match="objective.guidance_scale"):
        METHODS["grpo"].validate(config)
    config.objective.guidance_scale = 2.0
    METHODS["grpo"].validate(config)
    assert rl.objective_config(config, null_class=NULL).guidance_scale == 2.0
    del config.objective["guidance_scale"]
    METHODS["grpo"].validate(config)
    assert rl.objective_config(config, null_class=NULL).guidance_scale == 2.0


# ----------------------------------------------------------------------------------------------
# NormGuard on the conditional or the guided velocity.
# ----------------------------------------------------------------------------------------------


def np_penalty_terms(v, v_ref):
    n, n_ref = np.sqrt((v**2).reshape(len(v), -1).sum(1)), np.sqrt(
        (v_ref**2).reshape(len(v), -1).sum(1))
    excess = n / n_ref - 1
    return np.mean(np.maximum(excess, 0)), np.mean(n / n_ref)


@pytest.mark.parametrize("velocity", ["conditional", "guided"])
@pytest.mark.parametrize("method", ["nft", "grpo_guided"])
def test_normguard_guards_the_configured_velocity(velocity, method):
    w = 2.5
    ng = normguard.NormGuardConfig(weight=0.7, velocity=velocity, guidance_scale=w,
                                   null_class=NULL)
    if method == "nft":
        cfg = nft.NFTConfig(kl_weight=0.0)
        batch = forward_batch()
        b = f64(batch)
        x, _ = _noised(b)
    else:   # Flow-GRPO trained with CFG: its points are already guided
        cfg = grpo.GRPOConfig(guidance_scale=w, null_class=NULL)
        batch = grpo_batch()
        b = f64(batch)
        x = b["x"]
    base = METHODS[method.split("_")[0]].make_objective(cfg)
    guarded = normguard.with_normguard(base, ng)
    loss, aux, grads = value_and_grad(guarded, jx(P_THETA), jx(batch), ctx_for())
    base_loss, _, base_grads = value_and_grad(base, jx(P_THETA), jx(batch), ctx_for())
    cond = batch["cond"]

    def vel(p):
        if velocity == "guided":
            return np_guided(p, x, b["sigma"], cond, w)
        return np_velocity(p, x, b["sigma"], cond)

    penalty, ratio = np_penalty_terms(vel(f64(P_THETA)), vel(f64(P_REF)))
    assert penalty > 0                       # the hinge is active for some samples
    np.testing.assert_allclose(float(aux.metrics["normguard/penalty"]), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(aux.metrics["normguard/ratio"]), ratio, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base_loss) + 0.7 * penalty, rtol=1e-5)
    pen_grad = fd_grad(lambda p: np_penalty_terms(vel(p), vel(f64(P_REF)))[0], P_THETA)
    expected = {k: np.asarray(base_grads[k]) + 0.7 * pen_grad[k] for k in pen_grad}
    assert_grads_close(grads, expected)


def test_normguard_guided_with_scale_one_is_the_conditional_transform():
    cfg = nft.NFTConfig()
    batch = forward_batch()
    a = normguard.with_normguard(nft.make_objective(cfg), normguard.NormGuardConfig(weight=0.5))
    b = normguard.with_normguard(nft.make_objective(cfg), normguard.NormGuardConfig(
        weight=0.5, velocity="guided", guidance_scale=1.0, null_class=NULL))
    assert float(a(jx(P_THETA), jx(batch), ctx_for())[0]) == float(
        b(jx(P_THETA), jx(batch), ctx_for())[0])


def test_rl_normguard_velocity_defaults_to_what_the_rollout_samples_with():
    config = load_config_file("rl_nft.py")
    assert config.normguard.velocity == "auto"
    config.rollout.guidance_scale = 1.5
    ng = rl.normguard_config(config, null_class=NULL)
    assert (ng.velocity, ng.guidance_scale, ng.null_class) == ("guided", 1.5, NULL)
    config.rollout.guidance_scale = 1.0
    assert rl.normguard_config(config, null_class=NULL).velocity == "conditional"
    config.normguard.velocity = "conditional"
    config.rollout.guidance_scale = 3.0
    assert rl.normguard_config(config, null_class=NULL).velocity == "conditional"


# ----------------------------------------------------------------------------------------------
# Rollout policy.
# ----------------------------------------------------------------------------------------------


def test_rollout_policy_defaults_follow_the_references():
    expected = {"grpo": "current", "nft": "old", "awm": "current", "dpo": "current",
                "ram": "old"}
    for name, policy in expected.items():
        if name not in METHODS:
            continue
        config = load_config_file(f"rl_{name}.py")
        assert config.rollout.policy == "default"
        assert rl.rollout_policy(config) == policy, name
        config.rollout.policy = "current"
        assert rl.rollout_policy(config) == "current"


def test_train_iteration_samples_with_the_configured_policy():
    """The rollout program receives θ_old with policy "old" and θ with "current"."""
    seen = []

    def fake_rollout(params, labels, key, requests=None, null=None):
        seen.append(params)
        n = labels.shape[0]
        ro = Rollout(labels=labels, images=jnp.zeros((n,) + SHAPE), rewards=jnp.zeros(n),
                     advantages=jnp.zeros(n), trajectory=None)
        return ro, {}

    def fake_update(params, opt_state, old, ref, batch, ok, rollout_params):
        return params, opt_state, {"skipped": jnp.float32(0)}

    state = rl_state.RLState(iteration=jnp.int32(0), updates=jnp.int32(0), params=jx(P_THETA),
                             old_params=jx(P_OLD), opt_state=(), rng=jax.random.key_data(
                                 jax.random.key(0)))
    for policy, expected in (("old", P_OLD), ("current", P_THETA)):
        programs = rl.Programs(rollout=fake_rollout, batch=lambda ro, key: {"x": ro.images},
                               update=fake_update, old_update=lambda o, p, u: o,
                               place=lambda t: t, rollout_policy=policy)
        rl.train_iteration(state, jx(P_REF), programs=programs, num_classes=3, prompts=2,
                           group_size=2, inner_epochs=1, rows=4, minibatch_size=4,
                           schedule=lambda step: 0.0)
        assert float(seen[-1]["a"]) == float(expected["a"])


def test_runs_recorded_before_the_new_fields_resume_only_with_their_legacy_values():
    config = load_config_file("rl_nft.py")
    recorded = config.to_dict()
    del recorded["rollout"]["policy"], recorded["normguard"]["velocity"]
    changes = config_checks.changed_fields(recorded, config)
    assert set(changes) == {"rollout.policy", "normguard.velocity"}     # defaults differ
    config.rollout.policy, config.normguard.velocity = "current", "points"
    assert config_checks.changed_fields(recorded, config) == {}
    # the legacy values compute what the run computed: rollouts from θ, hinge on its points
    assert rl.rollout_policy(config) == "current"
    assert rl.normguard_config(config, null_class=NULL).velocity == "points"


def test_update_hands_theta_at_rollout_time_to_awm():
    """rl.update (jitted as the loop jits it) with AWM's θ_old = θ at rollout time equals the
    objective on a Context holding those parameters; train_iteration passes a copy of θ taken
    before the iteration's updates."""
    import optax
    cfg = awm.AWMConfig(off_policy=True, old_params="rollout", ema_params="rollout",
                        clip_range=0.05)
    assert cfg.needs_rollout_params
    objective = awm.make_objective(cfg)
    batch = jx(forward_batch())
    opt = optax.sgd(0.1)
    upd = jax.jit(lambda p, s, o, r, b, ok, rp: rl.update(p, s, o, r, b, ok, rp,
                                                         objective=objective, optimizer=opt,
                                                         velocity=toy_velocity))
    _, _, m = upd(jx(P_THETA), opt.init(jx(P_THETA)), jx(P_OLD), jx(P_REF), batch,
                  jnp.bool_(True), jx(P_ROLL))
    ctx = Context(velocity=toy_velocity, ref_params=jx(P_REF), old_params=None,
                  rollout_params=jx(P_ROLL))
    np.testing.assert_allclose(float(m["loss"]),
                               float(objective(jx(P_THETA), batch, ctx)[0]), rtol=1e-6)
    seen = []

    def fake_update(params, opt_state, old, ref, b, ok, rollout_params):
        seen.append(rollout_params)
        return jax.tree.map(lambda a: a + 1.0, params), opt_state, {"skipped": jnp.float32(0)}

    def fake_rollout(params, labels, key, requests=None, null=None):
        n = labels.shape[0]
        return Rollout(labels=labels, images=jnp.zeros((n,) + SHAPE), rewards=jnp.zeros(n),
                       advantages=jnp.zeros(n), trajectory=None), {}

    state = rl_state.RLState(iteration=jnp.int32(0), updates=jnp.int32(0), params=jx(P_THETA),
                             old_params=jx(P_OLD), opt_state=(), rng=jax.random.key_data(
                                 jax.random.key(0)))
    programs = rl.Programs(rollout=fake_rollout, batch=lambda ro, key: {"x": ro.images},
                           update=fake_update, old_update=lambda o, p, u: o, place=lambda t: t,
                           needs_rollout_params=True)
    rl.train_iteration(state, jx(P_REF), programs=programs, num_classes=3, prompts=2,
                       group_size=2, inner_epochs=1, rows=4, minibatch_size=2,
                       schedule=lambda step: 0.0)
    assert len(seen) == 2
    for rp in seen:      # the second update still sees θ before the first one
        np.testing.assert_array_equal(np.asarray(rp["a"]), P_THETA["a"])

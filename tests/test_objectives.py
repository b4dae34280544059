"""RL objectives: values and gradients against float64 NumPy re-implementations and finite
differences, closed-form special cases, the NormGuard contract, and sharded / pmap agreement.

The generator is a linear toy velocity ``v = a·x + b·σ + c[cond]`` on 4×4×1 images, with
three classes and the null label 3. Every NumPy loss below is written from the method's formula,
independently of the library code.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from normguard_jax import flow, normguard, rl_state
from normguard_jax.objectives import METHODS, am, awm, dpo, grpo, nft, ram
from normguard_jax.objectives.base import (BatchSpec, Context, Rollout, renoised_rollout_batch,
                                           renoised_rows)

NULL = 3
SHAPE = (4, 4, 1)
SIGMAS = np.asarray(flow.inference_sigmas(10, shift=3.0), np.float64)


# ----------------------------------------------------------------------------------------------
# Toy generator, parameters and NumPy helpers.
# ----------------------------------------------------------------------------------------------


def toy_velocity(params, x, sigma, cond):
    return (params["a"] * x + params["b"] * sigma[:, None, None, None]
            + params["c"][cond][:, None, None, :])


def _params(a, b, c):
    return {"a": np.float32(a), "b": np.float32(b), "c": np.asarray(c, np.float32).reshape(4, 1)}


P_OLD = _params(0.9, 0.2, [0.1, -0.2, 0.3, 0.05])
P_THETA = _params(0.95, 0.3, [0.15, -0.24, 0.33, 0.05])
P_REF = _params(0.8, 0.1, [0.0, -0.1, 0.2, 0.0])


def jx(p):
    return jax.tree.map(jnp.asarray, p)


def f64(p):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), p)


def bc(s):
    return np.asarray(s)[:, None, None, None]


def pm(a):
    return a.reshape(a.shape[0], -1).mean(axis=1)


def np_velocity(p, x, sigma, cond):
    return p["a"] * x + p["b"] * bc(sigma) + p["c"][cond][:, None, None, :]


def np_guided(p, x, sigma, cond, w):
    v_c = np_velocity(p, x, sigma, cond)
    v_u = np_velocity(p, x, sigma, np.full_like(cond, NULL))
    return v_u + w * (v_c - v_u)


def fd_grad(f, p, h=1e-6):
    """Central finite differences of a float64 NumPy function of the parameter dict."""
    p = f64(p)
    grads = {}
    for name in ("a", "b"):
        up, dn = dict(p), dict(p)
        up[name], dn[name] = p[name] + h, p[name] - h
        grads[name] = (f(up) - f(dn)) / (2 * h)
    gc = np.zeros_like(p["c"])
    for idx in np.ndindex(gc.shape):
        cu, cd = p["c"].copy(), p["c"].copy()
        cu[idx] += h
        cd[idx] -= h
        gc[idx] = (f({**p, "c": cu}) - f({**p, "c": cd})) / (2 * h)
    grads["c"] = gc
    return grads


def assert_grads_close(g_jax, g_np, rtol=2e-3, atol=1e-6):
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(np.asarray(g_jax[name]), g_np[name], rtol=rtol, atol=atol,
                                   err_msg=f"gradient w.r.t. {name}")


def ctx_for(velocity=toy_velocity):
    return Context(velocity=velocity, ref_params=jx(P_REF), old_params=jx(P_OLD))


def value_and_grad(objective, params, batch, ctx):
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, ctx)
    return loss, aux, grads


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------


def _sde_np(x, v, s, sn, smax, a):
    sp = np.where(s == 1.0, smax, s)
    g = a * np.sqrt(s / (1.0 - sp))
    dt = sn - s
    mean = x + bc(dt) * (v + bc(g**2 / (2 * s)) * (x + bc(1 - s) * v))
    return mean, g * np.sqrt(-dt), g          # mean, step std, std used by the reference KL


def _cps_np(x, v, s, sn, eta):
    std = sn * math.sin(eta * math.pi / 2)
    x0_hat, eps_hat = x - bc(s) * v, x + bc(1 - s) * v
    mean = bc(1 - sn) * x0_hat + bc(np.sqrt(np.maximum(sn**2 - std**2, 0.0))) * eps_hat
    return mean, std, std


def _gauss_lp_np(x_next, mean, std):
    return pm(-(x_next - mean) ** 2 / (2 * bc(std) ** 2) - bc(np.log(std))
              - 0.5 * math.log(2 * math.pi))


def _cps_lp_np(x_next, mean, std):
    return -pm((x_next - mean) ** 2)


_NP_STEPS = {
    "sde": (lambda x, v, b, a: _sde_np(x, v, b["sigma"], b["sigma_next"], b["sigma_max"], a),
            _gauss_lp_np),
    "cps": (lambda x, v, b, a: _cps_np(x, v, b["sigma"], b["sigma_next"], a), _cps_lp_np),
}
_NOISE = {"sde": 0.7, "cps": 0.8}


def grpo_batch(b=8, sampler="sde", seed=0, advantage=None):
    """Transitions sampled from the OLD params with the NumPy step; old log-probs in float64."""
    rng = np.random.default_rng(seed)
    steps = np.arange(b) % 10                                   # includes σ = 1 and σ_next = 0
    s, sn = SIGMAS[steps], SIGMAS[steps + 1]
    x = rng.normal(size=(b,) + SHAPE).astype(np.float32)
    cond = (np.arange(b) % 3).astype(np.int32)
    base = {"x": x, "sigma": s.astype(np.float32), "sigma_next": sn.astype(np.float32),
            "sigma_max": np.full(b, SIGMAS[1], np.float32), "cond": cond}
    b64 = f64(base)
    step, log_prob = _NP_STEPS[sampler]
    mean, std, _ = step(b64["x"], np_velocity(f64(P_OLD), b64["x"], b64["sigma"], cond), b64,
                        _NOISE[sampler])
    x_next = (mean + bc(std) * rng.normal(size=x.shape)).astype(np.float32)
    old = log_prob(x_next.astype(np.float64), mean, std)
    if advantage is None:
        advantage = rng.normal(size=b) * 1.5
        advantage[1] = 7.0                                      # exercises adv_clip_max
    base.update(x_next=x_next, old_log_prob=old.astype(np.float32),
                advantage=np.asarray(advantage, np.float32))
    return base


def np_grpo_loss(p, batch, cfg: grpo.GRPOConfig, p_ref):
    b = f64(batch)
    cond = batch["cond"]
    if cfg.guidance_scale != 1.0:
        vel = functools.partial(np_guided, w=cfg.guidance_scale)
    else:
        vel = np_velocity
    step, log_prob = _NP_STEPS[cfg.sampler]
    a = _NOISE[cfg.sampler] if cfg.noise_level is None else cfg.noise_level
    mean, std, kl_std = step(b["x"], vel(p, b["x"], b["sigma"], cond), b, a)
    ratio = np.exp(log_prob(b["x_next"], mean, std) - b["old_log_prob"])
    adv = np.clip(b["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
    eps = cfg.clip_range
    loss = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)))
    if cfg.kl_weight > 0:
        mean_ref = step(b["x"], vel(p_ref, b["x"], b["sigma"], cond), b, a)[0]
        kl_std = np.broadcast_to(kl_std, (len(cond),))
        safe = np.where(kl_std > 0, kl_std, 1.0)
        kl = np.where(kl_std > 0, pm((mean - mean_ref) ** 2) / (2 * safe**2), 0.0)
        loss = loss + cfg.kl_weight * np.mean(kl)
    return loss


def forward_batch(b=8, seed=1, advantage=None):
    rng = np.random.default_rng(seed)
    if advantage is None:
        advantage = rng.normal(size=b) * 1.5
        advantage[0] = -6.5                                     # beyond the ±5 clip
    return {"x0": rng.uniform(-1, 1, size=(b,) + SHAPE).astype(np.float32),
            "noise": rng.normal(size=(b,) + SHAPE).astype(np.float32),
            "sigma": rng.uniform(0.05, 0.95, size=b).astype(np.float32),
            "cond": (np.arange(b) % 3).astype(np.int32),
            "advantage": np.asarray(advantage, np.float32)}


def dpo_batch(b=8, seed=2):
    rng = np.random.default_rng(seed)
    valid = np.ones(b, np.float32)
    valid[-1] = 0.0
    return {"x0_w": rng.uniform(-1, 1, size=(b,) + SHAPE).astype(np.float32),
            "x0_l": rng.uniform(-1, 1, size=(b,) + SHAPE).astype(np.float32),
            "noise": rng.normal(size=(b,) + SHAPE).astype(np.float32),
            "sigma": rng.uniform(0.05, 0.95, size=b).astype(np.float32),
            "cond": (np.arange(b) % 3).astype(np.int32), "valid": valid}


def am_batch(b=8, seed=3):
    """Adjoint-matching rows: states, memoryless steps (some ending at σ' = 0), adjoints."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.1, 1.0, size=b).astype(np.float32)
    sigma[0] = 1.0
    sigma_next = (sigma * rng.uniform(0.3, 0.9, size=b)).astype(np.float32)
    sigma_next[-1] = 0.0
    return {"x": rng.normal(size=(b,) + SHAPE).astype(np.float32), "sigma": sigma,
            "sigma_next": sigma_next, "cond": (np.arange(b) % 3).astype(np.int32),
            "adjoint": rng.normal(size=(b,) + SHAPE).astype(np.float32)}


def _noised(b):
    x = bc(1 - b["sigma"]) * b["x0"] + bc(b["sigma"]) * b["noise"]
    return x, b["noise"] - b["x0"]


# ----------------------------------------------------------------------------------------------
# Flow-GRPO.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, kl_weight, guidance", [
    ("sde", 0.0, 1.0), ("sde", 0.3, 1.0), ("cps", 0.3, 1.0), ("sde", 0.3, 2.5)])
def test_grpo_value_and_gradient_match_numpy(sampler, kl_weight, guidance):
    cfg = grpo.GRPOConfig(sampler=sampler, clip_range=0.01, kl_weight=kl_weight,
                          guidance_scale=guidance, null_class=NULL)
    batch = grpo_batch(sampler=sampler)
    loss, aux, grads = value_and_grad(grpo.make_objective(cfg), jx(P_THETA), jx(batch),
                                      ctx_for())
    expected = np_grpo_loss(f64(P_THETA), batch, cfg, f64(P_REF))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    # some ratios are clipped and some are not, so both branches are exercised
    assert 0.0 < float(aux.metrics["grpo/clipfrac"]) < 1.0
    assert_grads_close(grads, fd_grad(lambda p: np_grpo_loss(p, batch, cfg, f64(P_REF)), P_THETA))
    assert (aux.points.v_ref is not None) == (kl_weight > 0 or guidance != 1.0)


def test_grpo_ratio_one_gives_minus_mean_advantage():
    batch = grpo_batch(advantage=np.linspace(-2, 3, 8))
    cfg = grpo.GRPOConfig()                                     # reference clip 1e-4
    objective = grpo.make_objective(cfg)
    ctx = ctx_for()
    # score the stored transitions under θ itself: ratio ≡ 1
    batch["old_log_prob"] = np.asarray(_grpo_new_log_prob(batch, cfg))
    loss, aux = objective(jx(P_THETA), jx(batch), ctx)
    np.testing.assert_allclose(float(loss), -np.mean(batch["advantage"]), rtol=1e-5, atol=1e-6)
    assert float(aux.metrics["grpo/clipfrac"]) == 0.0
    np.testing.assert_allclose(float(aux.metrics["grpo/ratio"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(aux.metrics["grpo/approx_kl"]), 0.0, atol=1e-10)


def _grpo_new_log_prob(batch, cfg):
    b = f64(batch)
    step, log_prob = _NP_STEPS[cfg.sampler]
    mean, std, _ = step(b["x"], np_velocity(f64(P_THETA), b["x"], b["sigma"], batch["cond"]), b,
                        _NOISE[cfg.sampler])
    return log_prob(b["x_next"], mean, std).astype(np.float32)


def test_grpo_clipping_engages_beyond_epsilon():
    cfg = grpo.GRPOConfig(clip_range=0.2)
    objective = grpo.make_objective(cfg)
    batch = grpo_batch(advantage=np.full(8, 1.5))
    batch["old_log_prob"] = _grpo_new_log_prob(batch, cfg) - np.float32(math.log(1.5))
    loss, aux, grads = value_and_grad(objective, jx(P_THETA), jx(batch), ctx_for())
    # ratio = 1.5 > 1 + ε with A > 0: the clipped term -A·1.2 wins and carries no gradient
    np.testing.assert_allclose(float(loss), -1.5 * 1.2, rtol=1e-5)
    assert float(aux.metrics["grpo/clipfrac"]) == 1.0
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads)
    # with A < 0 the unclipped term -A·ratio wins: value -A·1.5, non-zero gradient
    batch["advantage"] = np.full(8, -1.5, np.float32)
    loss, _, grads = value_and_grad(objective, jx(P_THETA), jx(batch), ctx_for())
    np.testing.assert_allclose(float(loss), 1.5 * 1.5, rtol=1e-4)
    assert abs(float(grads["a"])) > 1e-3


# ----------------------------------------------------------------------------------------------
# DiffusionNFT.
# ----------------------------------------------------------------------------------------------


def np_nft_loss(p, batch, cfg: nft.NFTConfig, weights=None):
    """Returns (loss, weights); ``weights`` = the stop-gradient factors (frozen for FD)."""
    b = f64(batch)
    x, _ = _noised(b)
    cond = batch["cond"]
    v = np_velocity(p, x, b["sigma"], cond)
    v_old = np_velocity(f64(P_OLD), x, b["sigma"], cond)
    adv = np.clip(b["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
    r = np.clip(adv / cfg.adv_clip_max / 2 + 0.5, 0, 1)
    d_pos = x - bc(b["sigma"]) * (cfg.beta * v + (1 - cfg.beta) * v_old) - b["x0"]
    d_neg = x - bc(b["sigma"]) * ((1 + cfg.beta) * v_old - cfg.beta * v) - b["x0"]
    if weights is None:
        weights = (np.maximum(pm(np.abs(d_pos)), cfg.weight_floor),
                   np.maximum(pm(np.abs(d_neg)), cfg.weight_floor))
    per = (r * pm(d_pos**2) / weights[0] + (1 - r) * pm(d_neg**2) / weights[1]) / cfg.beta
    loss = cfg.adv_clip_max * np.mean(per)
    if cfg.kl_weight > 0:
        v_ref = np_velocity(f64(P_REF), x, b["sigma"], cond)
        loss += cfg.kl_weight * np.mean(pm((v - v_ref) ** 2))
    return loss, weights


@pytest.mark.parametrize("beta, kl_weight", [(1.0, 1e-4), (0.1, 0.5)])
def test_nft_value_and_gradient_match_numpy(beta, kl_weight):
    cfg = nft.NFTConfig(beta=beta, kl_weight=kl_weight)
    batch = forward_batch()
    loss, aux, grads = value_and_grad(nft.make_objective(cfg), jx(P_THETA), jx(batch),
                                      ctx_for())
    expected, weights = np_nft_loss(f64(P_THETA), batch, cfg)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    fd = fd_grad(lambda p: np_nft_loss(p, batch, cfg, weights)[0], P_THETA)
    assert_grads_close(grads, fd)
    assert aux.points.v_ref is not None


def test_nft_at_old_policy_positive_equals_negative():
    cfg = nft.NFTConfig(beta=0.5, kl_weight=0.0)
    objective = nft.make_objective(cfg)
    ctx = ctx_for()
    losses = []
    for adv in (np.linspace(-4, 4, 8), np.zeros(8), np.full(8, 3.0)):
        loss, aux, grads = value_and_grad(objective, jx(P_OLD),
                                          jx(forward_batch(advantage=adv)), ctx)
        losses.append(float(loss))
        # v⁺ = v⁻ = v_old: both implicit policies give the same loss
        np.testing.assert_allclose(float(aux.metrics["nft/positive_loss"]),
                                   float(aux.metrics["nft/negative_loss"]), rtol=1e-6)
        assert float(aux.metrics["nft/old_deviation"]) == 0.0
        if not adv.any():                                       # r = ½ everywhere: no gradient
            jax.tree.map(lambda g: np.testing.assert_allclose(g, 0.0, atol=1e-6), grads)
    # …so the value does not depend on the advantages
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


def test_nft_gradient_sign_follows_advantage():
    cfg = nft.NFTConfig(beta=0.5, kl_weight=0.0)
    objective = nft.make_objective(cfg)
    _, _, g_pos = value_and_grad(objective, jx(P_OLD), jx(forward_batch(advantage=np.full(8, 2.0))),
                                 ctx_for())
    _, _, g_neg = value_and_grad(objective, jx(P_OLD),
                                 jx(forward_batch(advantage=np.full(8, -2.0))), ctx_for())
    # at θ = θ_old the per-sample gradient is ∝ (2r - 1): flipping A flips the gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -b, rtol=1e-5, atol=1e-7),
                 g_pos, g_neg)
    assert abs(float(g_pos["a"])) > 1e-4


def test_old_policy_decay_schedule_and_update():
    steps = jnp.array([0, 10, 400, 600, 5000])
    np.testing.assert_allclose(rl_state.old_policy_decay(steps), [0, 0.01, 0.4, 0.5, 0.5],
                               atol=1e-7)
    flat, rate, max_decay = rl_state.OLD_POLICY_DECAY_PRESETS["nft_slow"]
    np.testing.assert_allclose(
        rl_state.old_policy_decay(jnp.array([0, 74, 75, 175, 10_000]), flat=flat, rate=rate,
                                  max_decay=max_decay), [0, 0, 0, 0.75, 0.999], atol=1e-6)
    old, new = jx(P_OLD), jx(P_THETA)
    updated = rl_state.update_old_params(old, new, 400)
    jax.tree.map(lambda u, o, n: np.testing.assert_allclose(u, 0.4 * o + 0.6 * n, rtol=1e-6),
                 updated, old, new)
    jax.tree.map(np.testing.assert_array_equal, rl_state.update_old_params(old, new, 0), new)


def test_renoised_batch_layout_and_schedule_sampler():
    sampler = flow.schedule_sigma_sampler(SIGMAS)
    batch = flow.renoised_batch(jax.random.key(0), jnp.zeros((64,) + SHAPE),
                                jnp.zeros(64, jnp.int32), jnp.ones(64), sigma_sampler=sampler)
    assert batch["noise"].shape == (64,) + SHAPE and batch["sigma"].shape == (64,)
    levels = set(np.round(SIGMAS[:-1].astype(np.float32), 6))
    assert set(np.round(np.asarray(batch["sigma"]), 6)) <= levels
    assert len(set(np.asarray(batch["sigma"]).tolist())) > 3


def test_renoised_batch_with_several_draws_repeats_samples_with_fresh_noise():
    n = 6
    images = jax.random.normal(jax.random.key(1), (n,) + SHAPE)
    ro = Rollout(labels=jnp.arange(n, dtype=jnp.int32), images=images,
                 rewards=jnp.arange(n, dtype=jnp.float32), advantages=jnp.linspace(-1, 1, n),
                 trajectory=None)
    spec = BatchSpec(prompts=n, group_size=1, renoise_draws=3,
                     sigma_sampler=flow.schedule_sigma_sampler(SIGMAS))
    batch = renoised_rollout_batch(ro, jax.random.key(0), spec)
    assert renoised_rows(spec) == 3 * n
    assert batch["x0"].shape == (3 * n,) + SHAPE
    for d in range(3):
        rows = slice(d * n, (d + 1) * n)
        np.testing.assert_array_equal(batch["x0"][rows], images)
        np.testing.assert_array_equal(batch["cond"][rows], ro.labels)
        np.testing.assert_array_equal(batch["advantage"][rows], ro.advantages)
    assert not np.allclose(batch["noise"][:n], batch["noise"][n:2 * n])
    one = renoised_rollout_batch(ro, jax.random.key(0),
                                 dataclasses.replace(spec, renoise_draws=1))
    assert one["x0"].shape == (n,) + SHAPE


# ----------------------------------------------------------------------------------------------
# AWM.
# ----------------------------------------------------------------------------------------------


def np_awm_log_prob(v, target, sigma, weighting, power):
    e = pm((v - target) ** 2)
    tiny = 1e-10
    return {"uniform": -e, "t": -e * sigma, "t2": -e * sigma**2,
            "huber": -(np.sqrt(e + tiny) - 1e-5) * sigma,
            "ghuber": -((e + tiny) ** power - tiny**power) * sigma / power}[weighting]


def np_awm_loss(p, batch, cfg: awm.AWMConfig, old_log_prob=None):
    b = f64(batch)
    x, target = _noised(b)
    cond, s = batch["cond"], b["sigma"]
    v = np_velocity(p, x, s, cond)
    v_old = np_velocity(f64(P_OLD), x, s, cond)
    lp = np_awm_log_prob(v, target, s, cfg.weighting, cfg.ghuber_power)
    if old_log_prob is None:
        old_log_prob = (np_awm_log_prob(v_old, target, s, cfg.weighting, cfg.ghuber_power)
                        if cfg.off_policy else lp)
    ratio = np.exp(lp - old_log_prob)
    adv = np.clip(b["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max) / cfg.adv_clip_max \
        * cfg.advantage_max
    eps = cfg.clip_range
    loss = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)))
    elbo = 2 * (0.7 * np.sqrt(s / (1 - np.clip(s, 0, 0.99)))) ** 2
    kl_w = {"uniform": 1.0, "elbo": 1.0 / elbo}
    if cfg.kl_weight > 0:
        v_ref = np_velocity(f64(P_REF), x, s, cond)
        loss += cfg.kl_weight * np.mean(pm((v - v_ref) ** 2) * kl_w[cfg.kl_time_weighting])
    if cfg.ema_kl_weight > 0:
        loss += cfg.ema_kl_weight * np.mean(pm((v - v_old) ** 2)
                                            * kl_w[cfg.ema_kl_time_weighting])
    return loss, old_log_prob


@pytest.mark.parametrize("weighting, off_policy, kl_time", [
    ("ghuber", False, "uniform"), ("uniform", False, "elbo"), ("t", True, "uniform"),
    ("t2", False, "uniform"), ("huber", True, "elbo")])
def test_awm_value_and_gradient_match_numpy(weighting, off_policy, kl_time):
    cfg = awm.AWMConfig(weighting=weighting, off_policy=off_policy, kl_weight=0.2,
                        kl_time_weighting=kl_time, ema_kl_weight=0.5, clip_range=0.03)
    batch = forward_batch()
    loss, aux, grads = value_and_grad(awm.make_objective(cfg), jx(P_THETA), jx(batch),
                                      ctx_for())
    expected, old = np_awm_loss(f64(P_THETA), batch, cfg)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    fd = fd_grad(lambda p: np_awm_loss(p, batch, cfg, old_log_prob=old)[0], P_THETA)
    assert_grads_close(grads, fd)
    if off_policy:
        assert 0.0 < float(aux.metrics["awm/clipfrac"]) < 1.0


def test_awm_on_policy_is_advantage_weighted_log_likelihood_gradient():
    cfg = awm.AWMConfig(kl_weight=0.0, ema_kl_weight=0.0)
    batch = jx(forward_batch())
    loss, aux, grads = value_and_grad(awm.make_objective(cfg), jx(P_THETA), batch, ctx_for())
    adv = jnp.clip(batch["advantage"], -5, 5) / 5
    np.testing.assert_allclose(float(loss), -float(jnp.mean(adv)), rtol=1e-6)
    assert float(aux.metrics["awm/ratio"]) == 1.0

    def weighted_log_likelihood(p):                 # -mean(A·logp), the policy-gradient form
        x = flow.interpolate(batch["x0"], batch["noise"], batch["sigma"])
        e = jnp.mean((toy_velocity(p, x, batch["sigma"], batch["cond"])
                      - (batch["noise"] - batch["x0"])) ** 2, axis=(1, 2, 3))
        log_prob = -((e + 1e-10) ** 0.25 - 1e-10 ** 0.25) * batch["sigma"] / 0.25
        return -jnp.mean(adv * log_prob)

    expected = jax.grad(weighted_log_likelihood)(jx(P_THETA))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, expected)


# ----------------------------------------------------------------------------------------------
# Online DPO.
# ----------------------------------------------------------------------------------------------


def np_dpo_loss(p, batch, cfg: dpo.DPOConfig, p_base):
    b = f64(batch)
    errs = []
    for key in ("x0_w", "x0_l"):
        x = bc(1 - b["sigma"]) * b[key] + bc(b["sigma"]) * b["noise"]
        target = b["noise"] - b[key]
        errs.append([pm((np_velocity(q, x, b["sigma"], batch["cond"]) - target) ** 2)
                     for q in (p, p_base)])
    (ew, ew_ref), (el, el_ref) = errs
    inside = -0.5 * cfg.beta * ((ew - ew_ref) - (el - el_ref))
    return np.mean(b["valid"] * np.log1p(np.exp(-inside))), inside


@pytest.mark.parametrize("reference", ["ref", "old"])
def test_dpo_value_and_gradient_match_numpy(reference):
    cfg = dpo.DPOConfig(beta=20.0, reference=reference)
    batch = dpo_batch()
    p_base = f64(P_REF if reference == "ref" else P_OLD)
    loss, aux, grads = value_and_grad(dpo.make_objective(cfg), jx(P_THETA), jx(batch),
                                      ctx_for())
    expected, inside = np_dpo_loss(f64(P_THETA), batch, cfg, p_base)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert_grads_close(grads, fd_grad(lambda p: np_dpo_loss(p, batch, cfg, p_base)[0], P_THETA))
    valid = batch["valid"] > 0
    np.testing.assert_allclose(float(aux.metrics["dpo/implicit_acc"]),
                               np.mean(inside[valid] > 0), rtol=1e-6)
    np.testing.assert_allclose(float(aux.metrics["dpo/reward_margin"]),
                               np.mean(inside[valid]), rtol=1e-4, atol=1e-6)
    assert aux.points.v_theta.shape == (16,) + SHAPE
    assert (aux.points.v_ref is not None) == (reference == "ref")


def test_dpo_at_reference_is_log_two():
    loss, aux, _ = value_and_grad(dpo.make_objective(dpo.DPOConfig()), jx(P_REF),
                                  jx(dpo_batch()), ctx_for())
    valid = dpo_batch()["valid"]
    np.testing.assert_allclose(float(loss), math.log(2) * valid.mean(), rtol=1e-6)
    assert float(aux.metrics["dpo/implicit_acc"]) == 0.0


def test_dpo_batch_pairs_best_and_worst():
    x0 = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4, 1, 1, 1) * jnp.ones((1, 1) + SHAPE)
    rewards = jnp.array([[0.1, 0.9, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0], [0.3, 0.1, 0.2, 0.8]])
    batch = dpo.make_dpo_batch(jax.random.key(0), x0, jnp.array([0, 1, 2]), rewards,
                               sigma_sampler=flow.uniform_sigmas)
    np.testing.assert_array_equal(batch["x0_w"][:, 0, 0, 0], [1, 4, 11])
    np.testing.assert_array_equal(batch["x0_l"][:, 0, 0, 0], [0, 4, 9])
    np.testing.assert_array_equal(batch["valid"], [1, 0, 1])
    assert batch["noise"].shape == (3,) + SHAPE and batch["sigma"].shape == (3,)


# ----------------------------------------------------------------------------------------------
# RAM.
# ----------------------------------------------------------------------------------------------


def np_ram_loss(p, batch, cfg: ram.RAMConfig, target=None):
    b = f64(batch)
    x, u = _noised(b)
    cond, s = batch["cond"], b["sigma"]
    v = np_velocity(p, x, s, cond)
    if target is None:
        v_ref = np_velocity(f64(P_REF), x, s, cond)
        v_old = v if cfg.old_velocity == "self" else np_velocity(f64(P_OLD), x, s, cond)
        adv = np.clip(b["advantage"], -cfg.adv_clip_max, cfg.adv_clip_max)
        target = v_ref + cfg.scale * bc(adv) * (u - v_old)
    return np.mean(pm((v - target) ** 2)), target


@pytest.mark.parametrize("old_velocity", ["self", "old"])
def test_ram_value_and_gradient_match_numpy(old_velocity):
    cfg = ram.RAMConfig(scale=0.3, old_velocity=old_velocity)
    batch = forward_batch()
    loss, aux, grads = value_and_grad(ram.make_objective(cfg), jx(P_THETA), jx(batch),
                                      ctx_for())
    expected, target = np_ram_loss(f64(P_THETA), batch, cfg)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert_grads_close(grads, fd_grad(lambda p: np_ram_loss(p, batch, cfg, target)[0], P_THETA))
    assert aux.points.v_ref is not None


def test_ram_zero_advantage_distils_onto_reference():
    batch = jx(forward_batch(advantage=np.zeros(8)))
    objective = ram.make_objective(ram.RAMConfig(scale=0.7))
    loss, aux, grads = value_and_grad(objective, jx(P_THETA), batch, ctx_for())

    def distillation(p):
        x = flow.interpolate(batch["x0"], batch["noise"], batch["sigma"])
        v_ref = toy_velocity(jx(P_REF), x, batch["sigma"], batch["cond"])
        return jnp.mean((toy_velocity(p, x, batch["sigma"], batch["cond"]) - v_ref) ** 2)

    d_loss, d_grads = jax.value_and_grad(distillation)(jx(P_THETA))
    np.testing.assert_allclose(float(loss), float(d_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, d_grads)
    assert float(aux.metrics["ram/correction"]) == 0.0


def test_ram_target_moves_along_advantage_weighted_innovation():
    v_ref, v_old = jnp.zeros((2,) + SHAPE), jnp.full((2,) + SHAPE, 0.5)
    x0, noise = jnp.full((2,) + SHAPE, -1.0), jnp.ones((2,) + SHAPE)
    target = ram.ram_target(v_ref, v_old, x0, noise, jnp.array([1.0, -2.0]), 0.1)
    # u - v_old = 2 - 0.5 = 1.5 per pixel
    np.testing.assert_allclose(target[:, 0, 0, 0], [0.15, -0.3], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Contract shared by every objective: registry, NormGuard, sharding, pmap.
# ----------------------------------------------------------------------------------------------

CASES = {
    "grpo": lambda b: (grpo.GRPOConfig(clip_range=0.01), grpo_batch(b)),
    "grpo_kl_cfg": lambda b: (grpo.GRPOConfig(clip_range=0.01, kl_weight=0.1,
                                              guidance_scale=2.0, null_class=NULL),
                              grpo_batch(b)),
    "grpo_cps": lambda b: (grpo.GRPOConfig(sampler="cps", clip_range=0.01, kl_weight=0.1),
                           grpo_batch(b, sampler="cps")),
    "nft": lambda b: (nft.NFTConfig(beta=0.5), forward_batch(b)),
    "nft_no_kl": lambda b: (nft.NFTConfig(kl_weight=0.0), forward_batch(b)),
    "awm": lambda b: (awm.AWMConfig(clip_range=0.05, off_policy=True), forward_batch(b)),
    "awm_no_kl": lambda b: (awm.AWMConfig(kl_weight=0.0, ema_kl_weight=0.0), forward_batch(b)),
    "dpo": lambda b: (dpo.DPOConfig(beta=20.0), dpo_batch(b)),
    "dpo_old": lambda b: (dpo.DPOConfig(beta=20.0, reference="old"), dpo_batch(b)),
    "ram": lambda b: (ram.RAMConfig(scale=0.3), forward_batch(b)),
    "am": lambda b: (am.AMConfig(kl_weight=0.5), am_batch(b)),
}
_MAKERS = {grpo.GRPOConfig: grpo.make_objective, nft.NFTConfig: nft.make_objective,
           awm.AWMConfig: awm.make_objective, dpo.DPOConfig: dpo.make_objective,
           ram.RAMConfig: ram.make_objective, am.AMConfig: am.make_objective}
# cases whose objective evaluates the frozen reference itself (and must expose it)
COMPUTES_REF = {"grpo_kl_cfg", "grpo_cps", "nft", "awm", "dpo", "ram", "am"}


def build(case, b=8):
    cfg, batch = CASES[case](b)
    return _MAKERS[type(cfg)](cfg), jx(batch)


def test_registry_builds_every_method():
    for name, method in METHODS.items():
        assert method.name == name
        assert callable(method.make_objective(method.config_cls())), name


@pytest.mark.parametrize("config_cls, kwargs, field", [
    (grpo.GRPOConfig, {"clip_range": 0.0}, "clip_range"),
    (grpo.GRPOConfig, {"sampler": "ode"}, "sampler"),
    (grpo.GRPOConfig, {"guidance_scale": 3.0}, "null_class"),
    (grpo.GRPOConfig, {"kl_weight": float("nan")}, "kl_weight"),
    (nft.NFTConfig, {"beta": 0.0}, "beta"),
    (nft.NFTConfig, {"advantage_mode": "median"}, "advantage_mode"),
    (awm.AWMConfig, {"weighting": "cosine"}, "weighting"),
    (awm.AWMConfig, {"ghuber_power": -1.0}, "ghuber_power"),
    (dpo.DPOConfig, {"reference": "ema"}, "reference"),
    (dpo.DPOConfig, {"beta": -1.0}, "beta"),
    (ram.RAMConfig, {"scale": -0.1}, "scale"),
    (ram.RAMConfig, {"old_velocity": "ema"}, "old_velocity"),
])
def test_invalid_config_names_the_field(config_cls, kwargs, field):
    with pytest.raises(ValueError, match=f"config.objective.{field} must be"):
        config_cls(**kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_normguard_weight_zero_is_bit_identical(case):
    objective, batch = build(case)
    ctx = ctx_for()
    l0, _, g0 = value_and_grad(objective, jx(P_THETA), batch, ctx)
    wrapped = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.0))
    l1, aux, g1 = value_and_grad(wrapped, jx(P_THETA), batch, ctx)
    assert float(l0) == float(l1)
    jax.tree.map(np.testing.assert_array_equal, g0, g1)
    assert "normguard/ratio" in aux.metrics


@pytest.mark.parametrize("case", sorted(CASES))
def test_normguard_evaluates_the_reference_once(case):
    objective, batch = build(case)
    ref = jx(P_REF)
    calls = {"ref": 0}

    def counting_velocity(params, x, sigma, cond):
        calls["ref"] += params is ref
        return toy_velocity(params, x, sigma, cond)

    ctx = Context(velocity=counting_velocity, ref_params=ref, old_params=jx(P_OLD))
    _, plain_aux = objective(jx(P_THETA), batch, ctx)
    assert calls["ref"] == (1 if case in COMPUTES_REF else 0)
    assert (plain_aux.points.v_ref is not None) == (case in COMPUTES_REF)
    calls["ref"] = 0
    wrapped = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.5))
    loss, aux = wrapped(jx(P_THETA), batch, ctx)
    assert calls["ref"] == 1
    assert np.isfinite(float(loss)) and float(aux.metrics["normguard/ratio"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grpo_kl_cfg", "nft", "awm", "dpo", "ram"])
def test_eight_device_sharding_and_pmap_match_one_device(case):
    assert jax.device_count() == 8
    b = 16
    objective, batch = build(case, b)
    wrapped = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.3, power=2))
    ctx = ctx_for()
    params = jx(P_THETA)
    grad_fn = jax.value_and_grad(lambda p, bt: wrapped(p, bt, ctx)[0])
    l_one, g_one = grad_fn(params, batch)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    l_sh, g_sh = jax.jit(grad_fn)(params, sharded)
    np.testing.assert_allclose(float(l_sh), float(l_one), rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), g_sh, g_one)

    def per_device(p, bt):
        loss, grads = grad_fn(p, bt)
        return jax.lax.pmean(loss, "d"), jax.lax.pmean(grads, "d")

    stacked = jax.tree.map(lambda a: a.reshape((8, -1) + a.shape[1:]), batch)
    l_pm, g_pm = jax.pmap(per_device, axis_name="d", in_axes=(None, 0))(params, stacked)
    np.testing.assert_allclose(np.asarray(l_pm), float(l_one), rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a)[0], c, rtol=1e-5,
                                                         atol=1e-6), g_pm, g_one)

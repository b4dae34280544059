"""Group advantages and DPO pairing: statistics, ties, clipping, both layouts, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import advantages


def _reference_tracker(prompts, rewards, global_std=False):
    """Flow-GRPO's per-prompt statistic, re-derived in float64 numpy (no clipping)."""
    prompts = np.asarray(prompts)
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        group = rewards[prompts == p]
        std = (np.sqrt(np.mean((rewards - rewards.mean()) ** 2)) if global_std
               else np.sqrt(np.mean((group - group.mean()) ** 2)))
        out[prompts == p] = (group - group.mean()) / (std + 1e-4)
    return out


def test_grouped_layout_zero_mean_unit_population_std():
    rewards = jax.random.normal(jax.random.key(0), (6, 8)) * 3.0 + 2.0
    adv = advantages.group_advantages(rewards, clip=None)
    assert adv.shape == (6, 8)
    np.testing.assert_allclose(np.mean(adv, axis=1), 0.0, atol=1e-5)
    # population std (ddof=0) is std/(std + 1e-4), i.e. 1 up to ~1e-4/std
    np.testing.assert_allclose(np.std(adv, axis=1), 1.0, atol=2e-4)
    # ddof=1 would give sqrt(K/(K-1)) ≈ 1.069 instead
    assert not np.allclose(np.std(adv, axis=1, ddof=1), 1.0, atol=1e-2)


@pytest.mark.parametrize("global_std", [False, True])
def test_matches_the_per_prompt_tracker_statistic(global_std):
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(4, 5))
    ids = np.repeat(np.arange(4), 5)
    expected = _reference_tracker(ids, rewards.ravel(), global_std).reshape(4, 5)
    got = advantages.group_advantages(jnp.asarray(rewards, jnp.float32), global_std=global_std,
                                      clip=None)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_id_layout_with_shuffled_unequal_groups_agrees_with_tracker():
    rng = np.random.default_rng(2)
    ids = np.array([3, 0, 3, 1, 0, 3, 1, 1, 1, 0, 3])          # groups of size 3, 4, 4 (+ empty 2)
    rewards = rng.normal(size=ids.shape)
    expected = _reference_tracker(ids, rewards)
    got = advantages.group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids),
                                      num_groups=4, clip=None)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    got_global = advantages.group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids),
                                             num_groups=4, global_std=True, clip=None)
    np.testing.assert_allclose(got_global, _reference_tracker(ids, rewards, True), rtol=1e-5,
                               atol=1e-5)


def test_both_layouts_agree_under_jit():
    rewards = jax.random.uniform(jax.random.key(3), (3, 4))
    ids = jnp.repeat(jnp.arange(3), 4)
    grouped = jax.jit(advantages.group_advantages)(rewards)
    by_ids = jax.jit(lambda r, i: advantages.group_advantages(r, i, num_groups=3))(
        rewards.ravel(), ids)
    np.testing.assert_allclose(grouped.ravel(), by_ids, rtol=1e-6, atol=1e-6)


def test_ties_give_exactly_zero():
    # 0.9 repeated 7 times: the float32 mean differs from 0.9 by 1 ulp, so the plain formula
    # would give ~1e-3 instead of 0
    rewards = jnp.array([[0.9] * 7, [0.3, 0.7, 0.3, 0.7, 0.3, 0.7, 0.9], [2.7] * 7], jnp.float32)
    adv = advantages.group_advantages(rewards)
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_array_equal(adv[2], 0.0)
    assert np.all(np.abs(np.asarray(adv[1])) > 0.1)
    ids = jnp.array([0, 0, 0, 1, 1, 2])                         # group 2 has one member
    adv_ids = advantages.group_advantages(jnp.array([2.7, 2.7, 2.7, 0.0, 1.0, 5.0]), ids,
                                          num_groups=3)
    np.testing.assert_array_equal(np.asarray(adv_ids)[[0, 1, 2, 5]], 0.0)
    np.testing.assert_allclose(np.asarray(adv_ids)[[3, 4]], [-1, 1], atol=1e-3)


def test_clipping_at_plus_minus_five():
    # one outlier among K = 64: its standardized value is sqrt(K-1) ≈ 7.9 > 5
    rewards = jnp.zeros((1, 64)).at[0, 0].set(1.0)
    unclipped = advantages.group_advantages(rewards, clip=None)
    assert float(unclipped[0, 0]) > 7.0
    clipped = advantages.group_advantages(rewards)
    assert float(clipped[0, 0]) == 5.0
    np.testing.assert_allclose(clipped[0, 1:], unclipped[0, 1:])
    assert float(advantages.group_advantages(-rewards)[0, 0]) == -5.0


def test_layout_errors():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        advantages.group_advantages(jnp.zeros((8,)))
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, 2\)"):
        advantages.group_advantages(jnp.zeros((4,)), jnp.array([0, 1, 2, 0]), num_groups=2)


def test_dpo_pairs_best_worst_and_ties():
    rewards = jnp.array([[0.2, 0.9, 0.1, 0.5], [0.4, 0.4, 0.4, 0.4], [3.0, -1.0, 2.0, 3.0]])
    winner, loser, valid = advantages.dpo_pairs(rewards)
    np.testing.assert_array_equal(winner, [1, 0, 0])
    np.testing.assert_array_equal(loser, [2, 0, 1])
    np.testing.assert_array_equal(valid, [True, False, True])
    r = np.asarray(rewards)
    for g in np.flatnonzero(np.asarray(valid)):
        assert r[g, winner[g]] == r[g].max() and r[g, loser[g]] == r[g].min()

"""Host rewards: NumPy callables inside jitted programs, and a clear error for each failure."""

import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import host_rewards, rewards, sharding

from conftest import REPO
from test_rewards import context

B, SHAPE = 8, (8, 8, 3)


def images(seed=0):
    # Some pixels outside [-1, 1]: the host sees them clipped.
    return jax.random.uniform(jax.random.key(seed), (B, *SHAPE), minval=-1.3, maxval=1.3)


def labels():
    return jnp.arange(B, dtype=jnp.int32) % 4


def _ctx():
    return context("shapes", (8, 8, 3), 16)


def _build(fn, **kw):
    entry = host_rewards.host_reward(fn, name="test_reward", **kw)
    built = entry.build(_ctx())
    return rewards.Reward("test_reward", built.apply, entry.differentiable, built.params)


def red_minus_label(x, request):
    """A NumPy reward reading both the images and the request."""
    return x[..., 0].mean(axis=(1, 2)) - 0.1 * request["label"]


def test_host_reward_in_jit_matches_numpy_and_sees_clipped_images_and_the_request():
    reward = _build(red_minus_label)
    x, y = images(), labels()
    got = jax.jit(reward.apply)(reward.params, x, y)
    want = np.clip(np.asarray(x), -1, 1)[..., 0].mean(axis=(1, 2)) - 0.1 * np.asarray(y)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == (B,)
    # A prompt request reaches the host as it is.
    req = {"label": y, "index": y + 10, "kind": jnp.zeros(B, jnp.int32)}
    seen = {}

    def spy(x, request):
        seen.update(request)
        return np.zeros(len(x))

    jax.jit(_build(spy).apply)(None, x, req).block_until_ready()
    assert set(seen) == {"label", "index", "kind"}
    np.testing.assert_array_equal(seen["index"], np.asarray(y) + 10)
    # Not differentiable: zero gradient, no error.
    g = jax.grad(lambda u: jnp.sum(reward(u, y)))(x)
    assert float(jnp.abs(g).max()) == 0.0 and not reward.differentiable


def test_uint8_images():
    seen = {}

    def spy(x, request):
        seen["x"] = x
        return np.zeros(len(x), np.int64)

    x = images()
    jax.jit(_build(spy, images="uint8").apply)(None, x, labels()).block_until_ready()
    assert seen["x"].dtype == np.uint8
    np.testing.assert_array_equal(
        seen["x"], np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5).astype(np.uint8))


def test_host_reward_on_a_sharded_batch_inside_a_combination():
    mesh = sharding.make_mesh(-1, 1)
    x = jax.device_put(images(), sharding.batch_sharding(mesh))
    y = jax.device_put(labels(), sharding.batch_sharding(mesh))
    host = _build(red_minus_label)
    contrast = rewards.build_reward("contrast", _ctx())
    combined = rewards.CombinedReward((("test_reward", 2.0), ("contrast", 1.0)),
                                      (host, contrast))
    total, parts = jax.jit(combined.apply)(combined.params, x, y)
    np.testing.assert_allclose(total, 2.0 * parts["test_reward"] + parts["contrast"], rtol=1e-6)
    np.testing.assert_allclose(parts["test_reward"], host(images(), labels()), rtol=1e-6)


def slow(x, request):
    time.sleep(5.0)
    return np.zeros(len(x))


def raises(x, request):
    raise ConnectionError("reward server refused the connection")


@pytest.mark.parametrize("fn, kw, message", [
    (slow, {"timeout": 0.2}, r"host reward 'test_reward' did not return within its timeout "
                             r"of 0.2 s"),
    (raises, {}, r"host reward 'test_reward' raised ConnectionError: reward server refused"),
    (lambda x, r: np.zeros((len(x), 1)), {},
     r"host reward 'test_reward' returned shape \(8, 1\); it must return \(8,\)"),
    (lambda x, r: np.zeros(3), {}, r"returned shape \(3,\)"),
    (lambda x, r: np.array(["a"] * len(x)), {}, r"host reward 'test_reward' returned dtype "
                                                r"<U1; it must return real numbers"),
    (lambda x, r: np.zeros(len(x), bool), {}, r"returned dtype bool"),
    (lambda x, r: np.where(np.arange(len(x)) == 2, np.nan, 0.0), {},
     r"host reward 'test_reward' returned non-finite values at rows \[2\]"),
])
def test_each_failure_names_the_reward(fn, kw, message):
    reward = _build(fn, **kw)
    # On the host directly: the HostRewardError itself.
    host = host_rewards.HostReward(fn, "test_reward", **kw)
    with pytest.raises(host_rewards.HostRewardError, match=message):
        host.on_host(np.asarray(images()), {"label": np.asarray(labels())})
    # Inside a jitted program: the runtime error carries the same message.
    t0 = time.monotonic()
    with pytest.raises(Exception, match=message):
        jax.jit(reward.apply)(None, images(), labels()).block_until_ready()
    assert time.monotonic() - t0 < 4.0     # the timeout, not the slow call, ends the wait


def test_bad_host_reward_settings_are_refused():
    with pytest.raises(ValueError, match="images must be one of"):
        host_rewards.host_reward(red_minus_label, images="uint16")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        host_rewards.host_reward(red_minus_label, timeout=0)


def test_a_host_reward_named_as_module_function(tmp_path, monkeypatch):
    """The README's host-reward example, as its own module."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                if "host_rewards.host_reward(" in b]
    (tmp_path / "my_host_rewards.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        ctx = _ctx()
        combined = rewards.build_combined({"my_host_rewards:ink": 1.0}, ctx)
        assert not combined.differentiable
        x = images()
        total, _ = jax.jit(combined.apply)(combined.params, x, labels())
        ink = (np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5) > 128).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(total, ink, rtol=1e-6)
    finally:
        sys.modules.pop("my_host_rewards", None)


def test_host_reward_inside_the_sharded_rl_rollout():
    """The RL rollout program (batch sharded over 8 devices) calls the host reward once on
    the whole batch and returns its scores."""
    from normguard_jax import generators, rl
    from test_methods import tiny_config
    from test_objectives import NULL, P_THETA, SHAPE as TOY_SHAPE, jx, toy_velocity

    calls = []

    def mean_pixel(x, request):
        calls.append(len(x))
        return x.mean(axis=(1, 2, 3)) + request["label"]

    config = tiny_config("nft")
    base = generators.Pretrained(velocity=toy_velocity, params=jx(P_THETA), config=None,
                                 image_shape=TOY_SHAPE, num_classes=NULL, step=0)
    mesh = sharding.make_mesh(-1, 1)
    assert mesh.size == 8
    combined = rewards.CombinedReward((("test_reward", 1.0),), (_build(mean_pixel),))
    programs = rl.build_programs(config, base, mesh, combined, rl.build_optimizer(config)[0])
    n = config.rollout.prompts_per_iter * config.rollout.group_size
    labels = programs.place(jnp.arange(n, dtype=jnp.int32) % NULL)
    ro, parts = programs.rollout(jx(P_THETA), labels, jax.random.key(0))
    want = np.clip(np.asarray(ro.images), -1, 1).mean(axis=(1, 2, 3)) + np.asarray(labels)
    np.testing.assert_allclose(ro.rewards, want, rtol=1e-5, atol=1e-6)
    assert calls == [n]

"""The attention kernels of the MMDiT/FLUX blocks (models/attention_impl.py): the Pallas TPU
flash kernel, run here in Pallas' TPU interpreter, against XLA's softmax attention (values and
gradients), its padding of ragged lengths, the per-device wiring under a mesh, and a whole
MMDiT forward with each kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from normguard_jax import sharding
from normguard_jax.models import attention_impl, make_velocity_fn, mmdit


def _qkv(b, s, s_kv, heads=2, d=64, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, s, heads, d), dtype),
            jax.random.normal(kk, (b, s_kv, heads, d), dtype),
            jax.random.normal(kv, (b, s_kv, heads, d), dtype))


def test_flash_equals_xla_on_ragged_lengths_values_and_gradients():
    """130 queries over 140 keys: both padded to 256 and the padding masked by segment ids;
    the joint attention's lengths are never multiples of 128 (SD3.5-M: 1024 + 333)."""
    q, k, v = _qkv(1, 130, 140)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * jnp.arange(64.0))

    with pltpu.force_tpu_interpret_mode():
        out = attention_impl.flash(q, k, v)
        grads = jax.grad(loss(attention_impl.flash), argnums=(0, 1, 2))(q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v)
    ref_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    assert out.shape == (1, 130, 2, 64)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g / scale, r / scale, atol=1e-5)
    # Without the mask the padded keys (zeros) would take part: the result would differ.
    assert float(jnp.max(jnp.abs(out - jax.nn.dot_product_attention(
        q, jnp.pad(k, ((0, 0), (0, 116), (0, 0), (0, 0))),
        jnp.pad(v, ((0, 0), (0, 116), (0, 0), (0, 0))))))) > 1e-2


def test_flash_keeps_bfloat16_and_stays_close():
    q, k, v = _qkv(1, 128, 128, dtype=jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        out = attention_impl.flash(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2)


def test_choice_is_scoped_and_checked():
    f = lambda: attention_impl.current().impl  # noqa: E731
    assert f() == "xla"
    assert attention_impl.bind(f, "xla") is f
    assert attention_impl.bind(f, "flash")() == "flash"
    assert f() == "xla"                      # reset after the call
    with attention_impl.use("flash"):
        assert f() == "flash"
    assert f() == "xla"
    with pytest.raises(ValueError, match="not one of"):
        attention_impl.bind(f, "splash")


def test_under_a_mesh_each_device_attends_its_own_batch_shard(monkeypatch):
    """The kernel (replaced here by XLA's attention, recording the shapes it sees) runs per
    device on B / 8 rows inside a shard_map, and the result equals unsharded attention."""
    seen = []

    def per_device(q, k, v):
        seen.append(q.shape)
        return jax.nn.dot_product_attention(q, k, v)

    monkeypatch.setattr(attention_impl, "flash", per_device)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    q, k, v = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in _qkv(8, 12, 20, d=8))
    out = jax.jit(attention_impl.bind(attention_impl.attention, "flash", mesh))(q, k, v)
    assert seen == [(1, 12, 2, 8)]
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        jax.jit(attention_impl.bind(attention_impl.attention, "flash", mesh))(
            *(a[:4] for a in (q, k, v)))


def test_mmdit_routes_every_attention_through_the_chosen_kernel(monkeypatch):
    """A tiny SD3.5-layout MMDiT under ``bind(.., "flash")``: the joint attention (24 image +
    5 text tokens) and the image-only dual attention (24) both reach the flash kernel (here
    XLA's attention recording the shapes: the kernel's numerics are tested above), and the
    velocity equals the default path's."""
    seen = []

    def kernel(q, k, v):
        seen.append((q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v)

    monkeypatch.setattr(attention_impl, "flash", kernel)
    config = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                  caption_projection_dim=16, pooled_projection_dim=10, out_channels=16,
                  pos_embed_max_size=10, dual_attention_layers=(0,), qk_norm="rms_norm")
    graphdef, abstract = mmdit.abstract_mmdit(config)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([0.2 * jax.random.normal(key, p.shape)
                                for p, key in zip(leaves, keys)])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 12, 16)).astype(np.float32)
    sigma = np.array([0.3, 0.8], np.float32)
    cond = {"text": rng.standard_normal((2, 5, 12)).astype(np.float32),
            "pooled": rng.standard_normal((2, 10)).astype(np.float32)}
    velocity = make_velocity_fn(graphdef)
    ref = velocity(params, x, sigma, cond)
    assert seen == []                                   # the default path is XLA's
    out = attention_impl.bind(velocity, "flash")(params, x, sigma, cond)
    # block 0: joint (29 queries: the text stream's too) and dual (24); block 1 is
    # context-pre-only: its text queries are not computed (24 over 29 keys).
    assert sorted(seen) == sorted([(29, 29), (24, 24), (24, 29)])
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_rl_config_names_the_kernel_and_refuses_flash_off_tpu():
    from conftest import load_config_file  # noqa: PLC0415
    from normguard_jax import config_checks, rl  # noqa: PLC0415

    config = load_config_file("rl_nft.py")
    assert config.base.attention == "xla"
    rl.validate(config, num_devices=1)
    config.base.attention = "splash"
    with pytest.raises(config_checks.ConfigError, match="base.attention"):
        rl.validate(config, num_devices=1)
    config.base.attention = "flash"
    with pytest.raises(config_checks.ConfigError, match="TPU"):
        rl.validate(config, num_devices=1)

"""LoRA adapters: exact identity at init, adapter-only gradients, merge = adapted forward,
files, and an RL run that trains, checkpoints and resumes the adapter alone."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normguard_jax import checkpointing, generators, lora, models, rl
from normguard_jax.objectives.base import Context
from normguard_jax.objectives.flow_matching import flow_matching_loss

from test_rl import base_workdir, tiny_rl_config  # noqa: F401  (module fixture)

CFG = lora.LoRAConfig(rank=4, alpha=8.0, targets="attention_mlp")


def _model(arch):
    m = models.build_generator(arch, image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0),
                               **models.SIZES[arch]["tiny"])
    graphdef, params = models.split_generator(m)
    # Zero-initialised output layers make v ≡ 0: move every weight so the maps matter.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape),
                          params)
    return graphdef, params


def _inputs(batch=3):
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 1))
    return x, jnp.linspace(0.1, 0.9, batch), jnp.arange(batch, dtype=jnp.int32)


def _random_adapter(params, cfg=CFG):
    adapter = lora.init(jax.random.key(3), params, cfg)
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(4), a.shape),
                        adapter)


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_fresh_adapter_leaves_the_velocity_exactly_unchanged(arch):
    graphdef, params = _model(arch)
    adapter = lora.init(jax.random.key(3), params, CFG)
    assert adapter and all(float(jnp.abs(e["b"]).max()) == 0 for e in adapter.values())
    velocity = lora.make_velocity_fn(graphdef, CFG)
    x, s, c = _inputs()
    base_v = models.make_velocity_fn(graphdef)(params, x, s, c)
    assert float(jnp.abs(base_v).max()) > 0.1
    np.testing.assert_array_equal(velocity(lora.LoRAParams(params, adapter), x, s, c), base_v)
    np.testing.assert_array_equal(velocity(params, x, s, c), base_v)   # θ_ref: the plain base


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_merged_parameters_give_the_adapted_velocity(arch):
    graphdef, params = _model(arch)
    adapter = _random_adapter(params)
    x, s, c = _inputs()
    adapted = lora.make_velocity_fn(graphdef, CFG)(lora.LoRAParams(params, adapter), x, s, c)
    merged = models.make_velocity_fn(graphdef)(lora.merge(params, adapter, CFG), x, s, c)
    base_v = models.make_velocity_fn(graphdef)(params, x, s, c)
    assert float(jnp.abs(adapted - base_v).max()) > 1e-2          # the adapter does something
    np.testing.assert_allclose(merged, adapted, atol=1e-5 * float(jnp.abs(adapted).max()))
    back = lora.unmerge(lora.merge(params, adapter, CFG), adapter, CFG)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_targets_follow_peft_suffix_rule():
    _, params = _model("dit")
    attn = lora.target_paths(params, lora.LoRAConfig(rank=2, targets="attention"))
    assert attn == ["blocks.0.proj", "blocks.0.qkv", "blocks.1.proj", "blocks.1.qkv"]
    assert lora.matches("transformer_blocks.3.attn.to_q", ("attn.to_q",))
    assert not lora.matches("transformer_blocks.3.attn2.to_q", ("attn.to_q",))
    assert not lora.matches("blocks.0.cond_proj", ("proj",))
    with pytest.raises(ValueError, match="matches no Linear layer"):
        lora.target_paths(params, lora.LoRAConfig(rank=2, targets="to_nothing"))


def _dot_output_shapes(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return {tuple(int(d) for d in m.groups())
            for m in re.finditer(r":f32\[(\d+),(\d+)\] = dot_general", text)}


def test_gradients_reach_only_the_adapter_and_no_base_gradient_is_formed():
    graphdef, params = _model("dit")
    cfg = lora.LoRAConfig(rank=5, alpha=10.0, targets="attention_mlp")  # 5: no kernel dimension
    adapter = _random_adapter(params, cfg)
    velocity = lora.make_velocity_fn(graphdef, cfg)
    x, s, c = _inputs()
    batch = {"x0": x, "noise": jnp.flip(x, 0), "sigma": s, "cond": c}
    ctx = Context(velocity=velocity)

    def adapter_loss(ad):
        return flow_matching_loss(lora.LoRAParams(params, ad), batch, ctx)[0]

    def full_loss(p):
        return flow_matching_loss(p, batch, ctx)[0]

    grads = jax.grad(adapter_loss)(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    kernels = {tuple(k.shape) for k in jax.tree.leaves(params) if k.ndim == 2}
    # Control: differentiating the base forms ∂L/∂W, a dot with a kernel's shape.
    assert _dot_output_shapes(jax.grad(full_loss), params) & kernels
    assert not _dot_output_shapes(jax.grad(adapter_loss), adapter) & kernels


def test_adapter_files_roundtrip_and_refuse_another_base(tmp_path):
    _, params = _model("dit")
    adapter = _random_adapter(params)
    path = str(tmp_path / "adapter")
    lora.save_adapter(path, adapter, CFG, checkpointing.fingerprint(params))
    loaded, cfg = lora.load_adapter(path, params)
    assert cfg == CFG
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="another base"):
        lora.load_adapter(path, jax.tree.map(lambda p: p + 1, params))
    lora.export_merged(str(tmp_path / "merged"), params, adapter, CFG)
    merged = checkpointing.load_tree(str(tmp_path / "merged"), params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lora.merge(params, adapter, CFG))):
        np.testing.assert_array_equal(a, b)


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_lora_rl_run_trains_checkpoints_and_resumes_the_adapter_only(base_workdir, tmp_path):  # noqa: F811
    config = tiny_rl_config("nft", base_workdir, tmp_path, weight=0.1)
    # The tiny base's zero-initialised output layer has barely moved: adapt it too, so that
    # the adapter's effect on v is visible.
    config.lora.update(rank=2, alpha=4.0, targets="qkv, proj, fc1, fc2, final_linear")
    config.optim.lr = 1e-2
    config.train.iterations = 3
    base = generators.load_pretrained(base_workdir)
    ref_before = checkpointing.fingerprint(base.params)
    full = rl.run(config, str(tmp_path / "full"))

    adapter = lora.init(jax.random.key(0), base.params, lora.from_config(config))
    adapter_size = models.count_params(adapter)
    assert adapter_size < models.count_params(base.params) / 4
    for tree in (full.params, full.old_params):
        assert jax.tree.structure(tree) == jax.tree.structure(adapter)
    assert models.count_params(full.opt_state) <= 2 * adapter_size + 8   # Adam moments + counts

    def crash(i, state, metrics):
        if i == 2:
            raise _Crash()

    with pytest.raises(_Crash):
        rl.run(config, str(tmp_path / "resumed"), hooks=[crash])
    resumed = rl.run(config, str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves((full.params, full.old_params, full.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.old_params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The checkpoint holds the adapter; load_policy gives merged parameters of the base layout.
    policy, ref = generators.load_policy(str(tmp_path / "full"))
    assert checkpointing.fingerprint(ref.params) == ref_before           # θ_ref unchanged
    assert jax.tree.structure(policy.params) == jax.tree.structure(base.params)
    x = jax.random.normal(jax.random.key(5), (2, *base.image_shape))
    s, c = jnp.array([0.3, 0.8]), jnp.array([1, 2], jnp.int32)
    v_policy = policy.velocity(policy.params, x, s, c)
    v_adapted = rl.run_velocity(config, base)(
        lora.LoRAParams(base.params, jax.device_get(full.params)), x, s, c)
    assert float(jnp.abs(v_policy - base.velocity(base.params, x, s, c)).max()) > 1e-3
    np.testing.assert_allclose(v_policy, v_adapted, atol=1e-5)


def test_adapted_gradient_keeps_no_copy_of_the_kernels():
    """XLA's compiled temporary memory of the adapter gradient: the merged-kernel form holds a
    copy of every adapted kernel for the backward pass, the x@W + (x@A)@B form does not."""
    kw = dict(patch_size=2, hidden_dim=256, depth=2, num_heads=4, mlp_ratio=4.0, freq_dim=32)
    module = models.init_module(lambda: models.build_generator(
        "dit", image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(0), **kw), abstract=True)
    graphdef, params = models.split_generator(module)
    cfg = lora.LoRAConfig(rank=8, alpha=16.0, targets="attention_mlp")
    adapter = jax.eval_shape(lambda: lora.init(jax.random.key(0), params, cfg))
    adapted = lora.make_velocity_fn(graphdef, cfg)
    plain = models.make_velocity_fn(graphdef)
    x, s, c = (jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32),
               jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))

    def separate(ad, base, x, s, c):
        return jnp.mean(adapted(lora.LoRAParams(base, ad), x, s, c) ** 2)

    def merged(ad, base, x, s, c):
        return jnp.mean(plain(lora.merge(base, ad, cfg), x, s, c) ** 2)

    def temp_bytes(loss):
        compiled = jax.jit(jax.grad(loss)).lower(adapter, params, x, s, c).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    kernel_bytes = 4 * sum(k.size for p, k in lora._kernels(params).items()
                           if lora.matches(p, cfg.patterns))
    # The merged form needs at least ~one more copy of the adapted kernels.
    assert temp_bytes(merged) > temp_bytes(separate) + 0.75 * kernel_bytes

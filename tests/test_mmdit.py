"""The SD3 / SD3.5 MMDiT (models/mmdit.py) against diffusers' own ``SD3Transformer2DModel``.

Tiny random diffusers models are saved with ``save_pretrained`` and loaded through
``mmdit.load_mmdit`` (the name table and ``hf_weights.load_params``). Every diffusers parameter
is drawn at random (norm scales and biases too), so a parameter sent to the wrong place, a
swapped (shift, scale) pair or a missing gate changes the output. The comparison follows the
velocity mapping of the module docstring: ours(x, σ) = NHWC(diffusers(NCHW(x), 1000·σ)).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax.models import count_params, hf_weights, mmdit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from diffusers_reference import randomise, relative_error  # noqa: E402

RTOL = 1e-5  # max |ours - diffusers| / max |diffusers|, float32

# SD3(-Medium)'s layout in miniature: no q/k norm, no dual attention; 3 blocks, so there is a
# plain block before the context-pre-only last one. A 16×16 sample with pos_embed_max_size 12
# and 8×8 inputs: the 4×4 token grid is cropped from the middle of a 12×12 table whose
# positions are scaled by base/G = 8/12.
SD3_TINY = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
    pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12)
# SD3.5-Medium's layout in miniature: RMS q/k norm, dual attention in the first two of three
# blocks (the last, context-pre-only block has none, as in SD3.5-M), 16 latent channels,
# non-square 8×12 inputs (a 4×6 crop of a 10×10 table).
SD35_TINY = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
    pooled_projection_dim=10, out_channels=16, pos_embed_max_size=10,
    dual_attention_layers=(0, 1), qk_norm="rms_norm")
CASES = {"sd3": (SD3_TINY, (8, 8)), "sd35": (SD35_TINY, (8, 12))}
TEXT_TOKENS = 5


def _inputs(config, hw, seed=0):
    rng = np.random.default_rng(seed)
    b = 2
    x = rng.standard_normal((b, *hw, config["in_channels"])).astype(np.float32)
    sigma = np.array([0.25, 0.9], np.float32)
    text = rng.standard_normal((b, TEXT_TOKENS, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((b, config["pooled_projection_dim"])).astype(np.float32)
    return x, sigma, {"text": text, "pooled": pooled}


def _diffusers_velocity(model, x, sigma, cond):
    """The library's velocity from diffusers: NCHW latents, timestep = 1000·σ, NHWC back."""
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            encoder_hidden_states=torch.from_numpy(cond["text"]),
            pooled_projections=torch.from_numpy(cond["pooled"]),
            timestep=torch.from_numpy(sigma * np.float32(1000.0)),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(name, diffusers model, folder) of each tiny case, saved once per module."""
    config, _ = CASES[request.param]
    torch.manual_seed(0)
    model = randomise(diffusers.SD3Transformer2DModel(**config).float(), seed=1)
    folder = tmp_path_factory.mktemp(f"mmdit_{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    yield request.param, model, str(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_equals_diffusers(saved):
    name, model, folder = saved
    config, hw = CASES[name]
    graphdef, params, velocity = mmdit.load_mmdit(folder)
    x, sigma, cond = _inputs(config, hw)
    ours = jax.jit(velocity)(params, jnp.asarray(x), jnp.asarray(sigma),
                             {k: jnp.asarray(v) for k, v in cond.items()})
    assert ours.dtype == jnp.float32
    rel = relative_error(ours, _diffusers_velocity(model, x, sigma, cond))
    print(f"{name}: max relative error {rel:.2e}")
    assert rel < RTOL, f"{name}: max |ours - diffusers| / max |diffusers| = {rel:.2e}"
    # The position table this module recomputes is the buffer diffusers saved.
    g = config["pos_embed_max_size"]
    table = mmdit.position_table(16, g, config["sample_size"] // config["patch_size"])
    np.testing.assert_allclose(table, model.pos_embed.pos_embed[0].numpy(), rtol=0, atol=1e-7)


def test_bfloat16_activations_stay_close(saved):
    """dtype=bfloat16 runs (float32 norm statistics and softmax) and stays near float32."""
    name, _, folder = saved
    config, hw = CASES[name]
    x, sigma, cond = _inputs(config, hw, seed=1)
    args = (jnp.asarray(x), jnp.asarray(sigma), {k: jnp.asarray(v) for k, v in cond.items()})
    _, params32, velocity32 = mmdit.load_mmdit(folder)
    _, params16, velocity16 = mmdit.load_mmdit(folder, dtype=jnp.bfloat16)
    out16 = jax.jit(velocity16)(params16, *args)
    assert out16.dtype == jnp.float32
    assert relative_error(out16, jax.jit(velocity32)(params32, *args)) < 5e-2


def test_a_wrong_mapping_is_seen(saved):
    """Swapping the text stream's key and value maps of one block moves the output by far
    more than the tolerance: the comparison above can fail."""
    name, model, folder = saved
    config, hw = CASES[name]
    graphdef, params, velocity = mmdit.load_mmdit(folder)
    attn = params["transformer_blocks"][0]["attn"]
    k, v = attn["add_k_proj"]["kernel"][...], attn["add_v_proj"]["kernel"][...]
    attn["add_k_proj"]["kernel"][...] = v
    attn["add_v_proj"]["kernel"][...] = k
    x, sigma, cond = _inputs(config, hw)
    ours = jax.jit(velocity)(params, jnp.asarray(x), jnp.asarray(sigma),
                             {key: jnp.asarray(a) for key, a in cond.items()})
    assert relative_error(ours, _diffusers_velocity(model, x, sigma, cond)) > 100 * RTOL


def test_unmapped_and_missing_keys_fail_loudly(saved, tmp_path):
    name, _, folder = saved
    if name != "sd35":
        pytest.skip("one case suffices")
    # An extra tensor in the checkpoint is listed by name.
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    safetensors_numpy.save_file(
        {"transformer_blocks.0.attn.to_gate.weight": np.zeros((2, 2), np.float32),
         "transformer_blocks.0.ff.scale_shift_table": np.zeros((2,), np.float32)},
        str(extra / "extra.safetensors"))
    with pytest.raises(hf_weights.WeightsError) as err:
        mmdit.load_mmdit(str(extra))
    assert "transformer_blocks.0.attn.to_gate.weight" in str(err.value)
    assert "transformer_blocks.0.ff.scale_shift_table" in str(err.value)

    # A table that forgets the text stream's q/k norms: the keys are unmapped and the
    # parameters missing, all of them listed.
    def forgetful(key):
        return None if ".norm_added_" in key else mmdit.mmdit_name_table(key)

    config = mmdit.MMDiTConfig.from_dict(hf_weights.read_config(folder))
    _, abstract = mmdit.abstract_mmdit(config)
    with pytest.raises(hf_weights.WeightsError) as err:
        hf_weights.load_params(abstract, folder, forgetful)
    message = str(err.value)
    for i in range(config.num_layers):
        for qk in "qk":
            assert f"transformer_blocks.{i}.attn.norm_added_{qk}.weight" in message
            assert f"transformer_blocks/{i}/attn/norm_added_{qk}/scale" in message


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="caption_projection_dim"):
        mmdit.MMDiTConfig.from_dict({**SD3_TINY, "caption_projection_dim": 24}).validate()
    with pytest.raises(ValueError, match="qk_norm"):
        mmdit.MMDiTConfig.from_dict({**SD3_TINY, "qk_norm": "layer_norm"}).validate()
    with pytest.raises(ValueError, match="unknown fields"):
        mmdit.MMDiTConfig.from_dict({**SD3_TINY, "num_blocks": 3})


def test_sd35_medium_size_equals_diffusers():
    """SD3.5-Medium at full size, shapes only: our parameter count against diffusers' own
    model built on the meta device (an independent path; no weights anywhere)."""
    _, abstract = mmdit.abstract_mmdit(mmdit.SD35_MEDIUM_CONFIG)
    ours = count_params(abstract)
    with torch.device("meta"):
        reference = diffusers.SD3Transformer2DModel(**mmdit.SD35_MEDIUM_CONFIG)
    theirs = sum(p.numel() for p in reference.parameters())
    print(f"SD3.5-Medium parameters: ours {ours:,}, diffusers {theirs:,}")
    assert abs(ours - theirs) <= 0.02 * theirs
    assert ours == theirs
    # The same dict as a config.json round trip (lists for tuples) builds the same model.
    again = mmdit.MMDiTConfig.from_dict(json.loads(json.dumps(mmdit.SD35_MEDIUM_CONFIG)))
    assert again == mmdit.MMDiTConfig.from_dict(mmdit.SD35_MEDIUM_CONFIG)


@pytest.mark.slow
def test_remat_policies_keep_the_gradient_and_save_less():
    """Every remat policy gives the same gradient; what the backward pass keeps shrinks from
    "none" over "dots" (weight matmul outputs) to "full" (block inputs only)."""
    from flax import nnx  # noqa: PLC0415
    from normguard_jax.models import make_velocity_fn  # noqa: PLC0415

    x, sigma, cond = _inputs(SD35_TINY, (8, 12))
    grads, saved_bytes, params = {}, {}, None
    for policy in ("none", "dots", "full"):
        graphdef, abstract = mmdit.abstract_mmdit(SD35_TINY, remat=policy)
        if params is None:   # random values everywhere, so that every block reaches the output
            leaves, treedef = jax.tree.flatten(abstract)
            keys = jax.random.split(jax.random.key(3), len(leaves))
            params = treedef.unflatten([0.2 * jax.random.normal(k, p.shape) for p, k in
                                        zip(leaves, keys)])
        velocity = make_velocity_fn(graphdef)
        loss = lambda p, v=velocity: jnp.mean(v(p, x, sigma, cond) ** 2)  # noqa: E731
        grads[policy] = jax.jit(jax.grad(loss))(params)
        # The vjp closure holds exactly what the backward pass reads (the residuals).
        backward = jax.jit(lambda p, f=loss: jax.vjp(f, p)[1])(params)
        saved_bytes[policy] = sum(a.nbytes for a in jax.tree.leaves(backward))
    for policy in ("dots", "full"):
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert saved_bytes["none"] > saved_bytes["dots"] > saved_bytes["full"], saved_bytes
    with pytest.raises(ValueError, match="remat"):
        mmdit.MMDiT(SD35_TINY, remat="some", rngs=nnx.Rngs(0))

"""FLUX transformer: parity with diffusers' ``FluxTransformer2DModel`` called as ``FluxPipeline``
calls it, the name table on the real FLUX.1-dev key set, and FLUX.1-dev's size (abstract only).

The reference is a tiny random diffusers model (every parameter drawn at random: zero-initialised
layers would hide mapping errors) saved with ``save_pretrained`` and loaded with ``load_flux``.
Packing, image ids and unpacking on the diffusers side use the pipeline's own static methods.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from normguard_jax.models import flux, hf_weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from diffusers_reference import randomise, relative_error  # noqa: E402

TINY = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
LATENT = (16, 16, 16)  # H, W, C of the unpacked latent: 8×8 = 64 image tokens
TEXT_LEN = 7


def _random_diffusers_model(guidance_embeds: bool, seed: int):
    torch.manual_seed(seed)
    return randomise(
        diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds), seed)


def _inputs(guidance_embeds: bool, seed: int):
    rng = np.random.default_rng(seed)
    b = 2
    x = rng.normal(size=(b, *LATENT)).astype(np.float32)
    cond = {
        "text": rng.normal(size=(b, TEXT_LEN, TINY["joint_attention_dim"])).astype(np.float32),
        "pooled": rng.normal(size=(b, TINY["pooled_projection_dim"])).astype(np.float32),
    }
    if guidance_embeds:
        cond["guidance"] = np.array([3.5, 1.25], np.float32)
    sigma = np.array([0.83, 0.21], np.float32)
    return x, sigma, cond


def _diffusers_velocity(model, x, sigma, cond):
    """The transformer called exactly as FluxPipeline.__call__ calls it, output unpacked."""
    pipe = diffusers.FluxPipeline
    b, h, w, c = x.shape
    latents = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # NCHW
    packed = pipe._pack_latents(latents, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(TEXT_LEN, 3)
    guidance = torch.from_numpy(cond["guidance"]) if "guidance" in cond else None
    with torch.no_grad():
        out = model(
            hidden_states=packed, timestep=torch.from_numpy(sigma), guidance=guidance,
            pooled_projections=torch.from_numpy(cond["pooled"]),
            encoder_hidden_states=torch.from_numpy(cond["text"]),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
    # _unpack_latents takes the pixel size: latent size × vae_scale_factor (8)
    return pipe._unpack_latents(out, h * 8, w * 8, 8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_parity_with_diffusers(tmp_path, guidance_embeds):
    model = _random_diffusers_model(guidance_embeds, seed=1 + guidance_embeds)
    model.save_pretrained(tmp_path)
    x, sigma, cond = _inputs(guidance_embeds, seed=3)
    ref = _diffusers_velocity(model, x, sigma, cond)

    _, params, velocity = flux.load_flux(str(tmp_path))
    ours = np.asarray(jax.jit(velocity)(params, x, sigma, cond))
    assert ours.shape == x.shape and ref.shape == x.shape
    err = relative_error(ours, ref)
    print(f"max |Δ| / max |ref| = {err:.2e}")
    assert err < 1e-5
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the samples differ (σ, text, guidance per sample are used)
    assert np.abs(ours[0] - ours[1]).max() > 0.1 * np.abs(ours).max()


def test_bfloat16_activations_stay_close(tmp_path):
    import jax.numpy as jnp
    model = _random_diffusers_model(True, seed=5)
    model.save_pretrained(tmp_path)
    x, sigma, cond = _inputs(True, seed=6)
    _, params, velocity = flux.load_flux(str(tmp_path))
    ref = np.asarray(jax.jit(velocity)(params, x, sigma, cond))
    _, params16, velocity16 = flux.load_flux(str(tmp_path), dtype=jnp.bfloat16)
    assert jnp.asarray(params16["x_embedder"]["kernel"][...]).dtype == jnp.bfloat16
    ours = np.asarray(jax.jit(velocity16)(params16, x, sigma, cond))
    assert ours.dtype == np.float32
    err = relative_error(ours, ref)
    print(f"bfloat16 vs float32: max |Δ| / max |ref| = {err:.2e}")
    assert err < 5e-2


def test_missing_guidance_is_named(tmp_path):
    model = _random_diffusers_model(True, seed=7)
    model.save_pretrained(tmp_path)
    x, sigma, cond = _inputs(True, seed=8)
    del cond["guidance"]
    _, params, velocity = flux.load_flux(str(tmp_path))
    with pytest.raises(ValueError, match="guidance"):
        velocity(params, x, sigma, cond)


def test_unmapped_key_raises_listing_it(tmp_path):
    model = _random_diffusers_model(False, seed=9)
    model.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = dict(hf_weights.iter_tensors(str(path)))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["transformer_blocks.0.attn.to_qkv.weight"] = np.zeros((96, 32), np.float32)
    tensors["pos_embed.freqs"] = np.zeros(3, np.float32)
    safetensors_numpy.save_file(tensors, str(path))
    with pytest.raises(hf_weights.WeightsError) as e:
        flux.load_flux(str(tmp_path))
    assert "transformer_blocks.0.attn.to_qkv.weight" in str(e.value)
    assert "pos_embed.freqs" in str(e.value)


def test_schnell_checkpoint_does_not_fit_a_dev_model(tmp_path):
    model = _random_diffusers_model(False, seed=10)
    model.save_pretrained(tmp_path)
    config = hf_weights.read_config(str(tmp_path))
    abstract = nnx.eval_shape(lambda: flux.Flux({**config, "guidance_embeds": True},
                                                rngs=nnx.Rngs(0)))
    with pytest.raises(hf_weights.WeightsError, match="guidance_embedder"):
        hf_weights.load_params(nnx.split(abstract, nnx.Param)[1], str(tmp_path),
                               flux.flux_name_table)


def test_abstract_flux_is_eval_shape_of_the_whole_module():
    import jax.numpy as jnp
    for guidance_embeds in (True, False):
        config = dict(TINY, guidance_embeds=guidance_embeds, num_layers=3)
        kwargs = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True)
        whole = nnx.eval_shape(lambda: flux.Flux(config, rngs=nnx.Rngs(0), **kwargs))
        pieces = flux.abstract_flux(config, **kwargs)
        graph_w, params_w = nnx.split(whole, nnx.Param)
        graph_p, params_p = nnx.split(pieces, nnx.Param)
        assert graph_w == graph_p
        flat = lambda s: {tuple(p): (v.shape, v.dtype) for p, v in nnx.to_flat_state(s)}
        assert flat(params_w) == flat(params_p)
        assert nnx.state(whole, nnx.Not(nnx.Param)) == nnx.state(pieces, nnx.Not(nnx.Param))


def _flux_dev_abstract_params():
    return nnx.split(flux.abstract_flux(flux.FLUX_DEV_CONFIG), nnx.Param)[1]


def test_flux_dev_size_and_name_table_on_the_real_key_set():
    """FLUX.1-dev (``flux.FLUX_DEV_CONFIG``) built abstractly here and on torch's meta device
    by diffusers: the same parameter count (~11.9B), and the name table maps every diffusers
    key to a parameter of the same shape after its transform, and covers every parameter."""
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**flux.FLUX_DEV_CONFIG)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref_count = sum(p.numel() for p in ref.parameters())

    params = _flux_dev_abstract_params()
    leaves = {tuple(p): v for p, v in nnx.to_flat_state(params)}
    count = sum(int(np.prod(v.shape)) for v in leaves.values())
    print(f"FLUX.1-dev parameters: ours {count:,}, diffusers {ref_count:,}")
    assert count == ref_count
    assert 11.8e9 < count < 12.0e9

    seen = set()
    for key, shape in ref_shapes.items():
        target = flux.flux_name_table(key)
        assert target is not None, key
        path, transform = target
        assert path in leaves, (key, path)
        # a zero-byte stand-in of the tensor: transforms are views (transposes)
        stand_in = np.broadcast_to(np.zeros((), np.float32), shape)
        assert transform(stand_in).shape == tuple(leaves[path].shape), key
        assert path not in seen, key
        seen.add(path)
    assert seen == set(leaves)

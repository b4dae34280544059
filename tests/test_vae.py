"""The SD3/FLUX/SDXL VAE (models/vae.py) against diffusers' own ``AutoencoderKL``.

Tiny random diffusers models are saved with ``save_pretrained`` and loaded through
``vae.load_vae`` (the name table and ``hf_weights.load_params``). Every diffusers parameter is
drawn at random (GroupNorm scales and all biases too, which diffusers initialises to 1 and 0),
so a parameter sent to the wrong place changes the output; ``test_a_wrong_mapping_is_seen``
checks that the comparison is that sensitive.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from normguard_jax.models import hf_weights, vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from diffusers_reference import randomise, relative_error  # noqa: E402

RTOL = 1e-5  # max |ours - diffusers| / max |diffusers|, float32

# SD3's layout in miniature: three levels (two downsamplings, one width change on the way down
# and one on the way up, so the 1×1 shortcuts are exercised), 16 latent channels, no quant
# convs. The factors are SD3's.
SD3_TINY = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16],
    layers_per_block=2, latent_channels=16, norm_num_groups=4, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
# SD1/SDXL's layout in miniature: 4 latent channels, quant convs, no shift factor.
SDXL_TINY = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
    layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.13025,
    shift_factor=None, use_quant_conv=True, use_post_quant_conv=True)

# SD3's VAE as published in the vae/config.json of stabilityai/stable-diffusion-3-medium-
# diffusers (SD3.5 ships the same): SDXL's VAE architecture with 16 latent channels and no
# quant convs.
SD3 = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
    layers_per_block=2, latent_channels=16, norm_num_groups=32, act_fn="silu",
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    latents_mean=None, latents_std=None, force_upcast=True, sample_size=1024)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module", params=["sd3", "sdxl"])
def pair(request, tmp_path_factory):
    """(diffusers model, loaded VAE, jitted fns, config dict) saved to and loaded from disk."""
    config = {"sd3": SD3_TINY, "sdxl": SDXL_TINY}[request.param]
    model = randomise(diffusers.AutoencoderKL(**config), seed=0)
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    model.save_pretrained(folder)
    loaded = vae.load_vae(str(folder))
    fns = vae.make_vae_fns(loaded.graphdef)
    return model, loaded, vae.VAEFns(*(jax.jit(f) for f in fns)), config, folder


def test_decode_matches_diffusers(pair):
    model, loaded, fns, config, _ = pair
    latents = jax.random.normal(jax.random.key(1), (2, 4, 4, config["latent_channels"]))
    scale, shift = config["scaling_factor"], config["shift_factor"] or 0.0
    with torch.no_grad():  # the SD3 pipeline's decode: latents / scale + shift
        want = _nhwc(model.decode(_nchw(latents / scale + shift)).sample)
    got = fns.decode(loaded.params, latents)
    side = 4 * 2 ** (len(config["block_out_channels"]) - 1)
    assert got.shape == (2, side, side, 3)
    err = relative_error(got, want)
    print(f"decode max relative error {err:.2e}")
    assert err < RTOL
    np.testing.assert_allclose(fns.decode_unscaled(loaded.params, latents / scale + shift),
                               got, rtol=0, atol=1e-6 * np.abs(want).max())


def test_encode_matches_diffusers(pair):
    model, loaded, fns, config, _ = pair
    images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)
    scale, shift = config["scaling_factor"], config["shift_factor"] or 0.0
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
    mean, std = _nhwc(posterior.mean), _nhwc(posterior.std)
    key = jax.random.key(3)
    noise = np.asarray(jax.random.normal(key, mean.shape))

    @jax.jit
    def encodings(params):  # one compilation for the four variants
        return (fns.encode(params, images), fns.encode_unscaled(params, images),
                fns.encode(params, images, key), fns.encode_unscaled(params, images, key))

    got, got_unscaled, sample, sample_unscaled = encodings(loaded.params)
    err = relative_error(got, (mean - shift) * scale)  # the SD3 img2img pipeline's scaling
    print(f"encode max relative error {err:.2e}")
    assert err < RTOL
    assert relative_error(got_unscaled, mean) < RTOL
    # a posterior sample: mean + std · N(0, 1) with the key's normal draw
    assert relative_error(sample_unscaled, mean + std * noise) < RTOL
    assert relative_error(sample, (mean + std * noise - shift) * scale) < RTOL


def test_a_wrong_mapping_is_seen(pair):
    """Swapping two same-shaped parameters (norm1/norm2 scales of one block; to_q/to_k) moves
    the decoded image far beyond the tolerance: the parity tests can see a mapping error."""
    _, loaded, fns, config, _ = pair
    latents = jax.random.normal(jax.random.key(1), (1, 4, 4, config["latent_channels"]))
    base = fns.decode(loaded.params, latents)
    flat = traverse_util.flatten_dict(loaded.params.to_pure_dict())
    block = ("decoder", "mid_block", "resnets", 0)
    attn = ("decoder", "mid_block", "attentions", 0)
    for a, b in [(block + ("norm1", "scale"), block + ("norm2", "scale")),
                 (attn + ("to_q", "kernel"), attn + ("to_k", "kernel"))]:
        swapped = dict(flat)
        swapped[a], swapped[b] = flat[b], flat[a]
        params = jax.tree.map(lambda x: x, loaded.params)
        params.replace_by_pure_dict(traverse_util.unflatten_dict(swapped))
        assert relative_error(fns.decode(params, latents), base) > 1e-2, (a, b)


def test_unmapped_and_missing_keys_fail_loudly(pair, tmp_path):
    _, _, _, _, folder = pair
    (path,) = folder.glob("*.safetensors")
    tensors = safetensors_numpy.load_file(str(path))
    tensors["decoder.up_blocks.0.extra_norm.weight"] = np.ones(4, np.float32)
    del tensors["encoder.conv_in.bias"]
    safetensors_numpy.save_file(tensors, str(tmp_path / path.name))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(hf_weights.WeightsError) as error:
        vae.load_vae(str(tmp_path))
    message = str(error.value)
    assert "decoder.up_blocks.0.extra_norm.weight" in message
    assert "encoder/conv_in/bias" in message


def test_pre_0_15_attention_names_load(pair, tmp_path):
    """Folders written by diffusers < 0.15 name the mid-block attention query/key/value/
    proj_attn (Linear, or 1×1 conv in converted LDM files); they load into the same params."""
    _, loaded, _, _, folder = pair
    (path,) = folder.glob("*.safetensors")
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for name, array in safetensors_numpy.load_file(str(path)).items():
        for new, old in renames.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(new, old)
                if name.startswith("encoder") and name.endswith("weight"):
                    array = array[:, :, None, None]
        tensors[name] = array
    assert any(".query." in name for name in tensors)
    safetensors_numpy.save_file(tensors, str(tmp_path / path.name))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    legacy = vae.load_vae(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, legacy.params, loaded.params)


def test_name_table_covers_every_diffusers_key_of_sd3():
    """Every key of SD3's real-size state dict maps to one parameter of the right shape."""
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**SD3)
    _, abstract = vae.abstract_vae(SD3)
    leaves = traverse_util.flatten_dict(abstract.to_pure_dict())
    targets = {}
    for key, tensor in model.state_dict().items():
        path, transform = vae.name_table(key)
        assert path not in targets, (key, targets.get(path))
        targets[path] = key
        shape = transform(np.empty(tensor.shape, np.float32)).shape
        assert shape == leaves[path].shape, key
    assert set(targets) == set(leaves)
    assert vae.name_table("decoder.up_blocks.0.resnets.1.conv1.weight") == (
        ("decoder", "up_blocks", 0, "resnets", 1, "conv1", "kernel"), hf_weights.conv_kernel)
    assert vae.name_table("decoder.up_blocks.0.extra.weight") is None


def test_sd3_parameter_count_equals_diffusers():
    """SD3's VAE built without weights (nnx.eval_shape) has exactly diffusers' parameter
    count (83,819,683)."""
    with torch.device("meta"):
        theirs = sum(p.numel() for p in diffusers.AutoencoderKL(**SD3).parameters())
    _, abstract = vae.abstract_vae(SD3)
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    assert ours == theirs
    assert 83e6 < ours < 85e6


def test_config_reading():
    config = vae.VAEConfig.from_diffusers(dict(SD3, _class_name="AutoencoderKL",
                                               _diffusers_version="0.29.0"))
    assert config.downsampling_factor == 8
    assert (config.scaling_factor, config.shift_factor) == (1.5305, 0.0609)
    assert vae.VAEConfig.from_diffusers(SDXL_TINY).shift_factor == 0.0
    with pytest.raises(ValueError, match="act_fn"):
        vae.VAEConfig.from_diffusers(dict(SD3, act_fn="gelu"))
    with pytest.raises(ValueError, match="up_block_types"):
        vae.VAEConfig.from_diffusers(dict(SD3, up_block_types=["AttnUpDecoderBlock2D"] * 4))
    with pytest.raises(ValueError, match="unknown fields"):
        vae.VAEConfig.from_diffusers(dict(SD3, new_option=1))


def test_bfloat16_activations_stay_close(pair):
    """dtype=bfloat16 activations (float32 GroupNorm statistics and softmax) against float32."""
    _, loaded, fns, config, folder = pair
    low = vae.load_vae(str(folder), dtype=jnp.bfloat16)
    latents = jax.random.normal(jax.random.key(1), (1, 4, 4, config["latent_channels"]))
    got = jax.jit(vae.make_vae_fns(low.graphdef).decode)(low.params, latents)
    assert got.dtype == jnp.float32
    err = relative_error(got, fns.decode(loaded.params, latents))
    print(f"bfloat16 decode relative error {err:.2e}")
    assert err < 0.05

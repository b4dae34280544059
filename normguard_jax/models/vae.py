"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``) in Flax NNX, NHWC.

This is the VAE of SD3 and FLUX (16 latent channels, no quant convs) and of SD1/SDXL (4
channels, with the 1×1 quant convs): the same class, built from the model folder's diffusers
``config.json``, with the same maths as diffusers, so the released weights load unchanged
(``load_vae``; one name table, ``name_table``).

Layouts: images (B, H, W, C_img) float32 in [-1, 1]; latents (B, H/f, W/f, C_lat) float32 with
f = 2**(len(block_out_channels) - 1) (8 for the released models).

**Latent scaling — the one place it is defined.** The transformer works on *scaled* latents

    z_scaled = (z - shift_factor) * scaling_factor          (encode)
    z        = z_scaled / scaling_factor + shift_factor      (decode)

where z is the autoencoder's own latent (the posterior mean, or a sample of the posterior) and
both factors come from the folder's ``config.json``: SD3 uses scaling_factor 1.5305 and
shift_factor 0.0609, FLUX.1 0.3611 and 0.1159, SD1/SDXL 0.18215 / 0.13025 and no shift
(``null`` in the config, taken as 0). This is what the SD3 and FLUX pipelines of diffusers do
around ``vae.encode``/``vae.decode``. ``make_vae_fns(graphdef).encode``/``.decode`` apply it;
``.encode_unscaled``/``.decode_unscaled`` work on z itself.

Architecture (diffusers' Encoder / Decoder with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``):

  encoder: 3×3 conv → per level ``layers_per_block`` residual blocks, then (except at the last
    level) a stride-2 3×3 conv on the input padded by one zero row and column at the bottom and
    right only → mid block (residual block, single-head self-attention over all positions,
    residual block) → GroupNorm → SiLU → 3×3 conv to 2·C_lat (mean, log-variance)
    → optional 1×1 ``quant_conv``.
  decoder: optional 1×1 ``post_quant_conv`` → 3×3 conv → mid block → per level, widest first,
    ``layers_per_block + 1`` residual blocks then (except at the last level) nearest ×2
    upsampling and a 3×3 conv → GroupNorm → SiLU → 3×3 conv to C_img.
  residual block: GroupNorm → SiLU → 3×3 conv → GroupNorm → SiLU → 3×3 conv, plus the input
    (through a 1×1 conv when the width changes).

Every GroupNorm has ε = 1e-6 and computes its statistics in float32 whatever ``dtype`` is.
The posterior's log-variance is clipped to [-30, 20] as in diffusers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normguard_jax.models import config_kwargs, hf_weights

_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config that define the network.

    Defaults are those of ``diffusers.AutoencoderKL.__init__`` (a config.json written by
    ``save_pretrained`` states every field anyway).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Reads a diffusers ``AutoencoderKL`` config.json dict.

        Raises:
          ValueError: a field whose value this implementation does not cover (other block
            types, another activation, per-channel latent statistics), or an unknown field.
        """
        n = len(config.get("block_out_channels", cls.block_out_channels))
        supported = {  # a field absent from the dict takes diffusers' default, which fits
            "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n,
            "act_fn": "silu",
            "latents_mean": None,
            "latents_std": None,
        }
        kwargs = config_kwargs(cls, config, what="AutoencoderKL",
                               also_known=supported.keys() | _CONFIG_IGNORED)
        for name, need in supported.items():
            got = config.get(name, need)
            if (tuple(got) if isinstance(got, list) else got) != need:
                raise ValueError(
                    f"AutoencoderKL config: {name}={got!r} is not supported (need {need!r})")
        if kwargs.get("shift_factor") is None:
            kwargs["shift_factor"] = 0.0
        return cls(**kwargs)


# Fields that do not change the network: tiling size and the pipelines' upcast hint.
_CONFIG_IGNORED = frozenset({"sample_size", "force_upcast"})


# --------------------------------------------------------------------------- layers


def _conv(in_ch: int, out_ch: int, kernel: int, *, padding: Any = None, strides: int = 1,
          common: dict) -> nnx.Conv:
    if padding is None:
        padding = kernel // 2
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=strides, padding=padding, **common)


def _group_norm(ch: int, groups: int, *, common: dict) -> nnx.GroupNorm:
    # Two-pass variance (E[(x - mean)²]) as torch computes it; statistics in float32.
    return nnx.GroupNorm(ch, num_groups=groups, epsilon=_EPS, use_fast_variance=False, **common)


class ResnetBlock(nnx.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU → conv3×3, plus the (1×1-conv) input."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, *, common: dict):
        self.norm1 = _group_norm(in_ch, groups, common=common)
        self.conv1 = _conv(in_ch, out_ch, 3, common=common)
        self.norm2 = _group_norm(out_ch, groups, common=common)
        self.conv2 = _conv(out_ch, out_ch, 3, common=common)
        self.conv_shortcut = _conv(in_ch, out_ch, 1, common=common) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, h, w, in_ch) -> (B, h, w, out_ch)."""
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class MidAttention(nnx.Module):
    """Residual single-head self-attention over the h·w positions, GroupNorm first.

    The head is the full width (diffusers sets ``attention_head_dim`` to the channel count),
    so the logits are scaled by 1/sqrt(ch); softmax in float32. Memory: ``jax.nn.
    dot_product_attention``'s XLA path holds the (h·w)² logits, 1 GiB per 1024² image (128²
    latent positions) in float32.
    """

    def __init__(self, ch: int, groups: int, *, common: dict):
        self.group_norm = _group_norm(ch, groups, common=common)
        self.to_q = nnx.Linear(ch, ch, **common)
        self.to_k = nnx.Linear(ch, ch, **common)
        self.to_v = nnx.Linear(ch, ch, **common)
        self.to_out = nnx.Linear(ch, ch, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, h, w, ch) -> (B, h, w, ch)."""
        b, hh, ww, ch = x.shape
        tokens = self.group_norm(x).reshape(b, hh * ww, 1, ch)  # one head
        out = jax.nn.dot_product_attention(self.to_q(tokens), self.to_k(tokens),
                                           self.to_v(tokens))
        return x + self.to_out(out.reshape(b, hh, ww, ch))


class MidBlock(nnx.Module):
    """Residual block, optional attention, residual block (at the lowest resolution)."""

    def __init__(self, ch: int, groups: int, attention: bool, *, common: dict):
        self.resnets = nnx.List([ResnetBlock(ch, ch, groups, common=common) for _ in range(2)])
        self.attentions = nnx.List([MidAttention(ch, groups, common=common)] if attention
                                   else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """Residual blocks, then optionally a stride-2 conv padded only at the bottom and right."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool, *,
                 common: dict):
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups,
                                             common=common) for i in range(layers)])
        self.downsample = (_conv(out_ch, out_ch, 3, strides=2, padding=((0, 1), (0, 1)),
                                 common=common) if downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """Residual blocks, then optionally nearest-neighbour ×2 and a 3×3 conv."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool, *,
                 common: dict):
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups,
                                             common=common) for i in range(layers)])
        self.upsample = _conv(out_ch, out_ch, 3, common=common) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is None:
            return x
        return self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
    """Images (B, H, W, C_img) -> posterior moments (B, H/f, W/f, 2·C_lat), before quant_conv."""

    def __init__(self, cfg: VAEConfig, *, common: dict):
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, widths[0], 3, common=common)
        self.down_blocks = nnx.List([
            DownBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block, groups,
                      downsample=i < len(widths) - 1, common=common)
            for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention,
                                  common=common)
        self.conv_norm_out = _group_norm(widths[-1], groups, common=common)
        self.conv_out = _conv(widths[-1], 2 * cfg.latent_channels, 3, common=common)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, C_lat), after post_quant_conv -> images (B, h·f, w·f, C_img)."""

    def __init__(self, cfg: VAEConfig, *, common: dict):
        widths = tuple(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, widths[0], 3, common=common)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention,
                                  common=common)
        self.up_blocks = nnx.List([
            UpBlock(widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, groups,
                    upsample=i < len(widths) - 1, common=common)
            for i, w in enumerate(widths)])
        self.conv_norm_out = _group_norm(widths[-1], groups, common=common)
        self.conv_out = _conv(widths[-1], cfg.out_channels, 3, common=common)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- the model


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL`` (SD3 / FLUX / SD1 / SDXL VAE), NHWC.

    Args:
      config: a diffusers config.json dict, or a ``VAEConfig``.
      dtype: activation dtype (float32; bfloat16 on accelerators). GroupNorm statistics and
        the attention softmax are float32 regardless; outputs are float32.
      param_dtype: parameter dtype.
      rngs: initialisation randomness (the initial values are flax defaults, not diffusers';
        only the shapes matter, the weights come from ``load_vae``).

    The scaling factors are static attributes (in the graphdef), read from the config.
    """

    def __init__(self, config: VAEConfig | Mapping[str, Any], *,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_diffusers(config)
        bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderKL: norm_num_groups={cfg.norm_num_groups} does not "
                             f"divide block_out_channels {bad}")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor)
        self.downsampling_factor = cfg.downsampling_factor
        self.encoder = Encoder(cfg, common=common)
        self.decoder = Decoder(cfg, common=common)
        lat = cfg.latent_channels
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, common=common) if cfg.use_quant_conv else None
        self.post_quant_conv = (_conv(lat, lat, 1, common=common) if cfg.use_post_quant_conv
                                else None)

    def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C_img) in [-1, 1] -> posterior (mean, log-variance), each
        (B, H/f, W/f, C_lat) float32, unscaled; the log-variance clipped to [-30, 20]."""
        f = self.downsampling_factor
        if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode: need images (B, H, W, C) with H and W "
                             f"divisible by {f}; got shape {images.shape}")
        h = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, C_lat) -> images (B, h·f, w·f, C_img) float32 (about
        [-1, 1]; not clipped)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)


# --------------------------------------------------------------------------- pure functions


def scale_latents(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
    """The autoencoder's latents -> the transformer's: ``(z - shift) * scale``."""
    return (z - shift_factor) * scaling_factor


def unscale_latents(z_scaled: jax.Array, scaling_factor: float,
                    shift_factor: float) -> jax.Array:
    """The transformer's latents -> the autoencoder's: ``z / scale + shift``."""
    return z_scaled / scaling_factor + shift_factor


class VAEFns(NamedTuple):
    """Pure functions of the VAE parameters (see ``make_vae_fns``)."""

    encode: Callable[..., jax.Array]
    decode: Callable[[Any, jax.Array], jax.Array]
    encode_unscaled: Callable[..., jax.Array]
    decode_unscaled: Callable[[Any, jax.Array], jax.Array]


def make_vae_fns(graphdef: nnx.GraphDef) -> VAEFns:
    """The encode/decode functions of an ``AutoencoderKL`` graph.

    Returns ``VAEFns`` with (params as from ``nnx.split(model, nnx.Param)`` or ``load_vae``):

      encode(params, images, key=None) -> scaled latents (B, H/f, W/f, C_lat) float32: the
        posterior mean, or with a PRNG key a sample ``mean + std·N(0, 1)`` of the posterior;
        then ``(z - shift_factor) * scaling_factor`` (module docstring).
      decode(params, latents) -> images (B, H, W, C_img) float32: takes scaled latents and
        undoes the scaling first.
      encode_unscaled(params, images, key=None) / decode_unscaled(params, z): the same on the
        autoencoder's own latents z.

    Images are NHWC in [-1, 1]. No side effects; safe under jit, grad and vmap (with a batch
    axis).
    """

    def latent(model: AutoencoderKL, images: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        mean, logvar = model.moments(images)
        if key is None:
            return mean
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def encode_unscaled(params: Any, images: jax.Array,
                        key: Optional[jax.Array] = None) -> jax.Array:
        return latent(nnx.merge(graphdef, params), images, key)

    def decode_unscaled(params: Any, z: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).decode(z)

    def encode(params: Any, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return scale_latents(latent(model, images, key), model.scaling_factor,
                             model.shift_factor)

    def decode(params: Any, latents: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return model.decode(unscale_latents(latents, model.scaling_factor, model.shift_factor))

    return VAEFns(encode, decode, encode_unscaled, decode_unscaled)


# --------------------------------------------------------------------------- weights


def _legacy_linear(a: np.ndarray) -> np.ndarray:
    """Old attention weights: a torch Linear (out, in) or a 1×1 conv (out, in, 1, 1)."""
    return hf_weights.linear_kernel(a.reshape(a.shape[:2]))


# Every diffusers AutoencoderKL key, matched in order: (pattern, NNX path, transform). The
# path's dotted components become the state path (integers for list indices); \1 is the module
# prefix the pattern captured. Our module names are diffusers' except that one-element lists
# are dropped (downsamplers.0.conv -> downsample, upsamplers.0.conv -> upsample,
# to_out.0 -> to_out).
_BLOCK = r"(?:down_blocks|up_blocks)\.\d+"
_RESNET = rf"(?:{_BLOCK}|mid_block)\.resnets\.\d+"
_ATTN = r"mid_block\.attentions\.0"
_CONV = (rf"(?:encoder|decoder)\.(?:conv_in|conv_out|{_RESNET}\.(?:conv1|conv2|conv_shortcut))"
         r"|quant_conv|post_quant_conv")
_NORM = rf"(?:encoder|decoder)\.(?:conv_norm_out|{_RESNET}\.norm[12]|{_ATTN}\.group_norm)"
_NAME_TABLE: tuple[tuple[re.Pattern, str, hf_weights.Transform], ...] = tuple(
    (re.compile(pattern), path, transform) for pattern, path, transform in (
        (rf"({_CONV})\.weight", r"\1.kernel", hf_weights.conv_kernel),
        (rf"({_CONV})\.bias", r"\1.bias", hf_weights.identity),
        (r"(encoder\.down_blocks\.\d+)\.downsamplers\.0\.conv\.weight", r"\1.downsample.kernel",
         hf_weights.conv_kernel),
        (r"(encoder\.down_blocks\.\d+)\.downsamplers\.0\.conv\.bias", r"\1.downsample.bias",
         hf_weights.identity),
        (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.conv\.weight", r"\1.upsample.kernel",
         hf_weights.conv_kernel),
        (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.conv\.bias", r"\1.upsample.bias",
         hf_weights.identity),
        (rf"({_NORM})\.weight", r"\1.scale", hf_weights.identity),
        (rf"({_NORM})\.bias", r"\1.bias", hf_weights.identity),
        (rf"((?:encoder|decoder)\.{_ATTN}\.to_[qkv])\.weight", r"\1.kernel",
         hf_weights.linear_kernel),
        (rf"((?:encoder|decoder)\.{_ATTN}\.to_[qkv])\.bias", r"\1.bias", hf_weights.identity),
        (rf"((?:encoder|decoder)\.{_ATTN})\.to_out\.0\.weight", r"\1.to_out.kernel",
         hf_weights.linear_kernel),
        (rf"((?:encoder|decoder)\.{_ATTN})\.to_out\.0\.bias", r"\1.to_out.bias",
         hf_weights.identity),
        # Names of diffusers < 0.15 folders (and 1×1-conv attention of converted LDM files).
        (rf"((?:encoder|decoder)\.{_ATTN})\.query\.weight", r"\1.to_q.kernel", _legacy_linear),
        (rf"((?:encoder|decoder)\.{_ATTN})\.key\.weight", r"\1.to_k.kernel", _legacy_linear),
        (rf"((?:encoder|decoder)\.{_ATTN})\.value\.weight", r"\1.to_v.kernel", _legacy_linear),
        (rf"((?:encoder|decoder)\.{_ATTN})\.proj_attn\.weight", r"\1.to_out.kernel",
         _legacy_linear),
        (rf"((?:encoder|decoder)\.{_ATTN})\.query\.bias", r"\1.to_q.bias", hf_weights.identity),
        (rf"((?:encoder|decoder)\.{_ATTN})\.key\.bias", r"\1.to_k.bias", hf_weights.identity),
        (rf"((?:encoder|decoder)\.{_ATTN})\.value\.bias", r"\1.to_v.bias", hf_weights.identity),
        (rf"((?:encoder|decoder)\.{_ATTN})\.proj_attn\.bias", r"\1.to_out.bias",
         hf_weights.identity),
    ))


def name_table(key: str) -> Optional[tuple[tuple, hf_weights.Transform]]:
    """diffusers ``AutoencoderKL`` state-dict key -> (NNX param path, transform), or None.

    E.g. ``decoder.up_blocks.0.resnets.1.conv1.weight`` ->
    ``(("decoder", "up_blocks", 0, "resnets", 1, "conv1", "kernel"), conv_kernel)``.
    """
    for pattern, path, transform in _NAME_TABLE:
        match = pattern.fullmatch(key)
        if match:
            parts = match.expand(path).split(".")
            return tuple(int(p) if p.isdigit() else p for p in parts), transform
    return None


class LoadedVAE(NamedTuple):
    """A VAE from a model folder: ``fns = make_vae_fns(vae.graphdef)``, then
    ``fns.encode(vae.params, images)``."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: VAEConfig


def abstract_vae(config: VAEConfig | Mapping[str, Any], *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of an ``AutoencoderKL`` with ``jax.ShapeDtypeStruct`` leaves (no
    parameter is computed)."""
    model = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                                                 rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def load_vae(folder: str, *, dtype: jnp.dtype = jnp.float32,
             param_dtype: jnp.dtype = jnp.float32,
             shardings: Optional[Callable[[tuple], Any]] = None) -> LoadedVAE:
    """Loads a diffusers ``AutoencoderKL`` folder (config.json + safetensors), e.g. the
    ``vae/`` folder of an SD3 or FLUX repository.

    Args:
      folder: the model folder.
      dtype: activation dtype; param_dtype: parameter dtype (the checkpoint is cast to it).
      shardings: ``path -> Sharding`` per parameter (``hf_weights.load_params``), or None.

    Raises:
      hf_weights.WeightsError: keys the name table does not map, or parameters no key fills.
      ValueError: a config this implementation does not cover.
    """
    config = VAEConfig.from_diffusers(hf_weights.read_config(folder))
    graphdef, abstract = abstract_vae(config, dtype=dtype, param_dtype=param_dtype)
    params = hf_weights.load_params(abstract, folder, name_table, shardings=shardings)
    return LoadedVAE(graphdef, params, config)

"""SD3 / SD3.5 MMDiT (Esser et al. 2024, arXiv 2403.03206) in Flax NNX, equal to diffusers'
``SD3Transformer2DModel`` and loadable from a diffusers model folder.

Velocity convention (the one place it is stated): diffusers' SD3 transformer is called with
NCHW latents and ``timestep = 1000·σ``; its output is already the library's velocity
``v = ε - x0`` for ``x_σ = (1-σ)·x0 + σ·ε`` (the SD3 Euler step is
``x + (σ_next - σ)·output``).
So ``MMDiT(x, σ, cond) == transpose_NHWC(diffusers(transpose_NCHW(x), timestep=1000·σ,
encoder_hidden_states=cond["text"], pooled_projections=cond["pooled"]))``: this module takes
NHWC latents and σ ∈ [0, 1] (multiplied by ``embeddings.SIGMA_SCALE = 1000`` inside) and
returns NHWC. Latents are the VAE's, already shifted and scaled as the SD3 pipeline does.

Data flow, for latents x (B, H, W, C), σ (B,), text tokens (B, L, joint_attention_dim) and a
pooled text vector (B, pooled_projection_dim), with width D = heads·head_dim:
  image tokens  = stride-p p×p conv of x (T = H/p·W/p tokens, row-major) + a fixed 2D sin-cos
                  table: a G×G grid (G = pos_embed_max_size) whose positions are
                  ``arange(G)·(sample_size/p)/G``, cropped at its centre to (H/p, W/p); each
                  token's vector is ``[sincos(column), sincos(row)]`` (column half first), each
                  half ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ω_k = 10000^(-k/(D/4)).
  c             = MLP(sinusoid(1000·σ), 256 wide, [cos, sin]) + MLP(pooled); both MLPs are
                  Linear → SiLU → Linear.
  text tokens   = Linear(joint_attention_dim → D)(text).
  N joint blocks, each with two streams (image, text) that share one attention:
    per stream, from SiLU(c): Linear → (shift, scale, gate) for attention and for the MLP
    (adaLN-Zero); q, k, v of each stream from its own Linear maps, optionally RMS-normalised
    per head (``qk_norm="rms_norm"``, eps 1e-6, learnt scale per stream); softmax attention
    over the concatenation [image tokens, text tokens] (scale 1/sqrt(head_dim)); each stream
    takes back its own rows through its own output Linear; residual ``x + gate·attn``; then
    ``x + gate·MLP(LN(x)·(1+scale)+shift)`` (MLP: Linear D→4D, tanh-GELU, Linear 4D→D).
    Every LayerNorm here has no affine parameters and eps 1e-6.
    Dual-attention blocks (SD3.5-M's ``dual_attention_layers``): the image modulation also
    yields (shift2, scale2, gate2); a second, image-only self-attention ``attn2`` reads
    ``LN(x_in)·(1+scale2)+shift2`` of the block's *input* image tokens and its gated output is
    added after the joint attention's, before the MLP.
    The last block is "context pre-only": its text stream is modulated by a continuous adaLN
    (Linear → (scale, shift), in that order, no gate), takes part in the attention as keys and
    values only, and is then dropped (no text output projection, no text MLP). Its text query
    projection and text query norm exist in the checkpoint but cannot affect the output; this
    module keeps them as parameters (so checkpoints round-trip) and does not compute them.
  out           = Linear(LN(x)·(1+scale)+shift) with (scale, shift) = Linear(SiLU(c)) —
                  scale first — to p·p·out_channels per token, unpatchified to
                  (B, H, W, out_channels).

Precision: ``dtype`` is the activation dtype (inputs, Linear outputs and the residual streams);
LayerNorm and RMSNorm statistics and the attention softmax are computed in float32; the
output is float32. ``param_dtype`` is the parameters' dtype.

Loading: ``mmdit_name_table`` is the one table from diffusers state-dict names to this module's
parameter paths; ``load_mmdit(folder)`` builds the module abstractly from the folder's
``config.json`` and streams its ``*.safetensors`` into it (``hf_weights.load_params``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normguard_jax.models import hf_weights, init_in_own_trace, init_module, make_velocity_fn
from normguard_jax.models.layers import (
    Attention, FeedForward, Modulation, TimeTextEmbedding, TransformerConfig, attention,
    call_block, dense, layer_norm, modulate, remat_name,
)


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(TransformerConfig):
    """Architecture of an SD3-class MMDiT: the fields, names and defaults of diffusers'
    ``SD3Transformer2DModel`` config (a ``config.json`` without a field means the default);
    ``from_dict``, ``width`` and ``output_channels`` from ``layers.TransformerConfig``.

    Attributes:
      sample_size: latent height/width the position table was trained for; only sets the
        position scale ``base = sample_size // patch_size``. Inputs may be smaller.
      patch_size: p; tokens are p×p latent patches.
      in_channels: latent channels C of the input.
      num_layers: number of joint blocks; the last one is context-pre-only.
      attention_head_dim: width of one head.
      num_attention_heads: heads; D = heads · head_dim.
      joint_attention_dim: width of the text tokens (T5/CLIP concatenation; 4096).
      caption_projection_dim: width of the projected text tokens; must equal D.
      pooled_projection_dim: width of the pooled text vector (CLIP-L + CLIP-G, 2048).
      out_channels: channels of the output (None: in_channels).
      pos_embed_max_size: side G of the position grid that inputs are cropped from (H/p ≤ G).
      dual_attention_layers: indices of blocks with the extra image self-attention (SD3.5-M).
      qk_norm: None or "rms_norm" (per-head RMSNorm of q and k, with a learnt scale).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    NAME = "MMDiT"

    def validate(self) -> None:
        """Raises ValueError naming the field of an unsupported or inconsistent config."""
        if self.caption_projection_dim != self.width:
            raise ValueError(
                f"MMDiT config: caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads·attention_head_dim={self.width} (the text stream shares "
                "the blocks' width)"
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(
                f"MMDiT config: qk_norm={self.qk_norm!r} unsupported; None or 'rms_norm'"
            )
        if self.pos_embed_max_size is None:
            raise ValueError(
                "MMDiT config: pos_embed_max_size=None (an uncropped, resized position table) is "
                "not supported; every SD3/SD3.5 checkpoint sets it"
            )
        if self.width % 4:
            raise ValueError(f"MMDiT config: width {self.width} must be divisible by 4")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"MMDiT config: dual_attention_layers {bad} outside "
                f"[0, num_layers={self.num_layers})"
            )


# The published SD3.5-Medium transformer (stabilityai/stable-diffusion-3.5-medium,
# transformer/config.json). Cross-checked against diffusers' single-file loader
# (loaders/single_file_utils.py), which recognises SD3.5-M by a position table of
# 147456 = 384² entries and an adaLN width of 9216 = 6·1536 = 6·24·64, and finds the dual
# attention blocks as those holding ``attn2`` weights (blocks 0..12 of 24 in that checkpoint).
# Its parameters: 2,243,171,520 here and in diffusers (tests/test_mmdit.py). The advertised
# "2.5B" also counts the stored position table, 384²·1536 = 226,492,416 values (2.47B in all),
# which diffusers keeps as a buffer and this module recomputes.
SD35_MEDIUM_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


@functools.lru_cache(maxsize=8)
def position_table(width: int, grid: int, base: int) -> np.ndarray:
    """The fixed (G·G, width) position table of SD3 before cropping.

    Positions along each axis are ``arange(G, float32) / float32(G / base)``; token
    n = r·G + c gets ``[sincos(c), sincos(r)]``, each half ``[sin(pos·ω_k), cos(pos·ω_k)]``
    with ``ω_k = 10000^(-k/(width/4))``, computed in float64 and rounded to float32 (as diffusers
    does). Cached; read-only.
    """
    pos = np.arange(grid, dtype=np.float32) / np.float32(grid / base)
    omega = 1.0 / 10_000.0 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

    def sincos(p: np.ndarray) -> np.ndarray:
        angles = p.astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    table = np.concatenate(
        [sincos(cols.reshape(-1)), sincos(rows.reshape(-1))], axis=1
    ).astype(np.float32)
    table.setflags(write=False)
    return table


def cropped_position_table(config: MMDiTConfig, grid_h: int, grid_w: int) -> np.ndarray:
    """The (grid_h·grid_w, D) centre crop of ``position_table`` for a grid_h×grid_w token grid."""
    g = config.pos_embed_max_size
    if grid_h > g or grid_w > g:
        raise ValueError(
            f"MMDiT: token grid {grid_h}x{grid_w} exceeds pos_embed_max_size={g}"
        )
    table = position_table(config.width, g, config.sample_size // config.patch_size)
    top, left = (g - grid_h) // 2, (g - grid_w) // 2
    crop = table.reshape(g, g, -1)[top:top + grid_h, left:left + grid_w]
    return crop.reshape(grid_h * grid_w, -1)


def _attend(attn: Attention, x: jax.Array, text: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array | None]:
    """The attention of ``attn`` over [image tokens x (B, T, D), text tokens (B, L, D) or None]
    -> (image out (B, T, D), text out (B, L, D), or None when there is no text stream or no
    ``to_add_out``: the context-pre-only block's text queries are not computed)."""
    q, k, v = attn.qkv(x)
    text_queries = text is not None and attn.to_add_out is not None
    if text is not None:
        tk, tv = attn.key_value(text, text=True)
        k, v = jnp.concatenate([k, tk], 1), jnp.concatenate([v, tv], 1)
        if text_queries:
            q = jnp.concatenate([q, attn.query(text, text=True)], 1)
    out = attention(q, k, v)
    t = x.shape[1]
    return attn.to_out(out[:, :t]), (attn.to_add_out(out[:, t:]) if text_queries else None)


class JointBlock(nnx.Module):
    """One MMDiT block (image and text streams sharing an attention); see the module docstring.

    Args:
      context_pre_only: the last block: the text stream is only keys/values, then dropped.
      dual_attention: add the image-only self-attention ``attn2`` (SD3.5-M).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        context_pre_only: bool,
        dual_attention: bool,
        qk_norm: str | None,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        common = dense(dtype, param_dtype, rngs)
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.norm1 = Modulation(dim, 9 if dual_attention else 6, dense=common)
        self.norm1_context = Modulation(dim, 2 if context_pre_only else 6, dense=common)
        attn = dict(qk_norm=qk_norm == "rms_norm", image_out=True, dense=common,
                    param_dtype=param_dtype)
        self.attn = Attention(
            dim, num_heads, head_dim, joint=True, text_out=not context_pre_only, **attn
        )
        self.attn2 = (
            Attention(dim, num_heads, head_dim, joint=False, text_out=False, **attn)
            if dual_attention else None
        )
        self.ff = FeedForward(dim, dense=common)
        self.ff_context = None if context_pre_only else FeedForward(dim, dense=common)

    def __call__(
        self, x: jax.Array, text: jax.Array, c: jax.Array
    ) -> tuple[jax.Array, jax.Array | None]:
        """x (B, T, D), text (B, L, D), c (B, D) -> (x, text), text None after the last block."""
        mods = self.norm1(c)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        x_norm = layer_norm(x)
        if self.context_pre_only:
            t_scale, t_shift = self.norm1_context(c)
        else:
            t_shift, t_scale, t_gate, t_shift_m, t_scale_m, t_gate_m = self.norm1_context(c)
        text_in = modulate(layer_norm(text), t_shift, t_scale)
        attn_x, attn_text = _attend(self.attn, modulate(x_norm, shift_a, scale_a), text_in)
        out = x + gate_a[:, None, :] * attn_x
        if self.attn2 is not None:
            shift_2, scale_2, gate_2 = mods[6:]
            attn2_x, _ = _attend(self.attn2, modulate(x_norm, shift_2, scale_2))
            out = out + gate_2[:, None, :] * attn2_x
        out = out + gate_m[:, None, :] * self.ff(modulate(layer_norm(out), shift_m, scale_m))
        if self.context_pre_only:
            return out, None
        text = text + t_gate[:, None, :] * attn_text
        h = self.ff_context(modulate(layer_norm(text), t_shift_m, t_scale_m))
        return out, text + t_gate_m[:, None, :] * h


class PatchEmbedding(nnx.Module):
    """Stride-p p×p convolution (``proj``, HWIO kernel) plus the cropped position table."""

    def __init__(self, config: MMDiTConfig, *, dense: dict[str, Any]):
        p = config.patch_size
        self.config = config
        self.proj = nnx.Conv(
            config.in_channels, config.width, kernel_size=(p, p), strides=(p, p),
            padding="VALID", **dense,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H/p·W/p, D), tokens row-major."""
        h = self.proj(x)
        b, gh, gw, d = h.shape
        pos = cropped_position_table(self.config, gh, gw)
        return h.reshape(b, gh * gw, d) + jnp.asarray(pos, dtype=h.dtype)[None]


class MMDiT(nnx.Module):
    """SD3 / SD3.5 MMDiT velocity network ``(x, sigma, cond) -> v`` (see the module docstring).

    Args:
      config: a diffusers ``SD3Transformer2DModel`` config dict (e.g. a ``config.json``) or an
        ``MMDiTConfig``.
      dtype: activation dtype (float32, or bfloat16 on accelerators); norm statistics and the
        softmax stay float32; the output is float32.
      param_dtype: parameter dtype.
      remat: rematerialise each block in the backward pass: a name of
        ``layers.REMAT_POLICIES`` ("none", "full", "dots") or True ("full") / False ("none").
      rngs: initialisation randomness. Fresh weights: Xavier-uniform kernels, zero biases, unit
        RMSNorm scales, and zero adaLN and output maps (adaLN-Zero: the output starts at 0).

    Calling it: x (B, H, W, in_channels) latents, NHWC, with H/p, W/p ≤ pos_embed_max_size;
    sigma (B,) float32 in [0, 1]; cond ``{"text": (B, L, joint_attention_dim),
    "pooled": (B, pooled_projection_dim)}`` → v (B, H, W, out_channels) float32.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | MMDiTConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        config = MMDiTConfig.checked(config)
        self.config = config
        self.dtype = dtype
        self.remat = remat_name(remat)
        d = config.width
        common = dense(dtype, param_dtype, rngs)
        self.pos_embed = PatchEmbedding(config, dense=common)
        self.time_text_embed = TimeTextEmbedding(
            d, config.pooled_projection_dim, guidance=False, dense=common
        )
        self.context_embedder = nnx.Linear(
            config.joint_attention_dim, config.caption_projection_dim, **common
        )
        last = config.num_layers - 1
        self.transformer_blocks = nnx.List([
            init_in_own_trace(
                JointBlock, rngs, dim=d, num_heads=config.num_attention_heads,
                head_dim=config.attention_head_dim, context_pre_only=i == last,
                dual_attention=i in config.dual_attention_layers, qk_norm=config.qk_norm,
                dtype=dtype, param_dtype=param_dtype,
            )
            for i in range(config.num_layers)
        ])
        self.norm_out = Modulation(d, 2, dense=common)
        zeros = nnx.initializers.zeros_init()
        p = config.patch_size
        self.proj_out = nnx.Linear(
            d, p * p * config.output_channels,
            **{**common, "kernel_init": zeros}, bias_init=zeros,
        )

    def __call__(
        self, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]
    ) -> jax.Array:
        """x (B, H, W, C) NHWC, sigma (B,) in [0, 1], cond {"text", "pooled"} -> v (B, H, W,
        out_channels) float32."""
        cfg = self.config
        b, h, w, ch = x.shape
        p = cfg.patch_size
        if ch != cfg.in_channels or h % p or w % p:
            raise ValueError(
                f"MMDiT: input {x.shape} needs {cfg.in_channels} channels and H, W divisible "
                f"by patch_size={p}"
            )
        tokens = self.pos_embed(x.astype(self.dtype))
        c = self.time_text_embed(sigma, cond["pooled"].astype(self.dtype))
        text = self.context_embedder(cond["text"].astype(self.dtype))
        for block in self.transformer_blocks:
            tokens, text = call_block(block, tokens, text, c, remat=self.remat)
        scale, shift = self.norm_out(c)
        out = self.proj_out(modulate(layer_norm(tokens), shift, scale))
        out = out.reshape(b, h // p, w // p, p, p, cfg.output_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, cfg.output_channels)
        return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# diffusers state dict -> NNX parameters

# diffusers submodule names that differ here (applied to the dotted key first). All other
# module names are diffusers' own.
_RENAMES = (
    (re.compile(r"\.ff(_context)?\.net\.0\.proj\."), r".ff\1.fc1."),  # FeedForward's first
    (re.compile(r"\.ff(_context)?\.net\.2\."), r".ff\1.fc2."),  # and output Linear
    (re.compile(r"\.(attn2?)\.to_out\.0\."), r".\1.to_out."),  # to_out.1 is a Dropout
)
# (renamed key, leaf name here, transform); the first full match wins.
_LEAVES: tuple[tuple[re.Pattern, str, hf_weights.Transform], ...] = tuple(
    (re.compile(pattern), leaf, transform) for pattern, leaf, transform in (
        (r"pos_embed\.proj\.weight", "kernel", hf_weights.conv_kernel),
        (r".*\.norm(?:_added)?_[qk]\.weight", "scale", hf_weights.identity),
        (r".*\.weight", "kernel", hf_weights.linear_kernel),
        (r".*\.bias", "bias", hf_weights.identity),
    ))
# Checkpoint entries that are not parameters of this module: diffusers stores the fixed
# position table as a persistent buffer; ``MMDiT`` recomputes it (``position_table``;
# tests/test_mmdit.py checks the two agree).
MMDIT_BUFFERS = ("pos_embed.pos_embed",)


def mmdit_name_table(key: str) -> tuple[tuple, hf_weights.Transform] | object | None:
    """The one name table of this model (``hf_weights.NameTable``): a diffusers
    ``SD3Transformer2DModel`` state-dict key -> (path in the ``nnx.Param`` state of ``MMDiT``,
    transform of the stored array).

    Examples:
      ``transformer_blocks.0.attn.to_q.weight`` -> (("transformer_blocks", 0, "attn", "to_q",
        "kernel"), linear_kernel)
      ``transformer_blocks.3.ff_context.net.0.proj.bias`` -> ((…, "ff_context", "fc1",
        "bias"), identity)
      ``transformer_blocks.0.attn.to_out.0.weight`` -> ((…, "attn", "to_out", "kernel"), …)
      ``transformer_blocks.0.attn.norm_added_k.weight`` -> ((…, "norm_added_k", "scale"),
        identity)
      ``pos_embed.proj.weight`` -> (("pos_embed", "proj", "kernel"), conv_kernel)
      ``pos_embed.pos_embed`` -> ``hf_weights.IGNORE`` (recomputed buffer)
    A key that is neither a weight nor a bias gives None (unmapped); a weight or bias of a
    module the model does not have gets a path the loader reports as naming no parameter.
    """
    if key in MMDIT_BUFFERS:
        return hf_weights.IGNORE
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    for pattern, leaf, transform in _LEAVES:
        if pattern.fullmatch(key):
            parts = key.split(".")[:-1] + [leaf]
            return tuple(int(s) if s.isdigit() else s for s in parts), transform
    return None


def abstract_mmdit(
    config: Mapping[str, Any] | MMDiTConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: bool | str = False,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of an ``MMDiT`` with ``jax.ShapeDtypeStruct`` leaves: shapes
    only, nothing computed or allocated (``nnx.eval_shape``), at any size (each block is
    traced on its own, ``models.init_in_own_trace``: SD3.5-M in about a second)."""
    model = init_module(
        lambda: MMDiT(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                      rngs=nnx.Rngs(0)),
        abstract=True,
    )
    return nnx.split(model, nnx.Param)


class LoadedMMDiT(NamedTuple):
    """An MMDiT from a model folder; ``velocity(params, x, sigma, cond) -> v`` is the pure
    function of ``graphdef`` (as ``models.make_velocity_fn`` gives it)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    velocity: Callable[[Any, jax.Array, jax.Array, Mapping[str, jax.Array]], jax.Array]


def load_mmdit(
    folder: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: bool | str = False,
    shardings: Callable[[tuple], Any] | None = None,
) -> LoadedMMDiT:
    """Loads a diffusers ``SD3Transformer2DModel`` folder (config.json + safetensors, e.g. the
    ``transformer/`` folder of an SD3 or SD3.5 repository).

    Args:
      folder: the model folder.
      dtype: activation dtype; param_dtype: parameter dtype (the checkpoint is cast to it).
      remat: rematerialise each block in the backward pass.
      shardings: ``path -> Sharding`` per parameter (``hf_weights.load_params``), or None.

    Returns:
      ``(graphdef, params, velocity)``; ``velocity(params, x, sigma, cond)`` with x (B, H, W, C)
      NHWC latents, sigma (B,) in [0, 1], cond {"text", "pooled"} (see ``MMDiT``).

    Raises:
      hf_weights.WeightsError: checkpoint keys the table does not map, or parameters no key
        fills, listed by name.
      ValueError: a config this implementation does not cover.
    """
    config = MMDiTConfig.from_dict(hf_weights.read_config(folder))
    graphdef, abstract = abstract_mmdit(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    params = hf_weights.load_params(abstract, folder, mmdit_name_table, shardings=shardings)
    return LoadedMMDiT(graphdef, params, make_velocity_fn(graphdef))

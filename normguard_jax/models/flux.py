"""FLUX.1-class rectified-flow transformer (Black Forest Labs, 2024) in Flax NNX, equal to
diffusers' ``FluxTransformer2DModel`` and loadable from a diffusers model folder.

Velocity convention (the one place it is stated). diffusers' FLUX transformer takes *packed*
latents: the pipeline (``FluxPipeline``) cuts the VAE latent (B, C, H, W) into 2×2 patches,
giving (B, H/2·W/2, 4C) tokens in row-major patch order, each token's values ordered
(channel, row in patch, column in patch). It calls the transformer with ``timestep = t/1000``
where ``t = 1000·σ`` is the scheduler's timestep, i.e. with ``timestep = σ`` ∈ [0, 1], and the
transformer multiplies it by 1000 before the sinusoidal embedding. Its Euler step
(``FlowMatchEulerDiscreteScheduler.step``) is ``x + (σ_next - σ)·output`` on the packed latents,
so the unpacked output is dx/dσ, the library's ``v = ε - x0`` for ``x_σ = (1-σ)·x0 + σ·ε``.
This module takes the *unpacked* NHWC latent (B, H, W, in_channels/4) and σ (B,), packs it
itself, and returns the unpacked NHWC output:

    Flux(x, σ, cond) == unpack(diffusers(pack(x), timestep=σ, guidance=cond["guidance"],
                                         encoder_hidden_states=cond["text"],
                                         pooled_projections=cond["pooled"],
                                         img_ids=image_ids(H/2, W/2), txt_ids=zeros(L, 3)))

Guidance (FLUX.1-dev, ``guidance_embeds=True``): the pipeline passes the raw guidance scale
(e.g. 3.5, float32, one per sample); the *transformer's forward* (not the embedding module)
multiplies it by 1000, like the timestep, and the embedding takes the same 256-wide sinusoid
of it. So ``cond["guidance"]`` is the raw scale; it is ignored when ``guidance_embeds`` is
False (FLUX.1-schnell). Latents are the VAE's, already shifted and scaled as the pipeline does.

Data flow, width D = heads·head_dim:
  image tokens  = Linear(in_channels → D)(pack(x)), T = H/2·W/2 tokens.
  text tokens   = Linear(joint_attention_dim → D)(text), L tokens.
  c             = MLP(sinusoid(1000·σ)) [+ MLP(sinusoid(1000·guidance))] + MLP(pooled);
                  each MLP is Linear → SiLU → Linear; the sinusoid is 256 wide, [cos, sin],
                  frequencies 10000^(-k/128), k < 128.
  rotary table  = per token a position id (axis 0, row, column): text tokens all (0, 0, 0),
                  image token (i, j) of the (H/2, W/2) grid (0, i, j), as the pipeline's
                  ``_prepare_latent_image_ids``. For axis a with width d_a (``axes_dims_rope``,
                  Σ d_a = head_dim), angles ``pos_a·θ^(-2k/d_a)``, θ = 10000, k < d_a/2 (float64);
                  the head's features are rotated in adjacent pairs (2k, 2k+1) by these angles,
                  the axes' pairs one after another. Applied to q and k of every attention,
                  over the sequence [text tokens, image tokens].
  double-stream blocks (``num_layers``), image and text streams with their own weights:
    per stream adaLN-Zero from SiLU(c): Linear → (shift, scale, gate) for the attention and
    for the MLP; q, k, v per stream (Linear with bias), RMS-normalised per head (q and k,
    eps 1e-6, learnt scale, separate for each stream); one softmax attention (scale
    1/sqrt(head_dim)) over [text, image] with the rotary table; each stream's rows go through
    its own output Linear; ``x + gate·attn``; ``x + gate·MLP(LN(x)·(1+scale)+shift)`` with
    MLP Linear D→4D, tanh-GELU, Linear 4D→D.
  single-stream blocks (``num_single_layers``) on the concatenation [text, image]:
    from SiLU(c): Linear → (shift, scale, gate); h = LN(x)·(1+scale)+shift; attention of h
    (q, k, v with bias, q/k RMSNorm, rotary; no output Linear) and tanh-GELU(Linear D→4D)(h)
    side by side, concatenated (5D) into one Linear 5D→D; ``x + gate·that``.
  out           = Linear(LN(x_image)·(1+scale)+shift) with (scale, shift) = Linear(SiLU(c)) —
                  scale first — to out_channels per token, unpacked to (B, H, W,
                  out_channels/4).
  Every LayerNorm has no affine parameters and eps 1e-6.

Precision: ``dtype`` is the activation dtype (inputs, Linear outputs, the residual streams);
LayerNorm and RMSNorm statistics, the rotation, the attention logits and softmax, and the
sinusoidal embeddings of σ and guidance are computed in float32 (diffusers casts σ·1000 to the
activation dtype first; here it stays float32); the output is float32. ``param_dtype`` is the
parameters' dtype.

Loading: ``flux_name_table`` is the one table from diffusers state-dict names to this module's
parameter paths; ``load_flux(folder)`` builds the module abstractly (``abstract_flux``) from
the folder's ``config.json`` and streams its ``*.safetensors`` into it
(``hf_weights.load_params``). ``FLUX_DEV_CONFIG`` is FLUX.1-dev's architecture (11.9B
parameters).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normguard_jax.models import hf_weights, init_in_own_trace, init_module, make_velocity_fn
from normguard_jax.models.layers import (
    MLP_RATIO, Attention, FeedForward, Modulation, TimeTextEmbedding, TransformerConfig,
    attention, call_block, dense, layer_norm, modulate, remat_name,
)

# Base θ of the rotary position angles.
ROPE_THETA = 10_000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig(TransformerConfig):
    """Architecture of a FLUX.1-class transformer: the fields, names and defaults of diffusers'
    ``FluxTransformer2DModel`` config (a ``config.json`` without a field means the default);
    ``from_dict``, ``width`` and ``output_channels`` (the width of a packed output token) from
    ``layers.TransformerConfig``.

    Attributes:
      patch_size: must be 1 (every FLUX.1 checkpoint): the 2×2 packing is done outside
        diffusers' model, here inside this module.
      in_channels: width of a packed token, 4 × latent channels (64 for the 16-channel VAE).
      out_channels: width of a packed output token (None: in_channels).
      num_layers: number of double-stream blocks.
      num_single_layers: number of single-stream blocks.
      attention_head_dim: width of one head.
      num_attention_heads: heads; D = heads · head_dim.
      joint_attention_dim: width of the text tokens (T5-XXL: 4096).
      pooled_projection_dim: width of the pooled text vector (CLIP-L: 768).
      guidance_embeds: embed the guidance scale (guidance-distilled FLUX.1-dev) or not
        (FLUX.1-schnell).
      axes_dims_rope: rotary widths of the (unused, row, column) position axes; they sum to
        attention_head_dim.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    NAME = "FLUX"

    def validate(self) -> None:
        """Raises ValueError naming the field of an unsupported or inconsistent config."""
        if self.patch_size != 1:
            raise ValueError(
                f"FLUX config: patch_size={self.patch_size} unsupported; FLUX.1 checkpoints use "
                "1 (the 2×2 packing happens outside diffusers' transformer)"
            )
        for name in ("in_channels", "output_channels"):
            if getattr(self, name) % 4:
                raise ValueError(
                    f"FLUX config: {name}={getattr(self, name)} must be divisible by 4 (2×2 "
                    "packed latent channels)"
                )
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"FLUX config: axes_dims_rope={self.axes_dims_rope} must be three even widths"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"FLUX config: axes_dims_rope={self.axes_dims_rope} must sum to "
                f"attention_head_dim={self.attention_head_dim}"
            )


# FLUX.1-dev's transformer. The values are those of Black Forest Labs' reference code
# (github.com/black-forest-labs/flux, src/flux/util.py, configs["flux-dev"]: hidden_size 3072 =
# 24 heads × 128, depth 19, depth_single_blocks 38, context_in_dim 4096, vec_in_dim 768,
# axes_dim [16, 56, 56], in_channels 64, guidance_embed True), written with diffusers' names;
# they are also diffusers' ``FluxTransformer2DModel`` defaults except ``guidance_embeds``.
# FLUX.1-schnell is the same with guidance_embeds False.
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


# ----------------------------------------------------------------------------------------
# fixed tables


def image_ids(grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h·grid_w, 3) float32 position ids of the packed image tokens, row-major:
    token i·grid_w + j has ids (0, i, j) — the pipeline's ``_prepare_latent_image_ids``."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return ids.astype(np.float32)


@functools.lru_cache(maxsize=16)
def rope_table(
    axes_dims: tuple[int, ...], text_len: int, grid_h: int, grid_w: int
) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (text_len + grid_h·grid_w, Σ axes_dims) float32: the rotary angles of
    the sequence [text tokens (ids 0), image tokens (``image_ids``)].

    For axis a of width d_a, pair k < d_a/2 has angle ``id_a · θ^(-2k/d_a)`` (float64, then
    cos/sin rounded to float32); each value is repeated for the two features of its pair.
    Cached; read-only.
    """
    ids = np.concatenate([np.zeros((text_len, 3), np.float32), image_ids(grid_h, grid_w)])
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(ids[:, axis].astype(np.float64)[:, None] * inv[None, :])
    angles = np.repeat(np.concatenate(angles, axis=1), 2, axis=1)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent feature pairs of x (B, S, heads, head_dim) by the angles of (cos, sin)
    (S, head_dim): ``(a, b) -> (a·cos - b·sin, b·cos + a·sin)``, in float32."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# layers


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, rope: tuple[jax.Array, jax.Array]
            ) -> jax.Array:
    """``layers.attention`` after the rotation of q and k; (B, S, heads, head_dim) ->
    (B, S, heads·head_dim)."""
    cos, sin = rope
    return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


class DoubleStreamBlock(nnx.Module):
    """Image and text streams with their own weights sharing one attention (diffusers'
    ``FluxTransformerBlock``); see the module docstring."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dense(dtype, param_dtype, rngs)
        self.norm1 = Modulation(dim, 6, dense=common)
        self.norm1_context = Modulation(dim, 6, dense=common)
        self.attn = Attention(dim, num_heads, head_dim, joint=True, qk_norm=True,
                              image_out=True, text_out=True, dense=common,
                              param_dtype=param_dtype)
        self.ff = FeedForward(dim, dense=common)
        self.ff_context = FeedForward(dim, dense=common)

    def __call__(self, x: jax.Array, text: jax.Array, c: jax.Array,
                 rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D), text (B, L, D), c (B, D), rope over [text, image] -> (x, text)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(c)
        t_shift_a, t_scale_a, t_gate_a, t_shift_m, t_scale_m, t_gate_m = self.norm1_context(c)
        qi, ki, vi = self.attn.qkv(modulate(layer_norm(x), shift_a, scale_a))
        qt, kt, vt = self.attn.qkv(modulate(layer_norm(text), t_shift_a, t_scale_a), text=True)
        out = _attend(jnp.concatenate([qt, qi], 1), jnp.concatenate([kt, ki], 1),
                      jnp.concatenate([vt, vi], 1), rope)
        length = text.shape[1]
        x = x + gate_a[:, None, :] * self.attn.to_out(out[:, length:])
        x = x + gate_m[:, None, :] * self.ff(modulate(layer_norm(x), shift_m, scale_m))
        text = text + t_gate_a[:, None, :] * self.attn.to_add_out(out[:, :length])
        h = self.ff_context(modulate(layer_norm(text), t_shift_m, t_scale_m))
        return x, text + t_gate_m[:, None, :] * h


class SingleStreamBlock(nnx.Module):
    """Parallel attention and MLP over the concatenated [text, image] sequence (diffusers'
    ``FluxSingleTransformerBlock``); see the module docstring."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        common = dense(dtype, param_dtype, rngs)
        self.norm = Modulation(dim, 3, dense=common)
        self.attn = Attention(dim, num_heads, head_dim, joint=False, qk_norm=True,
                              image_out=False, text_out=False, dense=common,
                              param_dtype=param_dtype)
        self.proj_mlp = nnx.Linear(dim, MLP_RATIO * dim, **common)
        self.proj_out = nnx.Linear((MLP_RATIO + 1) * dim, dim, **common)

    def __call__(self, x: jax.Array, c: jax.Array, rope: tuple[jax.Array, jax.Array]
                 ) -> jax.Array:
        """x (B, L+T, D) the [text, image] sequence, c (B, D) -> (B, L+T, D)."""
        shift, scale, gate = self.norm(c)
        h = modulate(layer_norm(x), shift, scale)
        attn = _attend(*self.attn.qkv(h), rope)
        mlp = nnx.gelu(self.proj_mlp(h), approximate=True)
        return x + gate[:, None, :] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))


def pack(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2·W/2, 4C): 2×2 patches, row-major, values ordered (c, dy, dx) —
    the pipeline's ``_pack_latents`` on the NCHW latent."""
    b, h, w, ch = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, ch).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * ch)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of ``pack``: (B, H/2·W/2, 4C) -> (B, H, W, C)."""
    b, _, width = tokens.shape
    ch = width // 4
    x = tokens.reshape(b, h // 2, w // 2, ch, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, ch)


class Flux(nnx.Module):
    """FLUX.1-class velocity network ``(x, sigma, cond) -> v`` (see the module docstring).

    Args:
      config: a diffusers ``FluxTransformer2DModel`` config dict (e.g. a ``config.json``) or a
        ``FluxConfig``.
      dtype: activation dtype (float32, or bfloat16 on accelerators); norm statistics, the
        rotation and the softmax stay float32; the output is float32.
      param_dtype: parameter dtype.
      remat: rematerialise each block in the backward pass: a name of
        ``layers.REMAT_POLICIES`` ("none", "full", "dots") or True ("full") / False ("none").
      rngs: initialisation randomness. Fresh weights: Xavier-uniform kernels, zero biases, unit
        RMSNorm scales, and zero adaLN and output maps (adaLN-Zero: the output starts at 0).

    Calling it: x (B, H, W, in_channels/4) latents, NHWC, H and W even; sigma (B,) float32 in
    [0, 1]; cond ``{"text": (B, L, joint_attention_dim) T5 states, "pooled": (B,
    pooled_projection_dim) CLIP pooled output, "guidance": (B,) guidance scale (read only when
    guidance_embeds)}`` → v (B, H, W, out_channels/4) float32.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | FluxConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool | str = False,
        rngs: nnx.Rngs,
    ):
        config = FluxConfig.checked(config)
        self.config = config
        self.dtype = dtype
        self.remat = remat_name(remat)
        d = config.width
        common = dense(dtype, param_dtype, rngs)
        self.x_embedder = nnx.Linear(config.in_channels, d, **common)
        self.context_embedder = nnx.Linear(config.joint_attention_dim, d, **common)
        self.time_text_embed = TimeTextEmbedding(
            d, config.pooled_projection_dim, guidance=config.guidance_embeds, dense=common
        )
        block = dict(dim=d, num_heads=config.num_attention_heads,
                     head_dim=config.attention_head_dim, dtype=dtype, param_dtype=param_dtype)
        self.transformer_blocks = nnx.List([
            init_in_own_trace(DoubleStreamBlock, rngs, **block) for _ in range(config.num_layers)
        ])
        self.single_transformer_blocks = nnx.List([
            init_in_own_trace(SingleStreamBlock, rngs, **block)
            for _ in range(config.num_single_layers)
        ])
        self.norm_out = Modulation(d, 2, dense=common)
        self.proj_out = nnx.Linear(
            d, config.output_channels, **{**common, "kernel_init": nnx.initializers.zeros_init()}
        )

    def __call__(
        self, x: jax.Array, sigma: jax.Array, cond: Mapping[str, jax.Array]
    ) -> jax.Array:
        """x (B, H, W, C) NHWC, sigma (B,) in [0, 1], cond {"text", "pooled"[, "guidance"]}
        -> v (B, H, W, out_channels/4) float32."""
        cfg = self.config
        b, h, w, ch = x.shape
        if 4 * ch != cfg.in_channels or h % 2 or w % 2:
            raise ValueError(
                f"FLUX: input {x.shape} needs {cfg.in_channels // 4} channels (in_channels/4) "
                "and even H, W"
            )
        guidance = None
        if cfg.guidance_embeds:
            if "guidance" not in cond:
                raise ValueError(
                    'FLUX: this model embeds the guidance scale (guidance_embeds=True); pass '
                    'cond["guidance"] of shape (B,), e.g. 3.5'
                )
            guidance = jnp.broadcast_to(jnp.asarray(cond["guidance"]), (b,))
        tokens = self.x_embedder(pack(x.astype(self.dtype)))
        c = self.time_text_embed(sigma, cond["pooled"].astype(self.dtype), guidance)
        text = self.context_embedder(cond["text"].astype(self.dtype))
        length = text.shape[1]
        cos, sin = rope_table(cfg.axes_dims_rope, length, h // 2, w // 2)
        rope = (jnp.asarray(cos), jnp.asarray(sin))
        for block in self.transformer_blocks:
            tokens, text = call_block(block, tokens, text, c, rope, remat=self.remat)
        seq = jnp.concatenate([text, tokens], axis=1)
        for block in self.single_transformer_blocks:
            seq = call_block(block, seq, c, rope, remat=self.remat)
        tokens = seq[:, length:]
        scale, shift = self.norm_out(c)
        out = self.proj_out(modulate(layer_norm(tokens), shift, scale))
        return unpack(out, h, w).astype(jnp.float32)


def abstract_flux(
    config: Mapping[str, Any] | FluxConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: bool | str = False,
) -> Flux:
    """``nnx.eval_shape(lambda: Flux(config, ...))``: the module with ``jax.ShapeDtypeStruct``
    leaves, nothing computed or allocated, at any size (each block is traced on its own,
    ``models.init_in_own_trace``: FLUX.1-dev in about a second instead of 50 s)."""
    return init_module(
        lambda: Flux(config, dtype=dtype, param_dtype=param_dtype, remat=remat,
                     rngs=nnx.Rngs(0)),
        abstract=True,
    )


# ----------------------------------------------------------------------------------------
# diffusers state dict -> NNX parameters

_LINEAR = {"weight": ("kernel", hf_weights.linear_kernel), "bias": ("bias", hf_weights.identity)}
_NORM = {"weight": ("scale", hf_weights.identity)}

# diffusers module (a key without its last component) -> (path here, leaf table).
_TOP_MODULES: dict[str, tuple[tuple[str, ...], dict]] = {
    "x_embedder": (("x_embedder",), _LINEAR),
    "context_embedder": (("context_embedder",), _LINEAR),
    "norm_out.linear": (("norm_out", "linear"), _LINEAR),
    "proj_out": (("proj_out",), _LINEAR),
    **{
        f"time_text_embed.{e}.{l}": (("time_text_embed", e, l), _LINEAR)
        for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
        for l in ("linear_1", "linear_2")
    },
}
_DOUBLE_MODULES: dict[str, tuple[tuple[str, ...], dict]] = {
    "norm1.linear": (("norm1", "linear"), _LINEAR),
    "norm1_context.linear": (("norm1_context", "linear"), _LINEAR),
    **{f"attn.{m}": (("attn", m), _LINEAR)
       for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                 "to_add_out")},
    "attn.to_out.0": (("attn", "to_out"), _LINEAR),  # to_out.1 is a Dropout
    **{f"attn.{m}": (("attn", m), _NORM)
       for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")},
    **{f"{f}.net.0.proj": ((f, "fc1"), _LINEAR) for f in ("ff", "ff_context")},
    **{f"{f}.net.2": ((f, "fc2"), _LINEAR) for f in ("ff", "ff_context")},
}
_SINGLE_MODULES: dict[str, tuple[tuple[str, ...], dict]] = {
    "norm.linear": (("norm", "linear"), _LINEAR),
    "proj_mlp": (("proj_mlp",), _LINEAR),
    "proj_out": (("proj_out",), _LINEAR),
    **{f"attn.{m}": (("attn", m), _LINEAR) for m in ("to_q", "to_k", "to_v")},
    **{f"attn.{m}": (("attn", m), _NORM) for m in ("norm_q", "norm_k")},
}
_BLOCK_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def flux_name_table(
    key: str,
) -> tuple[tuple[str | int, ...], Callable[[np.ndarray], np.ndarray]] | None:
    """The one name table of this model: a diffusers ``FluxTransformer2DModel`` state-dict key
    -> (path in ``nnx.state(Flux)``, transform of the torch array to the NNX array), or None
    for a key this module does not know (the loader lists those as unmapped).

    Examples:
      ``transformer_blocks.0.attn.to_q.weight`` -> (("transformer_blocks", 0, "attn", "to_q",
        "kernel"), transpose)
      ``transformer_blocks.3.attn.to_out.0.bias`` -> ((…, "attn", "to_out", "bias"), identity)
      ``transformer_blocks.3.ff_context.net.0.proj.weight`` -> ((…, "ff_context", "fc1",
        "kernel"), transpose)
      ``single_transformer_blocks.5.attn.norm_k.weight`` -> ((…, "attn", "norm_k", "scale"),
        identity)
      ``time_text_embed.guidance_embedder.linear_1.bias`` -> (("time_text_embed",
        "guidance_embedder", "linear_1", "bias"), identity)
    The table does not depend on the config: a block index or a guidance embedder the model
    does not have maps to a path the loader reports as absent.
    """
    module, _, leaf = key.rpartition(".")
    prefix: tuple[str | int, ...] = ()
    modules = _TOP_MODULES
    match = _BLOCK_KEY.match(module)
    if match:
        kind, index, module = match.groups()
        prefix = (kind, int(index))
        modules = _DOUBLE_MODULES if kind == "transformer_blocks" else _SINGLE_MODULES
    if module not in modules:
        return None
    path, leaves = modules[module]
    if leaf not in leaves:
        return None
    name, transform = leaves[leaf]
    return prefix + path + (name,), transform


VelocityFn = Callable[[Any, jax.Array, jax.Array, Mapping[str, jax.Array]], jax.Array]


def load_flux(
    folder: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    remat: bool | str = False,
    shardings: Callable[[tuple], Any] | None = None,
) -> tuple[nnx.GraphDef, nnx.State, VelocityFn]:
    """Loads a diffusers ``FluxTransformer2DModel`` folder (e.g. ``FLUX.1-dev/transformer``).

    The module is built abstractly (``abstract_flux``: ``nnx.eval_shape``, no weights
    allocated) from the folder's ``config.json``; every tensor is then streamed from the
    safetensors files into its parameter (``hf_weights.load_params``), cast to
    ``param_dtype`` and placed by ``shardings``.

    Args:
      folder: the model folder (config.json and *.safetensors, sharded or not).
      dtype: activation dtype.
      param_dtype: parameter dtype (None: ``dtype``).
      remat: rematerialise each block in the backward pass.
      shardings: ``param_path -> jax.sharding.Sharding`` or None (default device).

    Returns:
      ``(graphdef, params, velocity)`` with ``velocity(params, x, sigma, cond) -> v`` pure
      (see ``Flux`` for shapes).

    Raises:
      hf_weights.WeightsError: checkpoint keys the name table does not map, parameters without
        a key, or shapes that do not match — all listed before any tensor is read.
      ValueError: an unknown or unsupported config field.
    """
    config = FluxConfig.from_dict(hf_weights.read_config(folder))
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = abstract_flux(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    params = hf_weights.load_params(abstract_params, folder, flux_name_table,
                                    shardings=shardings)
    return graphdef, params, make_velocity_fn(graphdef)

"""Class-conditional convolutional U-Net (ADM-style residual blocks with scale-shift conditioning).

Data flow for an image x (B, H, W, C):
  3×3 conv stem → down path: at each resolution ``num_res_blocks`` residual blocks, then a
  stride-2 conv (except at the lowest resolution); every output is kept as a skip
  → middle: residual block, optional self-attention, residual block (lowest resolution)
  → up path: at each resolution ``num_res_blocks + 1`` residual blocks, each consuming one skip
  by channel concatenation, then nearest ×2 upsampling + 3×3 conv (except at full resolution)
  → GroupNorm → SiLU → zero-initialised 3×3 conv to C channels.
Conditioning e = MLP(sinusoid(σ·1000)) + E[cond] (see ``embeddings.ConditionEmbedding``) enters
every residual block as a per-channel scale and shift after its second GroupNorm.

The output conv and the last conv of every residual block start at exactly zero (blocks start
as identity maps, the network output is exactly 0). GroupNorm normalises each sample on its
own, so samples never interact.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from normguard_jax.models.conv import conv_layer
from normguard_jax.models.embeddings import ConditionEmbedding


class ResBlock(nnx.Module):
    """GroupNorm → SiLU → conv → GroupNorm·(1 + scale) + shift → SiLU → conv(zero init), + skip.

    (scale, shift) = Linear(SiLU(e)) per output channel. The skip is a 1×1 conv when the
    channel count changes, the identity otherwise.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        num_groups: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.norm1 = nnx.GroupNorm(in_ch, num_groups=num_groups, **common)
        self.conv1 = conv_layer(in_ch, out_ch, (3, 3), padding=1, **common)
        self.emb_proj = nnx.Linear(emb_dim, 2 * out_ch, **common)
        self.norm2 = nnx.GroupNorm(out_ch, num_groups=num_groups, **common)
        self.conv2 = conv_layer(
            out_ch, out_ch, (3, 3), padding=1, kernel_init=zeros, bias_init=zeros, **common
        )
        self.skip = conv_layer(in_ch, out_ch, (1, 1), **common) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """x (B, h, w, in_ch), emb (B, emb_dim) -> (B, h, w, out_ch)."""
        h = self.conv1(nnx.silu(self.norm1(x)))
        scale, shift = jnp.split(self.emb_proj(nnx.silu(emb)), 2, axis=-1)
        h = self.norm2(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = self.conv2(nnx.silu(h))
        residual = x if self.skip is None else self.skip(x)
        return residual + h


class Downsample(nnx.Module):
    """3×3 conv with stride 2: (B, h, w, ch) -> (B, h/2, w/2, ch); h and w must be even."""

    def __init__(self, ch: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv_layer(
            ch, ch, (3, 3), strides=2, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """emb is unused; the signature matches ``ResBlock`` so the paths iterate uniformly."""
        del emb
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour ×2 then 3×3 conv: (B, h, w, ch) -> (B, 2h, 2w, ch)."""

    def __init__(self, ch: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv_layer(
            ch, ch, (3, 3), padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """emb is unused; the signature matches ``ResBlock``."""
        del emb
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class AttentionBlock(nnx.Module):
    """Residual multi-head self-attention over the h·w positions; output projection zero init."""

    def __init__(
        self,
        ch: int,
        num_heads: int,
        num_groups: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.num_heads = num_heads
        self.norm = nnx.GroupNorm(ch, num_groups=num_groups, **common)
        self.qkv = nnx.Linear(ch, 3 * ch, **common)
        self.proj = nnx.Linear(ch, ch, kernel_init=zeros, bias_init=zeros, **common)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """x (B, h, w, ch) -> (B, h, w, ch); emb is unused."""
        del emb
        b, h, w, ch = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.num_heads, ch // self.num_heads)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return x + self.proj(out.reshape(b, h, w, ch))


def _apply_layer(layer: nnx.Module, x: jax.Array, emb: jax.Array) -> jax.Array:
    return layer(x, emb)


# Rematerialised variant: activations inside a layer are recomputed in the backward pass.
_apply_layer_remat = nnx.remat(_apply_layer)


class UNet(nnx.Module):
    """Class-conditional U-Net velocity network ``(x, sigma, cond) -> v``.

    Args:
      image_shape: (H, W, C); H and W must be divisible by 2**(len(channel_mults) - 1).
      num_classes: number of real classes; ``cond == num_classes`` is the null class.
      base_channels: channels at full resolution are base_channels · channel_mults[0].
      channel_mults: one multiplier per resolution level, full resolution first.
      num_res_blocks: residual blocks per level on the down path (one more on the up path).
      num_groups: GroupNorm groups; must divide every channel count.
      attention: add self-attention in the middle (lowest resolution).
      num_heads: attention heads; must divide the lowest-resolution channel count.
      emb_dim: width of the conditioning vector (default 4 · base_channels).
      freq_dim: width of the sinusoidal embedding of σ·1000 (default base_channels).
      dtype: compute dtype (float32; bfloat16 on accelerators). Output is always float32.
      param_dtype: parameter dtype (float32).
      remat: wrap each residual / attention / resampling layer in ``nnx.remat``.
      rngs: initialisation randomness.

    Calling it: x (B, H, W, C) float32 NHWC in [-1, 1], sigma (B,) float32 in [0, 1] (scaled by
    1000 inside for the sinusoidal embedding), cond (B,) int32 in [0, num_classes] →
    v (B, H, W, C) float32.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        base_channels: int,
        channel_mults: Sequence[int],
        num_res_blocks: int,
        num_groups: int,
        attention: bool = True,
        num_heads: int = 1,
        emb_dim: int | None = None,
        freq_dim: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        h, w, ch_in = image_shape
        channel_mults = tuple(channel_mults)
        factor = 2 ** (len(channel_mults) - 1)
        if not channel_mults or num_res_blocks < 1 or num_classes < 1:
            raise ValueError(
                "UNet: need at least one level, num_res_blocks >= 1 and num_classes >= 1; got "
                f"channel_mults={channel_mults}, num_res_blocks={num_res_blocks}, "
                f"num_classes={num_classes}"
            )
        if h % factor or w % factor:
            raise ValueError(
                f"UNet: image size {h}x{w} is not divisible by 2**(levels-1)={factor} "
                f"(channel_mults={channel_mults})"
            )
        widths = [base_channels * m for m in channel_mults]
        bad = [c for c in widths if c % num_groups]
        if bad:
            raise ValueError(
                f"UNet: num_groups={num_groups} does not divide channel counts {bad}"
            )
        if attention and widths[-1] % num_heads:
            raise ValueError(
                f"UNet: num_heads={num_heads} does not divide the lowest-resolution width "
                f"{widths[-1]}"
            )
        emb_dim = 4 * base_channels if emb_dim is None else emb_dim
        freq_dim = base_channels if freq_dim is None else freq_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_shape = tuple(image_shape)
        self.remat = remat
        self.dtype = dtype

        self.cond_embed = ConditionEmbedding(emb_dim, num_classes, freq_dim=freq_dim, **common)
        self.stem = conv_layer(ch_in, widths[0], (3, 3), padding=1, **common)

        down, skip_widths, ch = [], [widths[0]], widths[0]
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(ResBlock(ch, out, emb_dim, num_groups, **common))
                ch = out
                skip_widths.append(ch)
            if level != len(widths) - 1:
                down.append(Downsample(ch, **common))
                skip_widths.append(ch)
        self.down = nnx.List(down)

        middle = [ResBlock(ch, ch, emb_dim, num_groups, **common)]
        if attention:
            middle.append(AttentionBlock(ch, num_heads, num_groups, **common))
        middle.append(ResBlock(ch, ch, emb_dim, num_groups, **common))
        self.middle = nnx.List(middle)

        up = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            for _ in range(num_res_blocks + 1):
                up.append(ResBlock(ch + skip_widths.pop(), out, emb_dim, num_groups, **common))
                ch = out
            if level != 0:
                up.append(Upsample(ch, **common))
        self.up = nnx.List(up)

        zeros = nnx.initializers.zeros_init()
        self.out_norm = nnx.GroupNorm(ch, num_groups=num_groups, **common)
        self.out_conv = conv_layer(
            ch, ch_in, (3, 3), padding=1, kernel_init=zeros, bias_init=zeros, **common
        )

    def __call__(self, x: jax.Array, sigma: jax.Array, cond: jax.Array) -> jax.Array:
        """x (B, H, W, C), sigma (B,) in [0, 1], cond (B,) int -> v (B, H, W, C) float32."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"UNet built for images {self.image_shape}, got input {x.shape}")
        apply = _apply_layer_remat if self.remat else _apply_layer
        emb = self.cond_embed(sigma, cond)
        h = self.stem(x.astype(self.dtype))
        skips = [h]
        for layer in self.down:
            h = apply(layer, h, emb)
            skips.append(h)
        for layer in self.middle:
            h = apply(layer, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = apply(layer, h, emb)
        out = self.out_conv(nnx.silu(self.out_norm(h)))
        return out.astype(jnp.float32)

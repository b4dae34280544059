"""Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero blocks.

Data flow for an image x (B, H, W, C):
  patchify (non-overlapping p×p patches, reshape + linear; the same map as a stride-p conv)
  → + fixed 2D sin-cos position embedding → N blocks modulated by c → adaLN final layer
  → linear to p·p·C values per token → unpatchify to (B, H, W, C).
c = MLP(sinusoid(σ·1000)) + E[cond] (see ``embeddings.ConditionEmbedding``).

adaLN-Zero: every modulation linear and the output linear start at exactly zero, so each
block starts as the identity and the network output is exactly 0 at initialisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from normguard_jax.models.embeddings import ConditionEmbedding, sincos_2d_position_embedding


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (B, T, D); shift, scale (B, D) -> x·(1 + scale) + shift, broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nnx.Module):
    """Pre-norm transformer block whose norms are modulated by c (adaLN-Zero).

    From c: (shift, scale, gate) for attention and for the MLP, via SiLU → Linear(D → 6D),
    zero-initialised. ``x + gate·Attn(modulate(LN(x)))``, then the same with the MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        xavier = nnx.initializers.xavier_uniform()
        zeros = nnx.initializers.zeros_init()
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(dim, **norm)
        self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=xavier, **dense)
        self.proj = nnx.Linear(dim, dim, kernel_init=xavier, **dense)
        self.norm2 = nnx.LayerNorm(dim, **norm)
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=xavier, **dense)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=xavier, **dense)
        self.modulation = nnx.Linear(dim, 6 * dim, kernel_init=zeros, bias_init=zeros, **dense)

    def _attention(self, x: jax.Array) -> jax.Array:
        """Multi-head self-attention over tokens: (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(b, t, d))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x (B, T, D) tokens, c (B, D) conditioning -> (B, T, D)."""
        mods = self.modulation(nnx.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)
        x = x + gate_a[:, None, :] * self._attention(_modulate(self.norm1(x), shift_a, scale_a))
        h = self.fc1(_modulate(self.norm2(x), shift_m, scale_m))
        h = self.fc2(nnx.gelu(h, approximate=True))
        return x + gate_m[:, None, :] * h


def _apply_block(block: DiTBlock, x: jax.Array, c: jax.Array) -> jax.Array:
    return block(x, c)


# Rematerialised variant: activations inside a block are recomputed in the backward pass.
_apply_block_remat = nnx.remat(_apply_block)


class DiT(nnx.Module):
    """Class-conditional DiT velocity network ``(x, sigma, cond) -> v``.

    Args:
      image_shape: (H, W, C) of the inputs; H and W must be divisible by ``patch_size``.
      num_classes: number of real classes; ``cond == num_classes`` is the null class.
      patch_size: p; the image becomes (H/p)·(W/p) tokens of p·p·C values.
      hidden_dim: token width D; divisible by ``num_heads`` and by 4 (position embedding).
      depth: number of transformer blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width = mlp_ratio · D.
      freq_dim: width of the sinusoidal embedding of σ·1000.
      dtype: compute dtype (float32; bfloat16 on accelerators). Output is always float32.
      param_dtype: parameter dtype (float32).
      remat: wrap each block in ``nnx.remat`` (less activation memory, one more forward pass).
      rngs: initialisation randomness.

    Calling it: x (B, H, W, C) float32 NHWC in [-1, 1], sigma (B,) float32 in [0, 1] (scaled by
    1000 inside for the sinusoidal embedding), cond (B,) int32 in [0, num_classes] →
    v (B, H, W, C) float32. Samples never interact (no batch statistics).
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int,
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        freq_dim: int = 256,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        h, w, ch = image_shape
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"DiT: image size {h}x{w} is not divisible by patch_size={patch_size}"
            )
        if hidden_dim % num_heads:
            raise ValueError(
                f"DiT: hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}"
            )
        if hidden_dim % 4:
            raise ValueError(
                f"DiT: hidden_dim={hidden_dim} must be divisible by 4 for the 2D position embedding"
            )
        if num_classes < 1 or depth < 1:
            raise ValueError(
                f"DiT: need num_classes >= 1 and depth >= 1, got {num_classes} and {depth}"
            )
        self.image_shape = tuple(image_shape)
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.remat = remat
        self.dtype = dtype
        xavier = nnx.initializers.xavier_uniform()
        zeros = nnx.initializers.zeros_init()
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        patch_values = patch_size * patch_size * ch
        self.patch_embed = nnx.Linear(patch_values, hidden_dim, kernel_init=xavier, **dense)
        self.cond_embed = ConditionEmbedding(
            hidden_dim, num_classes, freq_dim=freq_dim, **dense
        )
        self.blocks = nnx.List(
            [DiTBlock(hidden_dim, num_heads, mlp_ratio, **dense) for _ in range(depth)]
        )
        self.final_norm = nnx.LayerNorm(
            hidden_dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, rngs=rngs
        )
        self.final_modulation = nnx.Linear(
            hidden_dim, 2 * hidden_dim, kernel_init=zeros, bias_init=zeros, **dense
        )
        self.final_linear = nnx.Linear(
            hidden_dim, patch_values, kernel_init=zeros, bias_init=zeros, **dense
        )

    def _patchify(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, T, p·p·C), tokens row-major over the (H/p, W/p) grid."""
        b, h, w, ch = x.shape
        p = self.patch_size
        x = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * ch)

    def _unpatchify(self, tokens: jax.Array) -> jax.Array:
        """Inverse of ``_patchify``: (B, T, p·p·C) -> (B, H, W, C)."""
        h, w, ch = self.image_shape
        p = self.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, h // p, w // p, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, ch)

    def __call__(self, x: jax.Array, sigma: jax.Array, cond: jax.Array) -> jax.Array:
        """x (B, H, W, C), sigma (B,) in [0, 1], cond (B,) int -> v (B, H, W, C) float32."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"DiT built for images {self.image_shape}, got input {x.shape}")
        h, w, _ = self.image_shape
        p = self.patch_size
        tokens = self.patch_embed(self._patchify(x.astype(self.dtype)))
        pos = sincos_2d_position_embedding(self.hidden_dim, h // p, w // p)
        tokens = tokens + jnp.asarray(pos, dtype=tokens.dtype)[None]
        c = self.cond_embed(sigma, cond)
        apply = _apply_block_remat if self.remat else _apply_block
        for block in self.blocks:
            tokens = apply(block, tokens, c)
        shift, scale = jnp.split(self.final_modulation(nnx.silu(c)), 2, axis=-1)
        out = self.final_linear(_modulate(self.final_norm(tokens), shift, scale))
        return self._unpatchify(out).astype(jnp.float32)

"""Conditioning embeddings shared by the generators: noise level σ, class label, 2D position.

How σ enters a network: the model receives σ ∈ [0, 1] with shape (B,), multiplies it by
``SIGMA_SCALE = 1000`` and takes a sinusoidal embedding of σ·1000 (the frequencies of DiT and
ADM were chosen for timesteps in [0, 1000]); an MLP maps that embedding to the conditioning
width. The class label (index ``num_classes`` = null class for classifier-free guidance) has
its own learnt row, and the two vectors are summed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# σ ∈ [0, 1] is multiplied by this before the sinusoidal embedding.
SIGMA_SCALE = 1000.0


def sinusoidal_embedding(
    t: jax.Array, dim: int, *, max_period: float = 10_000.0
) -> jax.Array:
    """Sinusoidal features of a scalar per sample.

    Args:
      t: (B,) float array (here σ·1000).
      dim: output width; must be even.
      max_period: the slowest frequency is 1/max_period.

    Returns:
      (B, dim) float32 array ``[cos(t·f_k), sin(t·f_k)]`` with ``f_k = max_period^(-k/(dim/2))``,
      k = 0..dim/2-1.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(N,) positions -> (N, dim) ``[sin(p·ω_k), cos(p·ω_k)]`` with ω_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed (not learnt) 2D sin-cos position embedding for a row-major grid of tokens.

    Args:
      dim: embedding width; must be divisible by 4 (half for the row, half for the column).
      grid_h, grid_w: token grid size.

    Returns:
      (grid_h·grid_w, dim) float32 numpy array; token n = r·grid_w + c gets
      ``concat(sincos_1d(r), sincos_1d(c))``. Cached; treat as read-only.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate(
        [_sincos_1d(dim // 2, rows.reshape(-1)), _sincos_1d(dim // 2, cols.reshape(-1))], axis=1
    ).astype(np.float32)
    emb.setflags(write=False)
    return emb


class ConditionEmbedding(nnx.Module):
    """Noise-level plus class embedding: c = MLP(sinusoid(σ·1000)) + E[cond].

    The MLP is Linear(freq_dim → dim) → SiLU → Linear(dim → dim). The class table has
    ``num_classes + 1`` rows; row ``num_classes`` is the null (unconditional) class. A label
    outside [0, num_classes] looks up a row of NaNs (``jnp.take`` fill mode), so it cannot
    go unnoticed.

    Initialisation: every weight ~ N(0, 0.02²) (as in DiT and ADM), except the class table,
    whose standard deviation is ``class_init_std`` (default 0.02). A network that reads c
    through zero-initialised layers (adaLN-Zero) learns the class-dependent part of those
    layers at a rate proportional to the size of c's class part, so a larger value makes it
    use the label within a few hundred steps instead of thousands (see ``models/dit.py``).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        freq_dim: int = 256,
        class_init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.freq_dim = freq_dim
        self.dtype = dtype
        self.fc1 = nnx.Linear(
            freq_dim, dim, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.fc2 = nnx.Linear(
            dim, dim, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.class_table = nnx.Embed(
            num_classes + 1,
            dim,
            embedding_init=nnx.initializers.normal(class_init_std),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, sigma: jax.Array, cond: jax.Array) -> jax.Array:
        """sigma (B,) float in [0, 1], cond (B,) int in [0, num_classes] -> c (B, dim), ``dtype``."""
        freqs = sinusoidal_embedding(sigma * SIGMA_SCALE, self.freq_dim).astype(self.dtype)
        t_emb = self.fc2(nnx.silu(self.fc1(freqs)))
        return t_emb + self.class_table(cond)

"""The text-conditioned generator of the CPU experiments: an SD3-class MMDiT on pixels.

The same :class:`~normguard_jax.models.mmdit.MMDiT` that loads SD3.5 checkpoints, sized for
32×32 RGB images instead of VAE latents: joint text–image attention, adaLN-Zero on the pooled
text and σ, RMS q/k norm. The text tokens come from the conditioning's ``"text"`` (B, L, D_text)
and the pooled vector from ``"pooled"`` (B, P); with this library's captions those are the
word encoder's (:mod:`normguard_jax.word_encoder`), with a real model the T5/CLIP embeddings.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def pixel_mmdit(*, image_shape: tuple[int, int, int], num_classes: int, rngs: nnx.Rngs,
                text_dim: int, pooled_dim: int, patch_size: int, num_heads: int,
                head_dim: int, depth: int, qk_norm: str | None = "rms_norm",
                dtype=jnp.float32, param_dtype=jnp.float32, remat=False) -> nnx.Module:
    """An MMDiT for (H, W, C) images conditioned on ``{"text": (B, L, text_dim), "pooled":
    (B, pooled_dim)}``; ``num_classes`` is unused (text models have no class table).

    Raises:
      ValueError: H or W not divisible by ``patch_size``.
    """
    from normguard_jax.models.mmdit import MMDiT   # mmdit imports the models package
    del num_classes
    h, w, c = image_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {image_shape} is not divisible into {patch_size}×{patch_size} "
                         "patches")
    config = dict(sample_size=h, patch_size=patch_size, in_channels=c, out_channels=c,
                  num_layers=depth, attention_head_dim=head_dim, num_attention_heads=num_heads,
                  joint_attention_dim=text_dim, caption_projection_dim=num_heads * head_dim,
                  pooled_projection_dim=pooled_dim,
                  pos_embed_max_size=max(h, w) // patch_size, qk_norm=qk_norm)
    return MMDiT(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)

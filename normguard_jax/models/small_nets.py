"""Small Flax NNX networks for rewards and quality metrics, kept apart by design.

Three nets, three roles, three architectures and three training objectives
(``normguard_jax.auxnets`` trains and caches them):

``Classifier`` (reward side)
  A strided conv net with a two-layer dense head, trained with labels
  (cross-entropy, random shifts and light noise as augmentation). Its log-probabilities are
  rewards, so RL may learn to exploit it.

``Autoencoder`` (metric side: Fréchet distance, precision/recall)
  A convolutional autoencoder trained without labels to reconstruct its input (mean squared
  error, no augmentation); the metric features are its linear bottleneck. Independence from
  the classifier: a different objective (pixel reconstruction rather than class separation, so
  its features must keep everything needed to redraw the image, including stroke thickness,
  contrast and texture, which the classifier is trained to ignore), no labels at all, a
  different layout (4×4 stride-2 convs, GELU, a decoder that shapes the features), a
  different seed, and no shared weights. A generator that pushes the classifier's logits has no
  systematic reason to move the encoder's statistics towards the real data.

``PatchDetector`` (metric side: forensic realism)
  A fully convolutional real-vs-generated detector with a small receptive field. Its input is
  the image and a fixed Laplacian high-pass of it (the classic forensic trick of looking at
  residuals), and its logit is the mean of per-patch logits, so it judges local statistics
  (noise, blur, clipped intensities, ghosting) rather than global class content. Trained as a
  binary classifier: real training images versus artefact families (see
  ``normguard_jax.degradations``).

Conventions: images (B, H, W, C) float32 NHWC in [-1, 1] (callers clip generated images to
that range first); every net holds only ``nnx.Param`` state, so it is used functionally through
``make_apply``. H and W must be divisible by 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _check_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    h, w, c = (int(d) for d in image_shape)
    if h % 4 or w % 4:
        raise ValueError(f"image height and width must be divisible by 4, got {image_shape}")
    return h, w, c


class Classifier(nnx.Module):
    """Class logits of an image: three 3×3 convs (strides 1, 2, 2), flatten, two-layer head.

    ``__call__(x)``: x (B, H, W, C) float32 in [-1, 1] -> logits (B, num_classes) float32.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs,
                 widths: Sequence[int] = (16, 32, 64), hidden: int = 64):
        h, w, c = _check_shape(image_shape)
        w0, w1, w2 = widths
        self.conv0 = nnx.Conv(c, w0, (3, 3), strides=1, rngs=rngs)
        self.conv1 = nnx.Conv(w0, w1, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(w1, w2, (3, 3), strides=2, rngs=rngs)
        self.hidden = nnx.Linear((h // 4) * (w // 4) * w2, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.conv0(x))
        h = nnx.relu(self.conv1(h))
        h = nnx.relu(self.conv2(h))
        h = h.reshape(h.shape[0], -1)
        return self.out(nnx.relu(self.hidden(h)))


class Autoencoder(nnx.Module):
    """Conv autoencoder; ``encode`` gives the metric features.

    Encoder: two 4×4 stride-2 convs (GELU) -> flatten -> linear bottleneck (no activation).
    Decoder: linear -> reshape to (H/4, W/4) -> two 4×4 stride-2 transposed convs, the last one
    straight to C channels.

    ``encode(x)``: (B, H, W, C) -> (B, feature_dim) float32.
    ``__call__(x)``: (B, H, W, C) -> reconstruction (B, H, W, C) float32 (unbounded).
    """

    def __init__(self, image_shape: Sequence[int], *, rngs: nnx.Rngs,
                 widths: Sequence[int] = (16, 32), feature_dim: int = 32):
        h, w, c = _check_shape(image_shape)
        w0, w1 = widths
        self.grid = (h // 4, w // 4, w1)
        flat = (h // 4) * (w // 4) * w1
        self.enc0 = nnx.Conv(c, w0, (4, 4), strides=2, rngs=rngs)
        self.enc1 = nnx.Conv(w0, w1, (4, 4), strides=2, rngs=rngs)
        self.bottleneck = nnx.Linear(flat, feature_dim, rngs=rngs)
        self.expand = nnx.Linear(feature_dim, flat, rngs=rngs)
        self.dec1 = nnx.ConvTranspose(w1, w0, (4, 4), strides=2, rngs=rngs)
        self.dec0 = nnx.ConvTranspose(w0, c, (4, 4), strides=2, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        h = nnx.gelu(self.enc0(x))
        h = nnx.gelu(self.enc1(h))
        return self.bottleneck(h.reshape(h.shape[0], -1))

    def decode(self, z: jax.Array) -> jax.Array:
        h = nnx.gelu(self.expand(z)).reshape(z.shape[0], *self.grid)
        h = nnx.gelu(self.dec1(h))
        return self.dec0(h)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


# 3×3 Laplacian, applied per channel: a fixed high-pass that exposes noise and blur. A NumPy
# constant: creating a jax array at import time would start the JAX backend before
# jax.distributed could be initialised.
_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], np.float32)


def laplacian(x: jax.Array) -> jax.Array:
    """Per-channel 3×3 Laplacian with edge padding: (B, H, W, C) -> (B, H, W, C) float32."""
    c = x.shape[-1]
    kernel = jnp.tile(_LAPLACIAN[:, :, None, None], (1, 1, 1, c))  # HWIO, depthwise
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return jax.lax.conv_general_dilated(
        padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c)


class PatchDetector(nnx.Module):
    """Real-vs-generated logit from local patches (positive: judged real).

    Input: the image and its Laplacian, stacked on channels. Three 3×3 convs (strides 1, 2, 2,
    leaky ReLU) and a 1×1 conv to one logit per patch (an (H/4, W/4) grid of patches with
    11×11 px receptive fields); the output is the mean over patches.

    ``__call__(x)``: (B, H, W, C) float32 in [-1, 1] -> (B,) float32 logits.
    """

    def __init__(self, image_shape: Sequence[int], *, rngs: nnx.Rngs,
                 widths: Sequence[int] = (16, 32)):
        _, _, c = _check_shape(image_shape)
        w0, w1 = widths
        self.conv0 = nnx.Conv(2 * c, w0, (3, 3), strides=1, rngs=rngs)
        self.conv1 = nnx.Conv(w0, w1, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(w1, w1, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Conv(w1, 1, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.concatenate([x, laplacian(x)], axis=-1)
        h = nnx.leaky_relu(self.conv0(h), 0.2)
        h = nnx.leaky_relu(self.conv1(h), 0.2)
        h = nnx.leaky_relu(self.conv2(h), 0.2)
        return jnp.mean(self.head(h), axis=(1, 2, 3))


def make_apply(graphdef: nnx.GraphDef, method: str = "__call__"
               ) -> Callable[[Any, jax.Array], jax.Array]:
    """The pure function ``apply(params, x)`` that calls ``method`` of the merged module.

    Args:
      graphdef: from ``nnx.split(module, nnx.Param)``.
      method: the module method to call (``"__call__"``, or ``"encode"`` for features).

    Returns:
      ``apply(params, x) -> output``; safe under jit, grad and vmap.
    """

    def apply(params: Any, x: jax.Array) -> jax.Array:
        return getattr(nnx.merge(graphdef, params), method)(x)

    return apply

"""Controlled image degradations: the artefacts a quality metric must notice.

They serve two purposes: the forensic detector of ``normguard_jax.auxnets`` learns to tell real
images from these artefacts, and ``experiments/validity.py`` checks that every quality metric
worsens as their strength grows. Each is a pure, jit-able function
``fn(images, strength, key) -> images``:

- images: (B, H, W, C) float32, real data in [-1, 1];
- strength: scalar or (B,) float32 (one strength per image), 0 means "unchanged";
- key: typed PRNG key (ignored by deterministic degradations);
- output: (B, H, W, C) float32, NOT clipped (values may leave [-1, 1], which is itself one of
  the artefacts measured).

Set-level loss of diversity is not a per-image artefact; it is ``repeat_subset``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Degradation = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Pixels within this distance of an image's median grey level count as background.
BACKGROUND_TOLERANCE = 0.1


def _per_image(strength, images: jax.Array) -> jax.Array:
    """Broadcasts a scalar or (B,) strength to (B, 1, 1, 1)."""
    s = jnp.asarray(strength, jnp.float32)
    return jnp.broadcast_to(s, images.shape[:1]).reshape(-1, 1, 1, 1)


def gaussian_noise(images: jax.Array, strength, key: jax.Array) -> jax.Array:
    """Adds i.i.d. N(0, strength²) noise to every value (residual sampler noise)."""
    return images + _per_image(strength, images) * jax.random.normal(key, images.shape)


def _blur_matrices(size: int, std: jax.Array) -> jax.Array:
    """(B, size, size) row-normalised Gaussian weights exp(-(i-j)²/(2 std²)) (std per image)."""
    pos = jnp.arange(size, dtype=jnp.float32)
    d2 = (pos[:, None] - pos[None, :]) ** 2
    std = jnp.maximum(std.reshape(-1, 1, 1), 1e-3)
    w = jnp.exp(-d2[None] / (2.0 * std**2))
    return w / jnp.sum(w, axis=-1, keepdims=True)


def gaussian_blur(images: jax.Array, strength, key: jax.Array) -> jax.Array:
    """Separable Gaussian blur of standard deviation ``strength`` pixels.

    The kernel is truncated at the image border and renormalised, so constant images stay
    constant and values stay inside the input's range. Strength 0 is the identity (to float
    precision).
    """
    del key
    std = _per_image(strength, images)
    rows = _blur_matrices(images.shape[1], std)
    cols = _blur_matrices(images.shape[2], std)
    return jnp.einsum("bij,bjkc,blk->bilc", rows, images, cols)


def contrast_inflation(images: jax.Array, strength, key: jax.Array) -> jax.Array:
    """Scales every image about its own mean by ``1 + strength`` (over-saturation).

    ``x' = m + (1 + s)·(x - m)`` with m the per-image mean over all pixels and channels; the
    result is not clipped, so strong inflation pushes values outside [-1, 1].
    """
    del key
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return mean + (1.0 + _per_image(strength, images)) * (images - mean)


def background_mask(images: jax.Array) -> jax.Array:
    """(B, H, W, 1) float32, 1 where the channel-mean grey level is within
    ``BACKGROUND_TOLERANCE`` of the image's median (the background of digits and shapes)."""
    grey = jnp.mean(images, axis=-1, keepdims=True)
    median = jnp.median(grey.reshape(grey.shape[0], -1), axis=1).reshape(-1, 1, 1, 1)
    return (jnp.abs(grey - median) < BACKGROUND_TOLERANCE).astype(jnp.float32)


def background_noise(images: jax.Array, strength, key: jax.Array) -> jax.Array:
    """Adds N(0, strength²) noise only on background pixels (see ``background_mask``): the
    residue an unfinished or badly guided sampler leaves in flat regions."""
    noise = jax.random.normal(key, images.shape)
    return images + _per_image(strength, images) * noise * background_mask(images)


def ghosting(images: jax.Array, strength, key: jax.Array) -> jax.Array:
    """Blends each image with its neighbour in the batch: ``(1-s)·x_i + s·x_{i+1}``.

    Mimics the superimposed, averaged look of a generator between modes. Strength in [0, 0.5].
    """
    del key
    s = _per_image(strength, images)
    return (1.0 - s) * images + s * jnp.roll(images, 1, axis=0)


# Name -> degradation.
DEGRADATIONS: dict[str, Degradation] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "contrast": contrast_inflation,
    "background_noise": background_noise,
    "ghosting": ghosting,
}

# Strengths at which each artefact is clearly visible on [-1, 1] images, from its lower
# bound up to gross. The detector is trained on this range: its lower bounds set how subtle
# an artefact it flags (below them its response is graded rather than all-or-nothing).
STRENGTH_RANGES: dict[str, tuple[float, float]] = {
    "noise": (0.08, 0.5),
    "blur": (0.7, 2.0),
    "contrast": (0.3, 2.0),
    "background_noise": (0.08, 0.6),
    "ghosting": (0.25, 0.5),
}


def repeat_subset(images: np.ndarray, labels: np.ndarray, num_distinct: int) -> np.ndarray:
    """Reduces diversity: within each class, only the first ``num_distinct`` images survive,
    repeated cyclically in place of the others (set size and labels unchanged).

    Args:
      images: (N, H, W, C) array.
      labels: (N,) integer labels.
      num_distinct: distinct images kept per class (>= 1).

    Returns:
      A new (N, H, W, C) array of the same dtype.
    """
    if num_distinct < 1:
        raise ValueError(f"num_distinct must be >= 1, got {num_distinct}")
    images = np.asarray(images)
    labels = np.asarray(labels)
    out = images.copy()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep = idx[:num_distinct]
        out[idx] = images[keep[np.arange(len(idx)) % len(keep)]]
    return out


# Strength ladders of the validity check (experiments/validity.py and the tests): each family
# at four increasing strengths. "diversity" gives the fraction of distinct images kept per
# class (0 -> a single image per class).
VALIDITY_LADDERS: dict[str, tuple[float, ...]] = {
    "noise": (0.05, 0.1, 0.2, 0.4),
    "blur": (0.5, 1.0, 1.5, 2.5),
    "contrast": (0.25, 0.5, 1.0, 2.0),
    "background_noise": (0.05, 0.1, 0.2, 0.4),
    "diversity": (0.5, 0.2, 0.1, 0.0),
}


def validity_sets(images: np.ndarray, labels: np.ndarray, seed: int = 0
                  ) -> list[tuple[str, float, np.ndarray]]:
    """The degraded versions of a real set used by the validity check.

    Args:
      images: (N, H, W, C) float32 real images in [-1, 1].
      labels: (N,) int labels.
      seed: noise seed (condition i uses ``fold_in(key(seed), i)``).

    Returns:
      ``[(family, strength, images), ...]`` for every family and strength of
      ``VALIDITY_LADDERS``, in order; every set has the input's size and labels.
    """
    out = []
    key = jax.random.key(seed)
    x = jnp.asarray(images, jnp.float32)
    counts = np.bincount(np.asarray(labels))
    for family, ladder in VALIDITY_LADDERS.items():
        for strength in ladder:
            i = len(out)
            if family == "diversity":
                per_class = int(counts[counts > 0].min())
                kept = max(1, int(round(strength * per_class)))
                degraded = repeat_subset(images, labels, kept)
            else:
                degraded = np.asarray(DEGRADATIONS[family](x, jnp.float32(strength),
                                                           jax.random.fold_in(key, i)))
            out.append((family, strength, degraded))
    return out

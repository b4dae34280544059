"""A built-in text encoder for the CPU text-conditioned models: fixed word vectors, no weights.

Real text-to-image models read T5/CLIP embeddings (:mod:`normguard_jax.text`). The small
models this library pretrains on its own captions need an encoder that is offline,
deterministic and instant; this one has no parameters:

    words      = lower-cased runs of letters and digits of the prompt, the first ``max_words``
    vector(w)  = standard normal draw of dimension ``dim`` seeded by SHA-256(w), / sqrt(dim)
    text[i]    = vector(words[i]) + 0.5 · sincos(i)   for i < len(words); zeros after (padding)
    pooled     = mean of vector(words) (zeros for the empty prompt)

``sincos(i)`` is the usual sinusoidal position code (half sines, half cosines, frequencies
``10000^(-k/(dim/2))``). The empty prompt is all zeros: the null conditioning of
classifier-free guidance. Word order reaches the model only through the position code; the
pooled vector is a bag of words.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
from absl import logging

DIM = 32
MAX_WORDS = 8
POSITION_SCALE = 0.5
_WORD = re.compile(r"[a-z0-9]+")


def settings(dim: int = DIM, max_words: int = MAX_WORDS) -> dict:
    """The encoder's settings as a model records them (``encode(**settings)``)."""
    return {"dim": int(dim), "max_words": int(max_words)}


def words(prompt: str) -> list[str]:
    """The words of a prompt: lower-cased runs of letters and digits."""
    return _WORD.findall(prompt.lower())


@functools.lru_cache(maxsize=4096)
def word_vector(word: str, dim: int) -> np.ndarray:
    """The fixed (dim,) float32 vector of a word (seeded by its SHA-256)."""
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim) / np.sqrt(dim)
    vector = vector.astype(np.float32)
    vector.flags.writeable = False
    return vector


def position_code(length: int, dim: int) -> np.ndarray:
    """(length, dim) float32 sinusoidal position codes (sines then cosines)."""
    half = dim // 2
    freqs = 10000.0 ** (-np.arange(half) / max(half, 1))
    angles = np.arange(length)[:, None] * freqs[None]
    code = np.zeros((length, dim), np.float32)
    code[:, :half] = np.sin(angles)
    code[:, half:2 * half] = np.cos(angles)
    return code


def encode(prompts, dim: int = DIM, max_words: int = MAX_WORDS
           ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds prompts.

    Args:
      prompts: N strings.
      dim: D, the width of every vector.
      max_words: L; longer prompts keep their first L words (logged).

    Returns:
      ``(text, pooled)``: (N, L, D) and (N, D) float32.
    """
    prompts = list(prompts)
    text = np.zeros((len(prompts), max_words, dim), np.float32)
    pooled = np.zeros((len(prompts), dim), np.float32)
    positions = position_code(max_words, dim)
    for n, prompt in enumerate(prompts):
        tokens = words(prompt)
        if len(tokens) > max_words:
            logging.warning("prompt %r has %d words; the word encoder keeps the first %d",
                            prompt, len(tokens), max_words)
            tokens = tokens[:max_words]
        if not tokens:
            continue
        vectors = np.stack([word_vector(w, dim) for w in tokens])
        text[n, :len(tokens)] = vectors + POSITION_SCALE * positions[:len(tokens)]
        pooled[n] = vectors.mean(axis=0)
    return text, pooled

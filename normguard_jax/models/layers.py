"""Transformer pieces shared by the SD3 MMDiT (``mmdit.py``) and the FLUX transformer
(``flux.py``), each equal to its diffusers counterpart and named as diffusers names it, so
that both models' name tables map onto the same parameter paths.

  ``layer_norm``       LayerNorm without affine parameters, eps 1e-6, statistics in float32.
  ``modulate``         adaLN: ``x·(1 + scale) + shift``, one (shift, scale) per sample.
  ``RMSNorm``          per-head q/k norm with a learnt scale, statistic in float32.
  ``Modulation``       SiLU(c) → Linear(D → n·D), zero-initialised (adaLN-Zero), split in n.
  ``FeedForward``      Linear(D → 4D) → tanh-GELU → Linear(4D → D).
  ``TimeTextEmbedding`` c = MLP(sinusoid(1000·σ)) [+ MLP(sinusoid(1000·guidance))] + MLP(pooled).
  ``Attention``        the q/k/v maps (optionally RMS-normalised per head) of an image stream
                       and optionally of a text stream, and their output maps; the models
                       compose the attention itself (token order, rotary angles).
  ``attention``        softmax attention, logits and softmax in float32.
  ``call_block``       a block applied as is or rematerialised (``nnx.remat``, a policy).
  ``TransformerConfig`` what both models' config dataclasses share: reading a diffusers
                       ``config.json`` dict, the width D and the output channels.

Precision, as in both models: ``dtype`` is the activation dtype of every Linear; norm
statistics, the sinusoids and the softmax are float32; ``param_dtype`` is the parameters'.
Fresh weights: Xavier-uniform kernels, zero biases, unit RMSNorm scales, zero adaLN maps.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from normguard_jax.models import attention_impl, config_kwargs
from normguard_jax.models.embeddings import SIGMA_SCALE

# eps of every LayerNorm and of the q/k RMSNorms.
NORM_EPS = 1e-6
# Width of the sinusoidal embeddings of 1000·σ and 1000·guidance.
TIMESTEP_FREQ_DIM = 256
# Hidden width of every MLP, as a multiple of D.
MLP_RATIO = 4


class TransformerConfig:
    """Mixin of a frozen config dataclass with diffusers' fields ``num_attention_heads``,
    ``attention_head_dim``, ``in_channels`` and ``out_channels`` (None: in_channels), and a
    ``validate()`` that raises ValueError naming a bad field."""

    NAME: ClassVar[str]  # the model's name in error messages

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Any:
        """From a diffusers config dict; keys starting with "_" (``_class_name``,
        ``_diffusers_version``, …) are ignored, any other unknown key is an error."""
        return cls(**config_kwargs(cls, config, what=cls.NAME))

    @classmethod
    def checked(cls, config: Any) -> Any:
        """``config`` (a dict or an instance) as a validated instance."""
        config = config if isinstance(config, cls) else cls.from_dict(config)
        config.validate()
        return config

    @property
    def width(self) -> int:
        """Token width D = num_attention_heads · attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """Channels of an output token (``out_channels``, or in_channels when None)."""
        return self.in_channels if self.out_channels is None else self.out_channels


def dense(dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> dict[str, Any]:
    """Keyword arguments of every ``nnx.Linear``/``nnx.Conv``: dtypes, rngs, Xavier-uniform
    kernels (and the default zero biases)."""
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=nnx.initializers.xavier_uniform())


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x (B, T, D); shift, scale (B, D) -> x·(1 + scale) + shift, broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


@functools.lru_cache(maxsize=1)
def _timestep_frequencies() -> np.ndarray:
    """(128,) float32 ``exp(-ln(10000)·k/128)``: the exponent in float32 as diffusers forms it,
    the exponential in float64 rounded to float32 (XLA's float32 exp differs from torch's by an
    ulp in a sixth of the entries, which at 1000·guidance = 3500 moves an angle by 2e-4)."""
    half = TIMESTEP_FREQ_DIM // 2
    exponent = np.float32(-np.log(10_000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    freqs.setflags(write=False)
    return freqs


def timestep_embedding(t: jax.Array) -> jax.Array:
    """(B,) values (1000·σ or 1000·guidance) -> (B, 256) float32 ``[cos(t·f_k), sin(t·f_k)]``
    (diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True``, shift 0)."""
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(_timestep_frequencies())[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis with a learnt scale (initialised to 1); the
    statistic is computed in float32, the result cast back to the input dtype."""

    def __init__(self, dim: int, *, param_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + NORM_EPS)
        return (xf * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Modulation(nnx.Module):
    """SiLU(c) → Linear(D → n·D), split into n (B, D) vectors (adaLN; zero-initialised)."""

    def __init__(self, dim: int, n: int, *, dense: dict[str, Any]):
        zeros = nnx.initializers.zeros_init()
        self.n = n
        self.linear = nnx.Linear(dim, n * dim, **{**dense, "kernel_init": zeros}, bias_init=zeros)

    def __call__(self, c: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(nnx.silu(c)), self.n, axis=-1)


class FeedForward(nnx.Module):
    """Linear(D → 4D) → tanh-GELU → Linear(4D → D) (diffusers' ``net.0.proj`` and ``net.2``)."""

    def __init__(self, dim: int, *, dense: dict[str, Any]):
        self.fc1 = nnx.Linear(dim, MLP_RATIO * dim, **dense)
        self.fc2 = nnx.Linear(MLP_RATIO * dim, dim, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


class MLPEmbedder(nnx.Module):
    """Linear → SiLU → Linear (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int, *, dense: dict[str, Any]):
        self.linear_1 = nnx.Linear(in_dim, dim, **dense)
        self.linear_2 = nnx.Linear(dim, dim, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class TimeTextEmbedding(nnx.Module):
    """c = MLP(sinusoid(1000·σ)) [+ MLP(sinusoid(1000·guidance))] + MLP(pooled text).

    The sinusoids are float32 (``timestep_embedding``), cast to the activation dtype before
    their MLP; ``guidance`` adds the guidance embedder (FLUX.1-dev).
    """

    def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, dense: dict[str, Any]):
        self.dtype = dense["dtype"]
        self.timestep_embedder = MLPEmbedder(TIMESTEP_FREQ_DIM, dim, dense=dense)
        self.guidance_embedder = (
            MLPEmbedder(TIMESTEP_FREQ_DIM, dim, dense=dense) if guidance else None
        )
        self.text_embedder = MLPEmbedder(pooled_dim, dim, dense=dense)

    def _sinusoid(self, embedder: MLPEmbedder, value: jax.Array) -> jax.Array:
        freqs = timestep_embedding(value.astype(jnp.float32) * SIGMA_SCALE)
        return embedder(freqs.astype(self.dtype))

    def __call__(self, sigma: jax.Array, pooled: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        """sigma (B,) in [0, 1], pooled (B, pooled_dim), guidance (B,) raw scale or None
        -> c (B, D)."""
        c = self._sinusoid(self.timestep_embedder, sigma)
        if self.guidance_embedder is not None:
            c = c + self._sinusoid(self.guidance_embedder, guidance)
        return c + self.text_embedder(pooled)


class Attention(nnx.Module):
    """The maps of one attention layer (diffusers' ``Attention`` names), not the attention.

    Image stream: ``to_q``, ``to_k``, ``to_v``, norms ``norm_q``, ``norm_k`` when ``qk_norm``,
    output ``to_out`` when ``image_out``. ``joint`` adds a text stream: ``add_{q,k,v}_proj``,
    ``norm_added_{q,k}`` when ``qk_norm``, output ``to_add_out`` when ``text_out``. Every
    Linear has a bias.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, *, joint: bool, qk_norm: bool,
        image_out: bool, text_out: bool, dense: dict[str, Any], param_dtype: jnp.dtype,
    ):
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim

        def linear():
            return nnx.Linear(dim, inner, **dense)

        def norm():
            return RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None

        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = linear(), linear(), linear()
            self.norm_added_q, self.norm_added_k = norm(), norm()
        else:
            self.add_q_proj = self.add_k_proj = self.add_v_proj = None
            self.norm_added_q = self.norm_added_k = None
        self.to_out = nnx.Linear(inner, dim, **dense) if image_out else None
        self.to_add_out = nnx.Linear(inner, dim, **dense) if joint and text_out else None

    def _heads(self, proj: nnx.Linear, norm: RMSNorm | None, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, heads, head_dim), normalised per head if ``norm``."""
        h = proj(x).reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim)
        return h if norm is None else norm(h)

    def query(self, x: jax.Array, *, text: bool = False) -> jax.Array:
        """q (B, T, heads, head_dim) of the image (or ``text``) stream's tokens x (B, T, D)."""
        if text:
            return self._heads(self.add_q_proj, self.norm_added_q, x)
        return self._heads(self.to_q, self.norm_q, x)

    def key_value(self, x: jax.Array, *, text: bool = False) -> tuple[jax.Array, jax.Array]:
        """k, v (B, T, heads, head_dim) of the image (or ``text``) stream's tokens x."""
        if text:
            return (self._heads(self.add_k_proj, self.norm_added_k, x),
                    self._heads(self.add_v_proj, None, x))
        return self._heads(self.to_k, self.norm_k, x), self._heads(self.to_v, None, x)

    def qkv(self, x: jax.Array, *, text: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v (B, T, heads, head_dim) of one stream."""
        return (self.query(x, text=text), *self.key_value(x, text=text))


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention, scale 1/sqrt(head_dim), logits and softmax in float32 whatever the
    input dtype: q (B, S, heads, head_dim), k, v (B, S', heads, head_dim) ->
    (B, S, heads·head_dim). The kernel is ``attention_impl``'s choice in effect at trace time
    (default ``jax.nn.dot_product_attention``'s XLA path; ``"flash"``: the Pallas TPU kernel)."""
    out = attention_impl.attention(q, k, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


# What a rematerialised block keeps from its forward pass for the backward
# (``jax.checkpoint_policies``); everything else is recomputed. ``remat`` takes a name:
#   "none"  no remat: every activation inside a block is kept (most memory, least compute).
#   "full"  only the block's inputs are kept; the whole block runs again in the backward.
#   "dots"  the outputs of weight matmuls (dot products without batch dimensions: every
#           Linear) are kept; attention, norms, activations and modulations are recomputed.
# ``True`` and ``False`` mean "full" and "none".
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
    """The :data:`REMAT_POLICIES` name of a ``remat`` argument (``True`` → "full", ``False`` →
    "none"); raises ValueError for an unknown name."""
    name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: choose True, False or one of {sorted(REMAT_POLICIES)}")
    return name


def call_block(block: nnx.Module, *args: Any, remat: bool | str) -> Any:
    """``block(*args)``, rematerialised with the policy named by ``remat`` (see
    :data:`REMAT_POLICIES`: less activation memory, parts of the forward pass again in the
    backward).

    The block must not change its own state (true of every transformer block here). It runs
    as a pure function of its split state under ``jax.checkpoint`` rather than under
    ``nnx.remat``, which writes the state back after the call and fails when the parameters
    come from another trace level than the gradient's (e.g. θ_old inside the gradient of θ).
    """
    policy = REMAT_POLICIES[remat_name(remat)]
    if policy is None:
        return block(*args)
    graphdef, state = nnx.split(block)

    def pure(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(pure, policy=policy)(state, *args)

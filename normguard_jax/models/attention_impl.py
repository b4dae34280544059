"""Which kernel computes softmax attention in the MMDiT and FLUX blocks (``layers.attention``).

``"xla"`` (the default) is ``jax.nn.dot_product_attention``'s XLA path: it materialises the
(B, heads, S, S') logits and probabilities in float32, which dominates the activation memory
and HBM traffic of a real-size step (SD3.5-M at 512 px: S = 1024 image + 333 text tokens).
``"flash"`` is the Pallas TPU flash-attention kernel
(``jax.experimental.pallas.ops.tpu.flash_attention``, forward and backward kernels): it streams
blocks of keys through VMEM with an online softmax (statistics in float32) and never writes the
logits to HBM. It runs on TPU only; on CPU it runs in Pallas' TPU interpreter
(``pltpu.force_tpu_interpret_mode()``, tests only: slow) and it lowers and compiles here for a
described TPU topology (benchmarks/tpu_aot.py ``--attention flash``).

The choice is made where the velocity function is built, not inside the model: ``bind(v,
"flash", mesh)`` returns v with every call (hence every trace) under that implementation, so
the same NNX modules and checkpoints serve both. Under a mesh the kernel runs per device in a
``shard_map`` over the batch axis (sharded over every mesh axis, as
``sharding.batch_sharding``), since a Pallas call cannot be partitioned by GSPMD.

Conventions: q (B, S, heads, head_dim), k, v (B, S', heads, head_dim); scale 1/sqrt(head_dim);
no mask. The kernel needs sequence lengths in multiples of 128: shorter or ragged sequences
are padded and the padding is masked out with segment ids (padded keys get segment 0, real
tokens 1), so the result equals unpadded attention.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

IMPLEMENTATIONS = ("xla", "flash")
BLOCK = 128          # the kernel's minimum block along a sequence
_BLOCKS = (512, 256, 128)  # the largest of these dividing the padded length is used


class Choice(NamedTuple):
    impl: str = "xla"
    mesh: Mesh | None = None


_CURRENT: contextvars.ContextVar[Choice] = contextvars.ContextVar("attention", default=Choice())


def check(impl: str) -> str:
    """``impl`` if it names an implementation, else ValueError listing them."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {IMPLEMENTATIONS}")
    return impl


def current() -> Choice:
    """The implementation (and mesh) in effect for attention traced now."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(impl: str, mesh: Mesh | None = None) -> Iterator[None]:
    """Attention traced inside this block uses ``impl``; with ``mesh`` the flash kernel runs
    per device over the batch's shards. Read at trace time: a function already compiled keeps
    the implementation it was traced with."""
    token = _CURRENT.set(Choice(check(impl), mesh))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def bind(fn: Callable, impl: str, mesh: Mesh | None = None) -> Callable:
    """``fn`` whose every call runs under ``use(impl, mesh)`` (``fn`` itself when impl is
    ``"xla"``, the default)."""
    if check(impl) == "xla":
        return fn

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        with use(impl, mesh):
            return fn(*args, **kwargs)

    return bound


def _block(length: int) -> int:
    return next(b for b in _BLOCKS if length % b == 0)


def _pad(x: jax.Array, length: int) -> jax.Array:
    """(B, heads, S, D) padded with zeros along S to ``length``."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention by the Pallas TPU flash kernel on one device's arrays:
    q (B, S, heads, D), k, v (B, S', heads, D) -> (B, S, heads, D) in q's dtype."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, s, _, d = q.shape
    s_kv = k.shape[1]
    qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))     # (B, heads, S, D)
    sq, skv = -(-s // BLOCK) * BLOCK, -(-s_kv // BLOCK) * BLOCK
    segments = None
    if (sq, skv) != (s, s_kv):
        qt, kt, vt = _pad(qt, sq), _pad(kt, skv), _pad(vt, skv)
        segments = fa.SegmentIds(
            q=jnp.broadcast_to((jnp.arange(sq) < s).astype(jnp.int32), (b, sq)),
            kv=jnp.broadcast_to((jnp.arange(skv) < s_kv).astype(jnp.int32), (b, skv)))
    bq, bk = _block(sq), _block(skv)
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                          block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                          block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qt, kt, vt, segment_ids=segments, sm_scale=1.0 / math.sqrt(d),
                             block_sizes=sizes)
    return jnp.swapaxes(out[:, :, :s], 1, 2).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention by the implementation in effect (see ``use``): q (B, S, heads, D),
    k, v (B, S', heads, D) -> (B, S, heads, D); logits and softmax statistics in float32."""
    choice = current()
    if choice.impl == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    if choice.mesh is None or choice.mesh.size == 1:
        return flash(q, k, v)
    axes = tuple(choice.mesh.axis_names)
    if q.shape[0] % choice.mesh.size:
        raise ValueError(f"flash attention under a mesh of {choice.mesh.size} devices needs a "
                         f"batch divisible by it, got {q.shape[0]}")
    spec = P(axes, None, None, None)
    return jax.shard_map(flash, mesh=choice.mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)

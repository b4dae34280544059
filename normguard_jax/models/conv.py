"""2-D convolution with a faster kernel gradient for the generators' few-channel convolutions.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated`` (it is what
``nnx.Conv`` calls; ``conv_layer`` builds an ``nnx.Conv`` that uses it). The forward pass and the
input gradient are XLA's own convolutions. Only the kernel gradient differs: for an image x
(B, H, W, C_in), padded to x_p, and an output gradient g (B, H_out, W_out, C_out),

    dL/dW[i, j, c, o] = Σ_{b, h, w} x_p[b, s_h·h + i, s_w·w + j, c] · g[b, h, w, o],

computed on CPU as k_h·k_w matrix products (C_in × B·H_out·W_out) · (B·H_out·W_out × C_out),
one per kernel tap, instead of XLA:CPU's kernel-gradient convolution. On GPU and TPU, where
the native convolution is fast, it stays (``lax.platform_dependent`` picks at lowering time).
At the generators' 8–96 channels XLA:CPU's kernel-gradient convolution was 1.5–19× slower
than the products (benchmarks/conv_grad.py; benchmarks/README.md, "Kernel gradient of the
convolutions"). The products keep a strided copy of x per tap alive, so the training step
needs more temporary memory. Results agree with ``jax.grad`` of the XLA convolution to
float32 rounding (tests/test_conv.py).

Layouts: NHWC images and HWIO kernels, as ``nnx.Conv`` uses them. Any other case (grouped or
dilated convolutions, other layouts, 1-D/3-D, ``preferred_element_type``) falls through to
``jax.lax.conv_general_dilated`` unchanged. Negative padding is applied as a crop of the input
before the convolution: XLA:CPU's own convolution with negative padding gave a different,
wrong result from run to run (tests/test_conv.py checks the crop against numpy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

_LAYOUT = ("NHWC", "HWIO", "NHWC")

Pads = tuple[tuple[int, int], tuple[int, int]]


def kernel_gradient(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                    strides: tuple[int, int], pads: Pads) -> jax.Array:
    """dL/dW of y = conv(x, W) for output gradient g, as one matrix product per kernel tap.

    Args:
      x: input (B, H, W, C_in).
      g: gradient of the loss with respect to the output, (B, H_out, W_out, C_out).
      kernel_hw: (k_h, k_w).
      strides: (s_h, s_w).
      pads: ((top, bottom), (left, right)) zero padding of x, as in the forward pass.

    Returns:
      (k_h, k_w, C_in, C_out) in float32 (the products accumulate in float32 for any input
      dtype).
    """
    kh, kw = kernel_hw
    sh, sw = strides
    b, _, _, c = x.shape
    ho, wo = g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    taps = []
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(xp, (0, i, j, 0),
                               (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                               (1, sh, sw, 1))  # (B, H_out, W_out, C_in)
            taps.append(jnp.einsum("bhwc,bhwo->co", window, g,
                                   preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, c, g.shape[-1])


def _xla_conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_LAYOUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return _xla_conv(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _xla_conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, residuals, g):
    x, w = residuals
    # Transposes of the linear maps x -> conv(x, w) and w -> conv(x, w) (no forward pass).
    (dx,) = jax.linear_transpose(lambda x_: _xla_conv(x_, w, strides, pads), x)(g)

    def xla_kernel_gradient(x_, g_):
        return jax.linear_transpose(lambda w_: _xla_conv(x_, w_, strides, pads), w)(g_)[0]

    def tap_kernel_gradient(x_, g_):
        return kernel_gradient(x_, g_, w.shape[:2], strides, pads).astype(w.dtype)

    # The products win on XLA:CPU; GPU and TPU keep their native (cuDNN / MXU) convolution.
    dw = lax.platform_dependent(x, g, cpu=tap_kernel_gradient, default=xla_kernel_gradient)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _crop(x: jax.Array, pads: Pads) -> jax.Array:
    """Removes the rows and columns that negative entries of ``pads`` cut from x (B, H, W, C)."""
    (top, bottom), (left, right) = pads
    h, w = x.shape[1:3]
    start = (0, max(-top, 0), max(-left, 0), 0)
    limit = (x.shape[0], h - max(-bottom, 0), w - max(-right, 0), x.shape[3])
    if start == (0, 0, 0, 0) and limit == x.shape:
        return x
    if limit[1] <= start[1] or limit[2] <= start[2]:
        raise ValueError(f"padding {pads} crops away the whole {h}×{w} input")
    return lax.slice(x, start, limit)


def _is_unit(dilation) -> bool:
    return dilation is None or all(d == 1 for d in dilation)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None, **kwargs) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with the kernel gradient of ``kernel_gradient``.

    Same arguments and result as the lax function. The fast path takes NHWC lhs (B, H, W,
    C_in), HWIO rhs (k_h, k_w, C_in, C_out), any strides and padding (string or explicit
    pairs; negative entries crop the input), no dilation and one feature group; everything
    else is passed to lax unchanged.
    """
    fast = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
            and _is_unit(lhs_dilation) and _is_unit(rhs_dilation) and precision is None
            and kwargs.get("preferred_element_type") is None
            and kwargs.get("out_sharding") is None
            and dimension_numbers is not None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _LAYOUT))
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(_crop(lhs, pads), rhs, strides,
                 tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads))


def conv_layer(in_features: int, out_features: int, kernel_size: Sequence[int],
               **kwargs) -> nnx.Conv:
    """An ``nnx.Conv`` (same parameters, same forward pass) whose kernel gradient is
    ``kernel_gradient``. Keyword arguments are those of ``nnx.Conv``."""
    return nnx.Conv(in_features, out_features, kernel_size,
                    conv_general_dilated=conv_general_dilated, **kwargs)

"""models/conv.py: the custom kernel gradient agrees with XLA's convolution gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from normguard_jax.models import conv

LAYOUT = ("NHWC", "HWIO", "NHWC")


def _inputs(shape_x, shape_w, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kx, shape_x), 0.3 * jax.random.normal(kw, shape_w), kg)


@pytest.mark.parametrize("shape_x,kernel,strides,padding", [
    ((3, 8, 8, 4), 3, (1, 1), ((1, 1), (1, 1))),   # the generators' 3×3 convs
    ((2, 8, 8, 4), 3, (2, 2), ((1, 1), (1, 1))),   # stride-2 downsampling
    ((2, 9, 7, 3), 3, (2, 2), "SAME"),             # odd sizes, string padding
    ((2, 8, 8, 5), 4, (2, 2), "SAME"),             # even kernel: asymmetric padding
    ((2, 6, 6, 4), 1, (1, 1), "VALID"),            # 1×1 skip conv
    ((2, 7, 6, 2), 3, (1, 2), ((0, 2), (1, 0))),   # unequal strides and pads
])
def test_forward_and_gradients_match_xla(shape_x, kernel, strides, padding):
    c_out = 6
    x, w, kg = _inputs(shape_x, (kernel, kernel, shape_x[-1], c_out))

    def ours(x, w):
        return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=LAYOUT)

    def xla(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=LAYOUT)

    y = ours(x, w)
    np.testing.assert_array_equal(y, xla(x, w))
    g = jax.random.normal(kg, y.shape)
    dx, dw = jax.vjp(ours, x, w)[1](g)
    dx_ref, dw_ref = jax.vjp(xla, x, w)[1](g)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def test_kernel_gradient_closed_form():
    """1×1 kernel, stride 1: dW[0, 0] = Σ_pixels x ⊗ g, written out with numpy."""
    x, _, kg = _inputs((2, 3, 4, 3), (1, 1, 3, 2))
    g = jax.random.normal(kg, (2, 3, 4, 2))
    dw = conv.kernel_gradient(x, g, (1, 1), (1, 1), ((0, 0), (0, 0)))
    expected = np.einsum("bhwc,bhwo->co", np.asarray(x), np.asarray(g))
    np.testing.assert_allclose(dw[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x, w, kg = _inputs((2, 8, 8, 4), (3, 3, 4, 4))
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def loss(w):
        y = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=LAYOUT)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    dw = jax.grad(loss)(w)
    assert dw.dtype == jnp.bfloat16
    ref = jax.grad(lambda w: jnp.sum(lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=LAYOUT).astype(jnp.float32) ** 2))(w)
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref, np.float32),
                               rtol=5e-2, atol=5e-1)


def test_grouped_convolution_falls_through_to_lax():
    x, w, _ = _inputs((2, 6, 6, 4), (3, 3, 2, 4))

    def ours(w):
        return jnp.sum(jnp.sin(conv.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=LAYOUT, feature_group_count=2)))

    def xla(w):
        return jnp.sum(jnp.sin(lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=LAYOUT, feature_group_count=2)))

    np.testing.assert_allclose(jax.grad(ours)(w), jax.grad(xla)(w), rtol=1e-6, atol=1e-6)


def _numpy_conv(x, w, pads):
    """Stride-1 NHWC/HWIO convolution written out in numpy; negative pads crop."""
    x = np.asarray(x, np.float64)
    for axis, (lo, hi) in zip((1, 2), pads):
        n = x.shape[axis]
        x = np.take(x, range(max(-lo, 0), n - max(-hi, 0)), axis=axis)
        width = [(0, 0)] * 4
        width[axis] = (max(lo, 0), max(hi, 0))
        x = np.pad(x, width)
    kh, kw = w.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(np.einsum("bhwc,co->bhwo", x[:, i:i + ho, j:j + wo], np.asarray(w[i, j]))
               for i in range(kh) for j in range(kw))


def test_negative_padding_crops_the_input():
    """Negative pads cut rows/columns, as lax defines them; the result is deterministic and
    equal to numpy (XLA:CPU's own convolution varied from run to run for these pads)."""
    x, w, kg = _inputs((2, 8, 8, 3), (3, 3, 3, 4))
    pads = ((-1, 1), (0, -2))
    y = conv.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=LAYOUT)
    np.testing.assert_allclose(y, _numpy_conv(x, w, pads), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    # The loss is linear in w, so its gradient is the numpy correlation of x with g.
    dw = jax.grad(lambda w: jnp.vdot(
        conv.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=LAYOUT), g))(w)
    xc = np.asarray(x)[:, 1:, :-2]
    xc = np.pad(xc, ((0, 0), (0, 1), (0, 0), (0, 0)))
    expected = np.stack([np.einsum("bhwc,bhwo->co", xc[:, i:i + 6, j:j + 4], g)
                         for i in range(3) for j in range(3)]).reshape(3, 3, 3, 4)
    np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="crops away"):
        conv.conv_general_dilated(x, w, (1, 1), ((-8, 0), (0, 0)), dimension_numbers=LAYOUT)

def test_conv_layer_matches_nnx_conv_under_jit():
    """Same parameters and forward pass as nnx.Conv; gradients agree through jit."""
    ours = conv.conv_layer(3, 5, (3, 3), padding=1, rngs=nnx.Rngs(0))
    ref = nnx.Conv(3, 5, (3, 3), padding=1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    np.testing.assert_array_equal(ours(x), ref(x))

    @jax.jit
    def grads(graphdef, state, x):
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x) ** 2))(state)

    g_ours = grads(*nnx.split(ours), x)
    g_ref = grads(*nnx.split(ref), x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_lowering_uses_the_tap_products():
    """On CPU the backward pass holds k_h·k_w dots and no kernel-gradient convolution."""
    x, w, _ = _inputs((2, 8, 8, 4), (3, 3, 4, 4))

    def loss(w):
        return jnp.sum(conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=LAYOUT) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(w).as_text()
    assert hlo.count("stablehlo.convolution") == 1  # the forward pass only
    assert hlo.count("stablehlo.dot_general") >= 9

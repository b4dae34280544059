"""Kernel gradient of a 3×3 convolution: XLA:CPU's own against models/conv.py's per-tap products.

Usage (from the repository root):
  .venv/bin/python -m benchmarks.conv_grad [--rounds 20]

For the channel counts and resolutions of the small UNet (batch 128, stride 1, SAME padding),
prints the median time of: the forward convolution, the input gradient, XLA's kernel-gradient
convolution and ``normguard_jax.models.conv.kernel_gradient``, and the ratio of the two kernel
gradients (above 1: the products are faster). Both kernel gradients are checked to agree first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
from jax import lax

from normguard_jax.models import conv

LAYOUT = ("NHWC", "HWIO", "NHWC")
PADS = ((1, 1), (1, 1))
# (batch, resolution, channels): the small UNet's levels at its pretraining batch.
SHAPES = ((128, 32, 8), (128, 32, 16), (128, 16, 16), (128, 8, 32), (128, 4, 96))


def median_time(fn, rounds: int) -> float:
    """Median wall time of ``fn()`` (which blocks) over ``rounds`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print("| batch × H × W × C | forward | input gradient | XLA kernel gradient | per-tap "
          "products | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for b, h, c in SHAPES:
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (b, h, h, c))
        w = 0.1 * jax.random.normal(kw, (3, 3, c, c))
        g = jax.random.normal(kg, (b, h, h, c))

        def fwd(x, w):
            return lax.conv_general_dilated(x, w, (1, 1), PADS, dimension_numbers=LAYOUT)

        forward = jax.jit(fwd)
        input_grad = jax.jit(lambda g: jax.linear_transpose(lambda x_: fwd(x_, w), x)(g)[0])
        xla_kernel = jax.jit(lambda g: jax.linear_transpose(lambda w_: fwd(x, w_), w)(g)[0])
        taps = jax.jit(lambda g: conv.kernel_gradient(x, g, (3, 3), (1, 1), PADS))
        np.testing.assert_allclose(taps(g), xla_kernel(g), rtol=1e-3, atol=1e-2)
        t = {name: median_time(lambda f=f, a=a: jax.block_until_ready(f(*a)), args.rounds)
             for name, f, a in (("forward", forward, (x, w)), ("input", input_grad, (g,)),
                                ("xla", xla_kernel, (g,)), ("taps", taps, (g,)))}
        print(f"| {b} × {h} × {h} × {c} | {1e3 * t['forward']:.1f} ms | "
              f"{1e3 * t['input']:.1f} ms | {1e3 * t['xla']:.1f} ms | {1e3 * t['taps']:.1f} ms "
              f"| {t['xla'] / t['taps']:.2f}× |", flush=True)
    print(f"\njax {jax.__version__}, {os.cpu_count()} CPUs; median of {args.rounds} calls.")


if __name__ == "__main__":
    main()

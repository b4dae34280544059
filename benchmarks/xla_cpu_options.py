"""XLA:CPU library options (YNNPACK, XNNPACK) on the benchmark's sampler and train step.

Usage (from the repository root):
  .venv/bin/python -m benchmarks.xla_cpu_options [--model unet|dit] [--what sample|train]

Compiles the same program once per option set (``Lowered.compile(compiler_options=...)``, so
every variant lives in one process) and times the variants interleaved, as benchmarks/run.py
does. Prints each variant's median time and its speed-up over XLA's defaults, and the mean
absolute pixel of the sample (a variant that changed the numerics shows a different value).
"""

from __future__ import annotations

import argparse
import time

from benchmarks import run as bench_run

FUSION = "LIBRARY_FUSION_TYPE_"
ALL_TYPES = ",".join(FUSION + t for t in ("INDIVIDUAL_CONVOLUTION", "INDIVIDUAL_DOT",
                                          "ELTWISE", "REDUCE", "DOT"))
VARIANTS = {
    "default": {},
    "ynn_conv": {"xla_cpu_experimental_ynn_fusion_type": FUSION + "INDIVIDUAL_CONVOLUTION"},
    "ynn_all": {"xla_cpu_experimental_ynn_fusion_type": ALL_TYPES},
    "xnn_all": {"xla_cpu_experimental_xnn_fusion_type": ALL_TYPES},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet", choices=sorted(bench_run.MODELS))
    parser.add_argument("--what", default="sample", choices=["sample", "train"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    bench = bench_run.Bench(args.model, args.rounds)
    calls = {}
    for name, options in VARIANTS.items():
        t0 = time.perf_counter()
        if args.what == "sample":
            sample_fn, labels, key = bench.sample_program()
            compiled = jax.jit(sample_fn).lower(bench.params, labels, key).compile(
                compiler_options=options or None)
            images = np.asarray(compiled(bench.params, labels, key))
            calls[name] = (lambda c=compiled, l=labels, k=key:
                           c(bench.params, l, k).block_until_ready())
            detail = f"mean |pixel| {np.abs(images).mean():.7f}"
        else:
            call, *_ = bench._jax_train(bench.velocity, 1, compiler_options=options or None)
            call()
            calls[name] = call
            detail = ""
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s {detail}", flush=True)
    times = bench_run.interleave(calls, args.rounds)
    base = bench_run.med(times["default"])
    print(f"\n| {args.model} {args.what} variant | median s | speed-up over default |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {bench_run.med(ts):.3f} | {base / bench_run.med(ts):.2f}× |")


if __name__ == "__main__":
    main()

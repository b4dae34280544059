"""Wall-clock benchmark of the RL update and the rollout sampler on the local accelerators, with
random weights, at real sizes (``--size real``: SD3.5-Medium and FLUX.1-dev at 512×512) or tiny
ones (``--size tiny``: the same programs on miniature models, for a CPU test).

The programs are those of benchmarks/tpu_aot.py (``build_update``: NFT + NormGuard with AdamW,
θ float32 and θ_old/θ_ref bfloat16; ``build_sample``: ODE rollout with the model's guidance),
compiled on a mesh over every local device with parameters sharded over ``fsdp``; their
abstract arguments are filled with random values on the devices (parameters N(0, 0.02²), σ in
(0.05, 0.95), FLUX guidance 3.5). Each program is compiled, run once to warm up and then timed
over ``--repeats`` runs (median). Written to ``--out`` as JSON: per cell the device kind and
count, batch, compile and run seconds, images (sampler) or rows (update) per second and the
devices' peak memory when the backend reports it. benchmarks/gpu.sh runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import tpu_aot
from normguard_jax.models import flux

# Miniatures of the two layouts (tests and --size tiny).
TINY_MMDIT = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                  caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
                  pos_embed_max_size=10, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY = {
    "sd35m": tpu_aot.ModelSpec("sd35m-tiny", tpu_aot._mmdit(TINY_MMDIT), (8, 8, 16), (5, 16),
                               16, False, 4.5, 2, 2),
    "flux-dev": tpu_aot.ModelSpec("flux-dev-tiny", tpu_aot._flux(TINY_FLUX), (8, 8, 16),
                                  (5, 16), 16, True, 3.5, 2, 2),
}


def random_arguments(args, *, params=(0,), zeros=(), seed: int = 0):
    """Device arrays for abstract arguments (``jax.ShapeDtypeStruct`` with shardings), created
    directly in their sharded layout.

    Args:
      args: the tuple of abstract arguments.
      params: positions of parameter pytrees: floats N(0, 0.02²).
      zeros: positions filled with zeros (an optimizer state at step 0).
      seed: base seed.

    Other float leaves are N(0, 1), except leaves named ``sigma`` (uniform in (0.05, 0.95))
    and ``guidance`` (3.5); bools are True, other integers 0 (a key's data included).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(args)

    def make(i, path, leaf):
        position, name = path[0].idx, jax.tree_util.keystr(path)
        shape, dtype, key = leaf.shape, leaf.dtype, jax.random.key(seed + i)
        if position in zeros or not jnp.issubdtype(dtype, jnp.floating):
            return jnp.ones(shape, dtype) if dtype == jnp.bool_ else jnp.zeros(shape, dtype)
        if "sigma" in name:
            return jax.random.uniform(key, shape, dtype, 0.05, 0.95)
        if "guidance" in name:
            return jnp.full(shape, 3.5, dtype)
        scale = 0.02 if position in params else 1.0
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    # One program creates every array in its sharded layout (nothing is built unsharded).
    make_all = jax.jit(lambda: [make(i, path, leaf) for i, (path, leaf) in enumerate(leaves)],
                       out_shardings=[leaf.sharding for _, leaf in leaves])
    return jax.tree_util.tree_unflatten(treedef, make_all())


def _peak_bytes() -> int | None:
    peaks = [d.memory_stats().get("peak_bytes_in_use") for d in jax.local_devices()
             if d.memory_stats()]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def time_program(jitted, args, *, repeats: int, donate: bool) -> dict:
    """Compiles, warms up and times ``jitted`` on random ``args``; returns seconds.

    ``donate``: the update's layout (θ, optimizer state, θ_old, θ_ref, ...); it donates its
    first two arguments and each run feeds its outputs back in, as a training loop does.
    Otherwise the sampler's (θ first).
    """
    concrete = (random_arguments(args, params=(0, 2, 3), zeros=(1,)) if donate
                else random_arguments(args))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = compiled(*concrete)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if donate:
            concrete = (out[0], out[1]) + tuple(concrete[2:])
    return {"compile_s": compile_s, "first_run_s": times[0],
            "run_s": statistics.median(times[1:]), "runs": repeats}


def run(models, *, size: str, num_steps: int, repeats: int, update_batch: int | None,
        sample_batch: int | None, remat: str, programs=("update", "sample"), log=print):
    """Times every (model, program) cell on the local devices; returns the rows."""
    devices = jax.devices()
    rows = []
    for name in models:
        spec = (TINY if size == "tiny" else tpu_aot.MODELS)[name]
        spec = dataclasses.replace(spec, update_batch=update_batch or spec.update_batch,
                                   sample_batch=sample_batch or spec.sample_batch)
        for program in programs:
            row = {"model": spec.name, "program": program, "devices": len(devices),
                   "device_kind": devices[0].device_kind, "platform": devices[0].platform}
            try:
                if program == "update":
                    jitted, args = tpu_aot.build_update(spec, devices, remat=remat)
                    row.update(batch_per_device=spec.update_batch, remat=remat)
                    row.update(time_program(jitted, args, repeats=repeats, donate=True))
                    row["rows_per_s"] = spec.update_batch * len(devices) / row["run_s"]
                else:
                    jitted, args = tpu_aot.build_sample(spec, devices, num_steps=num_steps)
                    row.update(batch_per_device=spec.sample_batch, num_steps=num_steps)
                    row.update(time_program(jitted, args, repeats=repeats, donate=False))
                    row["images_per_s"] = spec.sample_batch * len(devices) / row["run_s"]
                row["peak_bytes"] = _peak_bytes()
            except Exception as e:  # noqa: BLE001  (an out-of-memory cell is a result too)
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            rows.append(row)
            log(json.dumps(row))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--models", default="sd35m,flux-dev")
    parser.add_argument("--programs", default="update,sample")
    parser.add_argument("--num_steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update_batch", type=int, default=0, help="rows per device (0: spec)")
    parser.add_argument("--sample_batch", type=int, default=0, help="images per device")
    parser.add_argument("--remat", default="full", help="remat policy of the update")
    parser.add_argument("--out", default="gpu_bench.json")
    a = parser.parse_args(argv)
    rows = run(a.models.split(","), size=a.size, num_steps=a.num_steps, repeats=a.repeats,
               update_batch=a.update_batch or None, sample_batch=a.sample_batch or None,
               remat=a.remat, programs=tuple(a.programs.split(",")))
    meta = {"jax": jax.__version__, "size": a.size,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) and a.size == "tiny" else 0


if __name__ == "__main__":
    sys.exit(main())

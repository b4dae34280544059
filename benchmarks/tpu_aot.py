"""Compiled per-device memory and FLOPs of the RL update and the sampler at real sizes, for TPU
slices, without a TPU: ahead-of-time compilation for a topology description (libtpu).

For each model (SD3.5-Medium, FLUX.1-dev), topology (v5e-8, v4-8) and program it builds the
program from the library's own pieces, with abstract arguments only (``jax.ShapeDtypeStruct``
carrying shardings: nothing of real size is ever allocated), compiles it for the topology's
devices and reads ``compiled.memory_analysis()`` and ``compiled.cost_analysis()``:

* ``update``: one RL optimizer step, ``rl.update`` with DiffusionNFT's objective
  (``objectives.METHODS["nft"]``) wrapped by NormGuard (``normguard.with_normguard``, λ = 0.1):
  forward of θ (with gradient), θ_old and θ_ref, backward, AdamW. θ and the optimizer state are
  float32 (θ is the float32 master), θ_old and θ_ref are stored in bfloat16; activations are
  bfloat16. Every parameter-like array is sharded over the mesh's ``fsdp`` axis by
  ``sharding.tree_shardings`` (mesh ``data=1, fsdp=8``), the batch over all devices.
* ``sample``: one rollout, ``sampling.sample`` (ODE) over the 10-step training schedule with
  the model's classifier-free guidance (SD3.5: w = 4.5, conditional and unconditional rows in
  one call; FLUX.1-dev: guidance-distilled, w embedded, one call), θ in bfloat16, sharded the
  same way.

Figures are per device. Memory: arguments, outputs, temporaries, aliased (donated) bytes and
``total = arguments + outputs + temporaries - aliased``, against the device's HBM. Cost: XLA's
FLOPs and bytes accessed of the per-device program; XLA counts a loop body once (whatever the
trip count), so the sampler's FLOPs and bytes are its ``lax.scan`` program's times the number of
steps (the few operations outside the loop are negligible). Roofline-bound utilisation ``min(1, (FLOPs / peak) / (bytes / bandwidth))``:
the fraction of the peak FLOP rate the program can reach if it runs at the larger of its
compute time and its HBM time (1 = compute-bound); collectives are not counted.

Topologies (``jax.experimental.topologies.get_topology_desc``): "v5e:2x4" is a v5e-8 (8 chips,
one device each: 16 GiB HBM, 197 TFLOP/s bf16, 819 GB/s); "v4:2x2x1" is a v4-8 (4 chips), which
the topology lists as 8 devices, one per TensorCore: each device is half a chip (16 GiB of the
chip's 32 GiB, 137.5 of 275 TFLOP/s, 600 of 1200 GB/s).

Run (in a venv with the ``tpu`` extra; see benchmarks/README.md)::

    python -m benchmarks.tpu_aot --out benchmarks/tpu_aot.json

The pieces (``build_update``, ``build_sample``, ``measure``) take any device list, so the
tests compile them for the 8 fake CPU devices at tiny sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from normguard_jax import flow, normguard, rl, sampling, sharding
from normguard_jax.models import count_params, flux, make_velocity_fn, mmdit
from normguard_jax.objectives import METHODS

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device of a topology: HBM bytes, peak bf16 FLOP/s and HBM bandwidth (bytes/s)."""

    topology: str
    name: str
    hbm: float
    peak_flops: float
    bandwidth: float


CHIPS = {
    "v5e-8": Chip("v5e:2x4", "TPU v5e", 16 * GiB, 197e12, 819e9),
    # One device per TensorCore (half a v4 chip), as the topology lists them.
    "v4-8": Chip("v4:2x2x1", "TPU v4 TensorCore", 16 * GiB, 137.5e12, 600e9),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A velocity model at the reference codebases' resolution.

    Attributes:
      name: short name.
      build: ``(remat, dtype, param_dtype) -> (graphdef, abstract params)``.
      latent: (H, W, C) latent of one image.
      text: (L, D) text-encoder states; pooled: P of the pooled embedding.
      guidance: embedded guidance scale (FLUX.1-dev), else classifier-free guidance.
      cfg_scale: sampler guidance scale (CFG w, or the embedded FLUX guidance).
      update_batch, sample_batch: rows per device of the update and of the rollout.
    """

    name: str
    build: Callable
    latent: tuple[int, int, int]
    text: tuple[int, int]
    pooled: int
    guidance: bool
    cfg_scale: float
    update_batch: int
    sample_batch: int


def _mmdit(config):
    def build(remat, dtype, param_dtype):
        return mmdit.abstract_mmdit(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return build


def _flux(config):
    def build(remat, dtype, param_dtype):
        from flax import nnx  # noqa: PLC0415
        module = flux.abstract_flux(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
        return nnx.split(module, nnx.Param)
    return build


MODELS = {
    # SD3.5-Medium at 512×512 (64×64×16 latents), CLIP-L+G and T5 states (77 + 256 tokens),
    # Flow-GRPO's 8 samples per device and CFG 4.5.
    "sd35m": ModelSpec("sd35m", _mmdit(mmdit.SD35_MEDIUM_CONFIG), (64, 64, 16), (333, 4096),
                       2048, False, 4.5, 8, 8),
    # FLUX.1-dev at 512×512 (64×64×16 latents, 1024 packed tokens), 512 T5 tokens, embedded
    # guidance 3.5.
    "flux-dev": ModelSpec("flux-dev", _flux(flux.FLUX_DEV_CONFIG), (64, 64, 16), (512, 4096),
                          768, True, 3.5, 8, 8),
}


def mesh_of(devices) -> Mesh:
    """The ``(data, fsdp)`` mesh with every device on ``fsdp`` (parameters sharded 8 ways)."""
    return sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)


def _struct(shape, dtype, sh: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sh)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), tree)


def _cond(spec: ModelSpec, batch: int, sh: NamedSharding) -> dict:
    cond = {"text": _struct((batch, *spec.text), jnp.bfloat16, sh),
            "pooled": _struct((batch, spec.pooled), jnp.bfloat16, sh)}
    if spec.guidance:
        cond["guidance"] = _struct((batch,), jnp.float32, sh)
    return cond


def build_update(spec: ModelSpec, devices, *, remat: str = "none", min_shard_size: int = 2**16,
                 normguard_weight: float = 0.1) -> tuple[Callable, tuple]:
    """The jitted RL update (NFT + NormGuard, AdamW) and its abstract sharded arguments.

    Returns:
      ``(jitted, args)``: ``jitted.lower(*args).compile()`` gives the program of one step;
      args are θ (float32), the AdamW state, θ_old and θ_ref (bfloat16), the batch
      (``update_batch`` rows per device: x0, noise (B, H, W, C) float32, σ (B,), cond, advantage
      (B,)), rewards_ok and None (no rollout-time θ).
    """
    mesh = mesh_of(devices)
    graphdef, params = spec.build(remat, jnp.bfloat16, jnp.float32)
    velocity = make_velocity_fn(graphdef)
    optimizer = optax.adamw(1e-5, weight_decay=1e-4)
    frozen = _cast(params, jnp.bfloat16)
    args_params = sharding.abstract_tree(params, mesh, min_shard_size)
    opt_state = sharding.abstract_tree(jax.eval_shape(optimizer.init, params), mesh,
                                       min_shard_size)
    frozen = sharding.abstract_tree(frozen, mesh, min_shard_size)
    data_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    b = spec.update_batch * len(devices)
    batch = {"x0": _struct((b, *spec.latent), jnp.float32, data_sh),
             "noise": _struct((b, *spec.latent), jnp.float32, data_sh),
             "sigma": _struct((b,), jnp.float32, data_sh),
             "cond": _cond(spec, b, data_sh),
             "advantage": _struct((b,), jnp.float32, data_sh)}
    method = METHODS["nft"]
    objective = normguard.with_normguard(
        method.make_objective(method.config_cls()),
        normguard.NormGuardConfig(weight=normguard_weight, velocity="points"))
    p_sh = jax.tree.map(lambda s: s.sharding, args_params)
    o_sh = jax.tree.map(lambda s: s.sharding, opt_state)
    f_sh = jax.tree.map(lambda s: s.sharding, frozen)
    jitted = jax.jit(functools.partial(rl.update, objective=objective, optimizer=optimizer,
                                       velocity=velocity),
                     in_shardings=(p_sh, o_sh, f_sh, f_sh, data_sh, repl, repl),
                     out_shardings=(p_sh, o_sh, repl), donate_argnums=(0, 1))
    args = (args_params, opt_state, frozen, frozen, batch, _struct((), jnp.bool_, repl), None)
    return jitted, args


def build_sample(spec: ModelSpec, devices, *, num_steps: int = 10, shift: float = 3.0,
                 min_shard_size: int = 2**16) -> tuple[Callable, tuple]:
    """The jitted rollout sampler (ODE over ``num_steps`` steps, the model's guidance) and its
    abstract sharded arguments: θ (bfloat16), x (B, H, W, C) float32 noise, cond[, the negative
    conditioning] (``sample_batch`` images per device), key."""
    mesh = mesh_of(devices)
    graphdef, params = spec.build("none", jnp.bfloat16, jnp.bfloat16)
    velocity = make_velocity_fn(graphdef)
    params = sharding.abstract_tree(params, mesh, min_shard_size)
    data_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    b = spec.sample_batch * len(devices)
    x = _struct((b, *spec.latent), jnp.float32, data_sh)
    cond = _cond(spec, b, data_sh)
    sigmas = jnp.asarray(flow.inference_sigmas(num_steps, shift))
    if spec.guidance:
        null = None
    else:   # the empty prompt's embedding, one row broadcast over the batch
        null = {"text": _struct((1, *spec.text), jnp.bfloat16, repl),
                "pooled": _struct((1, spec.pooled), jnp.bfloat16, repl)}

    def rollout(params, x, cond, null, key):
        if null is None:    # guidance-distilled: one call, w in cond["guidance"]
            vfn = lambda xs, s: velocity(params, xs, s, cond)  # noqa: E731
        else:
            vfn = functools.partial(sampling.guided_velocity, velocity, params, cond=cond,
                                    guidance_scale=spec.cfg_scale, null_class=null)
        return sampling.sample(vfn, x, sigmas, jax.random.wrap_key_data(key),
                               method="ode").states[-1]

    jitted = jax.jit(rollout, out_shardings=data_sh)
    key = _struct((2,), jnp.uint32, repl)
    return jitted, (params, x, cond, null, key)


def measure(jitted, args, *, chip: Chip | None = None, loop_steps: int = 1) -> dict[str, Any]:
    """Compiles ``jitted`` for ``args`` and reads its per-device memory and cost.

    Args:
      jitted, args: a jitted function and its abstract arguments (``jax.ShapeDtypeStruct``
        with shardings on the target devices).
      chip: the device's HBM, peak FLOP/s and bandwidth, for the fractions and the roofline;
        None leaves those fields out (CPU tests).
      loop_steps: multiply FLOPs and bytes by this (a loop body that XLA counts once).

    Returns:
      dict with ``compile_s``, ``argument_bytes``, ``output_bytes``, ``temp_bytes``,
      ``alias_bytes``, ``total_bytes`` (= arguments + outputs + temporaries - aliased, per
      device), ``flops`` and ``bytes_accessed`` (per device), ``intensity`` (FLOP/byte), and
      with ``chip``: ``hbm_fraction``, ``compute_s``, ``memory_s`` and ``roofline_util`` =
      min(1, compute_s / memory_s).
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"compile_s": round(compile_s, 1),
           "argument_bytes": int(mem.argument_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          - out["alias_bytes"])
    out["flops"] = float(cost.get("flops", 0.0)) * loop_steps
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) * loop_steps
    out["intensity"] = out["flops"] / max(out["bytes_accessed"], 1.0)
    if chip is not None:
        out["hbm_fraction"] = out["total_bytes"] / chip.hbm
        out["compute_s"] = out["flops"] / chip.peak_flops
        out["memory_s"] = out["bytes_accessed"] / chip.bandwidth
        out["roofline_util"] = min(1.0, out["compute_s"] / max(out["memory_s"], 1e-30))
    return out


def topology_devices(topology: str):
    """The devices of a TPU topology description (needs libtpu; no TPU)."""
    from jax.experimental import topologies  # noqa: PLC0415
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def param_bytes(spec: ModelSpec, param_dtype=jnp.float32) -> int:
    """Bytes of the model's parameters in ``param_dtype`` (all devices together)."""
    _, params = spec.build("none", jnp.bfloat16, param_dtype)
    return sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize for p in jax.tree.leaves(params))


def run(models, chips, remats, *, num_steps: int, log=print) -> list[dict]:
    """Measures every (model, chip, program) cell; returns the rows (see :func:`measure`)."""
    rows = []
    for model in models:
        spec = MODELS[model]
        _, p = spec.build("none", jnp.bfloat16, jnp.float32)
        n_params = count_params(p)
        for chip_name in chips:
            chip = CHIPS[chip_name]
            devices = topology_devices(chip.topology)
            cells = [(f"update remat={r}", functools.partial(build_update, remat=r), 1)
                     for r in remats]
            cells.append((f"sample {num_steps} steps",
                          functools.partial(build_sample, num_steps=num_steps), num_steps))
            for program, build, loop_steps in cells:
                row = {"model": model, "params": n_params, "chip": chip_name,
                       "topology": chip.topology, "program": program,
                       "batch_per_device": (spec.sample_batch if program.startswith("sample")
                                            else spec.update_batch)}
                try:
                    jitted, args = build(spec, devices)
                    row.update(measure(jitted, args, chip=chip, loop_steps=loop_steps))
                except Exception as e:  # noqa: BLE001  (a failed cell is a result too)
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                rows.append(row)
                log(format_row(row))
    return rows


HEADER = (f"{'model':9} {'chip':6} {'program':20} {'B/dev':>5} {'args GiB':>8} {'out GiB':>7} "
          f"{'temp GiB':>8} {'total GiB':>9} {'HBM %':>6} {'TFLOP':>8} {'GB acc':>8} "
          f"{'FLOP/B':>7} {'roofline':>8} {'compile s':>9}")


def format_row(row: dict) -> str:
    """One line of the printed table."""
    head = f"{row['model']:9} {row['chip']:6} {row['program']:20} {row['batch_per_device']:>5}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:200]}"
    g = lambda k: row[k] / GiB  # noqa: E731
    return (f"{head} {g('argument_bytes'):8.2f} {g('output_bytes'):7.2f} {g('temp_bytes'):8.2f} "
            f"{g('total_bytes'):9.2f} {100 * row['hbm_fraction']:6.1f} "
            f"{row['flops'] / 1e12:8.2f} {row['bytes_accessed'] / 1e9:8.1f} "
            f"{row['intensity']:7.0f} {100 * row['roofline_util']:7.1f}% {row['compile_s']:9.1f}")


def markdown(rows: list[dict]) -> str:
    """The rows as the markdown table of benchmarks/README.md."""
    lines = ["| model | chip | program | batch/device | args | outputs | temporaries | total "
             "(of HBM) | TFLOP | GB accessed | FLOP/byte | roofline-bound util. | compile |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['chip']} | {r['program']} | {r['batch_per_device']} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:160]} |" + " |" * 8)
            continue
        g = lambda k: f"{r[k] / GiB:.2f} GiB"  # noqa: E731
        lines.append(
            f"{head} {g('argument_bytes')} | {g('output_bytes')} | {g('temp_bytes')} | "
            f"{g('total_bytes')} ({100 * r['hbm_fraction']:.0f} %) | {r['flops'] / 1e12:.1f} | "
            f"{r['bytes_accessed'] / 1e9:.0f} | {r['intensity']:.0f} | "
            f"{100 * r['roofline_util']:.0f} % | {r['compile_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd35m,flux-dev")
    parser.add_argument("--chips", default="v5e-8,v4-8")
    parser.add_argument("--remat", default="none,full",
                        help="remat policies of the update (models.layers.REMAT_POLICIES)")
    parser.add_argument("--num_steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--out", default="benchmarks/tpu_aot.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of --out of other (model, chip, program) cells")
    parser.add_argument("--markdown", action="store_true",
                        help="only print --out's rows as a markdown table (no compiling)")
    a = parser.parse_args(argv)
    if a.markdown:
        with open(a.out, encoding="utf-8") as f:
            print(markdown(json.load(f)["rows"]))
        return 0
    print(HEADER, flush=True)
    rows = run(a.models.split(","), a.chips.split(","), a.remat.split(","),
               num_steps=a.num_steps, log=lambda line: print(line, flush=True))
    meta = {"jax": jax.__version__, "command": "python -m benchmarks.tpu_aot " +
            " ".join(sys.argv[1:] if argv is None else argv),
            "chips": {k: dataclasses.asdict(v) for k, v in CHIPS.items()},
            "roofline": "min(1, (flops / peak_flops) / (bytes_accessed / bandwidth))"}
    try:
        import libtpu  # noqa: PLC0415
        meta["libtpu"] = getattr(libtpu, "__version__", "?")
    except ImportError:
        pass
    if a.append and os.path.exists(a.out):
        with open(a.out, encoding="utf-8") as f:
            old = json.load(f)
        cell = lambda r: (r["model"], r["chip"], r["program"])  # noqa: E731
        new = {cell(r) for r in rows}
        rows = [r for r in old["rows"] if cell(r) not in new] + rows
        commands = old["meta"].get("commands", [old["meta"].get("command")])
        meta["commands"] = [c for c in commands if c] + [meta.pop("command")]
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n".join([HEADER] + [format_row(r) for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiled per-device memory and FLOPs of the RL update and the sampler at real sizes, for TPU
slices, without a TPU: ahead-of-time compilation for a topology description (libtpu).

For each model (SD3.5-Medium, FLUX.1-dev), topology (v5e-8, v4-8) and program it builds the
program from the library's own pieces, with abstract arguments only (``jax.ShapeDtypeStruct``
carrying shardings: nothing of real size is ever allocated), compiles it for the topology's
devices and reads ``compiled.memory_analysis()`` and ``compiled.cost_analysis()``:

* ``update``: one RL optimizer step, ``rl.update`` with DiffusionNFT's objective
  (``objectives.METHODS["nft"]``) wrapped by NormGuard (``normguard.with_normguard``, λ = 0.1):
  forward of θ (with gradient), θ_old and θ_ref, backward, AdamW. The run's precision is
  ``precision.compute = precision.reference = "bfloat16"``: activations bfloat16, θ_ref stored
  in bfloat16 (``rl.reference_params``); the trainable tree (``rl.trainable_init``), its θ_old
  copy and the optimizer state are float32. Two tunings (``--lora``):

  - full fine-tuning: the trainable tree is θ (``policy = rl.full_policy``);
  - LoRA (rank r > 0, α, targets; default Flow-GRPO's SD3.5-M setting r = 32, α = 64, the
    ``attention`` preset of ``lora.TARGET_PRESETS``): the trainable tree is the adapter,
    ``policy = lora.LoRAParams`` over the frozen bfloat16 base θ_ref, velocity
    ``lora.make_velocity_fn`` (``x@W + (α/r)(x@A)@B``; the base is never differentiated).

  Every parameter-like array is sharded over the mesh's ``fsdp`` axis by
  ``sharding.tree_shardings`` (mesh ``data=1, fsdp=8``; arrays under 2**16 elements, e.g.
  the rank-32 adapter factors, stay replicated, as in the RL configs), the batch over all
  devices.
* ``sample``: one rollout, ``sampling.sample`` (ODE) over the 10-step training schedule with
  the model's classifier-free guidance (SD3.5: w = 4.5, conditional and unconditional rows in
  one call; FLUX.1-dev: guidance-distilled, w embedded, one call), with the policy as the RL
  rollout takes it: θ (float32 master weights, cast by each layer) or the bfloat16 base plus
  the float32 adapter, sharded the same way.

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

Run (in a venv with the ``tpu`` extra; see benchmarks/README.md), one cell per process when the
host has little memory (an SD3.5-M update compile holds several GiB)::

    python -m benchmarks.tpu_aot --out benchmarks/tpu_aot.json
    python -m benchmarks.tpu_aot --models sd35m --chips v5e-8 --lora 32 --remat full \
        --programs update --append

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
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from normguard_jax import flow, lora, normguard, rl, sampling, sharding
from normguard_jax.models import attention_impl, count_params, flux, make_velocity_fn, mmdit
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
      config, family: the architecture (a config dict) and "mmdit" or "flux", for
        :func:`with_blocks`; None for a spec built by hand.
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
    config: dict | None = None
    family: str | None = None


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
                       2048, False, 4.5, 8, 8, mmdit.SD35_MEDIUM_CONFIG, "mmdit"),
    # FLUX.1-dev at 512×512 (64×64×16 latents, 1024 packed tokens), 512 T5 tokens, embedded
    # guidance 3.5.
    "flux-dev": ModelSpec("flux-dev", _flux(flux.FLUX_DEV_CONFIG), (64, 64, 16), (512, 4096),
                          768, True, 3.5, 8, 8, flux.FLUX_DEV_CONFIG, "flux"),
}


def blocks_of(spec: ModelSpec) -> tuple[int, int]:
    """The spec's two block counts: (dual-attention, plain) MMDiT blocks, or (double-stream,
    single-stream) FLUX blocks. SD3.5-M: (13, 11); FLUX.1-dev: (19, 38)."""
    c = spec.config
    if spec.family == "mmdit":
        dual = len(c.get("dual_attention_layers", ()))
        return dual, c["num_layers"] - dual
    return c["num_layers"], c["num_single_layers"]


def with_blocks(spec: ModelSpec, blocks: tuple[int, int]) -> ModelSpec:
    """The same model with fewer blocks (every block at full width): MMDiT ``(dual, plain)``
    = the first ``dual`` blocks with dual attention, then ``plain`` ones (the last is the
    context-pre-only block, so ``plain`` ≥ 1); FLUX ``(double, single)``. For compiles whose
    full depth does not fit the compiling host's memory: figures are then extrapolated linearly
    in the block counts (:func:`extrapolate`)."""
    first, second = blocks
    if spec.family == "mmdit":
        if second < 1:
            raise ValueError("an MMDiT needs at least one plain (context-pre-only) last block")
        config = dict(spec.config, num_layers=first + second,
                      dual_attention_layers=tuple(range(first)))
        build = _mmdit(config)
    elif spec.family == "flux":
        config = dict(spec.config, num_layers=first, num_single_layers=second)
        build = _flux(config)
    else:
        raise ValueError(f"{spec.name}: no architecture config to change the depth of")
    return dataclasses.replace(spec, build=build, config=config)


# Per-device figures that grow with the depth; the others are derived from them.
EXTENSIVE = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes",
             "flops", "bytes_accessed")


def extrapolate(rows: list[dict], chips=None) -> list[dict]:
    """Full-depth rows fitted to reduced-depth ones (``blocks`` field, :func:`with_blocks`).

    For every cell (model, tuning, chip, program) with compiles at several depths, each figure
    of :data:`EXTENSIVE` is fitted as ``c + a·n1 + b·n2`` (least squares over the cell's depths;
    with only proportional depths, ``c + a·k``) and evaluated at the model's full block counts.
    The row gets ``blocks`` = the full counts, ``extrapolated_from`` = the depths used, the
    fit's largest relative residual at those depths (``fit_residual``) and the derived fields
    recomputed (no compile time or host memory).
    """
    chips = chips or CHIPS
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r and r.get("blocks") and r["model"] in MODELS:
            groups.setdefault(cell_key(r), []).append(r)
    out = []
    for key, group in groups.items():
        spec = MODELS[key[0]]
        full = blocks_of(spec)
        depths = sorted({tuple(r["blocks"]) for r in group})
        if len(depths) < 2 or tuple(full) in depths:
            continue
        x = np.array([[1.0, *d] for d in depths])
        target = np.array([1.0, *full])
        if np.linalg.matrix_rank(x) < 3:   # proportional depths: one slope along the ray
            ratio = np.array(full, float) / max(full)
            ks = x[:, 1:] @ ratio / (ratio @ ratio)
            if not np.allclose(x[:, 1:], np.outer(ks, ratio)):
                continue
            x = np.stack([np.ones_like(ks), ks], axis=1)
            target = np.array([1.0, max(full)])
        by_depth = {tuple(r["blocks"]): r for r in group}   # the last row of a depth wins
        row = {k: v for k, v in by_depth[depths[-1]].items()
               if k not in ("compile_s", "host_peak_rss_gib", "params_compiled")}
        if all("trainable_params" in by_depth[d] for d in depths):   # linear in depth too
            y = np.array([by_depth[d]["trainable_params"] for d in depths], float)
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            row["trainable_params"] = int(round(float(target @ coef)))
        residual = 0.0
        for field in EXTENSIVE:
            y = np.array([by_depth[d][field] for d in depths], float)
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            residual = max(residual, float(np.max(np.abs(x @ coef - y) / np.maximum(y, 1.0))))
            row[field] = float(target @ coef)
        for field in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes"):
            row[field] = int(round(row[field]))
        row["total_bytes"] = (row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
                              - row["alias_bytes"])
        row.update(blocks=list(full), extrapolated_from=[list(d) for d in depths],
                   fit_residual=residual, fit_unknowns=x.shape[1])
        row["intensity"] = row["flops"] / max(row["bytes_accessed"], 1.0)
        chip = chips[row["chip"]]
        row["hbm_fraction"] = row["total_bytes"] / chip.hbm
        row["compute_s"] = row["flops"] / chip.peak_flops
        row["memory_s"] = row["bytes_accessed"] / chip.bandwidth
        row["roofline_util"] = min(1.0, row["compute_s"] / max(row["memory_s"], 1e-30))
        out.append(row)
    return out


def mesh_of(devices) -> Mesh:
    """The ``(data, fsdp)`` mesh with every device on ``fsdp`` (parameters sharded 8 ways)."""
    return sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)


def _struct(shape, dtype, sh: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sh)


def _cond(spec: ModelSpec, batch: int, sh: NamedSharding) -> dict:
    cond = {"text": _struct((batch, *spec.text), jnp.bfloat16, sh),
            "pooled": _struct((batch, spec.pooled), jnp.bfloat16, sh)}
    if spec.guidance:
        cond["guidance"] = _struct((batch,), jnp.float32, sh)
    return cond


def run_config(lora_cfg: lora.LoRAConfig | None = None) -> ml_collections.ConfigDict:
    """The fields of an RL config that :func:`rl.trainable_init` and :func:`rl.reference_params`
    read: bfloat16 compute and θ_ref storage (``precision``), the ``lora`` block (rank 0 = full
    fine-tuning) and the seed."""
    cfg = lora_cfg or lora.LoRAConfig()
    return ml_collections.ConfigDict({
        "seed": 0, "precision": {"compute": "bfloat16", "reference": "bfloat16"},
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}})


def _policy_trees(spec: ModelSpec, remat: str, lora_cfg: lora.LoRAConfig | None):
    """``(velocity, policy, trainable, reference)`` of a run, abstract (ShapeDtypeStructs).

    Full fine-tuning (``lora_cfg`` None or rank 0): the trainable tree is θ itself (float32
    master weights), θ_ref the base cast to bfloat16, ``policy = rl.full_policy``. LoRA: the
    trainable tree is the adapter (float32, ``rl.trainable_init``), θ_ref the bfloat16 base,
    which is also the frozen part of the policy (``lora.LoRAParams(θ_ref, adapter)``), and the
    velocity is ``lora.make_velocity_fn`` (adapted layers compute ``x@W + (α/r)(x@A)@B``).
    Both compute in bfloat16 (the graph's dtype), as ``rl.run_velocity`` builds it for
    ``precision.compute = "bfloat16"``.
    """
    config = run_config(lora_cfg)
    graphdef, base = spec.build(remat, jnp.bfloat16, jnp.float32)
    reference = jax.eval_shape(lambda b: rl.reference_params(config, b), base)
    trainable = jax.eval_shape(lambda b: rl.trainable_init(config, b), base)
    if config.lora.rank:
        return (lora.make_velocity_fn(graphdef, lora.from_config(config)), lora.LoRAParams,
                trainable, reference)
    return make_velocity_fn(graphdef), rl.full_policy, trainable, reference


def update_objective(normguard_weight: float = 0.1) -> Callable:
    """The update's objective: DiffusionNFT (its default config) wrapped by NormGuard with
    weight λ at the base loss's own velocity points."""
    method = METHODS["nft"]
    return normguard.with_normguard(
        method.make_objective(method.config_cls()),
        normguard.NormGuardConfig(weight=normguard_weight, velocity="points"))


def build_update(spec: ModelSpec, devices, *, remat: str = "none", min_shard_size: int = 2**16,
                 normguard_weight: float = 0.1, lora_cfg: lora.LoRAConfig | None = None,
                 attention: str = "xla") -> tuple[Callable, tuple]:
    """The jitted RL update (NFT + NormGuard, AdamW) and its abstract sharded arguments.

    The program is ``rl.update`` jitted as ``rl.build_programs`` jits it: the trainable tree
    (θ, or with ``lora_cfg`` of rank > 0 the LoRA adapter), its AdamW state and θ_old (the
    trainable tree's dtype, float32, as ``rl_state.initial_state`` copies it) sharded by
    ``sharding.tree_shardings``, θ_ref (bfloat16) likewise, θ and the optimizer state donated.
    ``attention``: the kernel of the blocks' attention (``models.attention_impl``; "flash" is
    the Pallas TPU kernel, per device over the batch's shards).

    Returns:
      ``(jitted, args)``: ``jitted.lower(*args).compile()`` gives the program of one step;
      args are the trainable tree, its AdamW state, θ_old, θ_ref, the batch (``update_batch``
      rows per device: x0, noise (B, H, W, C) float32, σ (B,), cond, advantage (B,)),
      rewards_ok and None (no rollout-time θ).
    """
    mesh = mesh_of(devices)
    velocity, policy, trainable, reference = _policy_trees(spec, remat, lora_cfg)
    velocity = attention_impl.bind(velocity, attention, mesh)
    optimizer = optax.adamw(1e-5, weight_decay=1e-4)
    args_params = sharding.abstract_tree(trainable, mesh, min_shard_size)
    opt_state = sharding.abstract_tree(jax.eval_shape(optimizer.init, trainable), mesh,
                                       min_shard_size)
    ref = sharding.abstract_tree(reference, mesh, min_shard_size)
    data_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    b = spec.update_batch * len(devices)
    batch = {"x0": _struct((b, *spec.latent), jnp.float32, data_sh),
             "noise": _struct((b, *spec.latent), jnp.float32, data_sh),
             "sigma": _struct((b,), jnp.float32, data_sh),
             "cond": _cond(spec, b, data_sh),
             "advantage": _struct((b,), jnp.float32, data_sh)}
    objective = update_objective(normguard_weight)
    p_sh = jax.tree.map(lambda s: s.sharding, args_params)
    o_sh = jax.tree.map(lambda s: s.sharding, opt_state)
    r_sh = jax.tree.map(lambda s: s.sharding, ref)
    jitted = jax.jit(functools.partial(rl.update, objective=objective, optimizer=optimizer,
                                       velocity=velocity, policy=policy),
                     in_shardings=(p_sh, o_sh, p_sh, r_sh, data_sh, repl, repl),
                     out_shardings=(p_sh, o_sh, repl), donate_argnums=(0, 1))
    args = (args_params, opt_state, args_params, ref, batch, _struct((), jnp.bool_, repl), None)
    return jitted, args


def build_sample(spec: ModelSpec, devices, *, num_steps: int = 10, shift: float = 3.0,
                 min_shard_size: int = 2**16, lora_cfg: lora.LoRAConfig | None = None,
                 attention: str = "xla") -> tuple[Callable, tuple]:
    """The jitted rollout sampler (ODE over ``num_steps`` steps, the model's guidance) and its
    abstract sharded arguments: the policy as ``rl.build_programs``' rollout takes it (θ, the
    float32 master weights, cast to bfloat16 by each layer; or with ``lora_cfg`` of rank > 0
    ``lora.LoRAParams(bfloat16 base, float32 adapter)``), x (B, H, W, C) float32 noise, cond[, the negative conditioning]
    (``sample_batch`` images per device), key."""
    mesh = mesh_of(devices)
    velocity, policy, trainable, reference = _policy_trees(spec, "none", lora_cfg)
    velocity = attention_impl.bind(velocity, attention, mesh)
    params = policy(sharding.abstract_tree(reference, mesh, min_shard_size),
                    sharding.abstract_tree(trainable, mesh, min_shard_size))
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


def tuning_name(lora_cfg: lora.LoRAConfig | None) -> str:
    """The row's ``tuning`` field: "full", or "lora r<rank> α<alpha> <targets>"."""
    if lora_cfg is None or not lora_cfg.rank:
        return "full"
    return f"lora r{lora_cfg.rank} α{lora_cfg.alpha:g} {lora_cfg.targets}"


def program_name(program: str, attention: str) -> str:
    """The row's ``program``: ``program`` itself with XLA's attention, else
    ``"<program>, <attention> attention"``."""
    return program if attention == "xla" else f"{program}, {attention} attention"


def run(models, chips, remats, *, num_steps: int, lora_cfgs=(None,),
        programs=("update", "sample"), blocks=None, attentions=("xla",),
        update_batch=None, log=print) -> list[dict]:
    """Measures every (model, chip, tuning, program) cell; returns the rows (see
    :func:`measure`; plus ``host_peak_rss_gib``, the compiling process's peak resident memory
    so far, and ``trainable_params``). ``blocks``: compile the models at this reduced depth
    (:func:`with_blocks`; the rows get a ``blocks`` field and ``params`` stays the full
    model's). ``attentions``: the attention kernels (``models.attention_impl``) each program is
    compiled with. ``update_batch``: rows per device of the update instead of the model's
    (a micro-step of an accumulated update: ``train.minibatch_size`` with
    ``optim.accumulate_steps``)."""
    rows = []
    for model in models:
        spec = MODELS[model]
        if update_batch:
            spec = dataclasses.replace(spec, update_batch=int(update_batch))
        _, p = spec.build("none", jnp.bfloat16, jnp.float32)
        n_params = count_params(p)
        if blocks is not None:
            spec = with_blocks(spec, blocks)
            _, p = spec.build("none", jnp.bfloat16, jnp.float32)
        for chip_name in chips:
            chip = CHIPS[chip_name]
            devices = topology_devices(chip.topology)
            for lora_cfg in lora_cfgs:
                cells = []
                for att in attentions:
                    if "update" in programs:
                        cells += [(program_name(f"update remat={r}", att),
                                   functools.partial(build_update, remat=r, lora_cfg=lora_cfg,
                                                     attention=att), 1)
                                  for r in remats]
                    if "sample" in programs:
                        cells.append((program_name(f"sample {num_steps} steps", att),
                                      functools.partial(build_sample, num_steps=num_steps,
                                                        lora_cfg=lora_cfg, attention=att),
                                      num_steps))
                trainable = jax.eval_shape(
                    lambda b, c=lora_cfg: rl.trainable_init(run_config(c), b), p)
                for program, build, loop_steps in cells:
                    row = {"model": model, "params": n_params,
                           "trainable_params": count_params(trainable),
                           "tuning": tuning_name(lora_cfg), "chip": chip_name,
                           "topology": chip.topology, "program": program,
                           "batch_per_device": (spec.sample_batch
                                                if program.startswith("sample")
                                                else spec.update_batch)}
                    if blocks is not None:
                        row.update(blocks=list(blocks), params_compiled=count_params(p))
                    try:
                        jitted, args = build(spec, devices)
                        row.update(measure(jitted, args, chip=chip, loop_steps=loop_steps))
                    except Exception as e:  # noqa: BLE001  (a failed cell is a result too)
                        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    row["host_peak_rss_gib"] = round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
                    rows.append(row)
                    log(format_row(row))
    return rows


def cell_key(row: dict, depth: bool = False) -> tuple:
    """What identifies a cell of the table (with its rows per device); with ``depth`` also the
    compiled depth (rows of the same cell and depth replace each other in ``--append``)."""
    key = (row["model"], row.get("tuning", "full"), row["chip"], row["program"],
           row["batch_per_device"])
    return key + (tuple(row.get("blocks") or ()),) if depth else key


HEADER = (f"{'model':9} {'tuning':24} {'chip':6} {'program':20} {'B/dev':>5} {'args GiB':>8} "
          f"{'out GiB':>7} {'temp GiB':>8} {'total GiB':>9} {'HBM %':>6} {'TFLOP':>8} "
          f"{'GB acc':>8} {'FLOP/B':>7} {'roofline':>8} {'compile s':>9} {'host GiB':>8}")


def format_row(row: dict) -> str:
    """One line of the printed table."""
    program = row["program"] + (f" [{'+'.join(map(str, row['blocks']))}]"
                                if row.get("blocks") else "")
    head = (f"{row['model']:9} {row.get('tuning', 'full'):24} {row['chip']:6} "
            f"{program:20} {row['batch_per_device']:>5}")
    if "error" in row:
        return f"{head} ERROR {row['error'][:200]}"
    g = lambda k: row[k] / GiB  # noqa: E731
    return (f"{head} {g('argument_bytes'):8.2f} {g('output_bytes'):7.2f} {g('temp_bytes'):8.2f} "
            f"{g('total_bytes'):9.2f} {100 * row['hbm_fraction']:6.1f} "
            f"{row['flops'] / 1e12:8.2f} {row['bytes_accessed'] / 1e9:8.1f} "
            f"{row['intensity']:7.0f} {100 * row['roofline_util']:7.1f}% {row['compile_s']:9.1f} "
            f"{row.get('host_peak_rss_gib', float('nan')):8.1f}")


def _order(row: dict) -> tuple:
    """Table order: model, full before LoRA, chip, the updates (remat none, full, dots), then
    the sampler."""
    models, chips = list(MODELS), list(CHIPS)
    remats = ["update remat=none", "update remat=full", "update remat=dots"]
    program = row["program"]
    return (models.index(row["model"]) if row["model"] in models else len(models),
            row.get("tuning", "full") != "full", row.get("tuning", "full"),
            chips.index(row["chip"]) if row["chip"] in chips else len(chips),
            remats.index(program) if program in remats else len(remats), program,
            -row["batch_per_device"])


def _markdown_row(r: dict) -> str:
    tuning = r.get("tuning", "full")
    program = r["program"]
    if r.get("extrapolated_from"):   # with more depths than unknowns the fit can be checked
        over = len(r["extrapolated_from"]) > r.get("fit_unknowns", len(r["extrapolated_from"]))
        program += f" ≈ (fit residual {100 * r['fit_residual']:.1f} %)" if over else " ≈"
    head = f"| {r['model']} | {tuning} | {r['chip']} | {program} | {r['batch_per_device']} |"
    if "error" in r:
        return f"{head} {r['error'][:160]} |" + " |" * 9
    g = lambda k: f"{r[k] / GiB:.2f} GiB"  # noqa: E731
    rss = r.get("host_peak_rss_gib")
    compile_s = r.get("compile_s")
    return (f"{head} {g('argument_bytes')} | {g('output_bytes')} | {g('temp_bytes')} | "
            f"{g('total_bytes')} ({100 * r['hbm_fraction']:.0f} %) | {r['flops'] / 1e12:.1f} | "
            f"{r['bytes_accessed'] / 1e9:.0f} | {r['intensity']:.0f} | "
            f"{100 * r['roofline_util']:.0f} % | "
            f"{'' if compile_s is None else f'{compile_s:.0f} s'} | "
            f"{'' if rss is None else f'{rss:.1f} GiB'} |")


def markdown(rows: list[dict]) -> str:
    """The rows as the markdown tables of benchmarks/README.md (sorted by :func:`_order`): the
    full-depth cells, compiled or (marked ≈) extrapolated from reduced-depth compiles
    (:func:`extrapolate`), then the reduced-depth compiles themselves."""
    header = ("| model | tuning | chip | program | batch/device | args | outputs | temporaries "
              "| total (of HBM) | TFLOP | GB accessed | FLOP/byte | roofline-bound util. | "
              "compile | host RSS |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    full = [r for r in rows if not r.get("blocks")] + extrapolate(rows)
    lines = list(header) + [_markdown_row(r) for r in sorted(full, key=_order)]
    reduced = [r for r in rows if r.get("blocks")]
    if reduced:
        lines += ["", "Reduced-depth compiles (blocks: MMDiT dual-attention + plain, FLUX "
                  "double + single):", "", header[0].replace("| program |",
                                                             "| program | blocks |"),
                  header[1] + "---|"]
        for r in sorted(reduced, key=lambda r: (_order(r), r["blocks"])):
            line = _markdown_row(r).split(" | ")
            line.insert(4, "+".join(str(b) for b in r["blocks"]))
            lines.append(" | ".join(line))
    return "\n".join(lines)


def lora_configs(ranks: str, alpha: float, targets: str) -> list[lora.LoRAConfig | None]:
    """``--lora``'s comma-separated ranks as configs: 0 = full fine-tuning (None)."""
    return [lora.LoRAConfig(rank=r, alpha=alpha, targets=targets) if r else None
            for r in (int(x) for x in ranks.split(","))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd35m,flux-dev")
    parser.add_argument("--chips", default="v5e-8,v4-8")
    parser.add_argument("--lora", default="0,32",
                        help="comma-separated LoRA ranks; 0 = full fine-tuning")
    parser.add_argument("--lora_alpha", type=float, default=64.0)
    parser.add_argument("--lora_targets", default="attention",
                        help="lora.TARGET_PRESETS name or comma-separated patterns")
    parser.add_argument("--remat", default="none,full",
                        help="remat policies of the update (models.layers.REMAT_POLICIES)")
    parser.add_argument("--programs", default="update,sample", help="update, sample or both")
    parser.add_argument("--attention", default="xla",
                        help="comma-separated attention kernels (models.attention_impl: xla, "
                             "flash = the Pallas TPU flash kernel)")
    parser.add_argument("--num_steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--update_batch", type=int, default=0,
                        help="rows per device of the update (default: the model's); fewer rows "
                             "are one micro-step of an accumulated update")
    parser.add_argument("--blocks", default="",
                        help="compile at a reduced depth 'N1,N2' (MMDiT dual-attention, plain "
                             "blocks; FLUX double, single blocks); the markdown extrapolates")
    parser.add_argument("--out", default="benchmarks/tpu_aot.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of --out of other (model, tuning, chip, program) "
                             "cells")
    parser.add_argument("--failed", default="",
                        help="compile nothing: record the selected cells with this error text "
                             "(e.g. a compile the host's memory could not hold)")
    parser.add_argument("--markdown", action="store_true",
                        help="only print --out's rows as a markdown table (no compiling)")
    a = parser.parse_args(argv)
    if a.update_batch < 0:
        parser.error(f"--update_batch={a.update_batch} must be ≥ 1 (or 0 for the model's)")
    if a.markdown:
        with open(a.out, encoding="utf-8") as f:
            print(markdown(json.load(f)["rows"]))
        return 0
    models, chips, remats = a.models.split(","), a.chips.split(","), a.remat.split(",")
    lora_cfgs = lora_configs(a.lora, a.lora_alpha, a.lora_targets)
    programs = tuple(a.programs.split(","))
    if a.failed:
        rows = [{"model": m, "tuning": tuning_name(c), "chip": ch, "topology": CHIPS[ch].topology,
                 "program": prog, "batch_per_device": (MODELS[m].sample_batch if prog.startswith("sample")
                                                       else a.update_batch or MODELS[m].update_batch),
                 "error": a.failed}
                for m in models for ch in chips for c in lora_cfgs
                for prog in ([f"update remat={r}" for r in remats] if "update" in programs
                             else []) + ([f"sample {a.num_steps} steps"]
                                         if "sample" in programs else [])]
    else:
        print(HEADER, flush=True)
        blocks = tuple(int(b) for b in a.blocks.split(",")) if a.blocks else None
        rows = run(models, chips, remats, num_steps=a.num_steps, lora_cfgs=lora_cfgs,
                   programs=programs, blocks=blocks, update_batch=a.update_batch or None,
                   attentions=tuple(attention_impl.check(x) for x in a.attention.split(",")),
                   log=lambda line: print(line, flush=True))
    meta = {"jax": jax.__version__, "command": "python -m benchmarks.tpu_aot " +
            " ".join(sys.argv[1:] if argv is None else argv),
            "chips": {k: dataclasses.asdict(v) for k, v in CHIPS.items()},
            "roofline": "min(1, (flops / peak_flops) / (bytes_accessed / bandwidth))"}
    try:
        from importlib import metadata  # noqa: PLC0415
        meta["libtpu"] = metadata.version("libtpu")
    except Exception:  # noqa: BLE001  (no libtpu: CPU tests)
        pass
    if a.append and os.path.exists(a.out):
        with open(a.out, encoding="utf-8") as f:
            old = json.load(f)
        new = {cell_key(r, depth=True) for r in rows}
        rows = [r for r in old["rows"] if cell_key(r, depth=True) not in new] + rows
        commands = old["meta"].get("commands", [old["meta"].get("command")])
        meta["commands"] = [c for c in commands if c] + [meta.pop("command")]
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n".join([HEADER] + [format_row(r) for r in sorted(rows, key=_order)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

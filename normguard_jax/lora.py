"""Low-rank adapters (LoRA) on the linear projections of a generator, as pure functions.

An adapter is a dict ``{module path: {"a": (in, r), "b": (r, out)}}`` (float32) over the
``nnx.Linear`` layers of a base parameter tree whose dotted path (e.g.
``"transformer_blocks.0.attn.to_q"``) matches one of the target patterns. The adapted layer
computes ``y = x @ W + bias + (α/r)·(x @ A) @ B``; ``B = 0`` at initialisation, so the adapted
generator equals its base exactly until the first update.

The adapted forward keeps the two paths separate (:func:`make_velocity_fn`) instead of merging
``W + (α/r)·A@B`` into a new kernel. Why: under ``jax.grad`` a merged kernel is a residual of
the backward pass (it multiplies the output gradient), so every adapted layer would keep a
second, full-size copy of its kernel alive from the forward to the backward -- at 2.5B-12B
parameters that is gigabytes per device. With ``x @ W + (x @ A) @ B`` the backward keeps only
``x @ A`` (tokens × r), the base kernels are never differentiated (no ``∂L/∂W`` is formed, let
alone stored: the base enters the step as a non-differentiated argument), and the extra FLOPs
are ``2·tokens·r·(in + out)`` per layer, r·(in + out)/(in·out) ≈ 4 % of the dense matmul at
SD3.5-M's width 1536 and r = 32.
:func:`merge` is for export and evaluation, where one merged copy is made once.

Targets follow PEFT's rule: a pattern matches a module whose dotted path equals it or ends with
``"." + pattern``. The default, ``"attention"``, holds Flow-GRPO's SD3.5-M list (rank 32, α 64,
Gaussian A with std 1/r, B = 0) in this repository's names (diffusers' ``attn.to_out.0`` is
``attn.to_out`` here) plus the attention projections of the small DiT and UNet.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from normguard_jax import checkpointing, config_checks

# Named target sets; any other value of ``targets`` is a comma-separated list of patterns.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # Flow-GRPO's SD3.5-M targets (both streams' q/k/v/out; the dual attention ``attn2`` is not
    # matched, as in PEFT), FLUX's double and single blocks, and the DiT/UNet attention maps.
    "attention": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_q_proj",
                  "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "qkv", "proj"),
    # The above plus the MLPs (MMDiT ff/ff_context, FLUX single blocks, DiT).
    "attention_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.add_q_proj",
                      "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "qkv", "proj",
                      "fc1", "fc2", "proj_mlp"),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r (0 = no adapter), alpha α (scale α/r), targets (a preset name or patterns)."""

    rank: int = 0
    alpha: float = 64.0
    targets: str = "attention"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def patterns(self) -> tuple[str, ...]:
        if self.targets in TARGET_PRESETS:
            return TARGET_PRESETS[self.targets]
        return tuple(p.strip() for p in self.targets.split(",") if p.strip())


def from_config(config) -> LoRAConfig:
    """The ``lora`` block of an RL config (a ConfigDict or its dict record); a config recorded
    before the block existed has no adapter."""
    block = config["lora"] if "lora" in config else {"rank": 0}
    return LoRAConfig(**dict(block))


def check_config(config) -> None:
    """Checks the ``lora`` block (which layers match is checked once the base is loaded)."""
    rank = config_checks.integer(config, "lora.rank", 0)
    if rank:
        config_checks.number(config, "lora.alpha", 0, strict_minimum=True)
        if not LoRAConfig(rank=rank, targets=config.lora.targets).patterns:
            raise config_checks.ConfigError(
                f"config.lora.targets must be a preset ({', '.join(TARGET_PRESETS)}) or "
                f"comma-separated patterns, got {config.lora.targets!r}")


class LoRAParams(NamedTuple):
    """The parameters of an adapted generator: the frozen ``base`` tree and the ``adapter``."""

    base: Any
    adapter: Any


def _key_str(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _kernels(params) -> dict[str, jax.Array]:
    """``{dotted module path: kernel}`` of every 2-D ``kernel`` leaf (the ``nnx.Linear`` layers)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [_key_str(k) for k in path]
        if names and names[-1] == "value":        # nnx.Variable leaves carry a trailing .value
            names = names[:-1]
        if names and names[-1] == "kernel" and len(leaf.shape) == 2:
            out[".".join(names[:-1])] = leaf
    return out


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """PEFT's rule: ``path`` equals a pattern or ends with ``"." + pattern``."""
    return any(path == p or path.endswith("." + p) for p in patterns)


def target_paths(params, cfg: LoRAConfig) -> list[str]:
    """Sorted dotted paths of the Linear layers of ``params`` that ``cfg.targets`` selects.

    Raises:
      ValueError: no layer matches (a misspelt pattern would otherwise train nothing).
    """
    paths = sorted(p for p in _kernels(params) if matches(p, cfg.patterns))
    if not paths:
        raise ValueError(f"lora.targets={cfg.targets!r} matches no Linear layer of the model "
                         f"(its layers: {', '.join(sorted(_kernels(params))[:12])}, ...)")
    return paths


def init(key: jax.Array, base_params, cfg: LoRAConfig) -> dict[str, dict[str, jax.Array]]:
    """A fresh adapter: A ~ N(0, (1/r)²) (PEFT's "gaussian" init, Flow-GRPO's), B = 0.

    Args:
      key: typed key. base_params: the base tree (arrays or ShapeDtypeStructs).
    Returns:
      ``{path: {"a": (in, r) float32, "b": (r, out) float32}}``.
    """
    kernels = _kernels(base_params)
    adapter = {}
    for i, path in enumerate(target_paths(base_params, cfg)):
        n_in, n_out = kernels[path].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (n_in, cfg.rank), jnp.float32)
        adapter[path] = {"a": a / cfg.rank, "b": jnp.zeros((cfg.rank, n_out), jnp.float32)}
    return adapter


def delta(adapter_entry: dict[str, jax.Array], scale: float) -> jax.Array:
    """The dense update ``scale·A@B`` (in, out) float32 of one adapted layer."""
    return scale * (adapter_entry["a"].astype(jnp.float32) @
                    adapter_entry["b"].astype(jnp.float32))


def _map_kernels(params, adapter, fn):
    def visit(path, leaf):
        names = [_key_str(k) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        module = ".".join(names[:-1])
        if names and names[-1] == "kernel" and module in adapter:
            return fn(leaf, adapter[module])
        return leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def merge(base_params, adapter, cfg: LoRAConfig):
    """Base parameters with every adapted kernel replaced by ``W + (α/r)·A@B`` (kernel dtype).

    One full copy of the adapted kernels: for export and evaluation, not inside the train step
    (see the module docstring).
    """
    return _map_kernels(base_params, adapter, lambda w, e: (
        w.astype(jnp.float32) + delta(e, cfg.scale)).astype(w.dtype))


def unmerge(merged_params, adapter, cfg: LoRAConfig):
    """Inverse of :func:`merge` (up to float rounding): ``W' - (α/r)·A@B``."""
    return _map_kernels(merged_params, adapter, lambda w, e: (
        w.astype(jnp.float32) - delta(e, cfg.scale)).astype(w.dtype))


class _Adapted(nnx.Module):
    """``linear(x) + scale·(x @ a) @ b``, computed in the layer's compute dtype."""

    def __init__(self, linear: nnx.Linear, a: jax.Array, b: jax.Array, scale: float):
        self.linear = linear
        self.a, self.b = nnx.LoRAParam(a), nnx.LoRAParam(b)
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.linear(x)
        dtype = self.linear.dtype or jnp.result_type(x, self.a[...])
        h = x.astype(dtype) @ self.a[...].astype(dtype)
        return y + (self.scale * (h @ self.b[...].astype(dtype))).astype(y.dtype)


def _attach(model: nnx.Module, path: str, entry: dict, scale: float) -> None:
    *parents, name = path.split(".")
    node = model
    for p in parents:
        node = node[int(p)] if isinstance(node, nnx.List) else getattr(node, p)
    if isinstance(node, nnx.List):
        node[int(name)] = _Adapted(node[int(name)], entry["a"], entry["b"], scale)
    else:
        setattr(node, name, _Adapted(getattr(node, name), entry["a"], entry["b"], scale))


def make_velocity_fn(graphdef: nnx.GraphDef, cfg: LoRAConfig) -> Callable:
    """``velocity(params, x, sigma, cond) -> v`` of the base graph, with or without adapter.

    ``params`` is either the plain base tree (the reference θ_ref: the base's own velocity) or
    :class:`LoRAParams` (the adapted policy: each targeted Linear computes
    ``x @ W + b + (α/r)·(x @ A) @ B``). Shapes and dtypes as :func:`models.make_velocity_fn`.
    """
    def velocity(params, x, sigma, cond):
        if not isinstance(params, LoRAParams):
            return nnx.merge(graphdef, params)(x, sigma, cond)
        model = nnx.merge(graphdef, params.base)
        for path, entry in params.adapter.items():
            _attach(model, path, entry, cfg.scale)
        return model(x, sigma, cond)

    return velocity


# ----------------------------------------------------------------------------------------------
# Files: the adapter alone, or the merged parameters.
# ----------------------------------------------------------------------------------------------

_META = "lora.json"


def save_adapter(path: str, adapter, cfg: LoRAConfig, base_fingerprint: str) -> None:
    """Writes the adapter (arrays, Orbax) and ``lora.json`` (rank, alpha, targets, the SHA-256
    fingerprint of the base it was trained on, :func:`checkpointing.fingerprint`) to ``path``."""
    os.makedirs(path, exist_ok=True)
    checkpointing.save_tree(os.path.join(path, "adapter"), adapter)
    with open(os.path.join(path, _META), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "base_fingerprint": base_fingerprint}, f)


def load_adapter(path: str, base_params) -> tuple[dict, LoRAConfig]:
    """Reads what :func:`save_adapter` wrote; returns ``(adapter, cfg)``.

    Raises:
      ValueError: ``base_params`` is not the base the adapter was trained on.
    """
    with open(os.path.join(path, _META)) as f:
        meta = json.load(f)
    if checkpointing.fingerprint(base_params) != meta["base_fingerprint"]:
        raise ValueError(f"the adapter in {path} was trained on another base (fingerprint "
                         f"{meta['base_fingerprint'][:12]})")
    cfg = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    template = jax.eval_shape(lambda p: init(jax.random.key(0), p, cfg), base_params)
    return checkpointing.load_tree(os.path.join(path, "adapter"), template), cfg


def export_merged(path: str, base_params, adapter, cfg: LoRAConfig) -> None:
    """Writes the merged parameters ``W + (α/r)·A@B`` (:func:`merge`, the base's layout and
    dtypes) to ``path``; read them back with ``checkpointing.load_tree(path, base_params)``."""
    checkpointing.save_tree(path, merge(base_params, adapter, cfg))

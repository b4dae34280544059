"""Velocity generators (class- or text-conditional) and their functional interface.

Every generator is a Flax NNX module ``model(x, sigma, cond) -> v`` whose only state is
``nnx.Param``. The library splits it once and then works with the pure function returned by
``make_velocity_fn``:

    model = build_generator("dit", image_shape=(32, 32, 1), num_classes=10,
                            rngs=nnx.Rngs(0), **SIZES["dit"]["small"])
    graphdef, params = split_generator(model)
    velocity = make_velocity_fn(graphdef)
    v = velocity(params, x, sigma, cond)

Conventions: x (B, H, W, C) float32 NHWC in [-1, 1]; sigma (B,) float32 in [0, 1] with σ=1
noise and σ=0 data (the networks embed σ·1000 sinusoidally); cond (B,) int32 in
[0, num_classes], where ``num_classes`` is the null class (its own embedding row) used by
classifier-free guidance, or for the text generators (``TEXT_GENERATORS``) the pytree
``{"text": (B, L, D), "pooled": (B, P)}`` (the null conditioning is the empty prompt's, see
:mod:`normguard_jax.conditioning`); v (B, H, W, C) float32 approximates ε - x0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import numpy as np
from clu import parameter_overview
from flax import nnx

from normguard_jax.models.dit import DiT
from normguard_jax.models.embeddings import SIGMA_SCALE
from normguard_jax.models.pixel_mmdit import pixel_mmdit
from normguard_jax.models.unet import UNet

VelocityFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

GENERATORS: dict[str, Callable[..., nnx.Module]] = {"dit": DiT, "unet": UNet,
                                                     "mmdit": pixel_mmdit}
# Generators conditioned on text (``{"text", "pooled"}``) rather than class labels; they are
# built with ``text_dim`` and ``pooled_dim`` from the prompt table's embeddings.
TEXT_GENERATORS = ("mmdit",)

# Size presets, passed as ``**SIZES[name][size]`` to ``build_generator``.
# "tiny": tests (tens of thousands of parameters, compiles in about a second).
# "small": experiments on 32×32 images (1.0M / 1.4M parameters, ~30-40 GFLOP per jitted
# forward+backward at batch 128; measured 0.8-2 s on a busy, shared 2-core CPU).
# Both work for 32×32 and 8×8 inputs (patch size 2 or 4 divides 8; with four U-Net levels an
# 8×8 image reaches 1×1 at the lowest level).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        "tiny": dict(
            patch_size=2, hidden_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, freq_dim=64
        ),
        # ~1.0M parameters. 64 tokens of 4×4 patches at 32×32; the adaLN modulation (computed
        # once per sample, not per token) holds ~40 % of the weights but costs almost no FLOPs.
        # A 16-channel conv stem is cut into the patches and, with the noisy input and the
        # token prediction, feeds a 16-channel conv refinement head; the output adds a learnt
        # gain times the input. In 400-step trials on digits_mnist (batch 64, lr 1e-3) the plain
        # transformer (stem 0, refine 0, no skip) gave loss 0.257 and noise-shaped fragments with
        # patch seams, the head alone 0.215 (no seams, still fragments), stem + head + skip 0.19
        # and connected strokes. A jitted forward+backward at batch 128, 32×32×3, is ~40 GFLOP.
        # The class table starts at N(0, 1), not the reference N(0, 0.02²): with 0.02 the
        # samples ignored the label after 400 steps (10 % read as the requested digit by the
        # held-out classifier; 31 % after 1300), with 1.0 31 % after 400 (see models/dit.py).
        "small": dict(
            patch_size=4, hidden_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, freq_dim=128,
            refine_channels=16, input_skip=True, stem_channels=16, class_init_std=1.0,
        ),
    },
    # The text-conditioned MMDiT (models/pixel_mmdit.py), 32×32 RGB in 4×4 patches (64 image
    # tokens + 8 text tokens). "small": 4 joint blocks of width 128 with the DiT's 16-channel
    # conv head and input skip, 2.3M parameters.
    "mmdit": {
        "tiny": dict(patch_size=4, num_heads=2, head_dim=8, depth=2, refine_channels=4,
                     input_skip=True),
        "small": dict(patch_size=4, num_heads=4, head_dim=32, depth=4, refine_channels=16,
                      input_skip=True),
    },
    "unet": {
        "tiny": dict(
            base_channels=8,
            channel_mults=(1, 2),
            num_res_blocks=1,
            num_groups=4,
            attention=True,
            num_heads=2,
            emb_dim=32,
            freq_dim=32,
        ),
        # ~1.4M parameters, widths 8/16/32/96 at 32/16/8/4 pixels: the weights sit at the lowest
        # resolution, where a convolution is cheap; a jitted forward+backward at batch 128,
        # 32×32×1, is ~28 GFLOP (doubling the full-resolution width would double it).
        "small": dict(
            base_channels=8,
            channel_mults=(1, 2, 4, 12),
            num_res_blocks=1,
            num_groups=4,
            attention=True,
            num_heads=4,
            emb_dim=128,
            freq_dim=64,
        ),
        # ~1.8M parameters, widths 16/32/64/96: twice "small"'s full-resolution width, which
        # the sharp outlines of `shapes` need; ~73 GFLOP per forward+backward at batch 128.
        "small_wide": dict(
            base_channels=16,
            channel_mults=(1, 2, 4, 6),
            num_res_blocks=1,
            num_groups=4,
            attention=True,
            num_heads=4,
            emb_dim=128,
            freq_dim=64,
        ),
    },
}


def build_generator(
    name: str,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    rngs: nnx.Rngs,
    **size_kwargs: Any,
) -> nnx.Module:
    """Instantiates the generator registered under ``name`` in ``GENERATORS``.

    Args:
      name: a key of ``GENERATORS`` ("dit", "unet", or the text-conditioned "mmdit").
      image_shape: (H, W, C) of the images it will see.
      num_classes: number of real classes; the null class is index ``num_classes``.
      rngs: initialisation randomness, e.g. ``nnx.Rngs(0)``.
      **size_kwargs: architecture sizes (see ``SIZES``), plus ``dtype``, ``param_dtype``,
        ``remat``; text generators also ``text_dim`` and ``pooled_dim``.

    Returns:
      The module; at initialisation its output is exactly zero.

    Raises:
      ValueError: unknown name, or sizes incompatible with ``image_shape``.
    """
    try:
        cls = GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown generator {name!r}; choose one of {sorted(GENERATORS)}"
        ) from None
    return cls(image_shape=tuple(image_shape), num_classes=num_classes, rngs=rngs, **size_kwargs)


def init_module(make: Callable[[], nnx.Module], *, abstract: bool = False) -> nnx.Module:
    """Builds a module with one compiled initialisation, or only its shapes.

    Built eagerly, every initialiser of every distinct parameter shape is compiled on its own
    (about 20 s for the small UNet on a 2-core CPU); ``nnx.jit`` compiles them as one program.

    Args:
      make: ``() -> module``, creating its ``nnx.Rngs`` inside (an ``Rngs`` made outside
        cannot be advanced inside the traced initialisation).
      abstract: return the module with ``jax.ShapeDtypeStruct`` leaves instead of arrays
        (``nnx.eval_shape``): the template to restore a checkpoint into, at no cost.
    """
    return nnx.eval_shape(make) if abstract else nnx.jit(make)()


def init_in_own_trace(cls: type[nnx.Module], rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """``cls(**kwargs, rngs=rngs)`` initialised in its own traced program (``nnx.jit``); the
    keyword values must be hashable (sizes, flags, dtypes).

    Why: while a whole model is traced (``nnx.eval_shape``, ``nnx.jit``), each ``rngs`` draw
    makes JAX (flax 0.12.8) describe the origin of a tracer by walking the program traced so
    far, so one trace of all blocks costs quadratically in their number (~40 s for SD3.5-M's
    24 blocks, 50 s for FLUX.1-dev's 57, on a busy 2-core CPU). Each block built in its own
    nested trace keeps that walk short, and blocks of the same kind reuse one trace: the
    abstract build of either model takes about a second.
    """
    return _init_traced(cls, tuple(sorted(kwargs.items())), rngs)


@functools.partial(nnx.jit, static_argnums=(0, 1))
def _init_traced(cls: type[nnx.Module], kwargs: tuple[tuple[str, Any], ...],
                 rngs: nnx.Rngs) -> nnx.Module:
    return cls(**dict(kwargs), rngs=rngs)


def config_kwargs(cls: type, config: Mapping[str, Any], *, what: str,
                  also_known: Collection[str] = ()) -> dict[str, Any]:
    """The fields of the dataclass ``cls`` present in a diffusers ``config.json`` dict, lists
    made tuples (JSON has no tuples; frozen configs need hashable fields).

    Keys starting with "_" (``_class_name``, ``_diffusers_version``, …) and the keys in
    ``also_known`` (checked by the caller) are skipped; any other key that is not a field
    raises ValueError listing them, prefixed by ``what`` (e.g. "MMDiT").
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config
                     if not k.startswith("_") and k not in fields and k not in also_known)
    if unknown:
        raise ValueError(f"{what} config: unknown fields {unknown}; known: {sorted(fields)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}


def split_generator(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """Splits a generator into its static graph and its parameters.

    Returns:
      ``(graphdef, params)``; params is an ``nnx.State`` pytree of float arrays (param_dtype).
      Fails if the module holds state other than ``nnx.Param``.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def make_velocity_fn(graphdef: nnx.GraphDef) -> VelocityFn:
    """The pure velocity function of a generator's graph.

    Returns:
      ``velocity(params, x, sigma, cond) -> v``: params as returned by ``split_generator`` (or
      any pytree of the same structure, e.g. reference or EMA parameters); x (B, H, W, C)
      float32 in [-1, 1]; sigma (B,) float32 in [0, 1]; cond (B,) int32 in [0, num_classes]
      (or the pytree the model takes: ``mmdit.MMDiT``'s, ``flux.Flux``'s dict); v (B, H, W, C)
      float32. No side effects; safe under jit, grad and shard_map (the batch
      axis must stay explicit, so vmap over single images needs a leading axis of 1).
    """

    def velocity(params: Any, x: jax.Array, sigma: jax.Array, cond: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return model(x, sigma, cond)

    return velocity


def _as_nested_dict(params: Any) -> Any:
    return params.to_pure_dict() if isinstance(params, nnx.State) else params


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (an ``nnx.State`` or nested dict)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def parameter_summary(params: Any, *, include_stats: bool = True) -> str:
    """A table of every parameter (name, shape, size, optionally mean/std) and the total.

    Uses ``clu.parameter_overview``; the last line reads ``Total: N -- bytes``.
    """
    return parameter_overview.get_parameter_overview(
        _as_nested_dict(params), include_stats=include_stats
    )


__all__ = [
    "GENERATORS",
    "SIGMA_SCALE",
    "SIZES",
    "TEXT_GENERATORS",
    "DiT",
    "UNet",
    "VelocityFn",
    "build_generator",
    "config_kwargs",
    "count_params",
    "init_in_own_trace",
    "init_module",
    "make_velocity_fn",
    "parameter_summary",
    "split_generator",
]

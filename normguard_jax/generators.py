"""Building a generator from a config, and loading one from a workdir: the one place for both.

A generator is a pure ``velocity(params, x, sigma, cond) -> v`` plus a parameter pytree. A
pretraining workdir gives the base model (its EMA parameters by default); an RL workdir gives
the policy θ at a checkpoint together with its frozen base θ_ref. Both come back as
:class:`Pretrained` records that share the base's velocity function, so jitted programs that take
it as a static argument compile once for all checkpoints of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from normguard_jax import checkpointing, conditioning, config_checks, lora, models, optim, paths
from normguard_jax.models import layers as model_layers
from normguard_jax.rl_state import initial_state
from normguard_jax.train_state import TrainState


def build_generator(config: ml_collections.ConfigDict, image_shape, num_classes: int, *,
                    cond_shapes=None, abstract: bool = False):
    """``(graphdef, params, velocity)`` of the configured generator, initialised from the seed.

    Args:
      config: a pretraining config (fields ``model.*`` and ``seed``).
      image_shape: (H, W, C).
      num_classes: real classes; the null (unconditional) label is ``num_classes``.
      cond_shapes: text generators (``models.TEXT_GENERATORS``): the per-prompt shapes of the
        conditioning, ``{"text": (L, D), "pooled": (P,)}``
        (``conditioning.PromptTable.cond_shapes``); None for class-conditional ones.
      abstract: params are ``jax.ShapeDtypeStruct`` leaves (a template to restore into).

    Raises:
      ValueError: a text generator without ``cond_shapes``, or a class-conditional one with.
    """
    arch = config.model.arch
    extra = {}
    if arch in models.TEXT_GENERATORS:
        if cond_shapes is None:
            raise ValueError(f"model.arch={arch!r} is conditioned on text: give it captions "
                             "(config.data.captions) or prompt embeddings")
        extra = dict(text_dim=int(cond_shapes["text"][-1]),
                     pooled_dim=int(cond_shapes["pooled"][-1]))
    elif cond_shapes is not None:
        raise ValueError(f"model.arch={arch!r} is class-conditional; text conditioning needs "
                         f"one of {models.TEXT_GENERATORS}")
    model = models.init_module(lambda: models.build_generator(
        arch, image_shape=tuple(image_shape), num_classes=num_classes,
        rngs=nnx.Rngs(config.seed), dtype=jnp.dtype(config.model.dtype),
        remat=config.model.remat, **models.SIZES[arch][config.model.size], **extra),
        abstract=abstract)
    graphdef, params = models.split_generator(model)
    return graphdef, params, models.make_velocity_fn(graphdef)


def base_graphdef(base: "Pretrained", *, dtype: str | None = None) -> nnx.GraphDef:
    """The graph definition of ``base``'s generator (an abstract build: no arrays), optionally
    with another compute ``dtype`` ("float32" | "bfloat16"; parameters keep theirs)."""
    if base.config.model.arch in DIFFUSERS_FAMILIES:
        graphdef, _ = _abstract_transformer(
            base.config.diffusers.dir, base.config.model.arch,
            dtype=dtype or base.config.model.dtype, param_dtype=base.config.model.param_dtype,
            remat=base.config.model.remat)
        return graphdef
    config = ml_collections.ConfigDict(base.config.to_dict())
    if dtype is not None:
        config.model.dtype = dtype
    graphdef, _, _ = build_generator(config, base.image_shape, base.num_classes,
                                     cond_shapes=cond_shapes(base.conditioning), abstract=True)
    return graphdef


def master_weights(params):
    """The trainable copy of a base's parameters for full fine-tuning: floating leaves in
    float32 (a bfloat16 base, ``config.base.param_dtype``, trains float32 master weights)."""
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating)
                        and a.dtype != jnp.float32 else a, params)


def cond_shapes(spec) -> dict | None:
    """The per-prompt conditioning shapes a model record stores (None: class labels)."""
    if not spec or spec.get("kind", "class") == "class":
        return None
    return {k: tuple(v) for k, v in spec["cond_shapes"].items()}


class Pretrained(NamedTuple):
    """A generator restored from a workdir.

    Attributes:
      velocity: pure ``velocity(params, x, sigma, cond) -> v``.
      params: the restored parameters (a pretraining run's EMA by default; an RL run's θ).
      config: the config the checkpoint was written with (pretraining or RL).
      image_shape: (H, W, C).
      num_classes: number of real classes (the null class is ``num_classes``).
      step: the checkpoint's step (pretraining) or iteration (RL).
      conditioning: the model's conditioning record (``conditioning.class_spec()``,
        ``caption_spec`` or ``embeddings_spec`` plus its ``cond_shapes``); None for
        class-conditional models recorded before it existed.
      class_names: the names of the classes (may be empty).
      vae: a latent generator's decoder (:class:`Decoder`: the VAE of a diffusers pipeline,
        :func:`load_diffusers`); None for pixel-space generators, whose samples are images.
    """

    velocity: Callable
    params: object
    config: ml_collections.ConfigDict
    image_shape: tuple
    num_classes: int
    step: int
    conditioning: dict | None = None
    class_names: tuple = ()
    vae: "Decoder | None" = None


class Decoder(NamedTuple):
    """How a latent generator's samples become images.

    Attributes:
      decode: pure ``decode(params, latents) -> images``: (B, h, w, C_lat) latents as the
        transformer sees them (shifted and scaled) -> (B, H, W, 3) float32 images in about
        [-1, 1] (``models.vae.make_vae_fns(graphdef).decode``).
      params: the VAE's parameters (pass them as an argument of jitted programs).
      pixel_shape: (H, W, 3) of the decoded images.
    """

    decode: Callable
    params: Any
    pixel_shape: tuple


def pixel_shape(pre: Pretrained) -> tuple:
    """(H, W, C) of the images a generator's samples show: its image shape, or for a latent
    generator the shape its VAE decodes to."""
    return tuple(pre.vae.pixel_shape) if pre.vae is not None else tuple(pre.image_shape)


def to_pixels(pre: Pretrained, samples):
    """A generator's samples as images: decoded by its VAE (jitted, the VAE parameters an
    argument) for a latent generator, the samples themselves otherwise."""
    if pre.vae is None:
        return samples
    return _jitted_decode(pre.vae.decode)(pre.vae.params, samples)


_DECODERS: dict = {}


def _jitted_decode(decode: Callable) -> Callable:
    if decode not in _DECODERS:
        _DECODERS[decode] = jax.jit(decode)
    return _DECODERS[decode]


def prompt_table(pre: Pretrained, split: str = "train") -> conditioning.PromptTable:
    """The prompts a generator is conditioned on, one split ("train": RL rollouts; "test":
    evaluation): its classes, or its captions / prompt embeddings with the empty prompt as the
    null conditioning (:func:`conditioning.table`)."""
    return conditioning.table(pre.conditioning, split, num_classes=pre.num_classes,
                              class_names=pre.class_names or None)


def is_rl_workdir(workdir: str, step: int | None = None) -> bool:
    """Whether ``workdir``'s checkpoint (newest readable record, or ``step``) was written by an
    RL run."""
    _, meta = checkpointing.read_meta(workdir, step)
    return "base_workdir" in meta


def load_pretrained(workdir: str, *, use_ema: bool = True, step: int | None = None) -> Pretrained:
    """Restores the generator of a pretraining run.

    Without ``step``: the newest readable checkpoint (an unreadable one is skipped with a
    warning: :func:`checkpointing.restore_run`, the rule a resumed run follows).

    Raises:
      FileNotFoundError: no checkpoint in the workdir.
    """
    velocity = []

    def template(meta):
        config = ml_collections.ConfigDict(meta["config"])
        _, params, fn = build_generator(config, meta["image_shape"], meta["num_classes"],
                                        cond_shapes=cond_shapes(meta.get("conditioning")),
                                        abstract=True)
        velocity.append(fn)
        optimizer, _ = optim.build_optimizer(config.optim, config.train.steps)
        return jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0)),
                              params)

    step, state, meta = checkpointing.restore_run(workdir, step, template)
    return Pretrained(velocity=velocity[-1],
                      params=state.ema_params if use_ema else state.params,
                      config=ml_collections.ConfigDict(meta["config"]),
                      image_shape=tuple(meta["image_shape"]),
                      num_classes=int(meta["num_classes"]), step=int(step),
                      conditioning=meta.get("conditioning"),
                      class_names=tuple(meta.get("class_names", ())))


def load_policy(workdir: str, *, step: int | None = None, base: Pretrained | None = None
                ) -> tuple[Pretrained, Pretrained]:
    """Restores the policy θ of an RL run and its frozen base θ_ref.

    Returns ``(policy, base)``: two :class:`Pretrained` sharing the base's velocity function,
    image shape and classes; ``policy.params`` is θ at the checkpoint (the newest readable one
    unless ``step`` is given, as in :func:`load_pretrained`; for a LoRA run the adapter merged
    into the base, :func:`lora.merge`, so it takes the base's velocity function),
    ``policy.step`` its iteration,
    ``policy.config`` the RL config. The base is read at the exact step the run was trained
    from (no fallback: another θ_ref would be another run). ``base``: the run's base as
    returned by an earlier call on the same workdir; it is used instead of reading the base
    again, so policies of several checkpoints share one velocity function (and jitted programs
    that take it as a static argument compile once).

    Raises:
      FileNotFoundError: no checkpoint in the workdir.
      ValueError: ``base`` is not the base step this checkpoint was trained from.
    """
    loaded, chosen = {}, []      # bases read so far (the fallback may try several steps)

    def template(meta):
        config = ml_collections.ConfigDict(meta["config"])
        if base is not None and base.step != meta["base_step"]:
            raise ValueError(f"{workdir} iteration {meta['iteration']} was trained from base "
                             f"step {meta['base_step']}, not {base.step}")
        key = (meta["base_workdir"], meta["base_step"])
        if base is None and key not in loaded:
            if is_diffusers_base(config.base):   # the pipeline folder the run recorded
                recorded = ml_collections.ConfigDict(config.base.to_dict())
                recorded.diffusers_dir = meta["base_workdir"]
                recorded.embeddings = meta.get("base_embeddings", recorded.embeddings)
                loaded[key] = load_diffusers(recorded)
            else:
                loaded[key] = load_pretrained(meta["base_workdir"],
                                              use_ema=config.base.use_ema,
                                              step=meta["base_step"])
        chosen.append(base if base is not None else loaded[key])
        # The optimizer state's structure does not depend on the schedule's length. Shapes
        # only: building θ_old and the optimizer state for real would allocate them twice.
        # A LoRA run's θ, θ_old and optimizer state are adapter trees.
        optimizer, _ = optim.build_optimizer(config.optim, 1)
        adapter = lora.from_config(config)
        trainable = ((lambda p: lora.init(jax.random.key(0), p, adapter)) if adapter.rank
                     else master_weights)
        return jax.eval_shape(lambda p: initial_state(trainable(p), optimizer, config.seed),
                              chosen[-1].params)

    step, state, meta = checkpointing.restore_run(workdir, step, template)
    config = ml_collections.ConfigDict(meta["config"])
    adapter = lora.from_config(config)
    params = (lora.merge(chosen[-1].params, state.params, adapter) if adapter.rank
              else state.params)
    policy = chosen[-1]._replace(params=params, config=config, step=int(step))
    return policy, chosen[-1]


def load_generator(workdir: str, *, use_ema: bool = True, step: int | None = None
                   ) -> tuple[Pretrained, Pretrained | None]:
    """``(generator, reference)`` of a pretraining or an RL workdir.

    A pretraining workdir gives its (EMA or raw) parameters and no reference; an RL workdir
    gives the policy θ (``use_ema`` does not apply) and its frozen base θ_ref.
    """
    if is_rl_workdir(workdir, step):
        return load_policy(workdir, step=step)
    return load_pretrained(workdir, use_ema=use_ema, step=step), None


# ----------------------------------------------------------------------------------------------
# Real text-to-image models: a diffusers pipeline folder as the base.
# ----------------------------------------------------------------------------------------------

# Families of diffusers pipelines (the ``family`` of an ``embed_prompts`` dataset too) and the
# transformer class of each.
DIFFUSERS_FAMILIES = ("sd3", "flux")
_TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PARAM_DTYPES = ("float32", "bfloat16")


def diffusers_family(folder: str) -> str:
    """The family ("sd3" | "flux") of a diffusers pipeline folder, from the ``_class_name`` of
    its ``transformer/config.json``.

    Raises:
      config_checks.ConfigError: no transformer config there, or another transformer class.
    """
    path = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(path):
        raise config_checks.ConfigError(
            f"config.base.diffusers_dir={folder!r} is not a diffusers pipeline folder: no "
            "transformer/config.json (expected the transformer/ and vae/ subfolders of e.g. "
            "stabilityai/stable-diffusion-3.5-medium or black-forest-labs/FLUX.1-dev)")
    with open(path, encoding="utf-8") as f:
        name = json.load(f).get("_class_name", "")
    if name not in _TRANSFORMER_CLASSES:
        raise config_checks.ConfigError(
            f"config.base.diffusers_dir={folder!r}: transformer class {name!r} is not supported; "
            f"supported: {sorted(_TRANSFORMER_CLASSES)}")
    return _TRANSFORMER_CLASSES[name]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def diffusers_settings(base: ml_collections.ConfigDict) -> dict:
    """Checks ``config.base`` of a run on a diffusers pipeline (``base.diffusers_dir`` set)
    against the folders it names, reading only JSON files; returns the facts the run needs:
    ``family``, ``patch`` (latent pixels per token side), ``factor`` (VAE downsampling),
    ``latent_channels``, ``image_shape`` (latent (h, w, C)), ``pixel_shape`` and the
    embeddings' record ``embeddings_meta``.

    Raises:
      config_checks.ConfigError: a missing folder, an unknown family, a family that differs
        from the folder's transformer or from the embeddings' encoders, a resolution not
        divisible by VAE factor × patch, embeddings whose widths the transformer does not take,
        or a bad ``param_dtype`` / ``remat`` / ``guidance``.
    """
    c = config_checks
    folder = str(base.diffusers_dir)
    if not os.path.isdir(folder):
        raise c.ConfigError(f"config.base.diffusers_dir={folder!r} does not exist (a diffusers "
                            "pipeline folder with transformer/ and vae/ subfolders)")
    family = diffusers_family(folder)
    if base.family not in ("auto", *DIFFUSERS_FAMILIES):
        raise c.ConfigError(f"config.base.family must be one of {('auto',) + DIFFUSERS_FAMILIES}"
                            f", got {base.family!r}")
    if base.family != "auto" and base.family != family:
        raise c.ConfigError(f"config.base.family={base.family!r} but the transformer in "
                            f"{folder!r} is a {family!r} model")
    vae_config = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(vae_config):
        raise c.ConfigError(f"config.base.diffusers_dir={folder!r} has no vae/config.json "
                            "(rewards see pixels: the pipeline's VAE decodes the latents)")
    c.one_of(base, "param_dtype", PARAM_DTYPES)
    c.one_of(base, "remat", tuple(model_layers.REMAT_POLICIES))
    c.number(base, "guidance", 0)
    resolution = c.integer(base, "resolution", 1)
    transformer = _read_json(os.path.join(folder, "transformer", "config.json"))
    vae = _read_json(vae_config)
    factor = 2 ** (len(vae.get("block_out_channels", [64])) - 1)
    latent_channels = int(vae.get("latent_channels", 4))
    # FLUX packs 2×2 latent patches into a token; the MMDiT cuts patch_size × patch_size.
    patch = 2 if family == "flux" else int(transformer.get("patch_size", 2))
    if resolution % (factor * patch):
        raise c.ConfigError(
            f"config.base.resolution={resolution} must be divisible by {factor * patch} (the "
            f"VAE's downsampling {factor} × the transformer's patch {patch})")
    if not base.embeddings:
        raise c.ConfigError("config.base.embeddings must name an embed_prompts workdir (the "
                            "prompt embeddings of this pipeline's text encoders: "
                            "configs/embed_prompts.py)")
    from normguard_jax import text as text_lib  # pylint: disable=import-outside-toplevel
    try:
        meta = text_lib.read_meta(base.embeddings)
    except FileNotFoundError as e:
        raise c.ConfigError(f"config.base.embeddings: {e}") from None
    if meta["family"] != family:
        raise c.ConfigError(
            f"config.base.embeddings={base.embeddings!r} holds {meta['family']!r} text "
            f"embeddings but the transformer in {folder!r} is a {family!r} model; embed the "
            f"prompts with configs/embed_prompts.py:{family}")
    want = {"text": transformer.get("joint_attention_dim", 4096),
            "pooled": transformer.get("pooled_projection_dim", 768 if family == "flux" else 2048)}
    got = {"text": meta["text_shape"][-1], "pooled": meta["pooled_shape"][-1]}
    if want != got:
        raise c.ConfigError(
            f"config.base.embeddings={base.embeddings!r}: embedding widths {got} but the "
            f"transformer takes {want}")
    side = resolution // factor
    return {"family": family, "patch": patch, "factor": factor,
            "latent_channels": latent_channels, "image_shape": (side, side, latent_channels),
            "pixel_shape": (resolution, resolution, int(vae.get("out_channels", 3))),
            "embeddings_meta": meta}


def _abstract_transformer(folder: str, family: str, *, dtype: str, param_dtype: str,
                          remat: str):
    """``(graphdef, abstract params)`` of the pipeline's transformer (shapes only)."""
    from normguard_jax.models import flux, hf_weights, mmdit  # pylint: disable=import-outside-toplevel
    config = hf_weights.read_config(os.path.join(folder, "transformer"))
    kwargs = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), remat=remat)
    if family == "sd3":
        return mmdit.abstract_mmdit(config, **kwargs)
    return nnx.split(flux.abstract_flux(config, **kwargs), nnx.Param)


def _name_table(family: str):
    from normguard_jax.models import flux, mmdit  # pylint: disable=import-outside-toplevel
    return mmdit.mmdit_name_table if family == "sd3" else flux.flux_name_table


def with_guidance(velocity: Callable, guidance: float) -> Callable:
    """A FLUX velocity that takes the prompt conditioning ``{"text", "pooled"}`` alone: the
    guidance-distilled model's embedded guidance value (FLUX.1-dev: 3.5) is added to every
    call as ``cond["guidance"]`` (B,)."""
    value = float(guidance)

    def guided(params, x, sigma, cond):
        return velocity(params, x, sigma,
                        {**cond, "guidance": jnp.full(x.shape[:1], value, jnp.float32)})

    return guided


def velocity_of(base: Pretrained, fn: Callable) -> Callable:
    """``fn`` (a velocity of ``base``'s graph, e.g. a LoRA or bfloat16 rebuild) with what the
    base adds to each call: FLUX's embedded guidance value; other generators unchanged."""
    if base.config.model.arch == "flux" and base.config.diffusers.guidance_embeds:
        return with_guidance(fn, base.config.diffusers.guidance)
    return fn


def diffusers_fingerprint(folder: str) -> str:
    """A cheap identity of a pipeline's transformer and VAE (hashing billions of parameters
    takes minutes): SHA-256 over both ``config.json`` files and, for every safetensors file,
    its header (tensor names, dtypes, shapes, offsets), its size and 32 blocks of 64 KiB of
    its data at evenly spaced offsets (2 MiB per file, whatever its size). Another checkpoint
    of the same architecture changes the data sampled (a fine-tune changes every tensor); a
    re-save of the same weights does not change it."""
    from normguard_jax.models import hf_weights  # pylint: disable=import-outside-toplevel
    digest = hashlib.sha256()
    for sub in ("transformer", "vae"):
        sub_folder = os.path.join(folder, sub)
        digest.update(json.dumps(_read_json(os.path.join(sub_folder, "config.json")),
                                 sort_keys=True).encode())
        for path in hf_weights.checkpoint_files(sub_folder):
            start, header = hf_weights.read_header(path)
            size = os.path.getsize(path)
            digest.update(f"{sub}/{os.path.basename(path)}:{size}".encode())
            digest.update(json.dumps(header, sort_keys=True).encode())
            block, blocks = 1 << 16, 32
            with open(path, "rb") as f:
                for i in range(blocks):
                    f.seek(start + (size - start - block) * i // (blocks - 1)
                           if size - start > block else start)
                    digest.update(f.read(block))
    return digest.hexdigest()


def load_diffusers(base: ml_collections.ConfigDict, *, mesh=None,
                   min_shard_size: int | None = None) -> Pretrained:
    """The base model of a run on a diffusers pipeline folder (``config.base`` with
    ``diffusers_dir`` set; checked by :func:`diffusers_settings`).

    The transformer (``transformer/``: SD3/SD3.5 through ``models.mmdit``, FLUX through
    ``models.flux``) is built abstractly and its safetensors streamed one tensor at a time into
    parameters of ``base.param_dtype``, each placed at once with its sharding over ``mesh``'s
    fsdp axis (``sharding.param_spec``; replicated without a mesh). The VAE (``vae/``) is loaded
    the same way, float32, replicated (84M parameters).

    Returns a :class:`Pretrained` whose ``velocity(params, x, σ, cond)`` takes the prompt
    conditioning ``{"text": (B, L, D), "pooled": (B, P)}`` of ``base.embeddings`` (FLUX: plus its
    embedded guidance ``base.guidance``, :func:`with_guidance`), ``image_shape`` the latent
    (resolution/8, resolution/8, 16), ``conditioning`` the embeddings' record with its
    ``cond_shapes``, ``vae`` the decoder, ``step`` 0 and ``config`` a record of the pipeline
    (``model.arch`` = the family, ``model.dtype`` float32 compute, ``diffusers.*``).
    """
    from normguard_jax import sharding  # pylint: disable=import-outside-toplevel
    from normguard_jax.data import shapes  # pylint: disable=import-outside-toplevel
    from normguard_jax.models import hf_weights, vae as vae_lib  # pylint: disable=import-outside-toplevel
    facts = diffusers_settings(base)
    folder = paths.absolute(str(base.diffusers_dir))
    family = facts["family"]
    graphdef, abstract = _abstract_transformer(folder, family, dtype="float32",
                                               param_dtype=base.param_dtype, remat=base.remat)
    placement = None
    if mesh is not None:
        flat = {p: tuple(v.shape) for p, v in _flat_shapes(abstract).items()}
        fsdp = mesh.shape[sharding.FSDP_AXIS]
        min_size = sharding.MIN_SHARD_SIZE if min_shard_size is None else min_shard_size

        def placement(path):
            return jax.sharding.NamedSharding(mesh, sharding.param_spec(flat[path], fsdp,
                                                                         min_size))
    params = hf_weights.load_params(abstract, os.path.join(folder, "transformer"),
                                    _name_table(family), shardings=placement)
    loaded_vae = vae_lib.load_vae(os.path.join(folder, "vae"),
                                  shardings=(None if mesh is None else
                                             lambda path: sharding.replicated(mesh)))
    decoder = Decoder(decode=vae_lib.make_vae_fns(loaded_vae.graphdef).decode,
                      params=loaded_vae.params, pixel_shape=facts["pixel_shape"])
    meta = facts["embeddings_meta"]
    spec = conditioning.embeddings_spec(paths.absolute(str(base.embeddings)))
    spec["cond_shapes"] = {"text": list(meta["text_shape"]), "pooled": list(meta["pooled_shape"])}
    transformer = hf_weights.read_config(os.path.join(folder, "transformer"))
    record = ml_collections.ConfigDict({
        "model": {"arch": family, "dtype": "float32", "param_dtype": str(base.param_dtype),
                  "remat": str(base.remat)},
        "data": {"name": "prompts", "data_dir": ""},
        "diffusers": {"dir": folder, "family": family, "resolution": int(base.resolution),
                      "guidance": float(base.guidance),
                      "guidance_embeds": bool(transformer.get("guidance_embeds", False)),
                      "embeddings": spec["path"]},
    })
    pre = Pretrained(velocity=models.make_velocity_fn(graphdef), params=params, config=record,
                     image_shape=facts["image_shape"], num_classes=shapes.NUM_CLASSES, step=0,
                     conditioning=spec, class_names=(), vae=decoder)
    return pre._replace(velocity=velocity_of(pre, pre.velocity))


def _flat_shapes(state) -> dict:
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    return traverse_util.flatten_dict(state.to_pure_dict())


def is_pipeline_folder(folder: str) -> bool:
    """Whether ``folder`` looks like a diffusers pipeline (a ``transformer/config.json``)."""
    return os.path.isfile(os.path.join(str(folder), "transformer", "config.json"))


def is_diffusers_base(base_config) -> bool:
    """Whether an RL config's ``base`` block (a ConfigDict or its dict record) names a
    diffusers pipeline (``base.diffusers_dir``; absent in runs recorded before it existed)."""
    return bool(base_config.get("diffusers_dir", "") if hasattr(base_config, "get")
                else getattr(base_config, "diffusers_dir", ""))


def base_source(config) -> str:
    """The absolute folder of an RL config's base: the diffusers pipeline or the pretraining
    workdir."""
    return paths.absolute(config.base.diffusers_dir if is_diffusers_base(config.base)
                          else config.base.workdir)


def load_base(config: ml_collections.ConfigDict, *, mesh=None) -> tuple[Pretrained, str]:
    """``(base, fingerprint)`` of an RL config: a diffusers pipeline (:func:`load_diffusers`,
    fingerprint :func:`diffusers_fingerprint`) or a pretraining workdir
    (:func:`load_pretrained`, fingerprint of the parameters)."""
    if is_diffusers_base(config.base):
        min_size = config.mesh.min_shard_size if "mesh" in config else None
        pre = load_diffusers(config.base, mesh=mesh, min_shard_size=min_size)
        return pre, diffusers_fingerprint(config.base.diffusers_dir)
    pre = load_pretrained(config.base.workdir, use_ema=config.base.use_ema)
    return pre, checkpointing.fingerprint(pre.params)

"""Building a generator from a config, and loading one from a workdir: the one place for both.

A generator is a pure ``velocity(params, x, sigma, cond) -> v`` plus a parameter pytree. A
pretraining workdir gives the base model (its EMA parameters by default); an RL workdir gives
the policy θ at a checkpoint together with its frozen base θ_ref. Both come back as
:class:`Pretrained` records that share the base's velocity function, so jitted programs that take
it as a static argument compile once for all checkpoints of a run.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from normguard_jax import checkpointing, conditioning, lora, models, optim
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
    config = ml_collections.ConfigDict(base.config.to_dict())
    if dtype is not None:
        config.model.dtype = dtype
    graphdef, _, _ = build_generator(config, base.image_shape, base.num_classes,
                                     cond_shapes=cond_shapes(base.conditioning), abstract=True)
    return graphdef


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
    """

    velocity: Callable
    params: object
    config: ml_collections.ConfigDict
    image_shape: tuple
    num_classes: int
    step: int
    conditioning: dict | None = None
    class_names: tuple = ()


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
            loaded[key] = load_pretrained(meta["base_workdir"], use_ema=config.base.use_ema,
                                          step=meta["base_step"])
        chosen.append(base if base is not None else loaded[key])
        # The optimizer state's structure does not depend on the schedule's length. Shapes
        # only: building θ_old and the optimizer state for real would allocate them twice.
        # A LoRA run's θ, θ_old and optimizer state are adapter trees.
        optimizer, _ = optim.build_optimizer(config.optim, 1)
        adapter = lora.from_config(config)
        trainable = ((lambda p: lora.init(jax.random.key(0), p, adapter)) if adapter.rank
                     else (lambda p: p))
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

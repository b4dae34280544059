"""Pretraining of a flow-matching generator (the RL base model), class- or text-conditional.

Class-conditional models train on the dataset's labels. With ``config.data.captions`` (a
text generator, ``models.TEXT_GENERATORS``) every image is trained on the embeddings of one of
its class's captions, drawn per step (:func:`caption_batch`), with the empty prompt as the
dropped-out (CFG) conditioning; the checkpoints record how to rebuild the prompt tables.

``run(config, workdir)`` trains, logs and checkpoints; it resumes automatically from the newest
checkpoint in ``<workdir>/checkpoints``. Everything random is a function of ``(config.seed,
step)``, so a run that was interrupted and resumed ends bit-identical to an uninterrupted one.

The train step is one jitted function over a ``Mesh``: the batch is sharded over all devices,
parameters, EMA and optimizer state over the ``fsdp`` axis (:mod:`normguard_jax.sharding`;
replicated when ``mesh.fsdp = 1``), and XLA inserts the gathers and gradient reductions.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from normguard_jax import (checkpointing, conditioning, config_checks, data, distributed, flow,
                           generators, loop, models, nonfinite, optim, paths, reporting,
                           sampling, sharding)
from normguard_jax.objectives.base import Context
from normguard_jax.objectives.flow_matching import flow_matching_loss, make_flow_matching_batch
from normguard_jax.train_state import TrainState

Hook = Callable[[int, TrainState, dict], None]


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks every pretraining field; raises ConfigError naming the first bad one.

    ``num_devices``: also check that the mesh fits that many devices.
    """
    c = config_checks
    c.integer(config, "seed", 0)
    c.one_of(config, "model.arch", models.GENERATORS)
    c.one_of(config, "model.size", models.SIZES[config.model.arch])
    c.one_of(config, "model.dtype", ("float32", "bfloat16"))
    c.one_of(config, "flow.sigma_sampler", flow.TIMESTEP_SAMPLERS)
    c.number(config, "flow.logit_std", 0, strict_minimum=True)
    c.number(config, "flow.logit_mean")
    c.number(config, "flow.train_shift", 0, strict_minimum=True)
    c.number(config, "flow.label_dropout", 0, 1)
    captions = c.get_field(config, "data.captions") if "captions" in config.data else ""
    if captions and captions not in conditioning.CAPTION_SETS:
        raise c.ConfigError(f"config.data.captions={captions!r}: one of "
                            f"{conditioning.CAPTION_SETS}, or '' for class labels")
    text_model = config.model.arch in models.TEXT_GENERATORS
    if text_model and not captions:
        raise c.ConfigError(f"config.model.arch={config.model.arch!r} is conditioned on text: "
                            f"set config.data.captions (one of {conditioning.CAPTION_SETS})")
    if captions and not text_model:
        raise c.ConfigError(f"config.data.captions={captions!r} needs a text-conditioned "
                            f"config.model.arch (one of {models.TEXT_GENERATORS})")
    c.check_optim(config)
    c.number(config, "optim.ema_decay", 0, 1)
    c.integer(config, "train.steps", 1)
    c.integer(config, "train.batch_size", 1)
    c.check_intervals(config)
    c.check_sample(config)
    c.check_mesh(config, num_devices)
    distributed.validate(config)


def sigma_sampler(config: ml_collections.ConfigDict):
    """The training σ sampler ``(key, batch) -> (B,)`` from the ``flow`` block."""
    kwargs = {"shift": config.flow.train_shift}
    if config.flow.sigma_sampler == "logit_normal":
        kwargs.update(mean=config.flow.logit_mean, std=config.flow.logit_std)
    return functools.partial(flow.TIMESTEP_SAMPLERS[config.flow.sigma_sampler], **kwargs)


def train_step(state: TrainState, batch: dict, null=None, *, velocity, optimizer, schedule,
               sampler, null_class: int, label_dropout: float, ema_decay: float,
               accumulate_steps: int = 1):
    """One flow-matching update, skipped when the loss or a gradient is not finite.

    A skipped update returns params, EMA and optimizer state unchanged (bit for bit) and still
    advances ``step`` (the batch of that step is consumed), so a run that skips stays a
    deterministic function of ``(seed, step)``.

    Args:
      state: the :class:`TrainState` (laid out as :func:`jit_train_step` places it).
      batch: ``image`` (B, H, W, C) float32 in [-1, 1] and ``label`` (B,) int32, sharded;
        for a text-conditioned model also ``cond`` (``{"text": (B, L, D), "pooled": (B, P)}``,
        the embeddings of each image's caption), which is then what the model is trained on.
      null: the unconditional conditioning of a text model (the empty prompt's
        ``{"text": (1, L, D), "pooled": (1, P)}``), an argument; None for class labels, whose
        null is ``null_class``.
      velocity, optimizer, schedule, sampler: static pieces built from the config.
      null_class, label_dropout, ema_decay: static hyper-parameters.
      accumulate_steps: micro-steps per optimizer update (``optim.accumulate_steps``); the EMA
        moves only on the micro-steps that update θ, and its warm-up counts those updates.

    Returns:
      ``(new_state, metrics)`` with scalar metrics ``loss``, ``grad_norm``, ``param_norm``,
      ``lr`` (the rate used for this update) and ``skipped`` (float32, 1 when the update was
      skipped because of a non-finite value, else 0).
    """
    key = jax.random.fold_in(state.key(), state.step)
    cond = batch["cond"] if "cond" in batch else batch["label"]
    fm_batch = make_flow_matching_batch(key, batch["image"], cond, sigma_sampler=sampler,
                                        null_class=null_class if null is None else null,
                                        label_dropout=label_dropout)
    ctx = Context(velocity=velocity)
    (loss, _), grads = jax.value_and_grad(flow_matching_loss, has_aux=True)(
        state.params, fm_batch, ctx)
    # EMA warm-up: early on the average must not be dominated by the (zero-output) init.
    updates_taken = state.step // accumulate_steps
    decay = jnp.minimum(ema_decay, (1.0 + updates_taken) / (10.0 + updates_taken))

    def step(old, grads):
        params, ema, opt_state = old
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optim.if_updated(optimizer, opt_state,
                               optax.incremental_update(params, ema, 1.0 - decay), ema)
        return params, ema, opt_state

    finite = nonfinite.all_finite(loss, grads)
    params, ema, opt_state = nonfinite.apply_if(
        finite, step, (state.params, state.ema_params, state.opt_state), grads)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "lr": schedule(state.step),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics


def jit_train_step(config: ml_collections.ConfigDict, mesh, state: TrainState, *, velocity,
                   optimizer, schedule, null_class: int):
    """:func:`train_step` jitted on ``mesh`` for the configured run.

    Args:
      config: the pretraining config (its ``flow``, ``optim`` and ``mesh`` blocks).
      mesh: the ``(data, fsdp)`` mesh.
      state: a :class:`TrainState` or its ``jax.ShapeDtypeStruct`` template (shapes only).
      velocity, optimizer, schedule, null_class: as :func:`train_step` takes them.

    Returns:
      ``(step_fn, state_shardings)``: ``step_fn(state, batch, null=None) -> (state, metrics)``
      with the state laid out by ``sharding.tree_shardings`` (donated), the batch sharded over
      the whole mesh, the (text) null conditioning and the metrics replicated;
      ``state_shardings`` is where to ``device_put`` the initial state.
    """
    state_sh = sharding.tree_shardings(state, mesh, config.mesh.min_shard_size)
    jitted = jax.jit(
        functools.partial(train_step, velocity=velocity, optimizer=optimizer,
                          schedule=schedule, sampler=sigma_sampler(config),
                          null_class=null_class, label_dropout=config.flow.label_dropout,
                          accumulate_steps=optim.accumulate_steps(config.optim),
                          ema_decay=config.optim.ema_decay),
        in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)

    def step_fn(state, batch, null=None):
        return jitted(state, batch, null)
    return step_fn, state_sh


def _meta(config, split, step: int, skipped_updates: int, history: list, spec: dict) -> dict:
    return {"config": config.to_dict(), "step": int(step), "data_position": int(step),
            "image_shape": list(split.image_shape), "num_classes": int(split.num_classes),
            "class_names": list(split.class_names), "skipped_updates": int(skipped_updates),
            "history": history, "conditioning": spec}


def conditioning_of(config: ml_collections.ConfigDict, split
                    ) -> tuple[conditioning.PromptTable, dict]:
    """``(table, record)`` of a pretraining run: the class table, or the train captions of
    ``config.data.captions`` embedded by the word encoder; the record (with the conditioning
    shapes) goes into every checkpoint so that RL and evaluation rebuild the same tables."""
    captions = config.data.get("captions", "")
    spec = conditioning.caption_spec(captions) if captions else conditioning.class_spec()
    table = conditioning.table(spec, "train", num_classes=split.num_classes,
                               class_names=split.class_names)
    if not table.is_class:
        spec = dict(spec, cond_shapes={k: list(v) for k, v in table.cond_shapes().items()})
    return table, spec


def caption_batch(table: conditioning.PromptTable, labels, seed: int, step: int,
                  process_index: int) -> dict:
    """The conditioning of one local batch of a captioned run: for each image a caption of its
    class drawn uniformly, a deterministic function of ``(seed, step, process_index)``.

    Returns ``{"text": (B, L, D), "pooled": (B, P)}`` NumPy arrays."""
    rng = np.random.default_rng([seed, step, process_index, 0x0CA9])
    return table.cond(table.draw_for_classes(rng, np.asarray(labels)))


def _check_resume_compatible(meta: dict, config, split, workdir: str, step: int,
                             allowed: tuple[str, ...]) -> dict:
    """Raises ConfigError when the checkpoint in ``workdir`` is not this config's run.

    Another model or dataset is named first; then every other changed field is listed
    (:func:`config_checks.check_resume`). Returns the allowed changes.
    """
    old = meta["config"]
    for section, field in (("model", "arch"), ("model", "size"), ("data", "name")):
        if old[section][field] != config[section][field]:
            raise config_checks.ConfigError(
                f"config.{section}.{field}={config[section][field]!r} differs from the "
                f"checkpoint in {workdir} ({old[section][field]!r}); use a new workdir")
    if tuple(meta["image_shape"]) != tuple(split.image_shape):
        raise config_checks.ConfigError(
            f"image shape {tuple(split.image_shape)} of config.data.name={config.data.name!r} "
            f"differs from the checkpoint's {tuple(meta['image_shape'])} in {workdir}")
    return config_checks.check_resume(old, config, workdir=workdir, step=step, allowed=allowed)


def run(config: ml_collections.ConfigDict, workdir: str, *, hooks: Iterable[Hook] = (),
        allow_changed: Iterable[str] = ()) -> TrainState:
    """Trains (or resumes) a generator; returns the final state.

    Writes into ``workdir``: ``checkpoints/`` (Orbax), TensorBoard events, ``metrics.jsonl``,
    ``samples/*.png`` and ``parameters.txt`` (logs, metrics and images on process 0 only;
    every process takes part in checkpointing, each writing its own shards).

    Faults: SIGTERM (on any process) checkpoints the last completed step and returns. An
    update with a non-finite loss or gradient is skipped (parameters untouched) and counted
    (``skipped``, ``skipped_total``); ``config.train.max_nonfinite`` skips in a row stop the run
    with :class:`nonfinite.NonFiniteError` naming the steps, and the checkpoints written so
    far hold the last good parameters. Config errors, a workdir that cannot be written, a
    workdir in use by another process (:func:`checkpointing.workdir_lock`) and a checkpoint
    of another run (any changed config field not allowed) are reported before any model is
    built. Unreadable newest checkpoints are moved aside and the run resumes from the newest
    readable one (:mod:`normguard_jax.checkpointing`).

    Args:
      config: a pretraining config (``configs/pretrain_*.py``); validated first.
      workdir: the run directory; an existing checkpoint there is resumed.
      hooks: callables ``hook(step, state, metrics)`` run after every step (tests use them to
        simulate a crash).
      allow_changed: config fields that may differ from the resumed run's
        (``config_checks.RESUME_ALLOWED``, e.g. ``train.steps`` to extend it); the changes
        are recorded in the checkpoints' ``history``.
    """
    validate(config, jax.device_count())
    allowed = config_checks.check_allowed(allow_changed)
    config_checks.writable_directory(workdir)
    with checkpointing.workdir_lock(workdir):
        return _run(config, workdir, hooks, allowed)


def _run(config: ml_collections.ConfigDict, workdir: str, hooks: Iterable[Hook],
         allowed: tuple[str, ...]) -> TrainState:
    """:func:`run` once the workdir is locked."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    split = data.load_split(config.data.name, config.data.split, config.data.data_dir or None)
    null_class = split.num_classes
    manager = checkpointing.open_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                         save_interval_steps=config.train.checkpoint_every)
    latest = checkpointing.read_latest_meta(manager)
    if latest is not None:
        _check_resume_compatible(latest[1], config, split, workdir, latest[0], allowed)

    table, spec = conditioning_of(config, split)
    graphdef, params, velocity = generators.build_generator(
        config, split.image_shape, split.num_classes, cond_shapes=table.cond_shapes())
    summary = models.parameter_summary(params)
    logging.info("Generator %s/%s on %s %s:\n%s", config.model.arch, config.model.size,
                 config.data.name, split.image_shape, summary)
    total = config.train.steps
    optimizer, schedule = optim.build_optimizer(config.optim, total)
    state = TrainState.create(params, optimizer, jax.random.key(config.seed))
    step_fn, state_sh = jit_train_step(config, mesh, state, velocity=velocity,
                                       optimizer=optimizer, schedule=schedule,
                                       null_class=null_class)
    state = jax.device_put(state, state_sh)

    restored = checkpointing.restore_latest(manager, state, move_unreadable=True)
    skipped_before, history = 0, []
    if restored is not None:
        resumed_at, state, meta = restored
        changes = _check_resume_compatible(meta, config, split, workdir, resumed_at, allowed)
        skipped_before = int(meta.get("skipped_updates", 0))  # absent in older checkpoints
        history = config_checks.resume_history(meta, resumed_at, changes)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    start = int(state.step)

    writer = reporting.make_writer(workdir)
    if distributed.is_writer() and start == 0:
        (paths.path(workdir) / "parameters.txt").write_text(summary + "\n")
        writer.write_hparams(_flat_hparams(config))
    grid_cond, grid_null = conditioning.grid_condition(table, config.sample.per_class)
    grid_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)  # fixed across runs
    null = None if table.is_class else table.device_null()

    def write_samples(state: TrainState, step: int):
        images = sampling.generate_images(
            velocity, state.ema_params, grid_cond, grid_key, image_shape=split.image_shape,
            num_steps=config.sample.num_steps, shift=config.sample.shift,
            guidance_scale=config.sample.guidance_scale, null_class=null_class,
            null_condition=grid_null)
        reporting.write_grid(writer, workdir, step, "samples_ema", images,
                             config.sample.per_class)

    p_index, p_count = jax.process_index(), jax.process_count()

    def unit(state: TrainState, step: int):
        local = data.local_batch(split, step, config.train.batch_size, config.seed,
                                 p_index, p_count)
        if not table.is_class:
            local["cond"] = caption_batch(table, local["label"], config.seed, step, p_index)
        state, metrics = step_fn(state, sharding.global_batch(local, mesh), null)
        return state, metrics, metrics["skipped"]

    schedule_ = loop.Schedule(total=total, log_every=config.train.log_every,
                              sample_every=config.train.sample_every,
                              max_nonfinite=config.train.max_nonfinite, unit_name="step")
    return loop.run(state, unit, schedule=schedule_, manager=manager, writer=writer,
                    meta=lambda step, skipped: _meta(config, split, step, skipped, history,
                                                     spec),
                    write_samples=write_samples, skipped_before=skipped_before,
                    saved_step=start if restored is not None else None, hooks=hooks)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(key + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[key] = v
    walk("", config)
    return flat

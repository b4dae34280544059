"""The RL post-training loop: prompts → grouped rollouts → rewards → advantages → updates.

``run(config, workdir)`` fine-tunes a pretrained generator (``config.base.workdir``) with one of
the objectives of :mod:`normguard_jax.objectives`, optionally wrapped by NormGuard. One
iteration:

1. prompts: G class labels drawn from ``fold_in(key, iteration)``, each repeated K times;
2. rollouts from the current policy θ with the configured sampler, steps and CFG (one jitted
   ``lax.scan``), batch sharded over the mesh;
3. rewards (a weighted combination from :mod:`normguard_jax.rewards`);
4. per-prompt advantages;
5. ``inner_epochs`` passes of jitted, sharded minibatch updates on the method's training batch;
   then the old/EMA policy θ_old is moved towards θ.

The reference θ_ref is the frozen base model and is never updated. The state that changes
(θ, θ_old, optimizer, counters, key) is one pytree in one Orbax checkpoint; prompts, noise and
minibatch order are functions of ``(seed, iteration)``, so a resumed run continues the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from normguard_jax import (advantages, auxnets, checkpointing, config_checks, distributed, flow,
                           generate, nonfinite, normguard, optim, pretrain, reporting, rewards,
                           sampling, sharding)
from normguard_jax.interrupts import StopFlag
from normguard_jax.objectives import METHODS
from normguard_jax.objectives.base import BatchSpec, Context, Rollout
from normguard_jax.rl_state import (OLD_POLICY_DECAY_PRESETS, RLState, initial_state,
                                    update_old_params)

Hook = Callable[[int, "RLState", dict], None]


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------

SIGMA_SAMPLERS = ("schedule", "uniform", "logit_normal")


def objective_config(config: ml_collections.ConfigDict, null_class: int):
    """The method's frozen config dataclass from ``config.objective`` (validated there).

    Fields that must agree with the rollout (``sampler``, ``noise_level``) and the data
    (``null_class``) are taken from there rather than duplicated in ``config.objective``.
    """
    cls = METHODS[config.method].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    fields = dict(config.objective)
    shared = {"null_class": null_class, "sampler": config.rollout.sampler,
              "noise_level": None if config.rollout.noise_level < 0 else config.rollout.noise_level}
    fields.update({k: v for k, v in shared.items() if k in names})
    try:
        return cls(**fields)
    except TypeError as e:
        raise config_checks.ConfigError(f"config.objective: {e}") from None


def trained_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Indices of the stochastic (stored, trained) sampler steps."""
    r = config.rollout
    end = r.num_steps if r.sde_window_end < 0 else r.sde_window_end
    return tuple(range(r.sde_window_start, end))


def batch_spec(config: ml_collections.ConfigDict, sigma_sampler=None) -> BatchSpec:
    """How the configured method turns one iteration's rollout into training rows."""
    return BatchSpec(prompts=config.rollout.prompts_per_iter,
                     group_size=config.rollout.group_size,
                     renoise_draws=config.train.renoise_draws,
                     trained_steps=trained_steps(config), sigma_sampler=sigma_sampler)


def rows_per_iteration(config: ml_collections.ConfigDict) -> int:
    """Rows of the training batch built from one iteration's rollout."""
    return METHODS[config.method].rows(batch_spec(config))


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks every RL field that can be checked before the base model is loaded."""
    c = config_checks
    c.integer(config, "seed", 0)
    c.one_of(config, "method", METHODS)
    c.integer(config, "rollout.prompts_per_iter", 1)
    c.integer(config, "rollout.group_size", 2)
    c.one_of(config, "rollout.sampler", sampling.STEP_FNS)
    c.integer(config, "rollout.num_steps", 1)
    c.number(config, "rollout.shift", 0, strict_minimum=True)
    c.number(config, "rollout.guidance_scale", 0)
    c.integer(config, "rollout.sde_window_start", 0, config.rollout.num_steps - 1)
    if config.rollout.sde_window_end >= 0:
        c.integer(config, "rollout.sde_window_end", config.rollout.sde_window_start + 1,
                  config.rollout.num_steps)
    METHODS[config.method].validate(config)
    c.number(config, "advantages.clip", 0, strict_minimum=True)
    c.integer(config, "train.iterations", 1)
    c.integer(config, "train.inner_epochs", 1)
    c.integer(config, "train.renoise_draws", 1)
    c.integer(config, "train.minibatch_size", 1)
    c.one_of(config, "train.sigma_sampler", SIGMA_SAMPLERS)
    c.one_of(config, "train.old_policy", OLD_POLICY_DECAY_PRESETS)
    for field in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                  "max_nonfinite"):
        c.integer(config, f"train.{field}", 1)
    for name in c.get_field(config, "rewards"):   # names are checked once the dataset is known
        c.number(config, f"rewards.{name}", 0)
    c.number(config, "optim.lr", 0, strict_minimum=True)
    c.number(config, "optim.grad_clip", 0)
    c.integer(config, "sample.per_class", 1)
    n = config.rollout.prompts_per_iter * config.rollout.group_size
    if n % num_devices:
        raise c.ConfigError(f"config.rollout.prompts_per_iter * group_size = {n} must be "
                            f"divisible by the {num_devices} devices")
    rows = rows_per_iteration(config)
    mb = config.train.minibatch_size
    if mb % num_devices or rows % mb:
        raise c.ConfigError(f"config.train.minibatch_size={mb} must divide the {rows} training "
                            f"rows of an iteration and be divisible by the {num_devices} devices")
    try:
        normguard.NormGuardConfig(**config.normguard)
    except (TypeError, ValueError) as e:
        raise c.ConfigError(f"config.{e}" if str(e).startswith("normguard.") else str(e)) from None
    distributed.validate(config)


def updates_per_iteration(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of one iteration: inner epochs × minibatches of its training rows."""
    return (config.train.inner_epochs * rows_per_iteration(config)
            // config.train.minibatch_size)


def build_optimizer(config: ml_collections.ConfigDict):
    """``(optimizer, schedule)`` of the run, the schedule spanning all its optimizer steps."""
    return optim.build_optimizer(config.optim,
                                 config.train.iterations * updates_per_iteration(config))


def is_rl_workdir(workdir: str, step: int | None = None) -> bool:
    """Whether ``workdir``'s checkpoint (newest, or ``step``) was written by :func:`run`."""
    _, meta = checkpointing.read_meta(os.path.join(workdir, "checkpoints"), step)
    return "base_workdir" in meta


def load_policy(workdir: str, *, step: int | None = None,
                base: pretrain.Pretrained | None = None
                ) -> tuple[pretrain.Pretrained, pretrain.Pretrained]:
    """Restores the policy θ of an RL run and its frozen base θ_ref.

    Returns ``(policy, base)``: two :class:`pretrain.Pretrained` sharing the base's velocity
    function, image shape and classes; ``policy.params`` is θ at the checkpoint (newest unless
    ``step`` is given), ``policy.step`` its iteration, ``policy.config`` the RL config.
    ``base``: the run's base as returned by an earlier call on the same workdir; it is used
    instead of reading the base again, so policies of several checkpoints share one velocity
    function (and jitted programs that take it as a static argument compile once).

    Raises:
      FileNotFoundError: no checkpoint in ``<workdir>/checkpoints``.
      ValueError: ``base`` is not the base step this checkpoint was trained from.
    """
    directory = os.path.join(workdir, "checkpoints")
    step, meta = checkpointing.read_meta(directory, step)
    config = ml_collections.ConfigDict(meta["config"])
    if base is None:
        base = pretrain.load_pretrained(meta["base_workdir"], use_ema=config.base.use_ema,
                                        step=meta["base_step"])
    elif base.step != meta["base_step"]:
        raise ValueError(f"{workdir} step {step} was trained from base step {meta['base_step']}, "
                         f"not {base.step}")
    optimizer, _ = build_optimizer(config)
    template = initial_state(base.params, optimizer, config.seed)
    state = checkpointing.restore_state(directory, step, template)
    policy = base._replace(params=state.params, config=config, step=int(step))
    return policy, base


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------


def rollout(params, labels, key, *, velocity, image_shape, sigmas, method, noise_level,
            sde_window, guidance_scale, null_class, reward_fn, group_size, adv_clip,
            global_std, keep_trajectory) -> tuple[Rollout, dict]:
    """Samples K images per prompt, scores them and computes their advantages.

    Args:
      params: policy θ.
      labels: (N,) int32, group-contiguous (N = G·K).
      key: typed key of this iteration's rollout.
      velocity, image_shape, sigmas, method, noise_level, sde_window, guidance_scale,
        null_class: sampler settings (static).
      reward_fn: ``(images, labels) -> ((N,), components)``.
      group_size: K. adv_clip, global_std: advantage options.
      keep_trajectory: keep states and log-probs (Flow-GRPO) or only the final images.

    Returns:
      ``(rollout, components)`` with per-sample reward components.
    """
    x = generate.initial_noise(jax.random.fold_in(key, 0), labels.shape[0], image_shape)
    vfn = generate.conditional_velocity_fn(velocity, params, labels,
                                           guidance_scale=guidance_scale, null_class=null_class)
    traj = sampling.sample(vfn, x, sigmas, jax.random.fold_in(key, 1), method=method,
                           noise_level=noise_level, sde_window=sde_window)
    images = traj.states[-1]
    total, components = reward_fn(images, labels)
    adv = advantages.group_advantages(total.reshape(-1, group_size), global_std=global_std,
                                      clip=adv_clip).reshape(-1)
    return Rollout(labels=labels, images=images, rewards=total, advantages=adv,
                   trajectory=traj if keep_trajectory else None), components


def update(params, opt_state, old_params, ref_params, batch, rewards_ok, *, objective, optimizer,
           velocity):
    """One optimizer step of ``objective`` on a minibatch; returns (params, opt_state, metrics).

    The step is skipped (``params`` and ``opt_state`` returned unchanged, bit for bit) when
    ``rewards_ok`` (scalar bool: the rollout's rewards were all finite) is false or the loss
    or a gradient is not finite; ``metrics["skipped"]`` is then 1.0, else 0.0.
    """
    ctx = Context(velocity=velocity, ref_params=ref_params, old_params=old_params)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, ctx)
    ok = rewards_ok & nonfinite.all_finite(loss, grads)

    def step(state, grads):
        params, opt_state = state
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = nonfinite.apply_if(ok, step, (params, opt_state), grads)
    metrics = dict(aux.metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   skipped=1.0 - ok.astype(jnp.float32))
    return params, opt_state, metrics


def sigma_sampler_for(config: ml_collections.ConfigDict, sigmas):
    """σ sampler of re-noised training batches: the rollout schedule's levels, or a density."""
    name = config.train.sigma_sampler
    if name == "schedule":
        return flow.schedule_sigma_sampler(sigmas)
    return flow.TIMESTEP_SAMPLERS[name]


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def _reward_context(config, base):
    nets = auxnets.AuxNetCache(base.config.data.name, aux_dir=config.aux_dir,
                               data_dir=base.config.data.data_dir or None)
    return rewards.RewardContext(dataset=base.config.data.name, image_shape=base.image_shape,
                                 num_classes=base.num_classes, nets=nets)


def _check_resume_compatible(manager, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError when ``workdir`` holds an RL run of another method or base model.

    Reads only JSON records (of the newest RL checkpoint and of the base's checkpoint), so it
    runs before any model is loaded or compiled.
    """
    latest = checkpointing.read_latest_meta(manager)
    if latest is None:
        return
    _, meta = latest
    if meta["config"]["method"] != config.method:
        raise config_checks.ConfigError(
            f"config.method={config.method!r} differs from the checkpoint in {workdir} "
            f"({meta['config']['method']!r}); use a new workdir")
    _, base_meta = checkpointing.read_meta(os.path.join(config.base.workdir, "checkpoints"))
    if "image_shape" in meta and tuple(meta["image_shape"]) != tuple(base_meta["image_shape"]):
        raise config_checks.ConfigError(
            f"image shape {tuple(base_meta['image_shape'])} of the base model in "
            f"config.base.workdir={config.base.workdir!r} differs from the checkpoint's "
            f"{tuple(meta['image_shape'])} in {workdir}; use a new workdir")


def run(config: ml_collections.ConfigDict, workdir: str, *, hooks: Iterable[Hook] = ()
        ) -> RLState:
    """Runs (or resumes) RL post-training; returns the final state.

    Writes into ``workdir``: ``checkpoints/``, TensorBoard events, ``metrics.jsonl`` and
    ``samples/*.png`` (fixed-seed ODE samples of θ); logs and images on process 0 only.

    Faults: SIGTERM (on any process) checkpoints the last iteration and returns. An update
    whose loss or gradient is non-finite, and every update of an iteration whose rewards are
    non-finite, is skipped with θ and the optimizer untouched and counted (``train/skipped``,
    ``skipped_total``); ``config.train.max_nonfinite`` such iterations in a row stop the run
    with :class:`nonfinite.NonFiniteError` naming them. Config errors, an unwritable workdir
    and a checkpoint of another method or image shape fail before any model is loaded.
    """
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    validate(config, mesh.devices.size)
    config_checks.writable_directory(workdir)
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.train.keep_checkpoints,
                                         save_interval_steps=config.train.checkpoint_every)
    _check_resume_compatible(manager, config, workdir)
    base = pretrain.load_pretrained(config.base.workdir, use_ema=config.base.use_ema)
    null_class = base.num_classes
    reward_ctx = _reward_context(config, base)
    reward_fn = rewards.build_combined(dict(config.rewards), reward_ctx)
    method = METHODS[config.method]
    guard = normguard.NormGuardConfig(**config.normguard)
    objective = normguard.with_normguard(
        method.make_objective(objective_config(config, null_class)), guard)

    iterations = config.train.iterations
    rows = rows_per_iteration(config)
    steps_per_iter = updates_per_iteration(config)
    optimizer, schedule = build_optimizer(config)
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    ref_params = jax.device_put(base.params, repl)
    state = jax.device_put(initial_state(base.params, optimizer, config.seed), repl)

    restored = checkpointing.restore_latest(manager, state)
    skips = nonfinite.SkipCounter(config.train.max_nonfinite, "iteration",
                                  f"The last good checkpoint is in {manager.directory}.")
    if restored is not None:
        _, state, restored_meta = restored
        skips.total = int(restored_meta.get("skipped_updates", 0))  # absent in older checkpoints
        logging.info("Resumed RL from iteration %d in %s", int(state.iteration), workdir)
    start = int(state.iteration)

    sigmas = jnp.asarray(flow.inference_sigmas(config.rollout.num_steps, config.rollout.shift))
    window = trained_steps(config)
    noise_level = None if config.rollout.noise_level < 0 else config.rollout.noise_level
    rollout_fn = jax.jit(functools.partial(
        rollout, velocity=base.velocity, image_shape=base.image_shape, sigmas=sigmas,
        method=config.rollout.sampler, noise_level=noise_level,
        sde_window=(window[0], window[-1] + 1), guidance_scale=config.rollout.guidance_scale,
        null_class=null_class, reward_fn=reward_fn, group_size=config.rollout.group_size,
        adv_clip=config.advantages.clip, global_std=config.advantages.global_std,
        keep_trajectory=method.needs_trajectory),
        in_shardings=(repl, data_sh, repl))
    sampler = sigma_sampler_for(config, sigmas)
    batch_fn = jax.jit(functools.partial(method.training_batch,
                                         spec=batch_spec(config, sampler)))
    update_fn = jax.jit(functools.partial(update, objective=objective, optimizer=optimizer,
                                          velocity=base.velocity),
                        in_shardings=(repl, repl, repl, repl, data_sh, repl),
                        out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
    decay = dict(zip(("flat", "rate", "max_decay"),
                     OLD_POLICY_DECAY_PRESETS[config.train.old_policy]))
    old_update_fn = jax.jit(functools.partial(update_old_params, **decay))

    writer = reporting.make_writer(workdir)
    from clu import periodic_actions  # noqa: PLC0415  (imports TensorFlow: see reporting)
    progress = periodic_actions.ReportProgress(num_train_steps=iterations, writer=writer,
                                               every_steps=config.train.log_every)
    grid_labels = jnp.asarray(generate.class_grid_labels(base.num_classes,
                                                         config.sample.per_class))
    grid_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)

    def write_samples(it: int):
        images = generate.generate_images(
            base.velocity, state.params, grid_labels, grid_key, image_shape=base.image_shape,
            num_steps=config.sample.num_steps, shift=config.sample.shift,
            guidance_scale=config.sample.guidance_scale, null_class=null_class)
        reporting.write_grid(writer, workdir, it, "samples", images, config.sample.per_class)

    def meta(it):
        return {"config": config.to_dict(), "iteration": int(it),
                "base_workdir": os.path.abspath(config.base.workdir), "base_step": base.step,
                "image_shape": list(base.image_shape), "skipped_updates": skips.total}

    if start == 0:
        write_samples(0)
    g, k = config.rollout.prompts_per_iter, config.rollout.group_size
    mb = config.train.minibatch_size
    t0 = time.time()
    with StopFlag() as stop:
        try:
            for it in range(start, iterations):
                key_it = jax.random.fold_in(state.key(), it)
                prompts = jax.random.randint(jax.random.fold_in(key_it, 0), (g,), 0,
                                             base.num_classes)
                labels = jax.device_put(jnp.repeat(prompts, k).astype(jnp.int32), data_sh)
                ro, components = rollout_fn(state.params, labels, jax.random.fold_in(key_it, 1))
                rewards_ok = nonfinite.all_finite(ro.rewards)
                batch = batch_fn(ro, jax.random.fold_in(key_it, 2))
                params, opt_state = state.params, state.opt_state
                step_metrics = []
                for epoch in range(config.train.inner_epochs):
                    perm = jax.random.permutation(jax.random.fold_in(key_it, 3 + epoch), rows)
                    for j in range(rows // mb):
                        idx = perm[j * mb:(j + 1) * mb]
                        minibatch = jax.device_put(
                            jax.tree.map(lambda a, idx=idx: a[idx], batch), data_sh)
                        params, opt_state, m = update_fn(params, opt_state, state.old_params,
                                                         ref_params, minibatch, rewards_ok)
                        step_metrics.append(m)
                updates = state.updates + steps_per_iter
                state = state.replace(
                    iteration=state.iteration + 1, updates=updates, params=params,
                    opt_state=opt_state,
                    old_params=old_update_fn(state.old_params, params, updates))
                done = it + 1
                progress(done)
                metrics = {f"train/{name}": jnp.mean(jnp.stack([m[name] for m in step_metrics]))
                           for name in step_metrics[0]}
                # One read per iteration (replicated: every process takes the same branch).
                skipped = int(round(float(metrics["train/skipped"]) * len(step_metrics)))
                metrics.update({"reward/mean": jnp.mean(ro.rewards),
                                "reward/std": jnp.std(ro.rewards),
                                "lr": schedule(state.updates - 1)})
                metrics.update({f"reward/{n}": jnp.mean(v) for n, v in components.items()})
                if done % config.train.log_every == 0 or done == iterations or skipped:
                    scalars = dict(jax.device_get(metrics), skipped_total=skips.total + skipped)
                    writer.write_scalars(done, scalars)
                skips.record(done, skipped)
                for hook in hooks:
                    hook(done, state, metrics)
                checkpointing.save(manager, done, state, meta(done))
                if done % config.train.sample_every == 0 and done != iterations:
                    write_samples(done)
                if distributed.any_process(stop.requested):
                    logging.warning("SIGTERM: checkpointing iteration %d and stopping.", done)
                    if manager.latest_step() != done:
                        checkpointing.save(manager, done, state, meta(done), force=True)
                    break
            else:
                if manager.latest_step() != iterations:
                    checkpointing.save(manager, iterations, state, meta(iterations), force=True)
                write_samples(iterations)
        finally:
            manager.wait_until_finished()
            writer.flush()
    logging.info("RL iterations %d..%d in %.1f s", start, int(state.iteration), time.time() - t0)
    manager.close()
    return state

"""The RL post-training loop: prompts → grouped rollouts → rewards → advantages → updates.

``run(config, workdir)`` fine-tunes a pretrained generator (``config.base.workdir``, or a
diffusers pipeline folder ``config.base.diffusers_dir``: :func:`generators.load_base`) with one of
the objectives of :mod:`normguard_jax.objectives`, optionally wrapped by NormGuard. One
iteration:

1. prompts: G prompts of the base's train table (its classes, captions or prompt embeddings,
   :mod:`normguard_jax.conditioning`) drawn from ``fold_in(key, iteration)``, each repeated K
   times;
2. rollouts from the current policy θ, or from θ_old where the method's reference samples with
   its old / EMA policy (``config.rollout.policy``), with the configured sampler, steps and
   CFG (one jitted ``lax.scan``), batch sharded over the mesh;
3. rewards (a weighted combination from :mod:`normguard_jax.rewards`; a latent base's samples
   are decoded by its VAE first, inside the same program: :func:`build_reward`);
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
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from normguard_jax import (advantages, auxnets, checkpointing, conditioning, config_checks,
                           distributed, flow, generators, lora, loop, models, nonfinite,
                           normguard, optim, paths, reporting, rewards, sampling, sharding)
from normguard_jax.models import attention_impl
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
    # The rollout's CFG scale is the objective's unless config.objective sets its own (which
    # the method's validate may refuse, e.g. Flow-GRPO's ratio needs the rollout's velocity).
    if "guidance_scale" in names and "guidance_scale" not in fields:
        fields["guidance_scale"] = config.rollout.guidance_scale
    try:
        return cls(**fields)
    except TypeError as e:
        raise config_checks.ConfigError(f"config.objective: {e}") from None
    except ValueError as e:   # check_field's messages already name config.objective.<field>
        raise config_checks.ConfigError(str(e)) from None


def normguard_config(config: ml_collections.ConfigDict,
                     null_class: int) -> normguard.NormGuardConfig:
    """The NormGuard config of the run: ``config.normguard`` with ``velocity = "auto"`` resolved
    to what the rollouts sample with ("guided" when ``rollout.guidance_scale != 1``, else
    "conditional") and the rollout's CFG scale and null class for the guided velocity."""
    fields = dict(config.normguard)
    if fields.get("velocity", "auto") == "auto":
        fields["velocity"] = "guided" if config.rollout.guidance_scale != 1.0 else "conditional"
    fields.update(guidance_scale=config.rollout.guidance_scale, null_class=null_class)
    return normguard.NormGuardConfig(**fields)


ROLLOUT_POLICIES = ("default", "current", "old")


def rollout_policy(config: ml_collections.ConfigDict) -> str:
    """Which parameters sample the rollouts: "current" (θ) or "old" (θ_old, the lagged EMA);
    ``config.rollout.policy = "default"`` takes the method's reference choice
    (``Method.rollout_policy``)."""
    policy = config.rollout.policy
    return METHODS[config.method].rollout_policy if policy == "default" else policy


def trained_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Indices of the stochastic (stored, trained) sampler steps."""
    r = config.rollout
    end = r.num_steps if r.sde_window_end < 0 else r.sde_window_end
    return tuple(range(r.sde_window_start, end))


def batch_spec(config: ml_collections.ConfigDict, sigma_sampler=None, velocity=None,
               reward_fn=None) -> BatchSpec:
    """How the configured method turns one iteration's rollout into training rows
    (``velocity`` and ``reward_fn``: for builders that evaluate the base model or
    differentiate the reward, see :class:`BatchSpec`)."""
    # The objective config rides along for batch layouts that depend on it (DPO's tie rule,
    # AWM's loss_type); the null class does not enter any batch, so 0 stands in for it here.
    return BatchSpec(prompts=config.rollout.prompts_per_iter,
                     group_size=config.rollout.group_size,
                     renoise_draws=config.train.renoise_draws,
                     trained_steps=trained_steps(config), sigma_sampler=sigma_sampler,
                     velocity=velocity, reward_fn=reward_fn,
                     objective=objective_config(config, null_class=0))


def rows_per_iteration(config: ml_collections.ConfigDict) -> int:
    """Rows of the training batch built from one iteration's rollout."""
    return METHODS[config.method].rows(batch_spec(config))


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks every RL field that can be checked before the base model is loaded."""
    c = config_checks
    c.integer(config, "seed", 0)
    c.one_of(config, "method", METHODS)
    if c.one_of(config, "base.attention", attention_impl.IMPLEMENTATIONS) == "flash" and (
            jax.default_backend() != "tpu"):
        raise c.ConfigError("config.base.attention='flash' is the Pallas TPU kernel; this "
                            f"backend is {jax.default_backend()!r}: use 'xla'")
    c.integer(config, "rollout.prompts_per_iter", 1)
    c.integer(config, "rollout.group_size", 2)
    c.one_of(config, "rollout.sampler", sampling.STEP_FNS)
    c.one_of(config, "rollout.policy", ROLLOUT_POLICIES)
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
    c.check_intervals(config)
    for name in c.get_field(config, "rewards"):   # names are checked once the dataset is known
        c.number(config, f"rewards.{name}", 0)
    c.get_field(config, "extra_rewards")
    rewards.check_names(config)
    c.check_optim(config)
    c.check_sample(config)
    c.check_mesh(config, num_devices)
    lora.check_config(config)
    c.one_of(config, "precision.compute", PRECISIONS)
    c.one_of(config, "precision.reference", PRECISIONS)
    n = config.rollout.prompts_per_iter * config.rollout.group_size
    if n % num_devices:
        raise c.ConfigError(f"config.rollout.prompts_per_iter * group_size = {n} must be "
                            f"divisible by the {num_devices} devices")
    if "chunks" in config.rollout:
        chunks = c.integer(config, "rollout.chunks", 1)
        if config.rollout.prompts_per_iter % chunks or (n // chunks) % num_devices:
            raise c.ConfigError(
                f"config.rollout.chunks={chunks} must divide config.rollout.prompts_per_iter="
                f"{config.rollout.prompts_per_iter} (whole groups per chunk) and leave a "
                f"number of samples per chunk ({n} / {chunks}) divisible by the {num_devices} "
                "devices")
    rows = rows_per_iteration(config)
    mb = config.train.minibatch_size
    if mb % num_devices or rows % mb:
        raise c.ConfigError(f"config.train.minibatch_size={mb} must divide the {rows} training "
                            f"rows of an iteration and be divisible by the {num_devices} devices")
    try:
        normguard_config(config, null_class=0)
    except (TypeError, ValueError) as e:
        raise c.ConfigError(f"config.{e}" if str(e).startswith("normguard.") else str(e)) from None
    distributed.validate(config)
    if generators.is_diffusers_base(config.base):
        generators.diffusers_settings(config.base)   # the folders, read as JSON only
    elif not config.base.workdir:
        raise c.ConfigError("config.base.workdir is empty: name a pretraining workdir, or a "
                            "diffusers pipeline folder with config.base.diffusers_dir "
                            "(configs/rl_sd35m.py, configs/rl_flux.py)")
    weights, fields = rewards.config_weights(config)
    for name in ("clip_score", "pickscore"):   # model folders, before any model is loaded
        if weights.get(name, 0) and not config.reward_models.get(name, ""):
            raise c.ConfigError(f"{fields[name]}: the {name} reward needs "
                                f"config.reward_models.{name} (a transformers CLIPModel folder "
                                "with its tokenizer)")


def updates_per_iteration(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of one iteration: inner epochs × minibatches of its training rows."""
    return (config.train.inner_epochs * rows_per_iteration(config)
            // config.train.minibatch_size)


def build_optimizer(config: ml_collections.ConfigDict):
    """``(optimizer, schedule)`` of the run, the schedule spanning all its optimizer steps
    (micro-steps with ``optim.accumulate_steps > 1``: :func:`optim.build_optimizer`)."""
    return optim.build_optimizer(config.optim,
                                 config.train.iterations * updates_per_iteration(config))


# ----------------------------------------------------------------------------------------------
# Pure pieces.
# ----------------------------------------------------------------------------------------------


def rollout(params, labels, key, reward_params=None, requests=None, null=None, *, velocity,
            image_shape, sigmas, method, noise_level, sde_window, guidance_scale, null_class,
            reward_fn, group_size, adv_clip, global_std, keep_trajectory
            ) -> tuple[Rollout, dict]:
    """Samples K images per prompt, scores them and computes their advantages.

    Args:
      params: policy θ.
      labels: the conditioning, group-contiguous (N = G·K): (N,) int32 class labels or a
        text conditioning pytree (``{"text": (N, L, D), "pooled": (N, P)}``).
      key: typed key of this iteration's rollout.
      reward_params: the reward's parameters (``CombinedReward.params``), an argument rather
        than a constant of the compiled program.
      requests: what the reward is asked to check (``PromptTable.request``); None: ``labels``
        (class labels are their own request).
      null: the null conditioning of a text model (the empty prompt, leading axis 1), an
        argument that replaces ``null_class``; None for class labels.
      velocity, image_shape, sigmas, method, noise_level, sde_window, guidance_scale,
        null_class: sampler settings (static).
      reward_fn: ``(reward_params, images, requests) -> ((N,), components)``, e.g.
        ``CombinedReward.apply``.
      group_size: K. adv_clip, global_std: advantage options.
      keep_trajectory: keep states and log-probs (Flow-GRPO) or only the final images.

    Returns:
      ``(rollout, components)`` with per-sample reward components.
    """
    x = sampling.initial_noise(jax.random.fold_in(key, 0), sampling.cond_batch_size(labels),
                               image_shape)
    vfn = sampling.conditional_velocity_fn(
        velocity, params, labels, guidance_scale=guidance_scale,
        null_class=null_class if null is None else null)
    traj = sampling.sample(vfn, x, sigmas, jax.random.fold_in(key, 1), method=method,
                           noise_level=noise_level, sde_window=sde_window)
    images = traj.states[-1]
    total, components = reward_fn(reward_params, images,
                                  labels if requests is None else requests)
    adv = advantages.group_advantages(total.reshape(-1, group_size), global_std=global_std,
                                      clip=adv_clip).reshape(-1)
    return Rollout(labels=labels, images=images, rewards=total, advantages=adv,
                   trajectory=traj if keep_trajectory else None, requests=requests), components


def full_policy(ref_params, params):
    """The policy of a full fine-tuning run: θ itself (``ref_params`` unused)."""
    del ref_params
    return params


def update(params, opt_state, old_params, ref_params, batch, rewards_ok, rollout_params=None,
           null=None, *, objective, optimizer, velocity, policy=full_policy, guard_terms=None,
           guard_config=None):
    """One optimizer step of ``objective`` on a minibatch; returns (params, opt_state, metrics).

    ``params``, ``old_params``, ``rollout_params`` and ``opt_state`` are the trainable tree (all
    of θ, or a LoRA adapter); ``policy(ref_params, trainable)`` is what ``velocity`` takes
    (:func:`full_policy`, or :class:`lora.LoRAParams` over the frozen base θ_ref, which is then
    an argument of the step and never differentiated).

    The step is skipped (``params`` and ``opt_state`` returned unchanged, bit for bit) when
    ``rewards_ok`` (scalar bool: the rollout's rewards were all finite) is false or the loss
    or a gradient is not finite; ``metrics["skipped"]`` is then 1.0, else 0.0.

    ``null``: the null conditioning of a text model (``Context.null_condition``: guided
    velocities of Flow-GRPO and NormGuard), None for class labels.

    ``guard_terms`` (:func:`normguard.guard_terms` of the base objective) and ``guard_config``
    (its :class:`normguard.NormGuardConfig`), when given, add the gradient norms of the base
    loss and of the penalty, taken separately on the same minibatch
    (:func:`normguard.grad_norm_metrics`: one more forward and two more backward passes), to
    the metrics; the update itself is the same.
    """
    ctx = Context(velocity=velocity, ref_params=ref_params,
                  old_params=policy(ref_params, old_params),
                  rollout_params=(None if rollout_params is None
                                  else policy(ref_params, rollout_params)),
                  null_condition=null)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: objective(policy(ref_params, p), batch, ctx), has_aux=True)(params)
    ok = rewards_ok & nonfinite.all_finite(loss, grads)
    # At the params the gradient was taken at (before the step).
    guard_metrics = ({} if guard_terms is None else normguard.grad_norm_metrics(
        lambda p: guard_terms(policy(ref_params, p), batch, ctx), params, guard_config))

    def step(state, grads):
        params, opt_state = state
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = nonfinite.apply_if(ok, step, (params, opt_state), grads)
    metrics = dict(aux.metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   skipped=1.0 - ok.astype(jnp.float32), **guard_metrics)
    return params, opt_state, metrics


def sigma_sampler_for(config: ml_collections.ConfigDict, sigmas):
    """σ sampler of re-noised training batches: the rollout schedule's levels, or a density."""
    name = config.train.sigma_sampler
    if name == "schedule":
        return flow.schedule_sigma_sampler(sigmas)
    return flow.TIMESTEP_SAMPLERS[name]


class Programs(NamedTuple):
    """The compiled pieces of one RL iteration (built once per run by :func:`build_programs`).

    Attributes:
      rollout: ``(params, cond, key, requests=None, null=None) -> (Rollout, reward
        components)``, see :func:`rollout`.
      batch: ``(rollout, key) -> dict`` of training rows.
      update: ``(params, opt_state, old_params, ref_params, minibatch, rewards_ok,
        rollout_params) -> (params, opt_state, metrics)``, see :func:`update` (the null
        conditioning bound).
      old_update: ``(old_params, params, updates) -> old_params``, the θ_old EMA.
      place: puts a host or device batch on the mesh's data sharding.
      rollout_policy: "current" (θ samples the rollouts) or "old" (θ_old does).
      needs_rollout_params: pass a copy of θ at rollout time to the updates (AWM's
        ``rollout`` parameter sets).
      policy: ``(ref_params, trainable) -> the parameters the velocity takes``
        (:func:`full_policy`, or :class:`lora.LoRAParams`).
      null: the text model's null conditioning (None for class labels).
      rollout_chunks: sequential rollout calls per iteration (``config.rollout.chunks``;
        :func:`sample_rollout`).
      advantages: ``(N,) rewards -> (N,) advantages`` over the whole iteration (the chunked
        rollout recomputes them once every chunk is scored).
    """

    rollout: Callable
    batch: Callable
    update: Callable
    old_update: Callable
    place: Callable
    rollout_policy: str = "current"
    needs_rollout_params: bool = False
    policy: Callable = full_policy
    null: object = None
    rollout_chunks: int = 1
    advantages: Callable | None = None


def draw_prompts(key, table: conditioning.PromptTable | None, num_classes: int | None,
                 prompts: int, group_size: int):
    """``(cond, requests)`` of one iteration: G prompt indices drawn uniformly with ``key``,
    each repeated K times (group-contiguous). A class table's conditioning and request are the
    (N,) int32 labels themselves (``requests`` is then None); a text table's are its
    embeddings and its request dict (:class:`conditioning.PromptTable`)."""
    n = len(table) if table is not None else num_classes
    index = jnp.repeat(jax.random.randint(key, (prompts,), 0, n), group_size).astype(jnp.int32)
    if table is None or table.is_class:
        return index, None
    # Text embeddings are gathered on the host (a real model's table can hold GBs of T5
    # states); only the N rows drawn are sent to the devices.
    index = np.asarray(jax.device_get(index))
    return table.cond(index), table.request(index)


def train_iteration(state: RLState, ref_params, *, programs: Programs, prompts: int,
                    group_size: int, inner_epochs: int, rows: int, minibatch_size: int,
                    schedule, table: conditioning.PromptTable | None = None,
                    num_classes: int | None = None) -> tuple[RLState, dict, jax.Array]:
    """One RL iteration: prompts → rollout → training batch → epochs of updates → θ_old update.

    A deterministic function of ``state`` (its key and iteration fix the prompts, the rollout
    noise, the re-noising and the minibatch order): a resumed run repeats an uninterrupted one.

    Args:
      state: the run's :class:`RLState` before the iteration.
      ref_params: the frozen reference θ_ref.
      programs: the compiled pieces (:class:`Programs`).
      table: the prompts drawn from, uniformly (:func:`draw_prompts`); or ``num_classes``:
        class labels drawn uniformly from ``[0, num_classes)`` (the same draws as a class
        table of that many classes).
      prompts, group_size: G and K; the rollout has N = G·K samples.
      inner_epochs: passes over the training rows.
      rows: training rows of the iteration (``Method.rows``).
      minibatch_size: rows per optimizer step (divides ``rows``).
      schedule: the learning-rate schedule (logged).

    Returns:
      ``(state, metrics, skipped)``: the state after the iteration (``iteration`` + 1,
      ``updates`` + the optimizer steps taken), scalar metrics (``train/<objective metric>``
      means over the iteration's updates, ``reward/mean``, ``reward/std``,
      ``reward/<component>``, ``lr``) and the number of updates skipped for non-finite values.
    """
    key_it = jax.random.fold_in(state.key(), state.iteration)
    cond, requests = draw_prompts(jax.random.fold_in(key_it, 0), table, num_classes, prompts,
                                  group_size)
    sampler_params = state.old_params if programs.rollout_policy == "old" else state.params
    ro, components = sample_rollout(programs, programs.policy(ref_params, sampler_params),
                                    cond, jax.random.fold_in(key_it, 1), requests)
    # θ at rollout time, for objectives that read ctx.rollout_params (θ itself is donated).
    rollout_params = (jax.tree.map(jnp.copy, state.params) if programs.needs_rollout_params
                      else None)
    rewards_ok = nonfinite.all_finite(ro.rewards)
    batch = programs.batch(ro._replace(ref_params=ref_params), jax.random.fold_in(key_it, 2))
    params, opt_state = state.params, state.opt_state
    step_metrics = []
    for epoch in range(inner_epochs):
        perm = jax.random.permutation(jax.random.fold_in(key_it, 3 + epoch), rows)
        for j in range(rows // minibatch_size):
            idx = perm[j * minibatch_size:(j + 1) * minibatch_size]
            minibatch = programs.place(jax.tree.map(lambda a, idx=idx: a[idx], batch))
            params, opt_state, m = programs.update(params, opt_state, state.old_params,
                                                   ref_params, minibatch, rewards_ok,
                                                   rollout_params)
            step_metrics.append(m)
    updates = state.updates + len(step_metrics)
    state = state.replace(iteration=state.iteration + 1, updates=updates, params=params,
                          opt_state=opt_state,
                          old_params=programs.old_update(state.old_params, params, updates))
    stacked = {name: jnp.stack([m[name] for m in step_metrics]) for name in step_metrics[0]}
    metrics = {f"train/{name}": jnp.mean(v) for name, v in stacked.items()}
    metrics.update({"reward/mean": jnp.mean(ro.rewards), "reward/std": jnp.std(ro.rewards),
                    "lr": schedule(state.updates - 1)})
    metrics.update({f"reward/{n}": jnp.mean(v) for n, v in components.items()})
    return state, metrics, jnp.sum(stacked["skipped"])


class BoundProgram(NamedTuple):
    """A jitted program with some arguments bound: ``program(*args)`` calls
    ``jitted(*args[:at], *bound, *args[at:])`` (``at=None``: after all of ``args``), and
    ``lower(*args)`` lowers it the same way (e.g. the rollout with the reward's parameters,
    passed as arguments rather than compiled in as constants). ``arity``: the jitted
    function's number of positional arguments; trailing ones not given are passed as None."""

    jitted: Callable
    bound: tuple
    at: int | None = None
    arity: int | None = None

    def _args(self, args):
        at = len(args) if self.at is None else min(self.at, len(args))
        args = (*args[:at], *self.bound, *args[at:])
        # Trailing optional arguments left out are None (jit's in_shardings need all of them).
        return args + (None,) * ((self.arity or len(args)) - len(args))

    def __call__(self, *args):
        return self.jitted(*self._args(args))

    def lower(self, *args):
        return self.jitted.lower(*self._args(args))


def build_programs(config: ml_collections.ConfigDict, base: generators.Pretrained, mesh,
                   reward_fn: rewards.CombinedReward, optimizer, null=None) -> Programs:
    """Jits the rollout, batch, update and θ_old programs of the configured run on ``mesh``.

    The reward's parameters (``reward_fn.params``) are placed on the mesh once and bound as
    arguments of the rollout and batch programs (:class:`BoundProgram`). ``base.velocity``
    must take the run's policy parameters (:func:`run_velocity`). ``null``: the text
    model's null conditioning (``PromptTable.device_null``), placed replicated and passed to
    the rollout and the updates; None for class labels."""
    method = METHODS[config.method]
    objective_cfg = objective_config(config, base.num_classes)
    guard = normguard_config(config, base.num_classes)
    objective = normguard.with_normguard(method.make_objective(objective_cfg), guard)
    # Opt-in diagnostic: the base loss's and the penalty's gradient norms, taken separately.
    guard_terms = (normguard.guard_terms(method.make_objective(objective_cfg), guard)
                   if guard.log_grad_norms else None)
    repl, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    # θ, θ_old, θ_ref and the optimizer state laid out over the fsdp axis by one rule.
    # The trainable tree is θ or, with LoRA, the adapter; θ_ref is the base.
    policy = lora.LoRAParams if lora.from_config(config).rank else full_policy
    trainable = jax.eval_shape(lambda: trainable_init(config, base.params))
    ref_sh = sharding.tree_shardings(base.params, mesh, config.mesh.min_shard_size)
    train_sh = sharding.tree_shardings(trainable, mesh, config.mesh.min_shard_size)
    opt_sh = sharding.tree_shardings(jax.eval_shape(optimizer.init, trainable), mesh,
                                     config.mesh.min_shard_size)
    needs_rollout_params = getattr(objective_cfg, "needs_rollout_params", False)
    sigmas = jnp.asarray(flow.inference_sigmas(config.rollout.num_steps, config.rollout.shift))
    window = trained_steps(config)
    noise_level = None if config.rollout.noise_level < 0 else config.rollout.noise_level
    reward_params = jax.device_put(reward_fn.params, repl)
    rollout_fn = jax.jit(functools.partial(
        rollout, velocity=base.velocity, image_shape=base.image_shape, sigmas=sigmas,
        method=config.rollout.sampler, noise_level=noise_level,
        sde_window=(window[0], window[-1] + 1), guidance_scale=config.rollout.guidance_scale,
        null_class=base.num_classes, reward_fn=reward_fn.apply,
        group_size=config.rollout.group_size, adv_clip=config.advantages.clip,
        global_std=config.advantages.global_std, keep_trajectory=method.needs_trajectory),
        in_shardings=(policy(ref_sh, train_sh), data_sh, repl, repl, data_sh, repl))
    spec = batch_spec(config, sigma_sampler_for(config, sigmas), velocity=base.velocity)

    def training_batch(ro, key, reward_params):
        bound = functools.partial(reward_fn.apply, reward_params)
        return method.training_batch(ro, key, spec=dataclasses.replace(spec, reward_fn=bound))


    batch_fn = jax.jit(training_batch)
    update_fn = jax.jit(functools.partial(update, objective=objective, optimizer=optimizer,
                                          velocity=base.velocity, policy=policy,
                                          guard_terms=guard_terms, guard_config=guard),
                        in_shardings=(train_sh, opt_sh, train_sh, ref_sh, data_sh, repl,
                                      train_sh if needs_rollout_params else repl, repl),
                        out_shardings=(train_sh, opt_sh, repl), donate_argnums=(0, 1))
    decay = dict(zip(("flat", "rate", "max_decay"),
                     OLD_POLICY_DECAY_PRESETS[config.train.old_policy]))
    # The EMA schedule counts optimizer updates, not accumulated micro-steps.
    k = optim.accumulate_steps(config.optim)
    old_update_fn = jax.jit(lambda old, new, steps: update_old_params(old, new, steps // k,
                                                                       **decay),
                            in_shardings=(train_sh, train_sh, repl), out_shardings=train_sh)
    null = None if null is None else jax.device_put(null, repl)
    return Programs(rollout=BoundProgram(rollout_fn, (reward_params,), at=3, arity=6),
                    batch=BoundProgram(batch_fn, (reward_params,)),
                    update=BoundProgram(update_fn, (null,)),
                    old_update=old_update_fn, place=lambda tree: jax.device_put(tree, data_sh),
                    rollout_policy=rollout_policy(config),
                    needs_rollout_params=needs_rollout_params, policy=policy,
                    null=null,
                    rollout_chunks=rollout_chunks(config), advantages=jax.jit(functools.partial(
                        _advantages, group_size=config.rollout.group_size,
                        adv_clip=config.advantages.clip,
                        global_std=config.advantages.global_std)))


def rollout_chunks(config: ml_collections.ConfigDict) -> int:
    """``config.rollout.chunks`` (1 in runs recorded before the field existed)."""
    return int(config.rollout.get("chunks", 1))


def _advantages(rewards, *, group_size, adv_clip, global_std):
    return advantages.group_advantages(rewards.reshape(-1, group_size), global_std=global_std,
                                       clip=adv_clip).reshape(-1)


def _concatenate(rollouts: list) -> Rollout:
    """One rollout from the rollouts of consecutive chunks of groups (batch axis 0; the
    trajectory's batch axis is 1, its schedule fields are shared)."""
    cat = lambda axis: lambda *xs: jnp.concatenate(xs, axis=axis)  # noqa: E731
    first = rollouts[0]
    trajectory = None
    if first.trajectory is not None:
        parts = [r.trajectory for r in rollouts]
        trajectory = first.trajectory._replace(**{
            name: (None if getattr(first.trajectory, name) is None else
                   cat(1)(*[getattr(t, name) for t in parts]))
            for name in ("states", "means", "log_probs", "velocities")})
    stack = lambda name: (None if getattr(first, name) is None else  # noqa: E731
                          jax.tree.map(cat(0), *[getattr(r, name) for r in rollouts]))
    return first._replace(labels=stack("labels"), images=stack("images"),
                          rewards=stack("rewards"), advantages=stack("advantages"),
                          trajectory=trajectory, requests=stack("requests"))


def sample_rollout(programs: Programs, params, cond, key, requests=None):
    """The iteration's rollout: ``programs.rollout`` on all N samples at once, or with
    ``programs.rollout_chunks = C > 1`` in C sequential calls of N/C samples (whole groups;
    chunk c samples with ``fold_in(key, c)``), so that the sampler's and the VAE decode's
    activations are those of N/C samples. The chunks' rollouts are concatenated and the
    advantages recomputed over all N rewards (the batch-wide std of ``advantages.global_std``
    is the whole iteration's, as without chunks). Returns ``(rollout, reward components)``."""
    chunks = programs.rollout_chunks
    if chunks == 1:
        return programs.rollout(params, programs.place(cond), key,
                                None if requests is None else programs.place(requests),
                                programs.null)
    n = len(jax.tree.leaves(cond)[0])
    size = n // chunks
    parts, components = [], []
    for c in range(chunks):
        take = lambda tree, c=c: (None if tree is None else  # noqa: E731
                                  jax.tree.map(lambda a: a[c * size:(c + 1) * size], tree))
        ro, parts_c = programs.rollout(params, programs.place(take(cond)),
                                       jax.random.fold_in(key, c),
                                       None if requests is None else
                                       programs.place(take(requests)), programs.null)
        parts.append(ro)
        components.append(parts_c)
    ro = _concatenate(parts)
    ro = ro._replace(advantages=programs.advantages(ro.rewards))
    return ro, jax.tree.map(lambda *xs: jnp.concatenate(xs), *components)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------




PRECISIONS = ("float32", "bfloat16")


def precision(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """``(compute, reference)`` dtypes of ``config.precision`` (float32 in runs recorded before
    the block existed)."""
    block = config.precision if "precision" in config else {}
    return block.get("compute", "float32"), block.get("reference", "float32")


def run_velocity(config: ml_collections.ConfigDict, base: generators.Pretrained) -> Callable:
    """The velocity function of the run: the base's; with ``config.lora.rank > 0`` one that
    also takes :class:`lora.LoRAParams` (θ_ref stays the plain base tree); with
    ``config.precision.compute = "bfloat16"`` the base's graph with bfloat16 compute (every
    layer casts its float32 parameters and its input to bfloat16 where it uses them; the
    models' norm statistics, attention softmax and returned velocity stay float32)."""
    cfg = lora.from_config(config)
    compute, _ = precision(config)
    if not cfg.rank and compute == base.config.model.dtype:
        return base.velocity
    graphdef = generators.base_graphdef(base, dtype=compute)
    fn = lora.make_velocity_fn(graphdef, cfg) if cfg.rank else models.make_velocity_fn(graphdef)
    return generators.velocity_of(base, fn)


def reference_params(config: ml_collections.ConfigDict, base_params):
    """θ_ref as the run stores it: the base parameters, cast to bfloat16 with
    ``config.precision.reference = "bfloat16"`` (half the memory; with LoRA this is also the
    frozen part of the policy)."""
    _, reference = precision(config)
    if reference == "float32":
        return base_params
    return jax.tree.map(lambda a: a.astype(reference)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, base_params)


def trainable_init(config: ml_collections.ConfigDict, base_params):
    """θ at iteration 0: the base parameters, or a fresh LoRA adapter over them (from the
    seed; B = 0, so the policy equals the base)."""
    cfg = lora.from_config(config)
    if not cfg.rank:
        return generators.master_weights(base_params)
    try:
        return lora.init(jax.random.fold_in(jax.random.key(config.seed), 2**31 - 2),
                         base_params, cfg)
    except ValueError as e:
        raise config_checks.ConfigError(f"config.{e}") from None


def _reward_context(config, base, table: conditioning.PromptTable):
    """What the run's rewards are built for: the base's dataset and images (a diffusers
    pipeline: its decoded pixels, no reward classifier) and the table's prompt texts."""
    nets = None
    if base.vae is None:
        nets = auxnets.AuxNetCache(base.config.data.name, aux_dir=config.aux_dir,
                                   data_dir=base.config.data.data_dir or None)
    return rewards.RewardContext(dataset=base.config.data.name,
                                 image_shape=generators.pixel_shape(base),
                                 num_classes=base.num_classes, nets=nets,
                                 prompts=tuple(table.texts),
                                 model_dirs=dict(config.reward_models))


def build_reward(config, base, table: conditioning.PromptTable):
    """The run's combined reward (``config.rewards`` and ``extra_rewards``); for a latent base
    (a diffusers pipeline) wrapped so that it decodes the latents with the base's VAE first
    (:class:`rewards.DecodedReward`: the VAE parameters are an argument of the rollout)."""
    weights, fields = rewards.config_weights(config)
    combined = rewards.build_combined(weights, _reward_context(config, base, table),
                                      fields=fields)
    if base.vae is None:
        return combined
    return rewards.DecodedReward(combined, base.vae.decode, base.vae.params)


def _check_resume_compatible(manager, config: ml_collections.ConfigDict, workdir: str,
                             allowed: tuple[str, ...]) -> None:
    """Raises ConfigError when ``workdir`` holds another RL run: another method, a base model of
    another image shape or in another folder, or any other changed config field not allowed.

    Reads only JSON records (of the newest RL checkpoint and of the base's checkpoint), so it
    runs before any model is loaded or compiled.
    """
    latest = checkpointing.read_latest_meta(manager)
    if latest is None:
        return
    step, meta = latest
    if meta["config"]["method"] != config.method:
        raise config_checks.ConfigError(
            f"config.method={config.method!r} differs from the checkpoint in {workdir} "
            f"({meta['config']['method']!r}); use a new workdir")
    if generators.is_diffusers_base(config.base):
        shape = generators.diffusers_settings(config.base)["image_shape"]
        where = f"config.base.diffusers_dir={config.base.diffusers_dir!r}"
    else:
        shape = checkpointing.read_meta(config.base.workdir)[1]["image_shape"]
        where = f"config.base.workdir={config.base.workdir!r}"
    base_meta = {"image_shape": shape}
    if "image_shape" in meta and tuple(meta["image_shape"]) != tuple(base_meta["image_shape"]):
        raise config_checks.ConfigError(
            f"image shape {tuple(base_meta['image_shape'])} of the base model in "
            f"{where} differs from the checkpoint's "
            f"{tuple(meta['image_shape'])} in {workdir}; use a new workdir")
    _check_same_run(meta, config, workdir, step, allowed)


def _check_same_run(meta: dict, config: ml_collections.ConfigDict, workdir: str, step: int,
                    allowed: tuple[str, ...], base: generators.Pretrained | None = None,
                    base_fingerprint: str | None = None) -> dict:
    """Raises ConfigError unless ``meta`` (an RL checkpoint's record) is this config's run on
    the same base: the config (:func:`config_checks.check_resume`), the base's folder and,
    once the base is loaded, its step and a fingerprint of its parameters (θ_ref). Records
    older than these fields are not compared on them. Returns the allowed config changes."""
    changes = config_checks.check_resume(meta["config"], config, workdir=workdir, step=step,
                                         allowed=allowed)
    differ = []
    source = generators.base_source(config)
    field = ("config.base.diffusers_dir" if generators.is_diffusers_base(config.base)
             else "config.base.workdir")
    if "base_workdir" in meta and meta["base_workdir"] != source:
        differ.append(f"folder {meta['base_workdir']!r} -> {source!r}")
    if base is not None and "base_step" in meta and meta["base_step"] != base.step:
        differ.append(f"step {meta['base_step']} -> {base.step}")
    if (base_fingerprint is not None and "base_fingerprint" in meta
            and meta["base_fingerprint"] != base_fingerprint):
        differ.append("parameters (fingerprint "
                      f"{meta['base_fingerprint'][:12]} -> {base_fingerprint[:12]})")
    if differ:
        raise config_checks.ConfigError(
            f"the base model of {field}={source!r} is not the one the "
            f"run in {workdir} (iteration {step}) was trained from: {'; '.join(differ)}. Its "
            "θ_ref would change: use a new workdir")
    return changes


def run(config: ml_collections.ConfigDict, workdir: str, *, hooks: Iterable[Hook] = (),
        allow_changed: Iterable[str] = ()) -> RLState:
    """Runs (or resumes) RL post-training; returns the final state.

    Writes into ``workdir``: ``checkpoints/``, TensorBoard events, ``metrics.jsonl`` and
    ``samples/*.png`` (fixed-seed ODE samples of θ); logs and images on process 0 only.

    Faults (see :mod:`normguard_jax.loop`): SIGTERM (on any process) and Ctrl-C checkpoint the
    last iteration (Ctrl-C then re-raises). An update whose loss or gradient is non-finite, and
    every update of an iteration whose rewards are non-finite, is skipped with θ and the
    optimizer untouched and counted (``train/skipped``, ``skipped_total``);
    ``config.train.max_nonfinite`` such iterations in a row stop the run with
    :class:`nonfinite.NonFiniteError` naming them. Config errors, an unwritable workdir, a
    workdir in use by another process and a checkpoint of another run (another method, image
    shape or base folder, or any changed config field not allowed) fail before any model is
    loaded; a base whose step or parameters differ from the run's θ_ref fails before anything
    compiles. Unreadable newest checkpoints are moved aside and the run resumes from the
    newest readable one.

    ``allow_changed``: config fields that may differ from the resumed run's
    (``config_checks.RESUME_ALLOWED``, e.g. ``train.iterations`` to extend it); the changes
    are recorded in the checkpoints' ``history``.
    """
    validate(config, jax.device_count())
    allowed = config_checks.check_allowed(allow_changed)
    config_checks.writable_directory(workdir)
    with checkpointing.workdir_lock(workdir):
        return _run(config, workdir, hooks, allowed)


def _run(config: ml_collections.ConfigDict, workdir: str, hooks: Iterable[Hook],
         allowed: tuple[str, ...]) -> RLState:
    """:func:`run` once the workdir is locked."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    manager = checkpointing.open_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                         save_interval_steps=config.train.checkpoint_every)
    _check_resume_compatible(manager, config, workdir, allowed)
    base, base_fingerprint = generators.load_base(config, mesh=mesh)
    table = generators.prompt_table(base, "train")
    reward_fn = build_reward(config, base, table)
    optimizer, schedule = build_optimizer(config)
    base = base._replace(velocity=attention_impl.bind(run_velocity(config, base),
                                                      config.base.attention, mesh))
    programs = build_programs(config, base, mesh, reward_fn, optimizer,
                              null=None if table.is_class else table.device_null())
    ref_params = sharding.shard_tree(reference_params(config, base.params), mesh,
                                     config.mesh.min_shard_size)
    state = sharding.shard_tree(initial_state(trainable_init(config, base.params), optimizer,
                                              config.seed), mesh, config.mesh.min_shard_size)

    restored = checkpointing.restore_latest(manager, state, move_unreadable=True)
    skipped_before, history = 0, []
    if restored is not None:
        resumed_at, state, restored_meta = restored
        changes = _check_same_run(restored_meta, config, workdir, resumed_at, allowed, base,
                                  base_fingerprint)
        skipped_before = int(restored_meta.get("skipped_updates", 0))  # absent in older ones
        history = config_checks.resume_history(restored_meta, resumed_at, changes)
        logging.info("Resumed RL from iteration %d in %s", int(state.iteration), workdir)
    start = int(state.iteration)

    writer = reporting.make_writer(workdir)
    grid_cond, grid_null = conditioning.grid_condition(table, config.sample.per_class)
    grid_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)

    def write_samples(state: RLState, it: int):
        images = sampling.generate_images(
            base.velocity, programs.policy(ref_params, state.params), grid_cond, grid_key,
            image_shape=base.image_shape, num_steps=config.sample.num_steps,
            shift=config.sample.shift, guidance_scale=config.sample.guidance_scale,
            null_class=base.num_classes, null_condition=grid_null)
        reporting.write_grid(writer, workdir, it, "samples", generators.to_pixels(base, images),
                             config.sample.per_class)

    def meta(it: int, skipped_total: int) -> dict:
        return {"config": config.to_dict(), "iteration": int(it),
                "base_workdir": generators.base_source(config), "base_step": base.step,
                **({"base_embeddings": paths.absolute(config.base.embeddings)}
                   if generators.is_diffusers_base(config.base) else {}),
                "base_fingerprint": base_fingerprint, "image_shape": list(base.image_shape),
                "skipped_updates": skipped_total, "history": history}

    def unit(state: RLState, index: int):
        del index  # the state's own iteration counter positions the run
        return train_iteration(
            state, ref_params, programs=programs, table=table,
            prompts=config.rollout.prompts_per_iter, group_size=config.rollout.group_size,
            inner_epochs=config.train.inner_epochs, rows=rows_per_iteration(config),
            minibatch_size=config.train.minibatch_size, schedule=schedule)
    schedule_ = loop.Schedule(total=config.train.iterations, log_every=config.train.log_every,
                              sample_every=config.train.sample_every,
                              max_nonfinite=config.train.max_nonfinite, unit_name="iteration",
                              samples_at_start=True)
    return loop.run(state, unit, schedule=schedule_, manager=manager, writer=writer, meta=meta,
                    write_samples=write_samples, skipped_before=skipped_before,
                    saved_step=start if restored is not None else None, hooks=hooks)

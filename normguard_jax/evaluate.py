"""The ``evaluate`` job: every reward and every quality metric of one generator checkpoint.

``run(config, workdir)`` samples ``per_class`` images of every class at fixed seeds (a
text-conditioned model: asked for with its held-out test prompts of that class), scores them
with every reward defined for the dataset (``rewards.REWARDS``) and the configured combined
reward, computes the quality metrics of :mod:`normguard_jax.quality` against the held-out
split, does the same for an equally sized, class-balanced set of real training images (the
noise floor of every number at this set size), and writes ``evaluation.json``, ``evaluation.md`` and
``samples_eval.png`` into the workdir. Everything is a function of the config and the
checkpoint, so a second run writes identical numbers.

A generator whose prompts have no real images to compare with (a diffusers pipeline, or a text
model whose test prompts do not cover every class) is evaluated per test prompt instead
(:func:`run_prompts`): samples of each prompt, every applicable reward asked about that prompt,
ρ against the base, no per-class image metrics.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from normguard_jax import (auxnets, conditioning, config_checks, data, diagnostics, generators,
                           paths, quality, reporting, rewards, sampling)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field that can be checked without reading the checkpoint."""
    c = config_checks
    c.integer(config, "seed", 0)
    if not isinstance(config.checkpoint, str) or not config.checkpoint:
        raise c.ConfigError("config.checkpoint must name a pretraining workdir, an RL workdir "
                            f"or a diffusers pipeline folder, got {config.checkpoint!r}")
    c.integer(config, "checkpoint_step", -1)
    c.one_of(config, "use_ema", (True, False))
    c.one_of(config, "aux.preset", auxnets.PRESETS)
    c.one_of(config, "sample.method", sampling.STEP_FNS)
    c.check_sample(config, min_per_class=2)
    if config.sample.noise_level != -1.0:
        c.number(config, "sample.noise_level", 0)
    c.one_of(config, "sample.renormalize", (True, False))
    c.number(config, "sample.renormalize_phi", 0, 1)
    c.number(config, "sample.renormalize_sigma_max", 0, 1)
    if not config.sample.renormalize:
        for field in ("renormalize_phi", "renormalize_sigma_max"):
            if config.sample[field] != 1.0:
                raise c.ConfigError(f"config.sample.{field}={config.sample[field]!r} needs "
                                    "config.sample.renormalize=True (without it nothing is "
                                    "renormalised)")
    c.integer(config, "sample.batch_size", 1)
    c.integer(config, "metrics.knn_k", 1)
    c.number(config, "metrics.range_tolerance", 0)
    c.integer(config, "metrics.batch_size", 1)
    c.get_field(config, "extra_rewards")
    rewards.check_names(config)
    if config.metrics.knn_k >= config.sample.per_class * 2:
        raise c.ConfigError(f"config.metrics.knn_k={config.metrics.knn_k} needs more samples "
                            f"than config.sample.per_class={config.sample.per_class} gives")


def generate_set(pre: generators.Pretrained, labels: np.ndarray, sample: ml_collections.ConfigDict,
                 seed: int, renormalize_to=None,
                 table: conditioning.PromptTable | None = None) -> np.ndarray:
    """Samples one image per label in batches of ``sample.batch_size``.

    Batch i uses ``fold_in(key(seed), i)`` (the last batch is padded with repeats of its last
    label, and the extra images dropped). With a text ``table`` each label is asked for with
    its class's prompts in turn (:meth:`conditioning.PromptTable.for_classes`: the held-out
    captions of a captioned base), the empty prompt as the null conditioning.

    Returns:
      (N, H, W, C) float32, raw (not clipped).
    """
    labels = np.asarray(labels, np.int32)
    bs = sample.batch_size
    noise_level = None if sample.noise_level == -1.0 else float(sample.noise_level)
    out = []
    for i, start in enumerate(range(0, len(labels), bs)):
        chunk = labels[start:start + bs]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk))])
        cond, null = _condition(table, padded, labels[:start])
        images = sampling.generate_images(
            pre.velocity, pre.params, cond, jax.random.fold_in(jax.random.key(seed), i),
            image_shape=tuple(pre.image_shape), num_steps=sample.num_steps, shift=sample.shift,
            guidance_scale=sample.guidance_scale, null_class=pre.num_classes,
            method=sample.method, noise_level=noise_level, renormalize_to=renormalize_to,
            **renormalize_options(sample), null_condition=null)
        out.append(np.asarray(images)[:len(chunk)])
    return np.concatenate(out)


def renormalize_options(sample: ml_collections.ConfigDict) -> dict:
    """``renormalize_phi`` and ``renormalize_sigma_max`` of :func:`sampling.generate_images`
    from a ``sample`` block (they act only when a reference is given to renormalise to)."""
    return {"renormalize_phi": float(sample.renormalize_phi),
            "renormalize_sigma_max": float(sample.renormalize_sigma_max)}


def _condition(table, labels: np.ndarray, before: np.ndarray):
    """``(cond, null_condition)`` of a batch of class labels (``before``: the labels of the
    earlier batches, so each class keeps cycling through its prompts across batches)."""
    if table is None or table.is_class:
        return jnp.asarray(labels), None
    index = table.for_classes(np.concatenate([before, labels]))[len(before):]
    return jax.tree.map(jnp.asarray, table.cond(index)), table.device_null()


def first_per_class(split: data.ImageSplit, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each class (stored order), class-major, as float32."""
    idx = np.concatenate([np.flatnonzero(split.labels == c)[:per_class]
                          for c in range(split.num_classes)])
    return data.to_model_range(split.images[idx]), split.labels[idx].astype(np.int32)


def score_set(images, labels, reward_fns, combined, reference, nets, config) -> dict:
    """Means of every reward, of the combined reward, and all quality metrics of one set."""
    per_image = rewards.score_images(reward_fns, images, labels, config.metrics.batch_size)
    total = sum(w * per_image[name] for name, w in combined.weights)
    metrics = quality.quality_metrics(images, labels, reference, nets,
                                      tol=config.metrics.range_tolerance)
    return {"rewards": {k: float(np.mean(v)) for k, v in per_image.items()},
            "combined_reward": float(np.mean(total)), "quality": metrics}


def _markdown(result: dict) -> str:
    gen, real = result["generated"], result["real_train"]
    lines = [
        f"# Evaluation of `{result['checkpoint']}` (step {result['step']})",
        "",
        f"Dataset `{result['dataset']}`; {result['num_samples']} samples "
        f"({result['config']['sample']['per_class']} per class), sampler "
        f"`{result['config']['sample']['method']}` with {result['config']['sample']['num_steps']}"
        f" steps, CFG {result['config']['sample']['guidance_scale']}, seed "
        f"{result['config']['seed']}. Reference: {result['reference_size']} held-out images "
        f"(`{result['config']['reference_split']}`). The real column is an equally sized set of "
        "training images: the best a generator can do at this set size.",
        "",
        "| | generated | real (train) |",
        "|---|---:|---:|",
    ]
    lines.append(f"| combined reward {result['combined_weights']} | "
                 f"{gen['combined_reward']:.4f} | {real['combined_reward']:.4f} |")
    for name in gen["rewards"]:
        lines.append(f"| reward `{name}` | {gen['rewards'][name]:.4f} | "
                     f"{real['rewards'][name]:.4f} |")
    for name in gen["quality"]:
        arrow = {1: " (↑)", -1: " (↓)"}.get(quality.DIRECTION.get(name), "")
        lines.append(f"| metric `{name}`{arrow} | {gen['quality'][name]:.4f} | "
                     f"{real['quality'][name]:.4f} |")
    lines.append("")
    lines.append("Auxiliary nets (cached in `{}`):".format(result["config"]["aux"]["dir"]))
    for name, meta in result["aux_nets"].items():
        held = ", ".join(f"{k} {v:.3f}" for k, v in meta.items() if k.startswith("heldout"))
        lines.append(f"- {name}: {held}")
    return "\n".join(lines) + "\n"


def norm_ratio_summary(pre: generators.Pretrained, ref: generators.Pretrained | None,
                       labels: np.ndarray, sample: ml_collections.ConfigDict, seed: int,
                       table: conditioning.PromptTable | None = None) -> dict:
    """Mean ρ = ‖v_θ‖/‖v_ref‖ over samples, per ODE step and overall (1 without a reference).

    Uses the first batch of ``labels`` (at most ``sample.batch_size``) with the batch-0 key of
    :func:`generate_set`, so the states are those of the first evaluated samples. ρ is θ's own,
    on its plain ODE trajectory, whatever the sampler; with ``sample.renormalize`` the dict
    also holds ``"applied"``: ``{"mean", "per_step"}`` of the ratio of the velocity the
    renormalised sampler applied, on its own trajectory
    (:func:`diagnostics.velocity_norm_ratios` with the renormalisation options).
    """
    if ref is None:
        return {"mean": 1.0, "per_step": [1.0] * sample.num_steps}
    chunk, null = _condition(table, np.asarray(labels, np.int32)[:sample.batch_size],
                             np.zeros(0, np.int32))

    def profile(**options):
        ratios = diagnostics.velocity_norm_ratios(
            pre.velocity, pre.params, ref.params, chunk,
            jax.random.fold_in(jax.random.key(seed), 0), image_shape=tuple(pre.image_shape),
            num_steps=sample.num_steps, shift=sample.shift,
            guidance_scale=sample.guidance_scale, null_class=pre.num_classes,
            null_condition=null, **options)
        per_step = np.asarray(jnp.mean(ratios, axis=1))
        return {"mean": float(per_step.mean()), "per_step": [float(r) for r in per_step]}

    out = profile()
    if sample.renormalize and sample.renormalize_phi > 0:
        out["applied"] = profile(**renormalize_options(sample))
    return out


def by_prompt(pre: generators.Pretrained, table: conditioning.PromptTable) -> bool:
    """Whether a generator is evaluated per test prompt (:func:`run_prompts`) rather than per
    class: a latent generator (a diffusers pipeline: no real images of its prompts to compare
    with, no classifier), or a text table whose test prompts do not cover every class."""
    return pre.vae is not None or (not table.is_class and not table.labelled())


def generate_prompts(pre: generators.Pretrained, table: conditioning.PromptTable,
                     index: np.ndarray, sample: ml_collections.ConfigDict, seed: int,
                     renormalize_to=None) -> np.ndarray:
    """One image per prompt index (``index`` (N,) rows of ``table``), in batches of
    ``sample.batch_size`` with the batch-i key ``fold_in(key(seed), i)`` (the last batch padded
    with repeats), the empty prompt as CFG's null; a latent generator's samples decoded by its
    VAE. Returns (N, H, W, C) float32 images, raw (not clipped)."""
    index = np.asarray(index, np.int32)
    bs = sample.batch_size
    noise_level = None if sample.noise_level == -1.0 else float(sample.noise_level)
    out = []
    for i, start in enumerate(range(0, len(index), bs)):
        chunk = index[start:start + bs]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk))])
        cond = jax.tree.map(jnp.asarray, table.cond(padded))
        samples = sampling.generate_images(
            pre.velocity, pre.params, cond, jax.random.fold_in(jax.random.key(seed), i),
            image_shape=tuple(pre.image_shape), num_steps=sample.num_steps, shift=sample.shift,
            guidance_scale=sample.guidance_scale, null_class=pre.num_classes,
            method=sample.method, noise_level=noise_level, renormalize_to=renormalize_to,
            **renormalize_options(sample), null_condition=table.device_null())
        out.append(np.asarray(generators.to_pixels(pre, samples))[:len(chunk)])
    return np.concatenate(out)


def _prompt_markdown(result: dict) -> str:
    gen = result["generated"]
    sample = result["config"]["sample"]
    lines = [
        f"# Evaluation of `{result['checkpoint']}` (step {result['step']}) on test prompts",
        "",
        f"{result['num_prompts']} test prompts × {result['per_prompt']} samples "
        f"({result['num_samples']} images, {tuple(result['image_shape'])}), sampler "
        f"`{sample['method']}` with {sample['num_steps']} steps, shift {sample['shift']}, CFG "
        f"{sample['guidance_scale']}, seed {result['config']['seed']}. Per-class image metrics "
        "(FD, recall, realism) do not apply: there are no real images of these prompts.",
        "",
        "| | generated |",
        "|---|---:|",
        f"| combined reward {result['combined_weights']} | {gen['combined_reward']:.4f} |",
    ]
    for name, value in gen["rewards"].items():
        lines.append(f"| reward `{name}` | {value:.4f} |")
    lines.append(f"| out of range (|x| > 1 + {result['config']['metrics']['range_tolerance']}) |"
                 f" {gen['out_of_range']:.4f} |")
    lines.append(f"| ρ = ‖v_θ‖/‖v_ref‖ | {result['norm_ratio']['mean']:.4f} |")
    return "\n".join(lines) + "\n"


def run_prompts(config: ml_collections.ConfigDict, workdir: str, pre: generators.Pretrained,
                ref: generators.Pretrained | None, table: conditioning.PromptTable,
                t0: float | None = None) -> dict:
    """The evaluation of a generator per test prompt (:func:`by_prompt`).

    Samples ``config.sample.per_class`` images of each of the first ``config.max_prompts``
    test prompts (0: all) at fixed seeds, scores them with every reward defined for its images
    (``rewards.applicable``: e.g. CLIP score / PickScore when their folders are given, the
    pixel proxies; the classifier rewards need a library dataset and do not apply) and the
    configured combined reward, each asked about the sample's own prompt (its request), and
    writes ``evaluation.json`` (means, per-prompt means, ρ against the base of an RL run),
    ``evaluation.md`` and ``samples_eval.png`` (one row per prompt, at most 8 × 8).
    """
    t0 = time.time() if t0 is None else t0
    if config.sample.renormalize and ref is None:
        raise config_checks.ConfigError(
            "config.sample.renormalize needs an RL checkpoint (its base is the reference), got "
            f"{config.checkpoint!r}")
    max_prompts = int(config.get("max_prompts", 0))
    count = len(table) if max_prompts <= 0 else min(max_prompts, len(table))
    if not count:
        raise config_checks.ConfigError(f"{config.checkpoint!r}: its prompt table has no test "
                                        "prompts to evaluate")
    per = int(config.sample.per_class)
    index = np.repeat(np.arange(count, dtype=np.int32), per)
    base_config = (ref or pre).config
    nets = None
    if pre.vae is None:
        nets = auxnets.AuxNetCache(base_config.data.name, aux_dir=config.aux.dir,
                                   data_dir=config.data_dir or base_config.data.data_dir or None,
                                   preset=config.aux.preset)
    shape = generators.pixel_shape(pre)
    ctx = rewards.RewardContext(dataset=base_config.data.name, image_shape=shape,
                                num_classes=pre.num_classes, nets=nets,
                                prompts=tuple(table.texts), model_dirs=dict(config.reward_models))
    weights, fields = rewards.config_weights(config)
    rewards.check_weights(weights, ctx, fields=fields)
    folder = paths.path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    reward_fns = {name: rewards.build_reward(name, ctx)
                  for name in dict.fromkeys([*rewards.applicable(ctx), *weights])}
    images = generate_prompts(pre, table, index, config.sample, config.seed,
                              renormalize_to=ref.params if config.sample.renormalize else None)
    requests = table.request(index)
    per_image = rewards.score_images(reward_fns, images, requests, config.metrics.batch_size)
    total = sum(w * per_image[name] for name, w in weights.items())
    norm_ratio = {"mean": 1.0, "per_step": [1.0] * config.sample.num_steps}
    if ref is not None:
        first = index[:config.sample.batch_size]
        ratios = diagnostics.velocity_norm_ratios(
            pre.velocity, pre.params, ref.params, jax.tree.map(jnp.asarray, table.cond(first)),
            jax.random.fold_in(jax.random.key(config.seed), 0),
            image_shape=tuple(pre.image_shape), num_steps=config.sample.num_steps,
            shift=config.sample.shift, guidance_scale=config.sample.guidance_scale,
            null_class=pre.num_classes, null_condition=table.device_null())
        steps = np.asarray(jnp.mean(ratios, axis=1))
        norm_ratio = {"mean": float(steps.mean()), "per_step": [float(r) for r in steps]}
    tol = config.metrics.range_tolerance
    result = {
        "checkpoint": config.checkpoint, "step": int(pre.step), "prompts": "test prompts",
        "num_prompts": int(count), "per_prompt": per, "num_samples": int(len(images)),
        "image_shape": list(shape), "norm_ratio": norm_ratio, "combined_weights": weights,
        "config": config.to_dict(),
        "generated": {
            "rewards": {k: float(np.mean(v)) for k, v in per_image.items()},
            "combined_reward": float(np.mean(total)),
            "out_of_range": float(np.mean(np.abs(images) > 1.0 + tol)),
        },
        "per_prompt_rewards": [
            {"prompt": table.texts[i], **{k: float(np.mean(v[index == i]))
                                         for k, v in per_image.items()}}
            for i in range(count)],
    }
    (folder / "evaluation.json").write_text(json.dumps(result, indent=1))
    (folder / "evaluation.md").write_text(_prompt_markdown(result))
    rows, cols = min(count, 8), min(per, 8)
    keep = np.concatenate([np.arange(i * per, i * per + cols) for i in range(rows)])
    reporting.save_png(folder / "samples_eval.png", reporting.image_grid(images[keep], cols),
                       upscale=1 if shape[0] >= 128 else 2)
    logging.info("Evaluated %s (step %d) on %d test prompts in %.1f s:\n%s", config.checkpoint,
                 pre.step, count, time.time() - t0, _prompt_markdown(result))
    return result


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates ``config.checkpoint`` (a pretraining or RL workdir); returns the dict written
    to ``evaluation.json``. For an RL workdir the velocity-norm ratio to its base is included."""
    validate(config)
    step = None if config.checkpoint_step == -1 else config.checkpoint_step
    t0 = time.time()
    if generators.is_pipeline_folder(config.checkpoint):   # a base model before RL
        pipeline = ml_collections.ConfigDict(config.base.to_dict())
        pipeline.diffusers_dir = config.checkpoint
        pre, ref = generators.load_diffusers(pipeline), None
    else:
        pre, ref = generators.load_generator(config.checkpoint, use_ema=config.use_ema,
                                             step=step)
    table = generators.prompt_table(ref or pre, "test")
    if by_prompt(pre, table):
        return run_prompts(config, workdir, pre, ref, table, t0)
    base_config = (ref or pre).config
    dataset = base_config.data.name
    data_dir = config.data_dir or base_config.data.data_dir or None
    nets = auxnets.AuxNetCache(dataset, aux_dir=config.aux.dir, data_dir=data_dir,
                               preset=config.aux.preset)
    ctx = rewards.RewardContext(dataset=dataset, image_shape=tuple(pre.image_shape),
                                num_classes=pre.num_classes, nets=nets,
                                model_dirs=dict(config.reward_models))
    weights, fields = rewards.config_weights(config)
    rewards.check_weights(weights, ctx, fields=fields)
    folder = paths.path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    reward_fns = {name: rewards.build_reward(name, ctx)
                  for name in dict.fromkeys([*rewards.applicable(ctx), *weights])}
    combined = rewards.build_combined(weights, ctx, fields=fields)
    qnets = quality.quality_nets(nets, config.metrics.batch_size)
    ref_split = data.load_split(dataset, config.reference_split, data_dir)
    reference = quality.make_reference(ref_split.images, ref_split.labels, qnets,
                                          k=config.metrics.knn_k)

    labels = sampling.class_grid_labels(pre.num_classes, config.sample.per_class)
    table = generators.prompt_table(ref or pre, "test")
    if config.sample.renormalize and ref is None:
        raise config_checks.ConfigError(
            "config.sample.renormalize needs an RL checkpoint (its base is the reference), got "
            f"the pretraining workdir {config.checkpoint!r}")
    samples = generate_set(pre, labels, config.sample, config.seed,
                           renormalize_to=ref.params if config.sample.renormalize else None,
                           table=table)
    real_images, real_labels = first_per_class(data.load_split(dataset, "train", data_dir),
                                               config.sample.per_class)
    result = {
        "checkpoint": config.checkpoint, "step": int(pre.step), "dataset": dataset,
        "norm_ratio": norm_ratio_summary(pre, ref, labels, config.sample, config.seed, table),
        "prompts": "classes" if table.is_class else "held-out prompts of each class",
        "num_samples": int(len(samples)), "reference_size": int(reference.size),
        "combined_weights": weights, "config": config.to_dict(),
        "aux_nets": {name: {k: v for k, v in net.meta.items() if k.startswith("heldout")}
                     for name, net in sorted(nets.loaded().items())},
        "generated": score_set(samples, labels, reward_fns, combined, reference, qnets, config),
        "real_train": score_set(real_images, real_labels, reward_fns, combined, reference, qnets,
                                config),
    }
    (folder / "evaluation.json").write_text(json.dumps(result, indent=1))
    (folder / "evaluation.md").write_text(_markdown(result))
    shown = min(config.sample.per_class, 8)
    keep = np.concatenate([np.arange(c * config.sample.per_class, c * config.sample.per_class
                                     + shown) for c in range(pre.num_classes)])
    reporting.save_png(folder / "samples_eval.png",
                       reporting.image_grid(samples[keep], shown), upscale=2)
    logging.info("Evaluated %s (step %d) in %.1f s:\n%s", config.checkpoint, pre.step,
                 time.time() - t0, _markdown(result))
    return result

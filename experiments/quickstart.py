"""The ``quickstart`` job: base model → RL with and without NormGuard → one comparison table.

Run (from the repository root; README command 1, config in configs/quickstart.py):
  python -m normguard_jax.main --config=configs/quickstart.py --workdir=workdir/quickstart
An experiment, not library code: normguard_jax.main maps ``job = "quickstart"`` to this module.

``run(config, workdir)`` chains the library's jobs, each in its own sub-directory of ``workdir``:

1. ``base/`` (or ``config.base_workdir`` when set): pretrains the base generator
   (``config.pretrain``), or reuses it when finished;
2. the reward and metric nets are trained on first use into ``config.aux_dir`` (shared cache);
3. ``rl_unguarded/`` and ``rl_normguard/``: the same RL run (``config.rl``) with NormGuard off
   and with ``normguard.weight = config.guard_weight``;
4. ``eval_base/``, ``eval_unguarded/``, ``eval_normguard/``: every reward and quality metric at
   fixed seeds (``config.evaluate``), plus ρ = ‖v_θ‖/‖v_ref‖ along the ODE trajectory;
5. ``quickstart.md`` / ``quickstart.json``: the table, also printed.

Every stage resumes: a finished stage is skipped, an interrupted one continues from its last
checkpoint, so a second call costs seconds and a call after a kill loses at most one interval.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from experiments import tables
from normguard_jax import checkpointing, config_checks, evaluate, pretrain, rl, sharding

RUNS = ("unguarded", "normguard")  # the arms: λ = 0 and λ = config.guard_weight.
# Columns of the table: (label, path in evaluation.json, format).
COLUMNS = (
    ("reward (combined) ↑", ("generated", "combined_reward"), "{:.3f}"),
    ("p(class) ↑", ("generated", "rewards", "classifier_prob"), "{:.3f}"),
    ("log p(class) ↑", ("generated", "rewards", "classifier_logprob"), "{:.3f}"),
    ("contrast ↑", ("generated", "rewards", "contrast"), "{:.3f}"),
    ("shapes rule ↑", ("generated", "rewards", "shapes_rule"), "{:.3f}"),
    ("colour and shape right ↑", ("generated", "rewards", "shapes_correct"), "{:.3f}"),
    ("FD ↓", ("generated", "quality", "fd"), "{:.2f}"),
    ("judged real ↑", ("generated", "quality", "realism"), "{:.3f}"),
    ("precision ↑", ("generated", "quality", "precision"), "{:.3f}"),
    ("recall ↑", ("generated", "quality", "recall"), "{:.3f}"),
    ("out of range ↓", ("generated", "quality", "out_of_range"), "{:.3f}"),
    ("ρ = ‖v_θ‖/‖v_ref‖", ("norm_ratio", "mean"), "{:.3f}"),
)


def base_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the base model lives: ``config.base_workdir``, or ``<workdir>/base``."""
    return config.base_workdir or os.path.join(workdir, "base")


def rl_config(config: ml_collections.ConfigDict, workdir: str, run: str
              ) -> ml_collections.ConfigDict:
    """The RL config of one arm: ``config.rl`` on the quickstart base, guarded or not."""
    c = ml_collections.ConfigDict(config.rl.to_dict())
    c.base.workdir = base_workdir(config, workdir)
    c.aux_dir = config.aux_dir
    c.normguard.weight = config.guard_weight if run == "normguard" else 0.0
    return c


def evaluate_config(config: ml_collections.ConfigDict, checkpoint: str
                    ) -> ml_collections.ConfigDict:
    """The evaluation config of one checkpoint (pretraining or RL workdir)."""
    c = ml_collections.ConfigDict(config.evaluate.to_dict())
    c.checkpoint = checkpoint
    c.aux.dir = config.aux_dir
    c.rewards = ml_collections.ConfigDict(config.rl.rewards.to_dict())  # the reward RL optimised
    c.extra_rewards = config.rl.extra_rewards
    c.reward_models = ml_collections.ConfigDict(config.rl.reward_models.to_dict())
    return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Validates every stage's config before anything is trained or compiled."""
    config_checks.number(config, "guard_weight", 0, strict_minimum=True)
    if not arms(config):
        raise config_checks.ConfigError(
            f"config.arms must be a comma-separated subset of {list(RUNS)}, got {config.arms!r}")
    checks = [("pretrain", lambda: pretrain.validate(config.pretrain))]
    checks += [("rl", lambda run=run: rl.validate(rl_config(config, "<workdir>", run),
                                                  num_devices)) for run in arms(config)]
    checks += [("evaluate", lambda: evaluate.validate(evaluate_config(config, "<workdir>/base")))]
    for section, check in checks:
        try:
            check()
        except config_checks.ConfigError as e:  # name the field as the user writes it
            raise config_checks.ConfigError(
                str(e).replace("config.", f"config.{section}.", 1)) from None


def arms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The arms to run, in ``RUNS`` order; empty when ``config.arms`` names anything else."""
    names = [a.strip() for a in config.arms.split(",") if a.strip()]
    if not names or set(names) - set(RUNS):
        return ()
    return tuple(r for r in RUNS if r in names)


def _finished(workdir: str, steps: int) -> bool:
    if not checkpointing.has_checkpoints(workdir):
        return False
    try:
        step, _ = checkpointing.read_meta(workdir)
    except FileNotFoundError:
        return False
    return step >= steps


def _evaluate_cached(config: ml_collections.ConfigDict, checkpoint: str, out: str) -> dict:
    """Evaluates ``checkpoint`` into ``out`` unless an identical evaluation is already there."""
    eval_config = evaluate_config(config, checkpoint)
    path = os.path.join(out, "evaluation.json")
    step, _ = checkpointing.read_meta(checkpoint)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        # Same config, up to fields added since it was written at their old behaviour.
        if not config_checks.changed_fields(previous["config"], eval_config) \
                and previous["step"] == step:
            logging.info("Reusing the evaluation in %s", out)
            return previous
    return evaluate.run(eval_config, out)


def _lookup(result: dict, path: tuple[str, ...]):
    for key in path:
        if key not in result:
            return None
        result = result[key]
    return result


def table(results: dict[str, dict]) -> str:
    """Markdown table, one row per evaluated model (``results``: name -> evaluation.json);
    columns that no result has (e.g. the shapes rewards of a digits run) are left out."""
    columns = [col for col in COLUMNS
               if any(_lookup(r, col[1]) is not None for r in results.values())]
    lines = tables.header(["model", *(label for label, _, _ in columns)], left=1)
    for name, result in results.items():
        lines.append(tables.row([name, *(tables.fmt(_lookup(result, path), spec)
                                         for _, path, spec in columns)]))
    return "\n".join(lines)


def _markdown(config, results: dict, seconds: dict) -> str:
    r = config.rl
    e = config.evaluate
    return "\n".join([
        "# Quickstart: RL post-training with and without NormGuard",
        "",
        f"Base: `{config.pretrain.model.arch}`/`{config.pretrain.model.size}` on "
        f"`{config.pretrain.data.name}`"
        + (f" with captions `{config.pretrain.data.captions}` (word encoder)"
           if config.pretrain.data.get("captions") else "")
        + f", {config.pretrain.train.steps} flow-matching steps. "
        f"RL: `{r.method}`, {r.train.iterations} iterations of {r.rollout.prompts_per_iter} "
        f"prompts × {r.rollout.group_size} samples ({r.rollout.sampler}, "
        f"{r.rollout.num_steps} steps, CFG {r.rollout.guidance_scale}), reward "
        f"{dict(r.rewards)}; NormGuard: {config.rl.normguard.form} hinge, power "
        f"{config.rl.normguard.power}, λ = {config.guard_weight}.",
        f"Evaluation: {e.sample.per_class} samples per class at fixed seeds, "
        f"{e.sample.method} with {e.sample.num_steps} steps, CFG {e.sample.guidance_scale}; "
        "FD, judged real and precision/recall against the held-out split. "
        "ρ is the mean over ODE steps and samples of ‖v_θ(x_k)‖/‖v_ref(x_k)‖ on θ's own "
        "trajectory (1 for the base by definition).",
        "",
        table(results),
        "",
        "Wall time per stage (s, this call; a reused stage costs ~0): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
    ])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the quickstart in ``workdir``; returns ``{model: evaluation}``.

    On SIGTERM the running stage checkpoints and the job returns ``{}`` without starting the
    next stage; calling it again resumes.
    """
    mesh = sharding.make_mesh(config.rl.mesh.data, config.rl.mesh.fsdp)
    validate(config, mesh.devices.size)
    os.makedirs(workdir, exist_ok=True)
    seconds = {}
    t0 = time.time()
    base_dir = base_workdir(config, workdir)
    if not _finished(base_dir, config.pretrain.train.steps):
        logging.info("Quickstart 1/3: pretraining the base model into %s", base_dir)
        state = pretrain.run(config.pretrain, base_dir)
        if int(state.step) < config.pretrain.train.steps:  # SIGTERM: checkpointed, stop here
            logging.warning("Quickstart stopped during pretraining; rerun to resume.")
            return {}
    seconds["pretrain"] = time.time() - t0
    for run_name in arms(config):
        t0 = time.time()
        c = rl_config(config, workdir, run_name)
        out = os.path.join(workdir, f"rl_{run_name}")
        if not _finished(out, c.train.iterations):
            logging.info("Quickstart 2/3: RL (%s, λ = %g) into %s", c.method,
                         c.normguard.weight, out)
            state = rl.run(c, out)
            if int(state.iteration) < c.train.iterations:  # SIGTERM: checkpointed, stop here
                logging.warning("Quickstart stopped during RL (%s); rerun to resume.", run_name)
                return {}
        seconds[f"rl {run_name}"] = time.time() - t0
    results = {}
    models = [("base", base_dir, "eval_base")] + [
        (f"{config.rl.method} {r}", os.path.join(workdir, f"rl_{r}"), f"eval_{r}")
        for r in arms(config)]
    for name, checkpoint, out in models:
        t0 = time.time()
        logging.info("Quickstart 3/3: evaluating %s", checkpoint)
        results[name] = _evaluate_cached(config, checkpoint, os.path.join(workdir, out))
        seconds[f"eval {name}"] = time.time() - t0
    text = _markdown(config, results, seconds)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "quickstart.md"), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(workdir, "quickstart.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config.to_dict(), "seconds": seconds, "results": results}, f,
                      indent=1)
    print(text, flush=True)
    return results

"""Norm inflation, inference-time renormalisation and adjoint sensitivity of RL checkpoints.

Usage (from the repository root, after the quickstart or experiments/rl_methods.py):
  .venv/bin/python experiments/norm_analyses.py --runs workdir/quickstart/rl_unguarded,workdir/quickstart/rl_normguard \
      [--out experiments/results/norm_analyses] [--per_class 10] [--num_steps 20] \
      [--sensitivity_rewards classifier_logprob,contrast] [--batches 5]

For every RL workdir (its newest checkpoint against its own base model):
1. ρ_k = ‖v_θ(x_k)‖/‖v_ref(x_k)‖ at every ODE step on θ's own trajectory (fixed seeds), and
   the trajectory mean at every saved checkpoint (norm inflation over training);
2. reward and quality of θ sampled plainly and, for unguarded runs (λ = 0), also with v_θ
   rescaled to ‖v_ref‖ at every step (the evaluate job with ``sample.renormalize``), so the
   renormalised unguarded model sits next to the same model unmodified and to the guarded
   runs (``--renormalise_all`` renormalises the guarded runs too);
3. the adjoint sensitivity g_k = dR/dε_k of a differentiable reward to scaling the velocity of
   step k by (1+ε), for the base and for θ: per-step mean, std, t-statistic and fraction of
   positive signs. The reward is the run's own, or each of ``--sensitivity_rewards`` (names of
   normguard_jax.rewards.REWARDS; the non-differentiable ones are skipped with a message);
4. the batch-level adjoint signal, the paper's claim (rescaling the velocity magnitude carries no
   coherent first-order reward signal at the batch level), on ``--batches`` independent batches
   (seeds seed, seed+1, …; the per-step summary of 3. is batch 0): the global derivative
   G = Σ_k g_k along a uniform rescale of every step, its batch means, their t-statistic and
   sign consistency, for the base and θ; and for θ the first-order prediction
   Σ_k g_k·(1/ρ_k − 1) of renormalising to ‖v_ref‖ against the measured change of sampling with
   those scales and of the renormalised sampler (diagnostics.renormalisation_first_order).
Writes ``<out>.md``, ``<out>.json`` and ``<out>_*.png``. Compiled programs go to the
persistent XLA cache (normguard_jax.compile_cache), so runs of one architecture compile once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

import configs  # noqa: E402
from experiments import tables  # noqa: E402
from normguard_jax import (auxnets, checkpointing, compile_cache,  # noqa: E402
                           diagnostics, evaluate, generators, rewards, sampling)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ratio_profile(policy, base, labels, seed, num_steps, shift, guidance):
    ratios = diagnostics.velocity_norm_ratios(
        policy.velocity, policy.params, base.params, jnp.asarray(labels),
        jax.random.key(seed), image_shape=tuple(base.image_shape), num_steps=num_steps,
        shift=shift, guidance_scale=guidance, null_class=base.num_classes)
    return np.asarray(jnp.mean(ratios, axis=1))


def ratio_over_training(workdir, policy, base, newest_profile, labels, seed, num_steps, shift,
                        guidance):
    """Trajectory-mean ρ at every saved checkpoint: {step: mean ρ}. The newest checkpoint
    (``policy``) has it as the mean of ``newest_profile``; the others are restored on ``base``,
    so they share its velocity function and the ratio program compiles once."""
    steps = checkpointing.steps(workdir)
    out = {}
    for step in sorted(steps):
        if int(step) == policy.step:
            out[int(step)] = float(newest_profile.mean())
            continue
        older, _ = generators.load_policy(workdir, step=step, base=base)
        out[int(step)] = float(ratio_profile(older, base, labels, seed, num_steps, shift,
                                             guidance).mean())
    return out


def base_signal(base, labels, seeds, reward_fn, num_steps, shift, guidance):
    """The base's per-step sensitivity (batch 0) and batch-level global derivative G_b.

    Returns ``(per_step, batch_level, g)``: :func:`diagnostics.sensitivity_summary` of the first
    seed's (T, B) g; ``{"global_derivative": batch_level_summary}`` of G over the seeds'
    batches; and g itself as (N, T, B) numpy."""
    g = np.stack([np.asarray(diagnostics.adjoint_sensitivity(
        base.velocity, base.params, jnp.asarray(labels), jax.random.key(seed),
        reward_fn=reward_fn, image_shape=tuple(base.image_shape), num_steps=num_steps,
        shift=shift, guidance_scale=guidance, null_class=base.num_classes)) for seed in seeds])
    return (diagnostics.sensitivity_summary(g[0]),
            {"global_derivative": diagnostics.batch_level_summary(g.sum(axis=1))}, g)


def policy_signal(policy, base, labels, seeds, reward_fn, num_steps, shift, guidance):
    """θ's per-step sensitivity (batch 0) and its batch-level signal against θ_ref.

    One :func:`diagnostics.renormalisation_first_order` call per seed (batch). Returns
    ``(per_step, batch_level)``: the per-step summary of the first batch, and a dict with the
    batch-level summaries of G, of the predicted, measured (fixed scales 1/ρ) and renormalised
    ΔR, the prediction's agreement with both measurements, reward mean and std, the mean
    ε = 1/ρ − 1, and the per-sample (N, B) lists of G, predicted, measured and renormalised
    (for the figure)."""
    outs = [{k: np.asarray(v, np.float64) for k, v in diagnostics.renormalisation_first_order(
        policy.velocity, policy.params, base.params, jnp.asarray(labels), jax.random.key(seed),
        reward_fn=reward_fn, image_shape=tuple(base.image_shape), num_steps=num_steps,
        shift=shift, guidance_scale=guidance, null_class=base.num_classes).items()}
        for seed in seeds]
    per = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
    changes = ("global_derivative", "predicted", "measured", "renormalised")
    batch_level = {k: diagnostics.batch_level_summary(per[k]) for k in changes}
    batch_level.update(
        agreement=diagnostics.first_order_agreement(per["predicted"], per["measured"]),
        agreement_renormalised=diagnostics.first_order_agreement(per["predicted"],
                                                                 per["renormalised"]),
        reward_mean=float(per["reward"].mean()), reward_std=float(per["reward"].std()),
        eps_mean=float(per["eps"].mean()),
        per_sample={k: per[k].tolist() for k in changes})
    return diagnostics.sensitivity_summary(per["g"][0]), batch_level


def evaluate_variants(workdir, out_dir, per_class, num_steps, guidance, run_config, renormalise):
    """The evaluate job on the run's newest checkpoint: {"plain": result} and, if
    ``renormalise``, {"renormalised": result} with v_θ rescaled to ‖v_ref‖ at every step."""
    results = {}
    variants = (("plain", False), ("renormalised", True)) if renormalise else (("plain", False),)
    for name, renorm in variants:
        c = configs.load(os.path.join(REPO, "configs", "evaluate.py"))
        c.checkpoint = workdir
        c.aux.dir = run_config.aux_dir
        c.rewards = ml_collections.ConfigDict(run_config.rewards.to_dict())
        c.sample.update(per_class=per_class, num_steps=num_steps, guidance_scale=guidance,
                        renormalize=renorm)
        results[name] = evaluate.run(c, os.path.join(out_dir, name))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated RL workdirs")
    parser.add_argument("--out", default="experiments/results/norm_analyses")
    parser.add_argument("--per_class", type=int, default=10)
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sensitivity_rewards", default="",
                        help="comma-separated reward names for the adjoint sensitivity "
                             "('' = each run's own reward)")
    parser.add_argument("--batches", type=int, default=5,
                        help="independent batches (seeds seed … seed+batches−1) for the "
                             "batch-level adjoint signal")
    parser.add_argument("--analyses_dir", default="",
                        help="where the evaluations are written, one folder per run named "
                             "after it ('' = <run>/analyses; set it for runs you may not "
                             "write into)")
    parser.add_argument("--renormalise_all", action="store_true",
                        help="also evaluate the guarded runs (λ > 0) with renormalisation")
    parser.add_argument("--compilation_cache", default=compile_cache.DEFAULT_DIR,
                        help="persistent XLA compilation cache ('' = off)")
    args = parser.parse_args()
    compile_cache.enable(args.compilation_cache)
    unknown = sorted({r for r in args.sensitivity_rewards.split(",") if r} - set(rewards.REWARDS))
    if args.batches < 1:
        parser.error("--batches must be ≥ 1")
    if unknown:
        parser.error(f"unknown rewards {unknown}; choose from {sorted(rewards.REWARDS)}")
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if not checkpointing.steps(r):
            parser.error(f"{r} has no checkpoint")
        if not generators.is_rl_workdir(r):
            parser.error(f"{r} is not an RL workdir")

    record = {}
    base_sensitivity = {}  # runs that share a base model and reward share its sensitivity
    seeds = [args.seed + i for i in range(args.batches)]
    for run in runs:
        policy, base = generators.load_policy(run)
        cfg = policy.config
        guidance = float(cfg.sample.guidance_scale)
        labels = sampling.class_grid_labels(base.num_classes, args.per_class)
        print(f"[{run}] ρ_k profile", flush=True)
        profile = ratio_profile(policy, base, labels, args.seed, args.num_steps,
                                cfg.sample.shift, guidance)
        print(f"[{run}] ρ over training", flush=True)
        over_training = ratio_over_training(run, policy, base, profile, labels, args.seed,
                                            args.num_steps, cfg.sample.shift, guidance)
        renormalise = args.renormalise_all or float(cfg.normguard.weight) == 0.0
        print(f"[{run}] evaluation{' plain and renormalised' if renormalise else ''}", flush=True)
        analyses = (os.path.join(args.analyses_dir, os.path.basename(os.path.normpath(run)))
                    if args.analyses_dir else os.path.join(run, "analyses"))
        evals = evaluate_variants(run, analyses, args.per_class,
                                  args.num_steps, guidance, cfg, renormalise)
        nets = auxnets.AuxNetCache(base.config.data.name, aux_dir=cfg.aux_dir,
                                   data_dir=base.config.data.data_dir or None)
        ctx = rewards.RewardContext(dataset=base.config.data.name,
                                    image_shape=tuple(base.image_shape),
                                    num_classes=base.num_classes, nets=nets)
        names = [r for r in args.sensitivity_rewards.split(",") if r]
        weight_sets = ({n: {n: 1.0} for n in names} if names
                       else {"+".join(dict(cfg.rewards)): dict(cfg.rewards)})
        sens, batch_level = {}, {}
        for label, weights in weight_sets.items():
            reward = rewards.build_combined(weights, ctx)
            if not reward.differentiable:
                print(f"[{run}] reward {weights} is not differentiable: no sensitivity")
                continue
            print(f"[{run}] adjoint sensitivity of {label}", flush=True)
            fn = lambda images, cond, reward=reward: reward(images, cond)[0]
            key = (os.path.abspath(cfg.base.workdir), base.step, bool(cfg.base.use_ema), label,
                   float(cfg.sample.shift), guidance)
            if key not in base_sensitivity:
                base_sensitivity[key] = base_signal(base, labels, seeds, fn, args.num_steps,
                                                    cfg.sample.shift, guidance)[:2]
            print(f"[{run}] batch-level signal of {label} over {len(seeds)} batches", flush=True)
            policy_steps, policy_batches = policy_signal(policy, base, labels, seeds, fn,
                                                         args.num_steps, cfg.sample.shift,
                                                         guidance)
            sens[label] = {"base": base_sensitivity[key][0], "policy": policy_steps}
            batch_level[label] = {"base": base_sensitivity[key][1], "policy": policy_batches}
        record[run] = {"method": cfg.method, "normguard_weight": cfg.normguard.weight,
                       "rewards": dict(cfg.rewards), "ratio_per_step": profile.tolist(),
                       "ratio_over_training": over_training,
                       "evaluation": {k: {"combined_reward": v["generated"]["combined_reward"],
                                          "quality": v["generated"]["quality"]}
                                      for k, v in evals.items()},
                       "sensitivity": sens, "batch_level": batch_level}
    write(args, record)


def _or_dash(result, name, spec):
    """A reward or quality value of an evaluation result, formatted; — when there is none."""
    value = None if result is None else (
        result[name] if name in result else result["quality"][name])
    return tables.fmt(value, spec, missing="—")


def write(args, record):
    out = os.path.join(REPO, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, r in record.items():
        label = f"{r['method']} λ={r['normguard_weight']:g}"
        axes[0].plot(r["ratio_per_step"], marker="o", label=label)
        steps = sorted(r["ratio_over_training"], key=int)
        axes[1].plot([int(s) for s in steps], [r["ratio_over_training"][s] for s in steps],
                     marker="o", label=label)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="ODE step k (0 = noise)", ylabel="mean ρ_k", title="ρ_k on θ's trajectory")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(xlabel="RL iteration", ylabel="trajectory-mean ρ", title="ρ over training")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + "_ratio.png", dpi=120)
    plt.close(fig)

    with_sens = {run: r for run, r in record.items() if r["sensitivity"]}
    if with_sens:
        reward_names = sorted({k for r in with_sens.values() for k in r["sensitivity"]})
        fig, axes = plt.subplots(len(reward_names), 2, figsize=(10, 3.6 * len(reward_names)),
                                 squeeze=False)
        for row, reward_name in zip(axes, reward_names):
            for run, r in with_sens.items():
                if reward_name not in r["sensitivity"]:
                    continue
                for name, style in (("base", "--"), ("policy", "-")):
                    s = r["sensitivity"][reward_name][name]
                    label = f"{r['method']} λ={r['normguard_weight']:g} {name}"
                    row[0].plot(s["t_stat"], style, marker=".", label=label)
                    row[1].plot(s["frac_positive"], style, marker=".", label=label)
            row[0].axhline(0.0, color="grey", lw=0.8)
            row[0].set(xlabel="ODE step k", ylabel="t-statistic of dR/dε_k",
                       title=f"{reward_name}: does it want a larger velocity at step k?")
            row[1].axhline(0.5, color="grey", lw=0.8)
            row[1].set(xlabel="ODE step k", ylabel="fraction dR/dε_k > 0")
            row[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out + "_sensitivity.png", dpi=120)
        plt.close(fig)

    lines = ["# Norm inflation, renormalisation and adjoint sensitivity", "",
             "Command: `python experiments/norm_analyses.py " + " ".join(sys.argv[1:]) + "`", "",
             f"{args.per_class} samples per class, fixed seed {args.seed}, {args.num_steps}-step "
             "ODE with each run's sample-grid CFG. ρ_k is measured on θ's own trajectory with "
             "θ_ref evaluated on the same states. Renormalised columns (v_θ rescaled to ‖v_ref‖ "
             "at every step) are for unguarded runs" + (" and guarded ones" if args.renormalise_all
                                                       else "; — for guarded runs") + ".", "",
             "| run | method | λ | mean ρ | ρ at first / last step | reward plain | reward "
             "renormalised | FD plain | FD renormalised | recall plain | recall renormalised |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run, r in record.items():
        e = r["evaluation"]
        plain, renorm = e["plain"], e.get("renormalised")
        lines.append(
            f"| `{run}` | {r['method']} | {r['normguard_weight']:g} | "
            f"{np.mean(r['ratio_per_step']):.3f} | {r['ratio_per_step'][0]:.3f} / "
            f"{r['ratio_per_step'][-1]:.3f} | {plain['combined_reward']:.3f} | "
            f"{_or_dash(renorm, 'combined_reward', '{:.3f}')} | {plain['quality']['fd']:.2f} | "
            f"{_or_dash(renorm, 'fd', '{:.2f}')} | {plain['quality']['recall']:.3f} | "
            f"{_or_dash(renorm, 'recall', '{:.3f}')} |")
    lines += ["", "![ρ](" + os.path.basename(out) + "_ratio.png)", ""]
    if with_sens:
        lines += ["Adjoint sensitivity (t-statistic per ODE step; base dashed, policy solid):", "",
                  "![sensitivity](" + os.path.basename(out) + "_sensitivity.png)", "",
                  "| run | reward | model | t-statistic per step | fraction positive per step |",
                  "|---|---|---|---|---|"]
        for run, r in with_sens.items():
            for reward_name, by_model in r["sensitivity"].items():
                for name in ("base", "policy"):
                    s = by_model[name]
                    lines.append(f"| `{run}` | {reward_name} | {name} | "
                                 + " ".join(f"{t:+.1f}" for t in s["t_stat"]) + " | "
                                 + " ".join(f"{p:.2f}" for p in s["frac_positive"]) + " |")
    with_batches = {run: r for run, r in record.items() if r["batch_level"]}
    if with_batches:
        plot_batch_level(with_batches, out + "_batch_level.png")
        lines += batch_level_lines(with_batches, args, os.path.basename(out) + "_batch_level.png")
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _signed(s):
    """A batch-level summary as 'mean ± s.e.' over its batch means."""
    mean, se = tables.mean_se(s["batch_means"])
    return f"{mean:+.3g} ± {se:.2g}"


def batch_level_lines(record, args, figure):
    """The markdown section "Batch-level adjoint signal" for the runs that have one."""
    n = len(next(iter(next(iter(record.values()))["batch_level"].values()))["base"][
        "global_derivative"]["batch_means"])
    lines = ["", "## Batch-level adjoint signal", "",
             "The paper's claim: rescaling the velocity magnitude carries *no coherent first-order "
             "reward signal at the batch level*. G = Σ_k dR/dε_k is the derivative of a sample's "
             "reward along a uniform rescale v → (1+ε)·v of every ODE step (a +1 % rescale "
             "changes the reward by about 0.01·G). "
             f"{n} independent batches of {args.per_class} samples per class (seeds "
             f"{args.seed}…{args.seed + n - 1}); t is the t-statistic of the batch means over "
             "batches; 'sign' columns are the fractions of batches and of samples whose G has "
             "the sign of the overall mean.", "",
             *tables.header(["run", "reward", "model", "G per batch", "mean G ± s.e.",
                             "t over batches", "batches with sign", "samples with sign"],
                            left=3)]
    for run, r in record.items():
        for reward_name, by_model in r["batch_level"].items():
            for name in ("base", "policy"):
                s = by_model[name]["global_derivative"]
                lines.append(tables.row([
                    f"`{run}`", reward_name, name,
                    " ".join(f"{m:+.3g}" for m in s["batch_means"]), _signed(s),
                    f"{s['t_stat']:+.1f}", f"{s['frac_batches_with_sign']:.2f}",
                    f"{s['frac_samples_with_sign']:.2f}"]))
    lines += ["", "Renormalisation along its own direction: ε_k = 1/ρ_k − 1 per step and sample "
              "(ρ on θ's plain trajectory); predicted ΔR = Σ_k g_k·ε_k (first order); measured "
              "ΔR = reward of sampling with v_k·(1+ε_k) minus the plain reward, same noise; "
              "renormalised ΔR = the renormalised sampler (scale recomputed on its own states). "
              "Slope and correlation compare measured with predicted over all samples. Means ± "
              "s.e. over batches.", "",
              *tables.header(["run", "reward", "mean ε", "reward (std)", "predicted ΔR",
                              "measured ΔR", "renormalised ΔR", "slope", "correlation",
                              "sign agreement"], left=2)]
    for run, r in record.items():
        for reward_name, by_model in r["batch_level"].items():
            p = by_model["policy"]
            a = p["agreement"]
            lines.append(tables.row([
                f"`{run}`", reward_name, f"{p['eps_mean']:+.4f}",
                f"{p['reward_mean']:.3f} ({p['reward_std']:.3f})",
                _signed(p["predicted"]), _signed(p["measured"]), _signed(p["renormalised"]),
                f"{a['slope']:.2f}", f"{a['correlation']:.2f}", f"{a['sign_agreement']:.2f}"]))
    lines += ["", f"![batch-level signal]({figure})", ""]
    return lines


def plot_batch_level(record, path):
    """Left: G per batch (base hollow, θ filled) per run and reward; right: measured against
    predicted ΔR of renormalisation, one point per sample."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    row = 0
    ticks = []
    for run, r in record.items():
        for reward_name, by_model in r["batch_level"].items():
            for name in ("base", "policy"):
                means = by_model[name]["global_derivative"]["batch_means"]
                colour = f"C{(row // 2) % 10}"
                axes[0].scatter(means, [row] * len(means), marker="o", edgecolors=colour,
                                facecolors="none" if name == "base" else colour)
                ticks.append(f"{r['method']} λ={r['normguard_weight']:g} {reward_name} {name}")
                row += 1
            p = by_model["policy"]["per_sample"]
            axes[1].scatter(np.ravel(p["predicted"]), np.ravel(p["measured"]), s=6,
                            label=f"{r['method']} λ={r['normguard_weight']:g} {reward_name}")
    axes[0].axvline(0.0, color="grey", lw=0.8)
    axes[0].set_yticks(range(row), ticks, fontsize=6)
    axes[0].set(xlabel="batch mean of G = Σ_k dR/dε_k", title="uniform rescale: G per batch")
    axes[0].ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    lim = axes[1].get_xlim()
    axes[1].plot(lim, lim, color="grey", lw=0.8)
    axes[1].set(xlabel="predicted ΔR (first order)", ylabel="measured ΔR (scales 1/ρ)",
                title="renormalisation: per sample")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

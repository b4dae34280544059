"""NormGuard where the norm inflates (RAM, m = 4): seeds, λ, form, power, margin, early stopping.

Usage (from the repository root; resumable: rerun after an interruption and finished cells
are skipped):
  python experiments/guard_ablation.py [--study ram_logprob|awm_contrast]
      [--stages base,sweep,analyse,norms] [--num_hosts N --host_index i]
``--stages analyse`` only rewrites the results from the finished cells. ``--study`` picks the
setting (configs/sweeps/guard_ablation.py:STUDIES): ``ram_logprob`` (default; seeds, early
stopping and every ablation arm; results ``guard_ablation.*``) or ``awm_contrast`` (AWM on the
contrast reward, the main table's hardest reward hack with ρ > 1; seeds and early stopping;
``guard_ablation_awm_contrast.*``).

Stages:
- ``base``: pretrains the quickstart's digits base (configs/table_base.py:digits) if missing;
- ``sweep``: ``python -m experiments.sweep --config=configs/sweeps/guard_ablation.py`` (the
  cells and the reasons for their settings are in that file's docstring);
- ``analyse``: reads every finished evaluation and training log and writes
  ``experiments/results/guard_ablation.md``, ``.json``, ``guard_ablation_training.png`` and
  ``guard_ablation_tradeoff.png``;
- ``norms``: experiments/norm_analyses.py on the seed-0 unguarded and guarded runs: ρ_k per
  sampling step and over training, sampling with v_θ rescaled to ‖v_ref‖ (does inference-time
  renormalisation repair an inflated model?) and the adjoint sensitivity under the log-prob
  and the contrast reward (``experiments/results/guard_ablation_norms.*``).

What it measures. (1) Over ``SEEDS`` seeds, unguarded against the default guard (λ = 0.1,
relative hinge): mean ± standard error of every metric and of the paired difference, so a
gap can be read against the run-to-run spread instead of one pair. (2) The early-stopping
control on every seed: each guarded run against its own seed's unguarded checkpoints
(iterations 0, 8, 16, 24) at the same reward. (3) The hinge's strength, form, power and
margin on seed 0, next to the seed spread of (1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs import rl_table  # noqa: E402
from configs.sweeps import guard_ablation as ablation  # noqa: E402
from experiments import sweep, table_sweeps, tables  # noqa: E402

REPO = table_sweeps.REPO
RESULTS = table_sweeps.RESULTS
# The study analysed (configs/sweeps/guard_ablation.py:STUDIES); ``--study`` selects another.
ST = ablation.study()
REWARD_NAMES = {"digits_logprob": "log p(class)", "digits_contrast": "contrast"}


def reward_name() -> str:
    """Display name of the study's training reward."""
    return REWARD_NAMES.get(ST.setting, ST.setting)


def out_name(suffix: str = "") -> str:
    """Results file stem: ``guard_ablation`` for the default study, else with its name."""
    stem = ("guard_ablation" if ST.name == ablation.DEFAULT_STUDY
            else f"guard_ablation_{ST.name}")
    return stem + suffix


def metric_label(key: str, label: str) -> str:
    """Column label of a metric; the reward's names the study's reward."""
    return f"{reward_name()} ↑" if key == "reward" else label


METRICS = (("reward", "reward ↑", "{:.2f}"), ("fd", "FD ↓", "{:.2f}"),
           ("recall", "recall ↑", "{:.3f}"), ("realism", "judged real ↑", "{:.3f}"),
           ("precision", "precision ↑", "{:.3f}"), ("out_of_range", "out of range ↓", "{:.3f}"),
           ("rho", "ρ (sampling)", "{:.3f}"))
STAGES = ("base", "sweep", "analyse", "norms")
# Rewards of the adjoint sensitivity in the ``norms`` stage: the trained one and a pixel proxy.
SENSITIVITY_REWARDS = "classifier_logprob,contrast"


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def evaluation(name: str) -> dict | None:
    """Summary (reward, quality, ρ) of the finished evaluation cell ``name``, or None."""
    return table_sweeps.summarise(table_sweeps.load_eval(ST.workroot, name), ST.setting)


def training_log(rl_cell: str) -> dict[str, np.ndarray]:
    """Per-iteration series of one RL cell's metrics.jsonl: iteration, training ρ (mean
    ‖v_θ‖/‖v_ref‖ over the training rows), hinge-active fraction and mean rollout reward."""
    path = os.path.join(REPO, ST.workroot, rl_cell, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "train/normguard/ratio" in r]
    by_step = {r["step"]: r for r in rows}  # a resumed run may log an iteration twice
    steps = sorted(by_step)
    return {"iteration": np.array(steps),
            "ratio": np.array([by_step[s]["train/normguard/ratio"] for s in steps]),
            "active": np.array([by_step[s]["train/normguard/active_frac"] for s in steps]),
            "reward": np.array([by_step[s]["reward/mean"] for s in steps])}


def collect() -> dict:
    """Every finished cell of the sweep, summarised, plus the list of missing ones."""
    out = {"base": evaluation("eval-base"), "final": {}, "early": {}, "train": {},
           "missing": []}
    if out["base"] is None:
        out["missing"].append("eval-base")
    arms = [(a, s) for s in ablation.SEEDS for a in ablation.REPEATED]
    arms += [(a, 0) for a in ST.ablation]
    for arm, seed in arms:
        key = f"{arm}-s{seed}"
        row = evaluation(f"eval-{key}")
        if row is None:
            out["missing"].append(f"eval-{key}")
            continue
        log = training_log(f"rl-{key}")
        row["hinge_active"] = float(np.mean(log["active"])) if log else None
        row["train_ratio_last"] = float(log["ratio"][-1]) if log else None
        out["final"][key] = row
        out["train"][key] = {k: v.tolist() for k, v in log.items()}
    for seed in ablation.SEEDS:
        for k in ST.early_steps:
            key = f"plain-s{seed}-it{k}"
            row = evaluation(f"eval-{key}")
            if row is None:
                out["missing"].append(f"eval-{key}")
            else:
                out["early"][key] = row
    return out


# ----------------------------------------------------------------------------------------------
# Statistics and tables.
# ----------------------------------------------------------------------------------------------


def seeds_done(data: dict) -> list[int]:
    """Seeds whose unguarded and guarded evaluations both finished."""
    return [s for s in ablation.SEEDS
            if f"plain-s{s}" in data["final"] and f"guard-s{s}" in data["final"]]


def seed_table(data: dict) -> tuple[list[str], dict]:
    """Per-seed rows, means ± s.e., and the paired difference guarded − unguarded."""
    seeds = seeds_done(data)
    head = ["model", *[metric_label(k, label) for k, label, _ in METRICS], "hinge active"]
    lines = tables.header(head, left=1)
    if data["base"]:
        lines.append("| base | " + " | ".join(spec.format(data["base"][k])
                                             for k, _, spec in METRICS) + " | |")
    for s in seeds:
        for arm, label in (("plain", "unguarded"), ("guard", f"guard λ={ablation.GUARD_WEIGHT}")):
            r = data["final"][f"{arm}-s{s}"]
            lines.append(f"| {label}, seed {s} | " + " | ".join(
                spec.format(r[k]) for k, _, spec in METRICS)
                + f" | {tables.fmt(r['hinge_active'], '{:.2f}')} |")
    stats = {}
    if seeds:
        for arm, label in (("plain", "unguarded"), ("guard", "guarded")):
            cells = []
            for k, _, spec in METRICS:
                m, se = tables.mean_se([data["final"][f"{arm}-s{s}"][k] for s in seeds])
                stats[f"{arm}/{k}"] = (m, se)
                cells.append(f"{spec.format(m)} ± {spec.format(se)}")
            plural = "s" if len(seeds) > 1 else ""
            lines.append(f"| **{label}, mean ± s.e. ({len(seeds)} seed{plural})** | "
                         + " | ".join(cells) + " | |")
        cells = []
        for k, _, spec in METRICS:
            m, se, t = tables.paired_difference([data["final"][f"guard-s{s}"][k] for s in seeds],
                                                [data["final"][f"plain-s{s}"][k] for s in seeds])
            stats[f"diff/{k}"] = (m, se, t)
            cells.append(f"{'+' if m >= 0 else ''}{spec.format(m)} ± {spec.format(se)}"
                         + (f" (t={t:.1f})" if se > 0 else ""))
        lines.append("| **guarded − unguarded, paired** | " + " | ".join(cells) + " | |")
    return lines, stats


def earlystop_table(data: dict) -> tuple[list[str], list[dict]]:
    """Each seed's guarded run against its unguarded path (base, 8, 16, 24) at equal reward."""
    lines = ["| seed | guarded: reward, FD, recall | unguarded path: iteration (reward, FD, "
             "recall) | matched checkpoint (closest reward) | FD of the path at the guarded reward "
             "(interpolated) | guarded − matched FD |",
             "|---|---|---|---|---:|---:|"]
    records = []
    for s in seeds_done(data):
        g = data["final"][f"guard-s{s}"]
        path = [(0, data["base"])] + [
            (k, data["early"].get(f"plain-s{s}-it{k}")) for k in ST.early_steps]
        path.append((ST.iterations, data["final"][f"plain-s{s}"]))
        path = [(k, r) for k, r in path if r is not None]
        k, m = tables.closest_on_path(path, g["reward"])
        interp = tables.interpolate_at_reward(path, g["reward"], "fd")
        records.append({"seed": s, "matched_iteration": k, "fd_guard": g["fd"],
                        "fd_matched": m["fd"], "fd_interpolated": interp,
                        "path": [(i, r["reward"], r["fd"], r["recall"]) for i, r in path]})
        lines.append(
            f"| {s} | {g['reward']:.2f}, {g['fd']:.2f}, {g['recall']:.3f} | "
            + "; ".join(f"{i} ({r['reward']:.2f}, {r['fd']:.2f}, {r['recall']:.2f})"
                        for i, r in path)
            + f" | it {k} | {tables.fmt(interp, '{:.2f}')} | {g['fd'] - m['fd']:+.2f} |")
    return lines, records


def ablation_table(data: dict) -> list[str]:
    """Seed-0 rows of every arm (plain and guard first), with ρ during and after training."""
    head = ["arm (seed 0)", "NormGuard",
            *[metric_label(k, label) for k, label, _ in METRICS], "hinge active",
            "training ρ, last iteration"]
    lines = tables.header(head, left=2)
    arms = {**ablation.REPEATED, **ST.ablation}
    for arm, overrides in arms.items():
        r = data["final"].get(f"{arm}-s0")
        what = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
        if r is None:
            lines.append(f"| {arm} | {what} | not run |" + " |" * (len(head) - 3))
            continue
        lines.append(f"| {arm} | {what} | " + " | ".join(
            spec.format(r[k]) for k, _, spec in METRICS)
            + f" | {tables.fmt(r['hinge_active'], '{:.2f}')} | "
            f"{tables.fmt(r['train_ratio_last'], '{:.3f}')} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------


def plot_training(data: dict, path: str) -> None:
    """Training-time ρ and rollout reward per iteration: seeds of plain/guard, and ablations."""
    if not data["train"]:
        return
    panels = 3 if ST.ablation else 2  # the third shows the ablation arms
    fig, axes = plt.subplots(1, panels, figsize=(16 if ST.ablation else 11, 4))
    colours = {"plain": "C3", "guard": "C0"}
    for key, log in data["train"].items():
        if not log:
            continue
        arm, seed = key.rsplit("-s", 1)
        it = log["iteration"]
        if arm in colours:
            for ax, series in zip(axes[:2], ("ratio", "reward")):
                ax.plot(it, log[series], color=colours[arm], alpha=0.8, lw=1.2,
                        label=f"{arm} (seeds)" if seed == "0" else None)
        else:
            axes[2].plot(it, log["ratio"], lw=1.2, label=arm)
    if "plain-s0" in data["train"] and ST.ablation:
        log = data["train"]["plain-s0"]
        axes[2].plot(log["iteration"], log["ratio"], "--", color="C3", label="plain")
    for ax, title in zip(axes, ("training ρ = ‖v_θ‖/‖v_ref‖ (mean over rows)",
                                f"rollout reward ({reward_name()})",
                                "training ρ, ablation arms (seed 0)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL iteration")
        ax.legend(fontsize=7)
    for ax in axes[::2]:
        ax.axhline(1.0, color="k", lw=0.5)
    fig.suptitle(f"{ST.method.upper()} on digits, {reward_name()}: unguarded vs NormGuard "
                 f"({len(seeds_done(data))} seeds)"
                 + (" and the ablation arms" if ST.ablation else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(data: dict, path: str) -> None:
    """Reward against FD, recall and out-of-range for every evaluated model; the unguarded
    runs' checkpoint paths dashed (the early-stopping control)."""
    if not data["final"]:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (key, label) in zip(axes, (("fd", "FD ↓"), ("recall", "recall ↑"),
                                       ("out_of_range", "out of range ↓"))):
        if data["base"]:
            ax.plot(data["base"]["reward"], data["base"][key], "kx", ms=9, label="base")
        for s in ablation.SEEDS:
            trail = [data["base"]] + [data["early"].get(f"plain-s{s}-it{k}")
                                      for k in ST.early_steps]
            trail.append(data["final"].get(f"plain-s{s}"))
            trail = [r for r in trail if r is not None]
            if len(trail) > 1:
                ax.plot([r["reward"] for r in trail], [r[key] for r in trail], "--o",
                        color="C3", ms=3, alpha=0.7,
                        label="unguarded, it " + "/".join(
                            str(k) for k in (0, *ST.early_steps, ST.iterations))
                        if s == 0 else None)
            g = data["final"].get(f"guard-s{s}")
            if g is not None:
                ax.plot(g["reward"], g[key], "*", color="C0", ms=12,
                        label=f"guard λ={ablation.GUARD_WEIGHT}" if s == 0 else None)
        for i, arm in enumerate(ST.ablation):
            r = data["final"].get(f"{arm}-s0")
            if r is not None:
                ax.plot(r["reward"], r[key], "s", color=f"C{(i + 4) % 10}", ms=6, label=arm)
        ax.set_xlabel(f"{reward_name()} ↑ (the reward)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.suptitle("Reward against quality: guarded runs (stars, squares) vs the unguarded "
                 "runs' own checkpoints (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def analyse() -> None:
    data = collect()
    seed_lines, stats = seed_table(data)
    early_lines, early = earlystop_table(data)
    os.makedirs(RESULTS, exist_ok=True)
    plot_training(data, os.path.join(RESULTS, out_name("_training.png")))
    plot_tradeoff(data, os.path.join(RESULTS, out_name("_tradeoff.png")))
    rl = rl_table.get_config(f"{ST.method},{ST.setting}")
    study_flag = "" if ST.name == ablation.DEFAULT_STUDY else f" --study {ST.name}"
    if ST.method == "ram":
        method = (f"RAM (correction scale m = {rl.objective.scale:g}, lr {rl.optim.lr:g})")
    else:
        method = f"{ST.method.upper()} (configs/rl_{ST.method}.py, lr {rl.optim.lr:g})"
    lines = [
        "# NormGuard where the norm inflates: seeds"
        + (", λ, form, power, margin" if ST.ablation else f" ({ST.name})"),
        "",
        f"Command: `python experiments/guard_ablation.py{study_flag}` (runs "
        f"configs/sweeps/guard_ablation.py{':' + ST.name if study_flag else ''}, then this "
        f"analysis; `--stages analyse{study_flag}` rewrites this file from the finished cells).",
        "",
        f"Setting: {method} on the "
        f"quickstart's digits base (`{rl_table.BASES['digits']}`), reward {reward_name()}, "
        f"{ST.iterations} iterations of {rl.rollout.prompts_per_iter} prompts × "
        f"{rl.rollout.group_size} samples, 10-step ODE rollouts, no CFG. Evaluation: "
        f"configs/eval_table.py:{ST.setting} (300 samples at fixed seeds, 20-step ODE; FD, "
        "recall, judged real and precision against held-out digits; out of range = fraction "
        "of pixels beyond [-1.05, 1.05]; ρ on θ's own sampling trajectory).",
        "",
        ("Every cell finished." if not data["missing"] else
         f"Cells not finished when this was written ({len(data['missing'])}): "
         + ", ".join(data["missing"]) + "."),
        "",
        "## Seeds: unguarded vs NormGuard (λ = 0.1, relative hinge)",
        "",
        "Hinge active = fraction of training rows with ‖v_θ‖ > ‖v_ref‖, mean over iterations. "
        "Paired difference = mean over seeds of (guarded − unguarded) with its standard "
        "error; t = mean / s.e. (with 3 seeds, |t| > 4.3 is significant at 5 %, two-sided).",
        "",
        *seed_lines,
        "",
        f"![training]({out_name('_training.png')})",
        "",
        "## Early-stopping control, every seed",
        "",
        "If the guard only slowed the optimisation down, the unguarded run's own checkpoint at "
        "the guarded run's reward would have the guarded run's quality.",
        "",
        *early_lines,
        "",
        f"![tradeoff]({out_name('_tradeoff.png')})",
        "",
    ]
    if ST.ablation:
        lines += [
            "## Strength, form, power and margin (seed 0)",
            "",
            "Read these single-seed rows against the seed spread above. λ for the absolute and "
            "squared forms is chosen to give about the same gradient as the relative hinge at "
            "λ = 0.1 (configs/sweeps/guard_ablation.py explains the numbers).",
            "",
            *ablation_table(data),
            "",
        ]
    with open(os.path.join(RESULTS, out_name(".md")), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, out_name(".json")), "w", encoding="utf-8") as f:
        json.dump({"data": data, "seed_stats": stats, "earlystop": early}, f, indent=1)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages, run in order: {', '.join(STAGES)}")
    parser.add_argument("--study", default=ablation.DEFAULT_STUDY, choices=sorted(ablation.STUDIES),
                        help="which setting (configs/sweeps/guard_ablation.py:STUDIES)")
    parser.add_argument("--num_hosts", type=int, default=0)
    parser.add_argument("--host_index", type=int, default=-1)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    hosts = ([f"--config.num_hosts={args.num_hosts}"] if args.num_hosts else []) + (
        [f"--config.host_index={args.host_index}"] if args.host_index >= 0 else [])
    global ST
    ST = ablation.study(args.study)
    sweep_config = "configs/sweeps/guard_ablation.py" + (
        "" if ST.name == ablation.DEFAULT_STUDY else f":{ST.name}")
    os.chdir(REPO)
    for stage in stages:
        if stage == "base":
            table_sweeps.make_bases(["digits"])
        elif stage == "sweep":
            table_sweeps.run_sweep(sweep_config, hosts)
        elif stage == "analyse":
            analyse()
        elif stage == "norms":
            runs = [os.path.join(ST.workroot, f"rl-{arm}-s0") for arm in ("plain", "guard")]
            missing = [r for r in runs if not os.path.exists(
                os.path.join(r, sweep.DONE_MARKER))]
            if missing:
                print(f"norms stage skipped: {missing} not finished", flush=True)
                continue
            cmd = [sys.executable, os.path.join("experiments", "norm_analyses.py"),
                   f"--runs={','.join(runs)}", f"--out=experiments/results/{out_name('_norms')}",
                   f"--sensitivity_rewards={SENSITIVITY_REWARDS}"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

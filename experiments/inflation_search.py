"""Where does unguarded RL inflate ‖v_θ‖ by 5-15 %? Candidates × seeds, ρ over training.

Usage (from the repository root; resumable: finished cells are skipped on rerun):
  python experiments/inflation_search.py [--stages base,sweep,analyse] [--seeds 0,1]
``--seeds`` restricts the sweep stage to those seeds (default: every seed of
configs/sweeps/inflation_search.py); ``--stages analyse`` only rewrites the results.

Stages:
- ``base``: pretrains the quickstart's digits base (configs/table_base.py:digits) if missing;
- ``sweep``: ``python -m experiments.sweep --config=configs/sweeps/inflation_search.py`` (the
  candidates and why they were chosen are in that file's docstring); every run is unguarded;
- ``analyse``: writes ``experiments/results/inflation_search.md``, ``.json`` and
  ``inflation_search_training.png`` from the finished cells.

Two measures of ρ = ‖v_θ‖/‖v_ref‖: the training ratio (NormGuard's own measure on the training
rows, logged every iteration with λ = 0; its mean over the last ``LAST`` iterations is reported,
as single iterations swing by several per cent) and the sampling ratio of the evaluation (the
mean over the 20 ODE steps and the samples of θ's own trajectory, the paper's measure). A
candidate qualifies when the sampling ρ is ≥ ``TARGET`` on every finished seed.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs.sweeps import inflation_search as search  # noqa: E402
from experiments import table_sweeps  # noqa: E402

REPO = table_sweeps.REPO
RESULTS = table_sweeps.RESULTS
SWEEP = "configs/sweeps/inflation_search.py"
OUT = "inflation_search"
TARGET = 1.05   # the paper's lower end of unguarded inflation
LAST = 4        # iterations averaged for the final training ρ
STAGES = ("base", "sweep", "analyse")


def training_log(cell: str) -> dict[str, list]:
    """Per-iteration training ρ, hinge-free, and mean rollout reward of one RL cell
    (``{"iteration", "ratio", "reward"}``, lists of equal length; empty when missing)."""
    rows = table_sweeps.metric_rows(os.path.join(REPO, search.WORKROOT, cell),
                                    "train/normguard/ratio")
    if not rows:
        return {}
    return {"iteration": [r["step"] for r in rows],
            "ratio": [r["train/normguard/ratio"] for r in rows],
            "reward": [r.get("reward/mean", float("nan")) for r in rows]}


def collect() -> dict:
    """Every finished cell: per candidate and seed the training log and the evaluation."""
    out = {"base": {}, "cells": {}, "missing": []}
    for setting in sorted({spec[1] for spec in search.CANDIDATES.values()}):
        out["base"][setting] = table_sweeps.summarise(
            table_sweeps.load_eval(search.WORKROOT, f"eval-base-{setting}"), setting)
    for name, (method, setting, rl_over, _) in search.CANDIDATES.items():
        for seed in search.SEEDS:
            key = f"{name}-s{seed}"
            done = os.path.exists(os.path.join(REPO, search.WORKROOT, f"rl-{key}",
                                               "sweep_done.json"))
            ev = table_sweeps.summarise(
                table_sweeps.load_eval(search.WORKROOT, f"eval-{key}"), setting)
            if not done:
                out["missing"].append(f"rl-{key}")
                continue
            log = training_log(f"rl-{key}")
            out["cells"][key] = {"candidate": name, "seed": seed, "method": method,
                                 "setting": setting, "overrides": rl_over, "train": log,
                                 "eval": ev}
            if ev is None:
                out["missing"].append(f"eval-{key}")
    return out


def _final_train_ratio(log: dict) -> float:
    r = log.get("ratio") or []
    return float(np.mean(r[-LAST:])) if r else float("nan")


def verdicts(data: dict) -> dict[str, dict]:
    """Per candidate: seeds finished, sampling ρ per seed, min, and whether every finished
    seed reached ``TARGET`` (None before any evaluation finished)."""
    out = {}
    for name in search.CANDIDATES:
        cells = [c for c in data["cells"].values() if c["candidate"] == name]
        rho = [c["eval"]["rho"] for c in cells if c["eval"] is not None]
        train = [_final_train_ratio(c["train"]) for c in cells]
        out[name] = {"seeds": [c["seed"] for c in cells], "sampling_rho": rho,
                     "train_rho_last": train,
                     "min_sampling_rho": min(rho) if rho else None,
                     "qualifies": (min(rho) >= TARGET) if rho else None}
    return out


def table_md(data: dict, ver: dict) -> list[str]:
    """The per-cell table and the per-candidate verdicts, markdown lines."""
    lines = ["| candidate | seed | training ρ (last 4 it.) | max training ρ | sampling ρ | "
             "reward (base → run) | FD (base → run) | recall | out of range |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, c in data["cells"].items():
        base, ev, log = data["base"].get(c["setting"]), c["eval"], c["train"]
        mx = max(log["ratio"]) if log.get("ratio") else float("nan")
        if ev is None or base is None:
            rest = "(evaluation missing) | | | | "
        else:
            rest = (f"{ev['rho']:.3f} | {base['reward']:.3f} → {ev['reward']:.3f} | "
                    f"{base['fd']:.2f} → {ev['fd']:.2f} | {ev['recall']:.3f} | "
                    f"{ev['out_of_range']:.3f} ")
        lines.append(f"| {c['candidate']} | {c['seed']} | {_final_train_ratio(log):.3f} | "
                     f"{mx:.3f} | {rest}|")
    lines += ["", f"Verdict per candidate (qualifies: sampling ρ ≥ {TARGET} on every finished "
              "seed):", "", "| candidate | method, reward, overrides | seeds | sampling ρ per seed "
              "| training ρ per seed | qualifies |", "|---|---|---:|---|---|---|"]
    for name, v in ver.items():
        method, setting, over, _ = search.CANDIDATES[name]
        spec = f"{method}, {setting}" + (f", {over}" if over else "")
        q = {None: "(no evaluation yet)", True: "**yes**", False: "no"}[v["qualifies"]]
        lines.append(f"| {name} | {spec} | {len(v['seeds'])} | "
                     f"{', '.join(f'{r:.3f}' for r in v['sampling_rho'])} | "
                     f"{', '.join(f'{r:.3f}' for r in v['train_rho_last'])} | {q} |")
    return lines


def plot_training(data: dict, path: str) -> None:
    """Training ρ per iteration, one panel per candidate, one line per seed."""
    names = [n for n in search.CANDIDATES if any(c["candidate"] == n
                                                  for c in data["cells"].values())]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names):
        for c in data["cells"].values():
            if c["candidate"] == name and c["train"]:
                ax.plot(c["train"]["iteration"], c["train"]["ratio"], lw=1.2,
                        label=f"seed {c['seed']}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.axhline(TARGET, color="C3", lw=0.6, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("RL iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training ρ = ‖v_θ‖/‖v_ref‖")
    fig.suptitle("Unguarded RL on the digits base: training-time norm ratio (dashed: 1.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(command: str) -> None:
    """Writes the markdown, JSON and plot of the finished cells."""
    data = collect()
    ver = verdicts(data)
    lines = ["# Inflation search: where unguarded RL inflates ‖v_θ‖", "",
             f"Command: `{command}` (sweep: `{SWEEP}`; every run unguarded, λ = 0, "
             f"{search.ITERATIONS} iterations of 8 prompts × 8 samples on the digits base).", ""]
    lines += table_md(data, ver)
    if data["missing"]:
        lines += ["", "Not finished: " + ", ".join(data["missing"])]
    lines += ["", f"![training ρ]({OUT}_training.png)"]
    table_sweeps.write_report(RESULTS, OUT, lines, {"data": data, "verdicts": ver})
    plot_training(data, os.path.join(RESULTS, OUT + "_training.png"))
    print("\n".join(lines), flush=True)


def main():
    parser = table_sweeps.stage_parser(__doc__, STAGES)
    parser.add_argument("--seeds", default="", help="sweep only these seeds, e.g. 0,1")
    args = parser.parse_args()
    stages = table_sweeps.chosen_stages(parser, args.stages, STAGES)
    os.chdir(REPO)
    for stage in stages:
        if stage == "base":
            table_sweeps.make_bases(["digits"])
        elif stage == "sweep":
            only = []
            if args.seeds:
                seeds = "".join(s.strip() for s in args.seeds.split(","))
                only = [f"--config.only=eval-base-*,*-s[{seeds}]"]
            table_sweeps.run_sweep(SWEEP, only)
        elif stage == "analyse":
            analyse("python experiments/inflation_search.py"
                    + (f" --seeds {args.seeds}" if args.seeds else ""))


if __name__ == "__main__":
    main()

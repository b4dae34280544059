"""Main table, λ sweep, few-step inference and early-stopping control, from one command.

Usage (from the repository root; resumable: rerun after an interruption and finished cells
are skipped):
  python experiments/main_table.py [--stages <see DEFAULT_STAGES>] \
      [--lambda_setting digits_contrast,dpo] [--num_hosts N --host_index i]
``--stages analyse`` only rewrites the results from the finished cells.

Stages (the default runs the digits half of the table, the λ sweep, the early-stopping
evaluations and an analysis first, then the shapes half and few-step inference):
- ``bases``: pretrains the two base models (configs/table_base.py) when they are missing;
  ``bases:digits`` (or ``bases:shapes``) only that one;
- ``main``: ``python -m normguard_jax.sweep --config=configs/sweeps/table_main.py``
  (2 bases × 2 rewards × NFT/AWM/DPO × {λ = 0, λ = 0.1});
- ``main:<pattern>|<pattern>``: only the table cells whose names match;
- ``lambda``: configs/sweeps/table_lambda.py on one setting; by default the digits setting
  and method whose unguarded run has the largest ρ in the main table (the hinge acts only
  where ‖v_θ‖ > ‖v_ref‖), else ``--lambda_setting``; the choice is recorded in
  ``workdir/sweeps/table_lambda/choice.json`` and kept by later calls;
- ``earlystop``: configs/sweeps/table_earlystop.py (intermediate checkpoints of the unguarded
  runs);
- ``fewstep``: configs/sweeps/table_fewstep.py (2, 4, 8, 16, 40 ODE steps);
- ``analyse``: reads every evaluation.json and writes ``experiments/results/main_table.md``,
  ``.json`` and ``main_table_*.png`` with whatever has finished (missing cells are listed).

With ``--num_hosts``, every host runs its share of each sweep (shared file system); run the
``analyse`` stage once all hosts are done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, os.path.join(REPO, "configs", "sweeps"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from normguard_jax import sweep  # noqa: E402

import eval_table  # noqa: E402  (configs/ and configs/sweeps/ are not packages)
import table_main as main_sweep  # noqa: E402
import rl_table  # noqa: E402
import table_base  # noqa: E402
import table_earlystop  # noqa: E402
import table_fewstep  # noqa: E402
import table_lambda  # noqa: E402
import table_norms  # noqa: E402

NORM_CELLS = {os.path.basename(d) for d in table_norms.run_dirs(table_norms.METHODS)}

STAGES = ("bases", "main", "lambda", "earlystop", "fewstep", "analyse")
# Default order: the digits half of the table first, then the analyses on it, then the shapes
# half, so that an interrupted run leaves every analysis on one base rather than none.
DEFAULT_STAGES = ("bases,main:eval-base-*|*digits*,lambda,earlystop,analyse,"
                  "main:*shapes_rule*,fewstep,main,analyse")
# Columns: (key, label, path in evaluation.json["generated"] or special, format).
QUALITY = (("fd", "FD ↓"), ("recall", "recall ↑"), ("realism", "judged real ↑"),
           ("precision", "precision ↑"), ("out_of_range", "out of range ↓"))
# Run-to-run spread of two identical single-seed RL runs (experiments/README.md "Noise"):
# differences below these say nothing.
NOISE = {"fd": 3.0, "recall": 0.1, "realism": 0.15}


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------


def base_finished(workdir: str, steps: int) -> bool:
    """Whether a pretraining workdir has a checkpoint at (or past) ``steps``."""
    from normguard_jax import checkpointing  # noqa: PLC0415  (imports JAX)
    try:
        step, _ = checkpointing.read_meta(os.path.join(REPO, workdir, "checkpoints"))
    except FileNotFoundError:
        return False
    return step >= steps


def make_bases(names=tuple(rl_table.BASES)) -> None:
    """Pretrains each base of ``names`` (keys of rl_table.BASES) whose workdir is unfinished."""
    unknown = sorted(set(names) - set(rl_table.BASES))
    if unknown:
        raise SystemExit(f"unknown bases {unknown}; choose from {sorted(rl_table.BASES)}")
    for base in names:
        workdir = rl_table.BASES[base]
        steps = table_base.get_config(base).train.steps
        if base_finished(workdir, steps):
            print(f"base {base}: {workdir} is finished ({steps} steps)", flush=True)
            continue
        cmd = [sys.executable, "-m", "normguard_jax.main",
               f"--config=configs/table_base.py:{base}", f"--workdir={workdir}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)  # main.py sets up the tuned malloc itself


def run_sweep(spec: str, hosts: list[str]) -> bool:
    """Runs one sweep config in a subprocess; returns whether every cell finished."""
    cmd = [sys.executable, "-m", "normguard_jax.sweep", f"--config={spec}", *hosts]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode == 0


# ----------------------------------------------------------------------------------------------
# Reading results.
# ----------------------------------------------------------------------------------------------


def load_eval(workroot: str, name: str) -> dict | None:
    """``<workroot>/<name>/evaluation.json`` of a finished cell, or None."""
    path = os.path.join(REPO, workroot, name, "evaluation.json")
    if not os.path.exists(os.path.join(REPO, workroot, name, sweep.DONE_MARKER)):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def reward_name(setting: str) -> str:
    """The single reward a setting optimises."""
    (name,) = rl_table.SETTINGS[setting][1]
    return name


def summarise(result: dict | None, setting: str) -> dict | None:
    """Reward of the setting, quality metrics and ρ of one evaluation."""
    if result is None:
        return None
    gen = result["generated"]
    row = {"reward": gen["rewards"][reward_name(setting)],
           "rho": result["norm_ratio"]["mean"], "step": result["step"]}
    row.update({k: gen["quality"][k] for k, _ in QUALITY})
    if setting.startswith("shapes"):
        row["shapes_rule"] = gen["rewards"]["shapes_rule"]
    else:
        row["classifier_logprob"] = gen["rewards"]["classifier_logprob"]
    return row


def hinge_activity(workroot: str, name: str) -> float | None:
    """Mean over the logged iterations of the fraction of training rows where the hinge was
    active (``train/normguard/active_frac`` in the RL cell's metrics.jsonl), or None."""
    path = os.path.join(REPO, workroot, name, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    values = [r["train/normguard/active_frac"] for r in rows
              if "train/normguard/active_frac" in r]
    return float(np.mean(values)) if values else None


def base_of(setting: str) -> str:
    return rl_table.SETTINGS[setting][0]


def collect() -> dict:
    """Every finished evaluation of the four sweeps, summarised."""
    settings = list(rl_table.SETTINGS)
    out = {"base": {}, "main": {}, "lambda": {}, "fewstep": {}, "earlystop": {}, "missing": []}

    def get(workroot, name, setting):
        row = summarise(load_eval(workroot, name), setting)
        if row is None:
            out["missing"].append(f"{workroot}/{name}")
        return row

    for setting in settings:
        out["base"][setting] = get(main_sweep.WORKROOT, f"eval-base-{base_of(setting)}", setting)
        for method in main_sweep.METHODS:
            for arm in main_sweep.ARMS:
                key = f"{setting}-{method}-{arm}"
                out["main"][key] = get(main_sweep.WORKROOT, f"eval-{key}", setting)
                if out["main"][key] is not None:
                    out["main"][key]["hinge_active"] = hinge_activity(main_sweep.WORKROOT,
                                                                      f"rl-{key}")
            for k in table_earlystop.STEPS if setting in table_earlystop.SETTINGS else ():
                key = f"{setting}-{method}-plain-it{k}"
                out["earlystop"][key] = get(table_earlystop.WORKROOT, f"eval-{key}", setting)
    for setting in table_fewstep.SETTINGS:
        for n in table_fewstep.STEPS:
            out["fewstep"][f"base-{setting}-n{n}"] = get(
                table_fewstep.WORKROOT, f"eval-base-{base_of(setting)}-n{n}", setting)
            for method in table_fewstep.METHODS:
                for arm in main_sweep.ARMS:
                    key = f"{setting}-{method}-{arm}-n{n}"
                    out["fewstep"][key] = get(table_fewstep.WORKROOT, f"eval-{key}", setting)
    return out


def collect_lambda(setting: str, method: str) -> dict:
    """λ -> summary for the λ sweep (0 and 0.1 from the main table)."""
    rows = {0.0: summarise(load_eval(main_sweep.WORKROOT, f"eval-{setting}-{method}-plain"),
                           setting),
            main_sweep.GUARD_WEIGHT: summarise(load_eval(
                main_sweep.WORKROOT, f"eval-{setting}-{method}-guard"), setting)}
    for arm, overrides in table_lambda.ARMS.items():
        rows[overrides["normguard.weight"]] = summarise(
            load_eval(table_lambda.WORKROOT, f"eval-{setting}-{method}-{arm}"), setting)
    return dict(sorted(rows.items()))


LAMBDA_CHOICE = os.path.join(table_lambda.WORKROOT, "choice.json")  # fixed once made


def choose_lambda_setting(main: dict, settings=("digits_logprob", "digits_contrast")
                          ) -> tuple[str, str] | None:
    """(setting, method) of the λ sweep: the one recorded in ``LAMBDA_CHOICE`` if any, else
    the unguarded main-table run of ``settings`` with the largest ρ (None until all of those
    are evaluated). The choice is recorded by :func:`record_lambda_choice`, so a later
    analysis, with more cells finished, reports the same sweep."""
    path = os.path.join(REPO, LAMBDA_CHOICE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return tuple(json.load(f)["choice"])
    plain = {k: v for k, v in main.items()
             if k.endswith("-plain") and k.rsplit("-", 2)[0] in settings}
    if any(v is None for v in plain.values()):
        return None
    best = max(plain, key=lambda k: plain[k]["rho"])
    setting, method, _ = best.rsplit("-", 2)
    return setting, method


def record_lambda_choice(choice: tuple[str, str], rule: str) -> None:
    path = os.path.join(REPO, LAMBDA_CHOICE)
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"choice": list(choice), "rule": rule}, f)


# ----------------------------------------------------------------------------------------------
# Tables and plots.
# ----------------------------------------------------------------------------------------------


def fmt(v, spec="{:.3f}"):
    return "–" if v is None else spec.format(v)


def row_cells(row: dict | None) -> list[str]:
    if row is None:
        return ["not run"] + [""] * (len(QUALITY) + 1)
    return ([fmt(row["reward"])] + [fmt(row[k], "{:.2f}" if k == "fd" else "{:.3f}")
                                    for k, _ in QUALITY] + [fmt(row["rho"])])


def main_table_md(data: dict) -> list[str]:
    head = ["setting", "model", "reward ↑"] + [label for _, label in QUALITY] + ["ρ"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for setting in rl_table.SETTINGS:
        lines.append(f"| {setting} | base | " + " | ".join(row_cells(data["base"][setting]))
                     + " |")
        for method in main_sweep.METHODS:
            for arm, label in (("plain", "unguarded"), ("guard",
                                                        f"NormGuard λ={main_sweep.GUARD_WEIGHT}")):
                row = data["main"][f"{setting}-{method}-{arm}"]
                lines.append(f"| {setting} | {method} {label} | " + " | ".join(row_cells(row))
                             + " |")
    return lines


def delta_md(data: dict) -> tuple[list[str], list[dict]]:
    """Guarded minus unguarded, per setting and method, with a verdict against the noise."""
    lines = ["| setting | method | Δ reward | Δ FD (↓ better) | Δ recall | Δ judged real | "
             "out of range unguarded → guarded | ρ unguarded → guarded | "
             "hinge active (training) | quality better beyond noise? |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    records = []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            p, g = (data["main"][f"{setting}-{method}-{a}"] for a in ("plain", "guard"))
            if p is None or g is None:
                lines.append(f"| {setting} | {method} | not run | | | | | | | |")
                continue
            d = {k: g[k] - p[k] for k in ("reward", "fd", "recall", "realism")}
            # FD falls, recall and judged-real rise when quality improves.
            signs = {"fd": -1, "recall": 1, "realism": 1}
            better = any(signs[k] * d[k] > NOISE[k] for k in signs)
            worse = any(signs[k] * d[k] < -NOISE[k] for k in signs)
            verdict = ("better" if better and not worse else "worse" if worse and not better
                       else "mixed" if better and worse else "no (within noise)")
            records.append({"setting": setting, "method": method, **d, "verdict": verdict,
                            "out_of_range_plain": p["out_of_range"],
                            "out_of_range_guard": g["out_of_range"],
                            "rho_plain": p["rho"], "rho_guard": g["rho"]})
            lines.append(f"| {setting} | {method} | {d['reward']:+.3f} | {d['fd']:+.2f} | "
                         f"{d['recall']:+.3f} | {d['realism']:+.3f} | "
                         f"{p['out_of_range']:.3f} → {g['out_of_range']:.3f} | {p['rho']:.3f} → "
                         f"{g['rho']:.3f} | {fmt(g.get('hinge_active'), '{:.2f}')} | {verdict} |")
    return lines, records


def lambda_md(rows: dict, setting: str, method: str) -> list[str]:
    head = ["λ", "reward ↑"] + [label for _, label in QUALITY] + ["ρ"]
    lines = [f"Setting `{setting}`, method `{method}`.", "",
             "| " + " | ".join(head) + " |", "|---:|" + "---:|" * (len(head) - 1)]
    for lam, row in rows.items():
        lines.append(f"| {lam:g} | " + " | ".join(row_cells(row)) + " |")
    return lines


def plot_lambda(rows: dict, setting: str, method: str, path: str) -> None:
    done = [(lam, r) for lam, r in rows.items() if r is not None]
    if len(done) < 2:
        return
    x = np.arange(len(done))
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
    for ax, (key, label) in zip(axes, (("reward", f"reward ({reward_name(setting)})"),
                                       ("fd", "FD ↓"), ("recall", "recall ↑"),
                                       ("out_of_range", "out of range ↓"), ("rho", "ρ"))):
        ax.plot(x, [r[key] for _, r in done], "o-")
        ax.set_xticks(x, [f"{lam:g}" for lam, _ in done])
        ax.set_xlabel("λ")
        ax.set_title(label)
    fig.suptitle(f"NormGuard weight sweep: {setting}, {method} (single seed each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fewstep_series(data: dict, setting: str, method: str, arm: str) -> list[tuple[int, dict]]:
    """(steps, summary) for 2, 4, 8, 16, 20 (main table), 40, where evaluated."""
    out = []
    for n in sorted(set(table_fewstep.STEPS) | {20}):
        row = (data["main"][f"{setting}-{method}-{arm}"] if n == 20
               else data["fewstep"].get(f"{setting}-{method}-{arm}-n{n}"))
        if row is not None:
            out.append((n, row))
    return out


def fewstep_md(data: dict) -> tuple[list[str], dict]:
    steps = sorted(set(table_fewstep.STEPS) | {20})
    lines = ["FD gap = FD(guarded) − FD(unguarded) at each number of ODE steps (negative: the "
             "guarded model is better); in brackets the unguarded FD. Recall and out-of-range "
             "gaps below.", "",
             "| setting | method | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    gaps = {}
    for metric in ("fd", "recall", "out_of_range"):
        if metric != "fd":
            lines += ["", f"| setting | method ({metric} gap, unguarded in brackets) | "
                      + " | ".join(f"{n} steps" for n in steps) + " |",
                      "|---|---|" + "---:|" * len(steps)]
        for setting in table_fewstep.SETTINGS:
            for method in table_fewstep.METHODS:
                p = dict(fewstep_series(data, setting, method, "plain"))
                g = dict(fewstep_series(data, setting, method, "guard"))
                cells = []
                for n in steps:
                    if n in p and n in g:
                        gap = g[n][metric] - p[n][metric]
                        gaps.setdefault(f"{setting}-{method}-{metric}", {})[n] = gap
                        cells.append(f"{gap:+.2f} ({p[n][metric]:.2f})" if metric == "fd"
                                     else f"{gap:+.3f} ({p[n][metric]:.3f})")
                    else:
                        cells.append("–")
                lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    base = [f"{n}: {data['fewstep'][f'base-{s}-n{n}']['fd']:.2f}"
            for s in table_fewstep.SETTINGS[:1] for n in table_fewstep.STEPS
            if data["fewstep"].get(f"base-{s}-n{n}")]
    if base:
        lines += ["", "Base model FD by steps (20 steps: "
                  f"{fmt(data['base'][table_fewstep.SETTINGS[0]]['fd'], '{:.2f}')}): "
                  + ", ".join(base)]
    return lines, gaps


def plot_fewstep(data: dict, path: str) -> None:
    settings = table_fewstep.SETTINGS
    fig, axes = plt.subplots(2, len(settings), figsize=(5 * len(settings), 6.5), squeeze=False)
    drew = False
    for j, setting in enumerate(settings):
        for method, colour in zip(table_fewstep.METHODS, ("C0", "C1", "C2")):
            for arm, style in (("plain", "--"), ("guard", "-")):
                series = fewstep_series(data, setting, method, arm)
                if len(series) < 2:
                    continue
                drew = True
                ns = [n for n, _ in series]
                axes[0, j].plot(ns, [r["fd"] for _, r in series], style, color=colour,
                                marker="o", label=f"{method} {arm}")
            p = dict(fewstep_series(data, setting, method, "plain"))
            g = dict(fewstep_series(data, setting, method, "guard"))
            both = sorted(set(p) & set(g))
            if both:
                axes[1, j].plot(both, [g[n]["fd"] - p[n]["fd"] for n in both], "o-",
                                color=colour, label=method)
        base = [(n, data["fewstep"].get(f"base-{setting}-n{n}")) for n in table_fewstep.STEPS]
        base = sorted([(n, r) for n, r in base if r] + [(20, data["base"][setting])]
                      if data["base"][setting] else [])
        if base:
            axes[0, j].plot([n for n, _ in base], [r["fd"] for _, r in base], ":k",
                            marker="x", label="base")
        axes[0, j].set_title(f"{setting}: FD vs ODE steps")
        axes[1, j].axhline(0, color="k", lw=0.5)
        axes[1, j].axhspan(-NOISE["fd"], NOISE["fd"], color="0.9")
        axes[1, j].set_title("FD(guarded) − FD(unguarded); grey: noise")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(table_fewstep.STEPS) | {20})
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.set_xlabel("ODE steps")
            ax.legend(fontsize=7)
    if drew:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)


def unguarded_path(data: dict, setting: str, method: str) -> list[tuple[int, dict]]:
    """(iteration, summary) of the unguarded run: base (0), intermediate checkpoints, last."""
    path = [(0, data["base"][setting])]
    path += [(k, data["earlystop"].get(f"{setting}-{method}-plain-it{k}"))
             for k in table_earlystop.STEPS]
    path.append((rl_table.ITERATIONS, data["main"][f"{setting}-{method}-plain"]))
    return [(k, r) for k, r in path if r is not None]


def interpolate_at_reward(path: list[tuple[int, dict]], reward: float, key: str):
    """``key`` of the unguarded path linearly interpolated at ``reward`` between the first two
    consecutive checkpoints whose rewards bracket it; None when no pair does."""
    for (_, a), (_, b) in zip(path, path[1:]):
        lo, hi = sorted((a["reward"], b["reward"]))
        if lo <= reward <= hi and hi > lo:
            w = (reward - a["reward"]) / (b["reward"] - a["reward"])
            return a[key] + w * (b[key] - a[key])
    return None


def earlystop_md(data: dict) -> tuple[list[str], list[dict]]:
    lines = ["| setting | method | guarded: reward, FD, recall | matched unguarded checkpoint "
             "(iteration: reward, FD, recall) | FD of the unguarded path at the guarded reward "
             "(interpolated) | guarded − matched FD | explained by stopping early? |",
             "|---|---|---|---|---:|---:|---|"]
    records = []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            g = data["main"][f"{setting}-{method}-guard"]
            path = unguarded_path(data, setting, method)
            if g is None or len(path) < 2 or path[-1][0] != rl_table.ITERATIONS:
                lines.append(f"| {setting} | {method} | not run | | | | |")
                continue
            k, m = min(path, key=lambda kr: abs(kr[1]["reward"] - g["reward"]))
            fd_interp = interpolate_at_reward(path, g["reward"], "fd")
            diff = g["fd"] - m["fd"]
            final = path[-1][1]
            gain = g["fd"] - final["fd"]
            if gain > NOISE["fd"]:
                verdict = "nothing to explain: guarded FD worse than the final unguarded"
            elif gain >= -NOISE["fd"]:
                verdict = "nothing to explain: same FD as the final unguarded (within noise)"
            elif diff >= -NOISE["fd"]:
                verdict = ("yes: the matched unguarded checkpoint is as good"
                           + (" or better" if diff > NOISE["fd"] else ""))
            elif fd_interp is not None and g["fd"] - fd_interp >= -NOISE["fd"]:
                # The nearest checkpoint may sit well past the guarded reward; between two
                # checkpoints the unguarded run passes through it.
                verdict = ("yes, between checkpoints: the unguarded path at the guarded reward "
                           "(interpolated) is as good"
                           + (" or better" if g["fd"] - fd_interp > NOISE["fd"] else ""))
            else:
                verdict = "no: the guarded run beats the matched checkpoint"
            records.append({"setting": setting, "method": method, "matched_iteration": k,
                            "guard": g, "matched": m, "fd_interpolated": fd_interp,
                            "fd_guard_minus_matched": diff, "fd_guard_minus_final": gain,
                            "verdict": verdict})
            lines.append(
                f"| {setting} | {method} | {g['reward']:.3f}, {g['fd']:.2f}, {g['recall']:.3f} "
                f"| it {k}: {m['reward']:.3f}, {m['fd']:.2f}, {m['recall']:.3f} | "
                f"{fmt(fd_interp, '{:.2f}')} | {diff:+.2f} | {verdict} |")
    return lines, records


def plot_earlystop(data: dict, path: str) -> None:
    settings = list(rl_table.SETTINGS)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6))
    drew = False
    for ax, setting in zip(axes, settings):
        for method, colour in zip(main_sweep.METHODS, ("C0", "C1", "C2")):
            p = unguarded_path(data, setting, method)
            if len(p) >= 2:
                drew = True
                ax.plot([r["reward"] for _, r in p], [r["fd"] for _, r in p], "--o",
                        color=colour, ms=3, label=f"{method} unguarded (it {p[0][0]}..{p[-1][0]})")
            g = data["main"][f"{setting}-{method}-guard"]
            if g is not None:
                ax.plot([g["reward"]], [g["fd"]], "*", color=colour, ms=12,
                        label=f"{method} guarded")
        ax.set_xlabel(f"reward ({reward_name(setting)})")
        ax.set_ylabel("FD ↓")
        ax.set_title(setting)
        ax.legend(fontsize=6)
    if drew:
        fig.suptitle("Early-stopping control: unguarded checkpoints (dashed) vs guarded (star)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)


SAMPLE_PAIRS = 2  # sample grids shown: the pairs whose judged-real fraction changed the most


def samples_png(setting: str, method: str, path: str) -> bool:
    """The unguarded (left) and guarded (right) evaluation sample grids of one pair, side by
    side with a white gap, written to ``path``; False when either grid is missing."""
    grids = [os.path.join(REPO, main_sweep.WORKROOT, f"eval-{setting}-{method}-{arm}",
                          "samples_eval.png") for arm in ("plain", "guard")]
    if not all(os.path.exists(g) for g in grids):
        return False
    left, right = (np.asarray(Image.open(g).convert("RGB")) for g in grids)
    gap = 12
    canvas = np.full((max(left.shape[0], right.shape[0]), left.shape[1] + gap + right.shape[1],
                      3), 255, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    Image.fromarray(canvas).save(path)
    return True


def samples_md(data: dict) -> list[str]:
    """Side-by-side sample grids (``main_table_samples_<setting>_<method>.png``) of the
    ``SAMPLE_PAIRS`` pairs with the largest change in judged real, and their markdown."""
    changes = []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            plain = data["main"].get(f"{setting}-{method}-plain")
            guard = data["main"].get(f"{setting}-{method}-guard")
            if plain and guard:
                changes.append((abs(guard["realism"] - plain["realism"]), setting, method,
                                plain, guard))
    lines = []
    for _, setting, method, plain, guard in sorted(changes, key=lambda c: -c[0])[:SAMPLE_PAIRS]:
        name = f"main_table_samples_{setting}_{method}.png"
        if samples_png(setting, method, os.path.join(RESULTS, name)):
            lines += [f"{setting}, {method}: unguarded on the left (judged real "
                      f"{plain['realism']:.2f}, FD {plain['fd']:.2f}), NormGuard λ="
                      f"{main_sweep.GUARD_WEIGHT:g} on the right ({guard['realism']:.2f}, FD "
                      f"{guard['fd']:.2f}); one row per class, the evaluation's fixed seeds.",
                      "", f"![{setting} {method}]({name})", ""]
    return lines


def wall_time_md() -> str:
    """Cells and summed wall time per sweep, from the cells' done markers."""
    parts = []
    for label, root in (("table", main_sweep.WORKROOT), ("λ", table_lambda.WORKROOT),
                        ("early stopping", table_earlystop.WORKROOT),
                        ("few-step", table_fewstep.WORKROOT)):
        # experiments/run_all.py's GRPO/RAM cells share the table's workroot: not counted.
        seconds = [t for name, t in sweep.finished_seconds(os.path.join(REPO, root)).items()
                   if name not in NORM_CELLS]
        parts.append(f"{label} {len(seconds)} cells, {sum(seconds) / 60:.0f} min")
    return ("Wall time (sum of the cells' own times; more than the compute if other jobs shared "
            "the cores, see experiments/results/compute.md): " + "; ".join(parts) + ".")


def missing_md(missing: list[str]) -> str:
    """One line: how many cells of each sweep had not finished (names when few)."""
    if not missing:
        return "Every cell of the four sweeps finished."
    by_root = {}
    for m in missing:
        root, name = m.rsplit("/", 1)
        by_root.setdefault(root, []).append(name)
    parts = [f"`{root}`: {len(names)} ({', '.join(names) if len(names) <= 6 else 'see json'})"
             for root, names in by_root.items()]
    return "Cells not finished when this was written: " + "; ".join(parts) + "."


def sizes_md() -> list[str]:
    rl = rl_table.get_config("nft,digits_logprob")
    ev = eval_table.get_config("digits_logprob")
    digits, shapes = table_base.get_config("digits"), table_base.get_config("shapes")
    return [
        "Sizes (single seed 0 everywhere):",
        f"- Bases: `{rl_table.BASES['digits']}` = {digits.model.arch}/{digits.model.size} on "
        f"{digits.data.name}, {digits.train.steps} steps at batch {digits.train.batch_size}; "
        f"`{rl_table.BASES['shapes']}` = {shapes.model.arch}/{shapes.model.size} on "
        f"{shapes.data.name}, {shapes.train.steps} steps at batch {shapes.train.batch_size}.",
        f"- RL (configs/rl_table.py): {rl.train.iterations} iterations of "
        f"{rl.rollout.prompts_per_iter} prompts × {rl.rollout.group_size} samples, "
        f"{rl.rollout.num_steps}-step ODE rollouts (shift {rl.rollout.shift}), no CFG, "
        f"{rl.train.renoise_draws} re-noise draws (NFT/AWM), minibatch {rl.train.minibatch_size}"
        f" (DPO: {rl_table.get_config('dpo,digits_logprob').train.minibatch_size} pairs); "
        "learning rates and objective settings of configs/rl_<method>.py (NFT 3e-4, AWM and "
        f"DPO 1e-4); checkpoints every {rl_table.CHECKPOINT_EVERY} iterations.",
        f"- NormGuard: relative hinge max(0, ‖v_θ‖/‖v_ref‖ − 1), power 1, no margin, λ = "
        f"{main_sweep.GUARD_WEIGHT} in the main table.",
        f"- Evaluation (configs/eval_table.py): {ev.sample.per_class} samples per class for "
        f"digits (300), {eval_table.PER_CLASS['shapes']} for shapes (320), fixed seeds, "
        f"{ev.sample.num_steps}-step ODE (shift {ev.sample.shift}), no CFG. FD, recall, "
        "judged real and precision against the held-out split (quality metrics, not the "
        "reward); out of range = fraction of pixels beyond [-1.05, 1.05]; ρ = mean over ODE "
        "steps and the first 100 samples of ‖v_θ(x_k)‖/‖v_ref(x_k)‖ on θ's own trajectory.",
    ]


def analyse(lambda_choice: tuple[str, str] | None) -> None:
    data = collect()
    choice = lambda_choice or choose_lambda_setting(data["main"])
    lam_rows = collect_lambda(*choice) if choice else {}
    delta_lines, deltas = delta_md(data)
    few_lines, gaps = fewstep_md(data)
    early_lines, early = earlystop_md(data)
    os.makedirs(RESULTS, exist_ok=True)
    plot_lambda(lam_rows, *choice, os.path.join(RESULTS, "main_table_lambda.png")) \
        if choice else None
    plot_fewstep(data, os.path.join(RESULTS, "main_table_fewstep.png"))
    plot_earlystop(data, os.path.join(RESULTS, "main_table_earlystop.png"))
    lines = [
        "# Main table, λ sweep, few-step inference, early-stopping control",
        "",
        "Command: `python experiments/main_table.py` (runs the sweeps configs/sweeps/"
        "{table_main,table_lambda,table_earlystop,table_fewstep}.py, then this analysis; "
        "`--stages analyse` rewrites this file from the finished cells).",
        "",
        *sizes_md(),
        f"- Scope (budget): the λ sweep on one setting; the early-stopping checkpoints "
        f"(iterations {', '.join(map(str, table_earlystop.STEPS))}) for "
        f"{', '.join(table_earlystop.SETTINGS)}; few-step inference for "
        f"{', '.join(table_fewstep.METHODS)} on {', '.join(table_fewstep.SETTINGS)}.",
        "",
        wall_time_md(),
        "",
        "Noise: two identical single-seed NFT runs differed by about 1.0 in log p(class) and "
        f"3 in FD (experiments/README.md, \"Noise\"). Differences below FD {NOISE['fd']:g}, "
        f"recall {NOISE['recall']:g} or judged real {NOISE['realism']:g} are treated as noise "
        "here (the last two are guesses of the same order as the spread seen between runs).",
        "",
        "## Main table",
        "",
        "Reward = the reward the run optimised (`digits_logprob`: log p(class); "
        "`digits_contrast`: pixel std; `shapes_rule`: exact shape × colour match; "
        "`shapes_saturation`: mean chroma).",
        "",
        *main_table_md(data),
        "",
        "Guarded minus unguarded. Hinge active = fraction of training rows with ‖v_θ‖ > "
        "‖v_ref‖, averaged over the logged iterations (4, 8, 12) of the guarded run. A hinge "
        "that never acts leaves the run bit-identical to the unguarded one; where it acted on "
        "only a few rows (other iterations were not logged), the gap between the two runs is "
        "mostly run-to-run divergence, which RL amplifies from tiny differences: those pairs "
        "show the noise at this size.",
        "",
        *delta_lines,
        "",
        "## Samples",
        "",
        *(samples_md(data) or ["no finished pair yet"]),
        "",
        "## λ sweep",
        "",
        *(lambda_md(lam_rows, *choice) if choice else ["not run yet"]),
        "",
        "![λ sweep](main_table_lambda.png)" if choice else "",
        "",
        "## Few-step inference",
        "",
        *few_lines,
        "",
        "![few-step](main_table_fewstep.png)",
        "",
        "## Early-stopping control",
        "",
        "Each guarded run is matched with the checkpoint of the unguarded run of the same "
        "setting and method (base = iteration 0, then every "
        f"{rl_table.CHECKPOINT_EVERY} iterations) whose reward is closest to the guarded "
        "run's final reward. If NormGuard only slowed the optimisation down, the matched "
        "checkpoint would have the guarded run's quality. Intermediate checkpoints were "
        f"evaluated for {', '.join(table_earlystop.SETTINGS)}; for the other settings the "
        "unguarded path is only the base and the final checkpoint. When the closest checkpoint "
        "is far from the guarded reward, the unguarded path interpolated at that reward is the "
        "fairer control: a verdict \"yes, between checkpoints\" means that interpolation has "
        "the guarded FD or better (linear between two checkpoints, so an estimate).",
        "",
        *early_lines,
        "",
        "![early stopping](main_table_earlystop.png)",
        "",
        missing_md(data["missing"]),
        "",
    ]
    with open(os.path.join(RESULTS, "main_table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, "main_table.json"), "w", encoding="utf-8") as f:
        json.dump({"data": data, "lambda_setting": choice,
                   "lambda": {f"{k:g}": v for k, v in lam_rows.items()}, "deltas": deltas,
                   "fewstep_gaps": gaps, "earlystop": early}, f, indent=1)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=DEFAULT_STAGES,
                        help="comma-separated stages, run in order; 'main:<pattern>|<pattern>' "
                        "runs only the table cells whose names match")
    parser.add_argument("--lambda_setting", default="",
                        help="<setting>,<method> of the λ sweep ('' = largest unguarded ρ)")
    parser.add_argument("--num_hosts", type=int, default=0)
    parser.add_argument("--host_index", type=int, default=-1)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted({s.partition(":")[0] for s in stages} - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    choice = None
    if args.lambda_setting:
        setting, _, method = args.lambda_setting.partition(",")
        rl_table.parse(f"{method},{setting}")
        choice = (setting, method)
    hosts = ([f"--config.num_hosts={args.num_hosts}"] if args.num_hosts else []) + (
        [f"--config.host_index={args.host_index}"] if args.host_index >= 0 else [])
    os.chdir(REPO)
    for stage in stages:
        name, _, only = stage.partition(":")
        only_flag = [f"--config.only={only.replace('|', ',')}"] if only else []
        if name == "bases":
            make_bases(tuple(only.split("|")) if only else tuple(rl_table.BASES))
        elif name == "main":
            run_sweep("configs/sweeps/table_main.py", hosts + only_flag)
        elif name == "lambda":
            rule = ("given on the command line" if choice else
                    "largest ρ among the unguarded digits runs of the main table")
            choice = choice or choose_lambda_setting(collect()["main"])
            if choice is None:
                print("λ sweep skipped: the main table's unguarded digits runs are not all "
                      "evaluated (pass --lambda_setting to choose without them)", flush=True)
                continue
            record_lambda_choice(choice, rule)
            print(f"λ sweep on {choice} ({rule})", flush=True)
            run_sweep(f"configs/sweeps/table_lambda.py:{choice[0]},{choice[1]}",
                      hosts + only_flag)
        elif name == "earlystop":
            run_sweep("configs/sweeps/table_earlystop.py", hosts + only_flag)
        elif name == "fewstep":
            run_sweep("configs/sweeps/table_fewstep.py", hosts + only_flag)
        elif name == "analyse":
            analyse(choice)

if __name__ == "__main__":
    main()

"""Do NormGuard's variants avoid the per-sample hinge's undershoot at low σ? Seeds, early
stopping, few-step sampling and the guided-velocity guard under CFG, on the run that inflates
(NFT on contrast).

Usage (from the repository root; resumable: finished cells are skipped on rerun):
  python experiments/guard_variants.py [--stages base,sweep,analyse]

Stages:
- ``base``: pretrains the quickstart's digits base (configs/table_base.py:digits) if missing;
- ``sweep``: ``python -m experiments.sweep --config=configs/sweeps/guard_variants.py`` (arms,
  seeds and cells are in that file's docstring);
- ``analyse``: writes ``experiments/results/guard_variants.md`` and ``.json``,
  ``guard_variants_profile.png`` (sampling ρ_k per ODE step and training ρ per iteration, per
  arm) and ``guard_variants_tradeoff.png`` (reward against FD and saturation, every arm and
  seed, with the unguarded runs' checkpoint paths) from the finished cells. The CFG arms are
  compared with the CFG unguarded arm and with each other, not with the arms without CFG.

Conventions: a cell's summary is table_sweeps.summarise's dict plus ``per_step`` (the sampling
ρ_k of the 20 ODE steps, σ from 1 to 0, mean over samples), ``rho_last`` (ρ of the last step)
and ``rho_late`` (mean of the last ``LATE`` steps). Differences are paired by seed (both arms
of a seed share the base, the prompts and the first rollouts), with s.e. = std/√n and the
two-sided 5 % t critical value of experiments/seed_spread.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs.sweeps import guard_variants as gv  # noqa: E402
from experiments import seed_spread, table_sweeps, tables  # noqa: E402

REPO = table_sweeps.REPO
RESULTS = table_sweeps.RESULTS
SWEEP = "configs/sweeps/guard_variants.py"
OUT = "guard_variants"
STAGES = ("base", "sweep", "analyse")
LATE = 3  # the last ODE steps, σ < 0.1 with shift 3 and 20 steps
METRICS = (("reward", "contrast ↑", "{:.3f}"), ("fd", "FD ↓", "{:.2f}"),
           ("recall", "recall ↑", "{:.3f}"), ("realism", "judged real ↑", "{:.3f}"),
           ("out_of_range", "out of range ↓", "{:.3f}"), ("rho", "ρ (20 steps)", "{:.3f}"),
           ("rho_late", f"ρ last {LATE} steps", "{:.3f}"), ("rho_last", "ρ last step", "{:.3f}"))
QUALITY = ("fd", "recall", "realism", "out_of_range")
NAMES = {"reward": "contrast", "fd": "FD", "recall": "recall", "realism": "judged real",
         "out_of_range": "out of range", "rho": "ρ", "rho_late": f"ρ last {LATE}",
         "rho_last": "ρ last step"}
LABELS = {"plain": "unguarded", "sample": "per-sample hinge (default)",
          "batch": "batch ratio", "bins": "4 σ bins", "ramp": "cosine σ ramp",
          "cfg_plain": "CFG: unguarded", "cfg_cond": "CFG: conditional-velocity hinge",
          "cfg_guided": "CFG: guided-velocity hinge"}
ALL_ARMS = {**gv.ARMS, **gv.CFG_ARMS}
TRAIN_KEYS = {"ratio": "train/normguard/ratio", "active": "train/normguard/active_frac",
              "reward": "reward/mean", "grad_base": "train/normguard/grad_norm_base",
              "grad_penalty": "train/normguard/grad_norm_penalty",
              "grad_share": "train/normguard/grad_norm_ratio"}


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def evaluation(name: str) -> dict | None:
    """Summary of the finished evaluation cell ``name`` with the per-step ρ, or None."""
    result = table_sweeps.load_eval(gv.WORKROOT, name)
    row = table_sweeps.summarise(result, gv.SETTING)
    if row is None:
        return None
    per_step = [float(r) for r in result["norm_ratio"]["per_step"]]
    row.update(per_step=per_step, rho_last=per_step[-1],
               rho_late=float(np.mean(per_step[-LATE:])))
    return row


def training_log(rl_cell: str) -> dict[str, list]:
    """Per-iteration series of one RL cell (``iteration`` and the ``TRAIN_KEYS``; a key the
    run did not log is left out); {} when the cell has no metrics yet."""
    rows = table_sweeps.metric_rows(os.path.join(table_sweeps.REPO, gv.WORKROOT, rl_cell),
                                    TRAIN_KEYS["ratio"])
    if not rows:
        return {}
    out = {"iteration": [r["step"] for r in rows]}
    for name, key in TRAIN_KEYS.items():
        if all(key in r for r in rows):
            out[name] = [float(r[key]) for r in rows]
    return out


def gradient_share(log: Mapping[str, list]) -> float | None:
    """Mean of ‖∇ λ·penalty‖ / ‖∇ base loss‖ over the iterations where the hinge was active
    (None when it never was, or the norms were not logged)."""
    share, active = log.get("grad_share"), log.get("active")
    if not share or not active:
        return None
    values = [g for g, a in zip(share, active, strict=True) if a > 0]
    return float(np.mean(values)) if values else None


def collect() -> dict:
    """Every finished cell: ``base``/``base_n4``/``base_cfg`` summaries; ``final[arm][seed]``
    (every arm of ``ALL_ARMS``; summary with
    ``hinge_active`` and ``grad_share``), ``train[arm][seed]``, ``early[seed][k]``,
    ``fewstep[arm][seed]`` and the ``missing`` cell names."""
    out = {"base": None, "base_n4": None, "base_cfg": None, "final": {}, "train": {},
           "early": {}, "fewstep": {}, "missing": []}

    def get(name: str) -> dict | None:   # the summary, or None with the cell listed as missing
        row = evaluation(name)
        if row is None:
            out["missing"].append(name)
        return row

    out.update(base=get("eval-base"), base_n4=get(f"eval-base-n{gv.FEWSTEP}"),
               base_cfg=get("eval-base-cfg"))
    for arm in ALL_ARMS:
        for seed in gv.SEEDS:
            key = f"{arm}-s{seed}"
            row = get(f"eval-{key}")
            if row is None:
                continue
            log = training_log(f"rl-{key}")
            row["hinge_active"] = float(np.mean(log["active"])) if log.get("active") else None
            row["grad_share"] = gradient_share(log)
            out["final"].setdefault(arm, {})[seed] = row
            out["train"].setdefault(arm, {})[seed] = log
            few = get(f"eval-{key}-n{gv.FEWSTEP}") if arm in gv.FEWSTEP_ARMS else None
            if few is not None:
                out["fewstep"].setdefault(arm, {})[seed] = few
    for seed in gv.SEEDS:
        for k in gv.EARLY_STEPS:
            row = get(f"eval-plain-s{seed}-it{k}")
            if row is not None:
                out["early"].setdefault(seed, {})[k] = row
    return out


# ----------------------------------------------------------------------------------------------
# Statistics (pure).
# ----------------------------------------------------------------------------------------------


def paired_arms(runs: Mapping[int, dict], ref: Mapping[int, dict], keys: Sequence[str]) -> dict:
    """seed_spread.paired of ``runs − ref`` over their common seeds, per key."""
    seeds = sorted(set(runs) & set(ref))
    return {k: seed_spread.paired([runs[s][k] for s in seeds], [ref[s][k] for s in seeds])
            for k in keys}


def moved(diffs: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    """Metrics whose paired difference is beyond the 5 % critical value: (up, down)."""
    up = [k for k, d in diffs.items() if seed_spread.significant_sign(d) > 0]
    down = [k for k, d in diffs.items() if seed_spread.significant_sign(d) < 0]
    return up, down


def unguarded_path(data: dict, seed: int) -> list[tuple[int, dict]]:
    """(iteration, summary) of seed's unguarded run: base, ``EARLY_STEPS``, last; finished
    ones only."""
    path = [(0, data["base"])]
    path += [(k, data["early"].get(seed, {}).get(k)) for k in gv.EARLY_STEPS]
    path.append((gv.ITERATIONS, data["final"].get("plain", {}).get(seed)))
    return [(k, r) for k, r in path if r is not None]


def earlystop(data: dict, arm: str) -> dict:
    """The early-stopping control of one guarded arm: per seed, the unguarded checkpoint whose
    reward is closest to the arm's (``matched``: seed -> iteration), and the paired difference
    arm − matched checkpoint of the reward and every ``QUALITY`` metric (``diffs``)."""
    runs, matched = data["final"].get(arm, {}), {}
    pairs_arm, pairs_ref = {}, {}
    for seed, row in runs.items():
        path = unguarded_path(data, seed)
        if len(path) < 2:
            continue
        k, ref = tables.closest_on_path(path, row["reward"])
        matched[seed], pairs_arm[seed], pairs_ref[seed] = k, row, ref
    return {"matched": matched,
            "diffs": paired_arms(pairs_arm, pairs_ref, ("reward", *QUALITY))}


def fewstep(data: dict) -> dict:
    """The guard's effect at ``FEWSTEP`` steps against 20 steps: per key, the paired
    differences guarded − unguarded at each step count and their change (few − 20)."""
    few, full = data["fewstep"], data["final"]
    seeds = sorted(set.intersection(*(set(few.get(a, {})) for a in ("plain", "sample")),
                                    *(set(full.get(a, {})) for a in ("plain", "sample"))))
    keys = ("reward", "fd", "recall", "realism", "out_of_range", "rho")
    out = {"seeds": seeds, "n20": {}, "few": {}, "change": {}}
    for k in keys:
        d20 = [full["sample"][s][k] - full["plain"][s][k] for s in seeds]
        dfew = [few["sample"][s][k] - few["plain"][s][k] for s in seeds]
        out["n20"][k] = seed_spread.paired(d20, [0.0] * len(seeds))
        out["few"][k] = seed_spread.paired(dfew, [0.0] * len(seeds))
        out["change"][k] = seed_spread.paired(dfew, d20)
    return out


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------


def mean_table(data: dict) -> list[str]:
    """One row per arm: mean ± s.e. over its finished seeds, hinge activity, gradient share."""
    lines = tables.header(["arm", "seeds", *[label for _, label, _ in METRICS], "hinge active",
                           "‖∇pen‖/‖∇base‖ (active it.)"], left=2)
    for key, label in (("base", "base"), ("base_cfg", f"base, CFG {gv.CFG_SCALE}")):
        if data[key]:
            lines.append(f"| {label} | | " + " | ".join(spec.format(data[key][k])
                                                      for k, _, spec in METRICS) + " | | |")
    for arm, runs in data["final"].items():
        rows = list(runs.values())
        cells = [seed_spread.fmt_mean_se(*tables.mean_se([r[k] for r in rows]), len(rows), spec)
                 for k, _, spec in METRICS]
        extra = []
        for key in ("hinge_active", "grad_share"):
            vals = [r[key] for r in rows if r[key] is not None]
            extra.append(seed_spread.fmt_mean_se(*tables.mean_se(vals), len(vals), "{:.2f}")
                         if vals else tables.MISSING)
        lines.append(f"| {LABELS[arm]} | {len(rows)} | " + " | ".join(cells + extra) + " |")
    return lines


def diff_table(data: dict, ref: str, arms: Sequence[str]) -> tuple[list[str], dict]:
    """Paired differences of each of ``arms`` (other than ``ref``) against ``ref``, with the
    metrics that moved beyond the 5 % critical value."""
    lines = tables.header([f"arm − {LABELS[ref]}", "seeds",
                           *[label for _, label, _ in METRICS], "moved (5 %)"], left=2)
    stats = {}
    for arm in arms:
        runs = data["final"].get(arm)
        if arm == ref or runs is None or ref not in data["final"]:
            continue
        diffs = paired_arms(runs, data["final"][ref], [k for k, _, _ in METRICS])
        stats[arm] = diffs
        up, down = moved(diffs)
        n = next(iter(diffs.values()))["n"]
        said = "; ".join(p for p in (("up: " + ", ".join(NAMES[k] for k in up)) if up else "",
                                     ("down: " + ", ".join(NAMES[k] for k in down)) if down
                                     else "") if p)
        lines.append(f"| {LABELS[arm]} | {n} | " + " | ".join(
            seed_spread.fmt_diff(diffs[k], spec) for k, _, spec in METRICS)
            + f" | {said or ('–' if n < 2 else 'nothing')} |")
    if not stats:
        lines.append("| (no finished pair yet) |" + " |" * (len(METRICS) + 2))
    return lines, stats


def earlystop_table(data: dict) -> tuple[list[str], dict]:
    """Every guarded arm against the unguarded checkpoint of equal reward, paired by seed."""
    spec = dict((k, s) for k, _, s in METRICS)
    label = dict((k, lb) for k, lb, _ in METRICS)
    lines = tables.header(["guarded arm", "matched unguarded iteration per seed",
                           *[f"Δ {label[k]}" for k in ("reward", *QUALITY)],
                           "quality better / worse (5 %)"], left=2)
    stats = {}
    for arm in data["final"]:
        if arm == "plain" or arm not in gv.ARMS:
            continue
        es = earlystop(data, arm)
        stats[arm] = es
        if not es["matched"]:
            continue
        up, down = moved({k: es["diffs"][k] for k in QUALITY})
        better = [NAMES[k] for k in up if k in ("recall", "realism")] + [
            NAMES[k] for k in down if k in ("fd", "out_of_range")]
        worse = [NAMES[k] for k in down if k in ("recall", "realism")] + [
            NAMES[k] for k in up if k in ("fd", "out_of_range")]
        matched = ", ".join(f"s{s}: it {k}" for s, k in sorted(es["matched"].items()))
        lines.append(f"| {LABELS[arm]} | {matched} | " + " | ".join(
            seed_spread.fmt_diff(es["diffs"][k], spec[k]) for k in ("reward", *QUALITY))
            + f" | {', '.join(better) or '–'} / {', '.join(worse) or '–'} |")
    return lines, stats


def fewstep_table(data: dict, fs: dict) -> list[str]:
    """The guard's paired effect at 20 and at ``FEWSTEP`` steps, and its change."""
    spec = dict((k, s) for k, _, s in METRICS)
    lines = [f"Base: contrast {tables.fmt(data['base'] and data['base']['reward'])} at 20 steps, "
             f"{tables.fmt(data['base_n4'] and data['base_n4']['reward'])} at {gv.FEWSTEP}; FD "
             f"{tables.fmt(data['base'] and data['base']['fd'], '{:.2f}')} and "
             f"{tables.fmt(data['base_n4'] and data['base_n4']['fd'], '{:.2f}')}.", ""]
    lines += tables.header(["per-sample guard − unguarded", *(NAMES[k] for k in fs["n20"])],
                           left=1)
    for part, label in (("n20", "20 steps"), ("few", f"{gv.FEWSTEP} steps"),
                        ("change", f"change ({gv.FEWSTEP} − 20)")):
        lines.append(f"| {label} | " + " | ".join(
            seed_spread.fmt_diff(d, spec.get(k, "{:.3f}")) for k, d in fs[part].items()) + " |")
    return lines


# ----------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------


def plot_profile(data: dict, path: str) -> None:
    """Left: sampling ρ_k per ODE step (mean over seeds, band: min-max). Right: training ρ per
    RL iteration (mean over seeds)."""
    if not data["final"]:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, runs) in enumerate(data["final"].items()):
        steps = np.array([r["per_step"] for r in runs.values()])
        x = np.arange(steps.shape[1])
        ls = "--" if arm in gv.CFG_ARMS else "-"
        ax0.plot(x, steps.mean(0), color=f"C{i}", lw=1.4, ls=ls,
                 label=f"{LABELS[arm]} ({len(runs)})")
        ax0.fill_between(x, steps.min(0), steps.max(0), color=f"C{i}", alpha=0.12)
        logs = [data["train"][arm][s] for s in runs if data["train"][arm][s].get("ratio")]
        if logs:
            n = min(len(lg["ratio"]) for lg in logs)
            ax1.plot(logs[0]["iteration"][:n], np.mean([lg["ratio"][:n] for lg in logs], 0),
                     color=f"C{i}", lw=1.4, ls=ls, label=LABELS[arm])
    if data["base"]:
        ax0.plot(data["base"]["per_step"], color="k", lw=0.8, ls=":", label="base")
    for ax in (ax0, ax1):
        ax.axhline(1.0, color="k", lw=0.5)
    ax0.set(xlabel="ODE step (σ from 1 to 0)", ylabel="sampling ρ_k = ‖v_θ‖/‖v_ref‖",
            title="θ's own trajectory (band: min–max; dashed: CFG)")
    ax1.set(xlabel="RL iteration", ylabel="training ρ (training rows)",
            title="During training (mean over seeds)")
    ax0.legend(fontsize=7)
    fig.suptitle("NFT on contrast, 24 iterations: where each NormGuard variant holds ρ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(data: dict, path: str) -> None:
    """Reward against FD and against the out-of-range fraction: every arm and seed, and each
    seed's unguarded checkpoint path (base, 8, 16, 24 iterations) as a thin line."""
    if not data["final"]:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "fd", "FD ↓"), (axes[1], "out_of_range", "out of range ↓")):
        for seed in gv.SEEDS:
            p = unguarded_path(data, seed)
            if len(p) > 1:
                ax.plot([r["reward"] for _, r in p], [r[key] for _, r in p], color="0.6",
                        lw=0.8, marker=".", ms=4)
        for i, (arm, runs) in enumerate(data["final"].items()):
            ax.scatter([r["reward"] for r in runs.values()], [r[key] for r in runs.values()],
                       color=f"C{i}", s=28, label=LABELS[arm], zorder=3,
                       marker="^" if arm in gv.CFG_ARMS else "o")
        if data["base"]:
            ax.scatter([data["base"]["reward"]], [data["base"][key]], color="k", marker="x",
                       label="base", zorder=3)
        ax.set(xlabel="contrast reward ↑", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Reward against quality (grey: unguarded checkpoints at 0, 8, 16, 24 it.)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def analyse(command: str) -> dict:
    """Writes the markdown, JSON and plots of the finished cells; returns the statistics."""
    data = collect()
    lines = ["# NormGuard variants where ρ inflates (NFT on contrast)", "",
             f"Command: `{command}` (sweep: `{SWEEP}`; {gv.ITERATIONS} iterations of 8 prompts "
             f"× 8 samples on the digits base, seeds {', '.join(map(str, gv.SEEDS))}, λ = "
             f"{gv.GUARD_WEIGHT} for every guarded arm). Means ± s.e. over seeds; differences "
             "paired by seed, t in brackets, 'moved' when |t| exceeds the two-sided 5 % critical "
             "value (4.30 for 3 seeds); no correction for the number of comparisons.", "",
             "## Every arm", ""]
    lines += mean_table(data)
    stats = {}
    comparisons = (("plain", list(gv.ARMS), "Paired differences against the unguarded arm"),
                   ("sample", [a for a in gv.ARMS if a != "plain"],
                    "Paired differences against the default guard"),
                   ("cfg_plain", list(gv.CFG_ARMS),
                    f"Under CFG {gv.CFG_SCALE}: paired differences against the unguarded arm"),
                   ("cfg_cond", ["cfg_guided"],
                    f"Under CFG {gv.CFG_SCALE}: guarding the guided against the conditional "
                    "velocity"))
    for ref, arms, title in comparisons:
        lines += ["", f"## {title}", ""]
        part, stats[f"vs_{ref}"] = diff_table(data, ref, arms)
        lines += part
    lines += ["", "## Early stopping: each guarded arm against the unguarded checkpoint of "
              "equal reward", "",
              "For each seed the unguarded run's checkpoint (base, 8, 16 or 24 iterations) whose "
              "contrast is closest to the guarded run's; Δ = guarded − matched, paired by seed. "
              "A guard beats early stopping only where a quality metric is better here.", ""]
    part, stats["earlystop"] = earlystop_table(data)
    lines += part
    stats["fewstep"] = fewstep(data)
    lines += ["", f"## Few-step sampling: the default guard's effect at {gv.FEWSTEP} and 20 steps",
              ""]
    lines += fewstep_table(data, stats["fewstep"])
    if data["missing"]:
        lines += ["", "Not finished: " + ", ".join(data["missing"])]
    lines += ["", f"![ρ per step and over training]({OUT}_profile.png)", "",
              f"![reward against quality]({OUT}_tradeoff.png)"]
    table_sweeps.write_report(RESULTS, OUT, lines, {"data": data, "stats": stats})
    plot_profile(data, os.path.join(RESULTS, OUT + "_profile.png"))
    plot_tradeoff(data, os.path.join(RESULTS, OUT + "_tradeoff.png"))
    print("\n".join(lines), flush=True)
    return stats


def main():
    parser = table_sweeps.stage_parser(__doc__, STAGES)
    args = parser.parse_args()
    stages = table_sweeps.chosen_stages(parser, args.stages, STAGES)
    os.chdir(REPO)
    for stage in stages:
        if stage == "base":
            table_sweeps.make_bases(["digits"])
        elif stage == "sweep":
            table_sweeps.run_sweep(SWEEP, [])
        elif stage == "analyse":
            analyse("python experiments/guard_variants.py"
                    + (f" --stages {args.stages}" if args.stages != ",".join(STAGES) else ""))


if __name__ == "__main__":
    main()

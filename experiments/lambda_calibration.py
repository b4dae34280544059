"""λ calibrated per method: the penalty's gradient a stated fraction of the base loss's.

Usage (from the repository root; resumable: finished cells are skipped on rerun):
  python experiments/lambda_calibration.py [--stages base,calibrate,sweep,analyse]
``--stages analyse`` only rewrites the results from the finished cells.

Stages:
- ``base``: pretrains the quickstart's digits base (configs/table_base.py:digits) if missing;
- ``calibrate``: the unguarded calibration cells of every method (and the base's evaluation):
  ``python -m experiments.sweep --config=configs/sweeps/lambda_calibration.py:calibrate``;
- ``sweep``: the same config without the argument: λ of every fraction is read from the
  finished calibration logs when the grid is built, then the fraction cells, the λ = 0.1
  cells and every evaluation run (a method whose calibration is missing has no fraction
  cells; the reason is printed);
- ``analyse``: writes ``experiments/results/lambda_calibration.md``, ``.json``,
  ``lambda_calibration.png`` and ``lambda_calibration_training.png``.

Measures (all from ``train/normguard/*`` in each RL cell's metrics.jsonl, one row per
iteration, each the mean over that iteration's minibatch updates): ‖∇ base_loss‖
(``grad_norm_base``), ‖∇ penalty‖ (``grad_norm_penalty_unweighted``), the achieved fraction
‖∇ λ·penalty‖ / ‖∇ base_loss‖ (``grad_norm_ratio``, averaged over the iterations where the
hinge was active: ``active_frac > 0``), the hinge's active fraction of training rows
(``active_frac``, averaged over every iteration) and the training ρ (``ratio``). Sampling ρ
and the quality metrics come from each RL cell's evaluation (table_sweeps.summarise).
"""

from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs.sweeps import lambda_calibration as cal  # noqa: E402
from experiments import sweep, table_sweeps, tables  # noqa: E402

REPO = table_sweeps.REPO
RESULTS = table_sweeps.RESULTS
SWEEP = "configs/sweeps/lambda_calibration.py"
OUT = "lambda_calibration"
STAGES = ("base", "calibrate", "sweep", "analyse")
LAST = 4              # iterations averaged for the final training ρ
FEW_ACTIVE = 4        # a calibration active in fewer iterations than this is flagged
SKEW = 1.3            # mean-based λ / median-based λ above this (or below 1/SKEW) is flagged
DEFAULT_ARM = f"lam{cal.DEFAULT_LAMBDA:g}"
EVAL_COLS = (("reward", "contrast ↑"), ("fd", "FD ↓"), ("recall", "recall ↑"),
             ("realism", "judged real ↑"), ("out_of_range", "out of range ↓"),
             ("rho", "sampling ρ"))


def training_log(cell: str) -> dict[str, list]:
    """Per-iteration NormGuard scalars of one RL cell: lists of equal length under
    ``iteration``, ``ratio`` (training ρ), ``active_frac``, ``grad_norm_base``,
    ``grad_norm_penalty`` (λ-weighted), ``grad_norm_penalty_unweighted``, ``grad_norm_ratio``
    and ``reward`` ({} when missing)."""
    rows = cal.read_metrics(cell)
    if not rows:
        return {}
    p = cal.METRIC
    out = {"iteration": [r["step"] for r in rows],
           "reward": [r.get("reward/mean", float("nan")) for r in rows]}
    for key in ("ratio", "active_frac", "grad_norm_base", "grad_norm_penalty",
                "grad_norm_penalty_unweighted", "grad_norm_ratio"):
        out[key] = [float(r.get(p + key, float("nan"))) for r in rows]
    return out


def arm_stats(log: dict) -> dict:
    """Summary of one RL cell's log: ``achieved_fraction`` (mean ``grad_norm_ratio`` over the
    iterations with ``active_frac > 0``; NaN when none), ``achieved_of_means`` (mean
    ``grad_norm_penalty`` / mean ``grad_norm_base`` over the same iterations: the form λ is
    calibrated in), ``active_iterations``, ``iterations``,
    ``hinge_active`` (mean ``active_frac`` over every iteration) and ``train_rho_last`` (mean
    training ρ of the last ``LAST`` iterations)."""
    if not log:
        return {}
    act = [i for i, a in enumerate(log["active_frac"]) if a > 0]
    ratio = [log["grad_norm_ratio"][i] for i in act]
    pen = [log["grad_norm_penalty"][i] for i in act]
    base = [log["grad_norm_base"][i] for i in act]
    return {"achieved_fraction": float(np.mean(ratio)) if ratio else float("nan"),
            "achieved_of_means": float(np.mean(pen) / np.mean(base)) if act else float("nan"),
            "active_iterations": len(act), "iterations": len(log["iteration"]),
            "hinge_active": float(np.mean(log["active_frac"])),
            "train_rho_last": float(np.mean(log["ratio"][-LAST:]))}


def _done(cell: str) -> bool:
    return os.path.exists(os.path.join(REPO, cal.WORKROOT, cell, sweep.DONE_MARKER))


def collect() -> dict:
    """Every finished cell: the base's evaluation, and per method its calibration (norms, λ per
    fraction or why not), and per arm its λ, target fraction, training log, stats and
    evaluation. Unfinished cells are listed under ``missing``."""
    out = {"base": table_sweeps.summarise(table_sweeps.load_eval(cal.WORKROOT, "eval-base"),
                                          cal.SETTING),
           "methods": {}, "missing": [], "cell_minutes": 0.0}
    if out["base"] is None:
        out["missing"].append("eval-base")
    for seconds in sweep.finished_seconds(os.path.join(REPO, cal.WORKROOT)).values():
        out["cell_minutes"] += seconds / 60
    for m in cal.METHODS:
        entry = {"calibration": None, "lambdas": {}, "not_calibrated": None, "arms": {}}
        try:
            norms = cal.calibration_norms(m)
            entry["calibration"] = norms
            entry["lambdas"] = {cal.arm_name(f): lam
                                for f, lam in cal.calibrated_lambdas(m).items()}
            entry["median_lambdas"] = {
                cal.arm_name(f): f * norms["median_base"] / norms["median_penalty"]
                for f in cal.FRACTIONS}
            entry["default_fraction"] = (cal.DEFAULT_LAMBDA * norms["mean_penalty"]
                                         / norms["mean_base"])
        except cal.NotCalibrated as e:
            entry["not_calibrated"] = str(e)
        arms = {"calib": (0.0, 0.0)}
        arms.update({cal.arm_name(f): (entry["lambdas"].get(cal.arm_name(f)), f)
                     for f in cal.FRACTIONS})
        if m not in cal.SKIP_DEFAULT:
            arms[DEFAULT_ARM] = (cal.DEFAULT_LAMBDA, entry.get("default_fraction"))
        for arm, (lam, target) in arms.items():
            rl, ev = f"rl-{m}-{arm}", f"eval-{m}-{arm}"
            if not _done(rl):
                out["missing"].append(rl)
                continue
            log = training_log(rl)
            summary = table_sweeps.summarise(table_sweeps.load_eval(cal.WORKROOT, ev),
                                             cal.SETTING)
            if summary is None:
                out["missing"].append(ev)
            entry["arms"][arm] = {"lambda": lam, "target_fraction": target, "train": log,
                                  "stats": arm_stats(log), "eval": summary}
        out["methods"][m] = entry
    return out


def _f(x, spec="{:.3f}") -> str:
    return tables.fmt(x, spec) if x is not None and np.isfinite(x) else "–"


def calibration_md(data: dict) -> list[str]:
    """The calibration table: norms (mean and median over active iterations), λ per fraction
    and what λ = 0.1 corresponds to, markdown lines."""
    pct = " / ".join(f"{100 * f:g} %" for f in cal.FRACTIONS)
    lines = [f"| method | active iterations | ‖∇ base‖ mean (median) | ‖∇ penalty‖ mean (median) "
             f"| λ for {pct} | λ from medians | λ = {cal.DEFAULT_LAMBDA:g} as a fraction "
             "(mean; medians) |", "|---|---:|---:|---:|---|---|---|"]
    for m, e in data["methods"].items():
        n = e["calibration"]
        if n is None:
            lines.append(f"| {m} | not calibrated: {e['not_calibrated']} | | | | | |")
            continue
        lams = " / ".join(_f(e["lambdas"][cal.arm_name(f)], "{:.4g}") for f in cal.FRACTIONS)
        med = " / ".join(_f(e["median_lambdas"][cal.arm_name(f)], "{:.4g}")
                         for f in cal.FRACTIONS)
        med_frac = cal.DEFAULT_LAMBDA * n["median_penalty"] / n["median_base"]
        lines.append(f"| {m} | {n['active_iterations']} of {n['iterations']} | "
                     f"{n['mean_base']:.3f} ({n['median_base']:.3f}) | "
                     f"{n['mean_penalty']:.3f} ({n['median_penalty']:.3f}) | {lams} | {med} | "
                     f"{100 * e['default_fraction']:.1f} %; {100 * med_frac:.1f} % |")
    return lines


def method_md(m: str, entry: dict, base: dict | None) -> list[str]:
    """One method's table: base, unguarded (calibration) and every guarded arm, with λ, target
    and achieved fraction, hinge activity, training ρ and the evaluation, markdown lines."""
    head = " | ".join(label for _, label in EVAL_COLS)
    lines = [f"| arm | λ | target fraction | achieved fraction (of means) | active it. "
             f"| hinge active | training ρ (last {LAST}) | {head} |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(EVAL_COLS)]

    def evals(row):
        if row is None:
            return " | ".join(["(evaluation missing)"] + [""] * (len(EVAL_COLS) - 1))
        return " | ".join(_f(row[k], "{:.2f}" if k == "fd" else "{:.3f}") for k, _ in EVAL_COLS)

    lines.append(f"| base | | | | | | | {evals(base)} |")
    for arm, a in entry["arms"].items():
        s = a["stats"]
        label = "unguarded (calib)" if arm == "calib" else arm
        target = ("–" if a["target_fraction"] in (None, 0.0)
                  else f"{100 * a['target_fraction']:.1f} %")
        achieved = (f"{100 * s['achieved_fraction']:.1f} % ({100 * s['achieved_of_means']:.1f} %)"
                    if s and np.isfinite(s["achieved_fraction"]) else "–")
        lines.append(f"| {label} | {_f(a['lambda'], '{:.4g}')} | {target} | "
                     f"{achieved if arm != 'calib' else '–'} | "
                     f"{s.get('active_iterations', 0)} of {s.get('iterations', 0)} | "
                     f"{_f(s.get('hinge_active'))} | {_f(s.get('train_rho_last'))} | "
                     f"{evals(a['eval'])} |")
    return lines


def reliability(data: dict) -> list[str]:
    """Plain statements of what is not reliable, from the numbers: calibrations active in few
    iterations, norms whose mean and median disagree, achieved fractions off their target,
    and unguarded runs that did not inflate."""
    notes = []
    for m, e in data["methods"].items():
        n = e["calibration"]
        if n is None:
            notes.append(f"{m}: no λ: {e['not_calibrated']}")
            continue
        if n["active_iterations"] < FEW_ACTIVE:
            notes.append(f"{m}: the hinge was active in only {n['active_iterations']} of "
                         f"{n['iterations']} calibration iterations (steps "
                         f"{n['active_steps']}): its norms, and so its λ, rest on "
                         f"{n['active_iterations']} measurement(s) and are not reliable.")
        skew = (n["mean_base"] / n["mean_penalty"]) / (n["median_base"] / n["median_penalty"])
        if not 1 / SKEW <= skew <= SKEW:
            top_b, top_p = int(np.argmax(n["base"])), int(np.argmax(n["penalty"]))
            notes.append(f"{m}: the mean-based λ is {skew:.2f}× the median-based one "
                         f"(‖∇ base‖ mean {n['mean_base']:.3g}, median {n['median_base']:.3g}, "
                         f"largest {n['base'][top_b]:.3g} at step {n['active_steps'][top_b]}; "
                         f"‖∇ penalty‖ mean {n['mean_penalty']:.3g}, median "
                         f"{n['median_penalty']:.3g}, largest {n['penalty'][top_p]:.3g} at step "
                         f"{n['active_steps'][top_p]}): a few iterations dominate the "
                         "calibration.")
        calib = e["arms"].get("calib")
        if calib and calib["eval"] is not None and calib["eval"]["rho"] < 1.0:
            notes.append(f"{m}: unguarded, the sampling ρ is {calib['eval']['rho']:.3f} < 1 "
                         "(no inflation), so the guard has little to correct here.")
        for f in cal.FRACTIONS:
            a = e["arms"].get(cal.arm_name(f))
            if not a or not a["stats"]:
                continue
            got = a["stats"]["achieved_fraction"]
            if not np.isfinite(got):
                notes.append(f"{m} {cal.arm_name(f)}: the hinge was never active, no fraction "
                             "was achieved.")
            elif not 0.5 <= got / f <= 2.0:
                notes.append(f"{m} {cal.arm_name(f)}: achieved {100 * got:.1f} % against a "
                             f"target of {100 * f:g} % (active in "
                             f"{a['stats']['active_iterations']} of "
                             f"{a['stats']['iterations']} iterations, hinge active on "
                             f"{100 * a['stats']['hinge_active']:.0f} % of rows).")
    return notes


def _guarded(entry: dict) -> list[tuple[str, dict]]:
    return [(arm, a) for arm, a in entry["arms"].items() if arm != "calib"
            and a["target_fraction"] is not None]


def plot_summary(data: dict, path: str) -> None:
    """Per method (columns): achieved vs target fraction (filled: mean of the per-iteration
    ratios; hollow: ratio of the means), and sampling ρ, out of range, FD and
    reward vs the target fraction (rows); unguarded and base as horizontal lines, λ = 0.1 as a
    square at the fraction its calibration gives."""
    methods = [m for m, e in data["methods"].items() if _guarded(e)]
    if not methods:
        return
    rows = (("achieved", "achieved fraction"), ("rho", "sampling ρ"),
            ("out_of_range", "out of range"), ("fd", "FD"), ("reward", "contrast reward"))
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(3.6 * len(methods), 11),
                             squeeze=False)
    for j, m in enumerate(methods):
        entry = data["methods"][m]
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            for arm, a in _guarded(entry):
                if key == "achieved":
                    y = a["stats"].get("achieved_fraction", float("nan"))
                else:
                    y = a["eval"][key] if a["eval"] is not None else float("nan")
                marker = "s" if arm == DEFAULT_ARM else "o"
                color = "C3" if marker == "s" else "C0"
                ax.plot(a["target_fraction"], y, marker, color=color)
                if key == "achieved":   # hollow: the ratio of means
                    ax.plot(a["target_fraction"], a["stats"].get("achieved_of_means"), marker,
                            mfc="none", color=color)
            if key == "achieved":
                xs = np.array([min(cal.FRACTIONS) / 2, max(cal.FRACTIONS) * 3])
                ax.plot(xs, xs, "k--", lw=0.6, label="achieved = target")
                ax.set_yscale("log")
            else:
                calib = entry["arms"].get("calib")
                if calib and calib["eval"] is not None:
                    ax.axhline(calib["eval"][key], color="C1", lw=0.8, label="unguarded")
                if data["base"] is not None:
                    ax.axhline(data["base"][key], color="k", lw=0.6, ls=":", label="base")
            ax.set_xscale("log")
            ticks = sorted(cal.FRACTIONS)
            ax.set_xticks(ticks, [f"{100 * t:g} %" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if i == 0:
                ax.set_title(m, fontsize=10)
            if i <= 1:
                ax.legend(fontsize=7)
            if j == 0:
                ax.set_ylabel(label)
            if i == len(rows) - 1:
                ax.set_xlabel("target fraction ‖∇λ·pen‖/‖∇base‖ (■: λ = 0.1)")
    fig.suptitle("λ calibrated per method (digits, contrast reward, 12 iterations, seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(data: dict, path: str) -> None:
    """Training ρ per iteration, one panel per method, one line per arm."""
    methods = [m for m, e in data["methods"].items() if e["arms"]]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 3.4), squeeze=False,
                             sharey=True)
    for ax, m in zip(axes[0], methods):
        for arm, a in data["methods"][m]["arms"].items():
            if a["train"]:
                label = "unguarded" if arm == "calib" else f"{arm} (λ {a['lambda']:.3g})"
                ax.plot(a["train"]["iteration"], a["train"]["ratio"], lw=1.2, label=label)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("RL iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training ρ = ‖v_θ‖/‖v_ref‖")
    fig.suptitle("Training-time norm ratio per arm (digits, contrast reward)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(command: str) -> list[str]:
    """Writes the markdown, JSON and both plots of the finished cells; returns the md lines."""
    data = collect()
    lines = [f"Command: `{command}`", "", "# λ calibrated per method", "",
             f"Sweep: `{SWEEP}` (`:calibrate` first). Every RL cell: "
             f"`configs/rl_table.py:<method>,{cal.SETTING}` on the digits base, "
             f"{cal.ITERATIONS} iterations of 8 prompts × 8 samples, seed {cal.SEED}, "
             "`normguard.log_grad_norms=True`. The calibration cell is unguarded (λ = 0); "
             "λ = fraction · mean ‖∇ base‖ / mean ‖∇ penalty‖ over its iterations with the "
             "hinge active (`active_frac > 0`). Achieved fraction: mean of "
             "‖∇ λ·penalty‖ / ‖∇ base‖ over a run's own active iterations (in brackets: mean "
             "‖∇ λ·penalty‖ / mean ‖∇ base‖ over them, the form λ is calibrated in; the two "
             "differ when a few iterations have a large ‖∇ base‖). Hinge active: mean "
             "fraction of training rows with ‖v_θ‖ > ‖v_ref‖, over every iteration. "
             f"Finished cells took {data['cell_minutes']:.0f} min in all.", "",
             "## Calibration", ""]
    lines += calibration_md(data)
    for m, entry in data["methods"].items():
        lines += ["", f"## {m}", ""] + method_md(m, entry, data["base"])
    notes = reliability(data)
    if notes:
        lines += ["", "## Not reliable", ""] + [f"- {n}" for n in notes]
    if data["missing"]:
        lines += ["", "Not finished: " + ", ".join(data["missing"])]
    lines += ["", f"![summary]({OUT}.png)", "", f"![training ρ]({OUT}_training.png)"]
    table_sweeps.write_report(RESULTS, OUT, lines,
                              {"command": command, "data": data, "notes": notes})
    plot_summary(data, os.path.join(RESULTS, OUT + ".png"))
    plot_training(data, os.path.join(RESULTS, OUT + "_training.png"))
    print("\n".join(lines), flush=True)
    return lines


def main():
    parser = table_sweeps.stage_parser(__doc__, STAGES)
    args = parser.parse_args()
    stages = table_sweeps.chosen_stages(parser, args.stages, STAGES)
    os.chdir(REPO)
    ok = True
    for stage in stages:
        if stage == "base":
            table_sweeps.make_bases(["digits"])
        elif stage == "calibrate":
            ok &= table_sweeps.run_sweep(SWEEP + ":calibrate", [])
        elif stage == "sweep":
            ok &= table_sweeps.run_sweep(SWEEP, [])
        elif stage == "analyse":
            shown = ("" if args.stages == ",".join(STAGES) else f" --stages {args.stages}")
            analyse("python experiments/lambda_calibration.py" + shown)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Few-step inference: does the guard's effect on quality grow when sampling takes fewer steps?

The main table's checkpoints evaluated with 2, 4, 8, 16 and 40 ODE steps
(configs/sweeps/table_fewstep.py; 20 steps is the main table's own evaluation), read from
``table_sweeps.collect()["fewstep"]``. Run by experiments/main_table.py (stages ``fewstep`` and
``analyse``).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs.sweeps import table_fewstep  # noqa: E402
from experiments import table_sweeps, tables  # noqa: E402

MAIN_STEPS = 20  # ODE steps of the main table's evaluations (configs/eval_table.py)


def fewstep_series(data: dict, setting: str, method: str, arm: str) -> list[tuple[int, dict]]:
    """(steps, summary) for 2, 4, 8, 16, 20 (main table), 40, where evaluated."""
    out = []
    for n in sorted(set(table_fewstep.STEPS) | {MAIN_STEPS}):
        row = (data["main"][f"{setting}-{method}-{arm}"] if n == MAIN_STEPS
               else data["fewstep"].get(f"{setting}-{method}-{arm}-n{n}"))
        if row is not None:
            out.append((n, row))
    return out


def fewstep_md(data: dict) -> tuple[list[str], dict]:
    steps = sorted(set(table_fewstep.STEPS) | {MAIN_STEPS})
    step_labels = [f"{n} steps" for n in steps]
    lines = ["FD gap = FD(guarded) − FD(unguarded) at each number of ODE steps (negative: the "
             "guarded model is better); in brackets the unguarded FD. Recall and out-of-range "
             "gaps below.", "",
             *tables.header(["setting", "method", *step_labels], left=2)]
    gaps = {}
    for metric in ("fd", "recall", "out_of_range"):
        if metric != "fd":
            lines += ["", *tables.header(
                ["setting", f"method ({metric} gap, unguarded in brackets)", *step_labels],
                left=2)]
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
                        cells.append(tables.MISSING)
                lines.append(tables.row([setting, method, *cells]))
    base = [f"{n}: {data['fewstep'][f'base-{s}-n{n}']['fd']:.2f}"
            for s in table_fewstep.SETTINGS[:1] for n in table_fewstep.STEPS
            if data["fewstep"].get(f"base-{s}-n{n}")]
    if base:
        lines += ["", f"Base model FD by steps ({MAIN_STEPS} steps: "
                  f"{tables.fmt(data['base'][table_fewstep.SETTINGS[0]]['fd'], '{:.2f}')}): "
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
        base = sorted([(n, r) for n, r in base if r] + [(MAIN_STEPS, data["base"][setting])]
                      if data["base"][setting] else [])
        if base:
            axes[0, j].plot([n for n, _ in base], [r["fd"] for _, r in base], ":k",
                            marker="x", label="base")
        axes[0, j].set_title(f"{setting}: FD vs ODE steps")
        axes[1, j].axhline(0, color="k", lw=0.5)
        noise = table_sweeps.NOISE["fd"]
        axes[1, j].axhspan(-noise, noise, color="0.9")
        axes[1, j].set_title("FD(guarded) − FD(unguarded); grey: noise")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(table_fewstep.STEPS) | {MAIN_STEPS})
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.set_xlabel("ODE steps")
            ax.legend(fontsize=7)
    if drew:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)

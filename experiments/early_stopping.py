"""Early-stopping control of the main table: is the guard's effect only slower optimisation?

Each guarded run is matched with the checkpoint of the unguarded run of the same setting and
method (base = iteration 0, the intermediate checkpoints of configs/sweeps/table_earlystop.py,
the last = the main table's) whose reward is closest to the guarded run's final reward, and with
the unguarded path interpolated at that reward. Run by experiments/main_table.py (stages
``earlystop`` and ``analyse``).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import rl_table  # noqa: E402
from configs.sweeps import table_earlystop  # noqa: E402
from configs.sweeps import table_main as main_sweep  # noqa: E402
from experiments import table_sweeps, tables  # noqa: E402


def unguarded_path(data: dict, setting: str, method: str) -> list[tuple[int, dict]]:
    """(iteration, summary) of the unguarded run: base (0), intermediate checkpoints, last."""
    path = [(0, data["base"][setting])]
    path += [(k, data["earlystop"].get(f"{setting}-{method}-plain-it{k}"))
             for k in table_earlystop.STEPS]
    path.append((rl_table.ITERATIONS, data["main"][f"{setting}-{method}-plain"]))
    return [(k, r) for k, r in path if r is not None]


def earlystop_md(data: dict) -> tuple[list[str], list[dict]]:
    noise = table_sweeps.NOISE["fd"]
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
            k, m = tables.closest_on_path(path, g["reward"])
            fd_interp = tables.interpolate_at_reward(path, g["reward"], "fd")
            diff = g["fd"] - m["fd"]
            final = path[-1][1]
            gain = g["fd"] - final["fd"]
            if gain > noise:
                verdict = "nothing to explain: guarded FD worse than the final unguarded"
            elif gain >= -noise:
                verdict = "nothing to explain: same FD as the final unguarded (within noise)"
            elif diff >= -noise:
                verdict = ("yes: the matched unguarded checkpoint is as good"
                           + (" or better" if diff > noise else ""))
            elif fd_interp is not None and g["fd"] - fd_interp >= -noise:
                # The nearest checkpoint may sit well past the guarded reward; between two
                # checkpoints the unguarded run passes through it.
                verdict = ("yes, between checkpoints: the unguarded path at the guarded reward "
                           "(interpolated) is as good"
                           + (" or better" if g["fd"] - fd_interp > noise else ""))
            else:
                verdict = "no: the guarded run beats the matched checkpoint"
            records.append({"setting": setting, "method": method, "matched_iteration": k,
                            "guard": g, "matched": m, "fd_interpolated": fd_interp,
                            "fd_guard_minus_matched": diff, "fd_guard_minus_final": gain,
                            "verdict": verdict})
            lines.append(
                f"| {setting} | {method} | {g['reward']:.3f}, {g['fd']:.2f}, {g['recall']:.3f} "
                f"| it {k}: {m['reward']:.3f}, {m['fd']:.2f}, {m['recall']:.3f} | "
                f"{tables.fmt(fd_interp, '{:.2f}')} | {diff:+.2f} | {verdict} |")
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
        ax.set_xlabel(f"reward ({table_sweeps.reward_name(setting)})")
        ax.set_ylabel("FD ↓")
        ax.set_title(setting)
        ax.legend(fontsize=6)
    if drew:
        fig.suptitle("Early-stopping control: unguarded checkpoints (dashed) vs guarded (star)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)

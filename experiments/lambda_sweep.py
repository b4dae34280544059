"""λ sweep of the main table: NormGuard's weight on one setting and method.

The sweep is configs/sweeps/table_lambda.py (λ = 0.03, 0.3, 1; λ = 0 and 0.1 are the main
table's two arms). Its setting and method are chosen once, from the main table, and recorded in
``LAMBDA_CHOICE`` so that a later analysis, with more cells finished, reports the same sweep.
Run by experiments/main_table.py (stages ``lambda`` and ``analyse``).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs.sweeps import table_lambda  # noqa: E402
from configs.sweeps import table_main as main_sweep  # noqa: E402
from experiments import table_sweeps, tables  # noqa: E402

LAMBDA_CHOICE = os.path.join(table_lambda.WORKROOT, "choice.json")  # fixed once made


def collect_lambda(setting: str, method: str) -> dict:
    """λ -> summary for the λ sweep (0 and 0.1 from the main table)."""
    summarise, load_eval = table_sweeps.summarise, table_sweeps.load_eval
    rows = {0.0: summarise(load_eval(main_sweep.WORKROOT, f"eval-{setting}-{method}-plain"),
                           setting),
            main_sweep.GUARD_WEIGHT: summarise(load_eval(
                main_sweep.WORKROOT, f"eval-{setting}-{method}-guard"), setting)}
    for arm, overrides in table_lambda.ARMS.items():
        rows[overrides["normguard.weight"]] = summarise(
            load_eval(table_lambda.WORKROOT, f"eval-{setting}-{method}-{arm}"), setting)
    return dict(sorted(rows.items()))


def choose_lambda_setting(main: dict, settings=("digits_logprob", "digits_contrast")
                          ) -> tuple[str, str] | None:
    """(setting, method) of the λ sweep: the one recorded in ``LAMBDA_CHOICE`` if any, else
    the unguarded main-table run of ``settings`` with the largest ρ (None until all of those
    are evaluated). The choice is recorded by :func:`record_lambda_choice`, so a later
    analysis, with more cells finished, reports the same sweep."""
    path = os.path.join(table_sweeps.REPO, LAMBDA_CHOICE)
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
    path = os.path.join(table_sweeps.REPO, LAMBDA_CHOICE)
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"choice": list(choice), "rule": rule}, f)


def lambda_md(rows: dict, setting: str, method: str) -> list[str]:
    head = ["λ", "reward ↑"] + [label for _, label in table_sweeps.QUALITY] + ["ρ"]
    lines = [f"Setting `{setting}`, method `{method}`.", "", *tables.header(head, left=0)]
    for lam, row in rows.items():
        lines.append(tables.row([f"{lam:g}", *table_sweeps.row_cells(row)]))
    return lines


def plot_lambda(rows: dict, setting: str, method: str, path: str) -> None:
    done = [(lam, r) for lam, r in rows.items() if r is not None]
    if len(done) < 2:
        return
    x = np.arange(len(done))
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
    for ax, (key, label) in zip(axes, (("reward",
                                        f"reward ({table_sweeps.reward_name(setting)})"),
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

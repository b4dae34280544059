"""Seeds of the main table: means ± s.e., paired differences, verdicts and the seed spread.

Every seed of every cell, seed 0 included, comes from configs/sweeps/table_seeds.py (the
single-seed table of configs/sweeps/table_main.py is not mixed in: it ran on another machine).
A guarded − unguarded difference is paired by seed (both arms of a seed share the prompts and
rollout noise of its first iteration) and judged against its own standard error: a metric moved
when |t| = |mean| / s.e. exceeds the two-sided ``ALPHA`` critical value of Student's t with
n − 1 degrees of freedom (n = number of seeds with both arms finished). With one seed there is
no standard error and no verdict. ``report()`` writes experiments/results/main_table_seeds.md
and .json; the json keeps every finished cell's summary, so a later session (on a fresh
machine) adds the cells it runs to those of earlier sessions. Run by experiments/main_table.py
(stage ``seeds``) or alone: ``python experiments/seed_spread.py``.

Conventions: a summary is table_sweeps.summarise's dict (``reward``, the ``QUALITY`` keys,
``rho``, ...); ``runs`` maps ``<setting>-<method>-<arm>`` to {seed: summary} with only the
finished seeds; standard errors are sample std (ddof = 1) / √n; spreads are sample stds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from configs import rl_table
from configs.sweeps import table_main as main_sweep
from configs.sweeps import table_seeds as seeds_sweep
from experiments import sweep, table_sweeps, tables

REPORT = "main_table_seeds"   # experiments/results/<REPORT>.md and .json

ALPHA = 0.05
# Paired differences reported: (summary key, label, format).
PAIRED = (("reward", "reward", "{:.3f}"), ("fd", "FD", "{:.2f}"), ("recall", "recall", "{:.3f}"),
          ("realism", "judged real", "{:.3f}"), ("out_of_range", "out of range", "{:.3f}"),
          ("rho", "ρ", "{:.3f}"))
# Quality metrics that decide the verdict, with the sign of an improvement.
QUALITY_SIGNS = {"fd": -1, "recall": 1, "realism": 1}
# Every column of the mean ± s.e. table.
COLUMNS = (("reward", "reward ↑", "{:.3f}"),
           *((k, label, "{:.2f}" if k == "fd" else "{:.3f}") for k, label in table_sweeps.QUALITY),
           ("rho", "ρ", "{:.3f}"))
ARM_LABELS = {"plain": "unguarded", "guard": f"NormGuard λ={main_sweep.GUARD_WEIGHT}"}


# ----------------------------------------------------------------------------------------------
# Statistics (pure).
# ----------------------------------------------------------------------------------------------


def t_critical(n: int, alpha: float = ALPHA) -> float:
    """Two-sided ``alpha`` critical value of Student's t with n − 1 degrees of freedom for a
    mean over n paired differences (nan for n < 2: no standard error)."""
    return float(stats.t.ppf(1 - alpha / 2, n - 1)) if n >= 2 else float("nan")


def paired(guard: Sequence[float], plain: Sequence[float]) -> dict:
    """Paired difference guard[i] − plain[i] over seeds: ``n``, ``mean``, ``se`` (std/√n) and
    ``t`` = mean/se (±inf when se = 0 and the mean is not 0, nan when both are 0 or n = 1)."""
    m, se, t = tables.paired_difference(guard, plain)
    n = len(guard)
    if se == 0 and n >= 2 and m != 0:
        t = math.copysign(math.inf, m)
    return {"n": n, "mean": m, "se": se, "t": t}


def significant_sign(d: Mapping, alpha: float = ALPHA) -> int:
    """Sign (+1 / −1) of a paired difference whose |t| exceeds the critical value, else 0."""
    crit = t_critical(d["n"], alpha)
    if d["n"] < 2 or math.isnan(d["t"]) or abs(d["t"]) <= crit:
        return 0
    return 1 if d["mean"] > 0 else -1


def p_value(d: Mapping) -> float:
    """Two-sided p-value of a paired difference's t with n − 1 degrees of freedom (nan for
    n < 2 or an undefined t; 0 for an infinite t)."""
    if d["n"] < 2 or math.isnan(d["t"]):
        return float("nan")
    return float(2 * stats.t.sf(abs(d["t"]), d["n"] - 1))


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down correction for testing ``len(pvalues)`` hypotheses at family-wise error
    ``alpha``: sorted ascending, the i-th smallest (0-based) is rejected while
    p ≤ alpha / (m − i); the first that is not stops the rejections. A nan p-value (no
    standard error) counts as untested: it is never rejected and does not enlarge m.
    Returns, in the input order, whether each hypothesis is rejected."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    rejected = [False] * len(pvalues)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - rank):
            break
        rejected[i] = True
    return rejected


def verdict(diffs: Mapping[str, Mapping], alpha: float = ALPHA,
            survives: Mapping[str, bool] | None = None) -> str:
    """Quality verdict of guarded − unguarded from the paired differences of the
    ``QUALITY_SIGNS`` metrics: ``better``/``worse``/``mixed`` (naming the metrics that moved
    beyond the critical value), ``no difference detected`` or, for one seed, undecided.
    ``survives``: metric -> whether its test survives a multiple-testing correction
    (:func:`holm`); a metric that does not is not counted as moved."""
    n = diffs["fd"]["n"]
    if n < 2:
        return f"cannot be decided ({n} seed{'s' if n != 1 else ''})"
    labels = dict((k, label) for k, label, _ in PAIRED)
    moved = {k: s * significant_sign(diffs[k], alpha)
             * (1 if survives is None or survives.get(k, False) else 0)
             for k, s in QUALITY_SIGNS.items()}
    up = [labels[k] for k, m in moved.items() if m > 0]
    down = [labels[k] for k, m in moved.items() if m < 0]
    if up and down:
        return f"mixed (better: {', '.join(up)}; worse: {', '.join(down)})"
    if up:
        return f"better ({', '.join(up)})"
    if down:
        return f"worse ({', '.join(down)})"
    return "no difference detected"


def paired_seeds(runs: Mapping[str, Mapping[int, dict]], key: str) -> list[int]:
    """Seeds of ``<key>-plain`` and ``<key>-guard`` (key = ``<setting>-<method>``) that both
    finished, sorted."""
    return sorted(set(runs.get(f"{key}-plain", {})) & set(runs.get(f"{key}-guard", {})))


def paired_diffs(plain: Mapping[int, dict], guard: Mapping[int, dict],
                 seeds: Sequence[int]) -> dict[str, dict]:
    """``paired`` of every ``PAIRED`` metric over ``seeds`` (summary dicts by seed)."""
    return {k: paired([guard[s][k] for s in seeds], [plain[s][k] for s in seeds])
            for k, _, _ in PAIRED}


def mean_se_columns(rows: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """Mean and s.e. over summaries of every ``COLUMNS`` key."""
    return {k: tables.mean_se([r[k] for r in rows]) for k, _, _ in COLUMNS}


def spread(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, float]:
    """Sample std (ddof = 1) over summaries of each key (nan for fewer than 2)."""
    return {k: float(np.std([r[k] for r in rows], ddof=1)) if len(rows) >= 2 else float("nan")
            for k in keys}


def pooled(spreads: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """√(mean of the variances) over the spreads that are not nan (nan when none is)."""
    out = {}
    for k in keys:
        v = [s[k] ** 2 for s in spreads if not math.isnan(s[k])]
        out[k] = float(np.sqrt(np.mean(v))) if v else float("nan")
    return out


# ----------------------------------------------------------------------------------------------
# Reading the finished cells.
# ----------------------------------------------------------------------------------------------


def machine() -> str:
    """This machine in one line: cores, CPU model, whether it has AVX-512."""
    model, avx512 = tables.cpu()
    return f"{os.cpu_count()} cores, {model}{', AVX-512' if avx512 else ''}"


def load_archive(path: str = "") -> dict:
    """The cells recorded by an earlier analysis (``cells`` of ``<RESULTS>/<REPORT>.json``):
    cell name -> {``summary``, ``machine``, ``finished``}; {} when there is none."""
    path = path or os.path.join(table_sweeps.RESULTS, REPORT + ".json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("cells", {})


def collect(archive: Mapping[str, dict] | None = None) -> dict:
    """The runs of every seed, the re-pretrained bases and the missing cells.

    A cell is read from its workdir under configs/sweeps/table_seeds.WORKROOT when it has
    finished there, else from ``archive`` (the cells an earlier analysis recorded, so that the
    halves of the table can be run in different sessions, each on a fresh machine).

    Args:
      archive: ``load_archive()``: cell name -> {``summary``, ``machine``, ``finished``}.
    Returns:
      ``runs``: ``<setting>-<method>-<arm>`` -> {seed: summary} (finished seeds only; the guarded
      summaries carry ``hinge_active``); ``rebase``: {``base``, ``plain``, ``guard``} -> {base
      seed: summary}, base seed 0 being the table's base (``eval-base-<base>``) and its ``-s0``
      cells; ``cells``: every cell found, name -> {``summary``, ``machine``, ``finished``
      (date), ``source`` (``workdir`` | ``archive``)}; ``missing``: cells found nowhere
      (``<workroot>/<name>``).
    """
    archive = archive or {}
    root = seeds_sweep.WORKROOT
    here = machine()
    out = {"runs": {}, "rebase": {"base": {}, "plain": {}, "guard": {}}, "cells": {},
           "missing": []}

    def get(name, setting, rl_name=None):
        row = table_sweeps.summarise(table_sweeps.load_eval(root, name), setting)
        if row is not None:
            if rl_name is not None:
                row["hinge_active"] = table_sweeps.hinge_activity(root, rl_name)
            done = os.path.join(table_sweeps.REPO, root, name, sweep.DONE_MARKER)
            finished = datetime.date.fromtimestamp(os.path.getmtime(done)).isoformat()
            out["cells"][name] = {"summary": row, "machine": here, "finished": finished,
                                  "source": "workdir"}
        elif name in archive:
            row = dict(archive[name]["summary"])
            out["cells"][name] = {**archive[name], "source": "archive"}
        else:
            out["missing"].append(f"{root}/{name}")
        return row

    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            for arm in main_sweep.ARMS:
                key = f"{setting}-{method}-{arm}"
                found = {k: get(f"eval-{key}-s{k}", setting,
                                f"rl-{key}-s{k}" if arm == "guard" else None)
                         for k in seeds_sweep.SEEDS}
                out["runs"][key] = {k: r for k, r in found.items() if r is not None}
    setting, method = seeds_sweep.REBASE_SETTING, seeds_sweep.REBASE_METHOD
    rebase = out["rebase"]
    for k in (0, *seeds_sweep.REBASE_SEEDS):
        rebase["base"][k] = get(f"eval-base-{seeds_sweep.REBASE_BASE}"
                                + (f"-b{k}" if k else ""), setting)
        for arm in main_sweep.ARMS:
            rebase[arm][k] = (out["runs"][f"{setting}-{method}-{arm}"].get(0) if k == 0
                              else get(f"eval-{setting}-{method}-{arm}-b{k}", setting,
                                       f"rl-{setting}-{method}-{arm}-b{k}"
                                       if arm == "guard" else None))
    for part in rebase.values():
        for k in [k for k, r in part.items() if r is None]:
            del part[k]
    return out


def provenance_md(cells: Mapping[str, dict]) -> list[str]:
    """Where the cells were run: one line per base half (and the re-pretrained bases) naming
    the machines and dates of its cells and how many came from the archive; a half run on more
    than one machine is flagged."""
    groups = {}
    for name, cell in cells.items():
        part = ("re-pretrained bases" if name.rsplit("-", 1)[-1].startswith("b")
                and name.rsplit("-", 1)[-1][1:].isdigit()
                else "shapes" if "shapes" in name else "digits")
        groups.setdefault(part, []).append(cell)
    lines = []
    for part in ("digits", "shapes", "re-pretrained bases"):
        found = groups.get(part, [])
        if not found:
            lines.append(f"- {part}: no cell finished.")
            continue
        machines = sorted({c["machine"] for c in found})
        dates = sorted({c["finished"] for c in found})
        archived = sum(c["source"] == "archive" for c in found)
        lines.append(
            f"- {part}: {len(found)} cells, finished {dates[0]}"
            + (f" to {dates[-1]}" if len(dates) > 1 else "") + f", on {'; '.join(machines)}"
            + (f" ({archived} read from the committed json)" if archived else "")
            + (". **More than one machine: seeds of this half are not comparable bit for "
               "bit.**" if len(machines) > 1 else "."))
    return lines


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------


def fmt_diff(d: Mapping, spec: str) -> str:
    """``+m ± se (t=..)`` of a paired difference; ``+m`` alone for one seed."""
    m = f"{'+' if d['mean'] >= 0 else ''}{spec.format(d['mean'])}"
    if d["n"] < 2:
        return m
    t = "t=±∞" if math.isinf(d["t"]) else "t=–" if math.isnan(d["t"]) else f"t={d['t']:+.1f}"
    return f"{m} ± {spec.format(d['se'])} ({t})"


def fmt_mean_se(m: float, se: float, n: int, spec: str) -> str:
    """``m ± se`` (``m`` alone for one seed)."""
    return spec.format(m) if n < 2 else f"{spec.format(m)} ± {spec.format(se)}"


def max_seeds(runs: Mapping[str, Mapping[int, dict]]) -> int:
    """The largest number of paired seeds of any setting × method."""
    return max((len(paired_seeds(runs, f"{s}-{m}")) for s in rl_table.SETTINGS
                for m in main_sweep.METHODS), default=0)


def delta_md(runs: Mapping[str, Mapping[int, dict]]) -> tuple[list[str], list[dict]]:
    """Guarded − unguarded per setting and method, paired over the seeds with both arms
    finished, with two verdicts: each quality metric tested on its own (``verdict``), and
    after Holm's correction over every quality test of the table (``verdict_holm``: 3 metrics
    × the pairs with ≥ 2 seeds); and one record per pair (means, s.e., t, p, n, verdicts)."""
    head = ["setting", "method", "seeds", *[f"Δ {label}" for _, label, _ in PAIRED],
            "out of range unguarded → guarded", "ρ unguarded → guarded",
            "hinge active (training)", "quality: guarded vs unguarded",
            "after Holm's correction"]
    lines = [tables.row(head), "|---|---|---:|" + "---:|" * len(PAIRED) + "---|---|---:|---|---|"]
    records, pending = [], []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            key = f"{setting}-{method}"
            seeds = paired_seeds(runs, key)
            if not seeds:
                pending.append(None)
                records.append({"setting": setting, "method": method, "seeds": []})
                continue
            plain, guard = runs[f"{key}-plain"], runs[f"{key}-guard"]
            diffs = paired_diffs(plain, guard, seeds)
            for d in diffs.values():
                d["p"] = p_value(d)
            mean = {arm: {k: float(np.mean([rows[s][k] for s in seeds]))
                          for k in ("out_of_range", "rho")}
                    for arm, rows in (("plain", plain), ("guard", guard))}
            hinge = [guard[s].get("hinge_active") for s in seeds]
            hinge = None if any(h is None for h in hinge) else float(np.mean(hinge))
            records.append({"setting": setting, "method": method, "seeds": seeds,
                            **{k: d["mean"] for k, d in diffs.items()}, "paired": diffs,
                            "verdict": verdict(diffs),
                            "out_of_range_plain": mean["plain"]["out_of_range"],
                            "out_of_range_guard": mean["guard"]["out_of_range"],
                            "rho_plain": mean["plain"]["rho"], "rho_guard": mean["guard"]["rho"],
                            "hinge_active": hinge})
            pending.append(diffs)
    family = [(i, k) for i, diffs in enumerate(pending) if diffs for k in QUALITY_SIGNS]
    rejected = dict(zip(family, holm([pending[i][k]["p"] for i, k in family])))
    tests = sum(not math.isnan(pending[i][k]["p"]) for i, k in family)
    for i, (r, diffs) in enumerate(zip(records, pending)):
        if diffs is None:
            lines.append(tables.row([r["setting"], r["method"], "0", "not run"]
                                    + [""] * (len(head) - 4)))
            continue
        r["verdict_holm"] = verdict(diffs, survives={k: rejected[(i, k)] for k in QUALITY_SIGNS})
        r["holm_tests"] = tests
        lines.append(tables.row(
            [r["setting"], r["method"], str(len(r["seeds"])),
             *[fmt_diff(diffs[k], spec) for k, _, spec in PAIRED],
             f"{r['out_of_range_plain']:.3f} → {r['out_of_range_guard']:.3f}",
             f"{r['rho_plain']:.3f} → {r['rho_guard']:.3f}",
             tables.fmt(r["hinge_active"], "{:.2f}"), r["verdict"], r["verdict_holm"]]))
    return lines, [r for r in records if r["seeds"]]


def mean_table_md(runs: Mapping[str, Mapping[int, dict]]) -> list[str]:
    """Mean ± s.e. over the finished seeds of every column, per setting × method × arm."""
    head = ["setting", "model", "seeds", *[label for _, label, _ in COLUMNS]]
    lines = tables.header(head, left=2)
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            for arm, label in ARM_LABELS.items():
                rows = [r for _, r in sorted(runs[f"{setting}-{method}-{arm}"].items())]
                if not rows:
                    lines.append(tables.row([setting, f"{method} {label}", "0", "not run"]
                                            + [""] * (len(COLUMNS) - 1)))
                    continue
                ms = mean_se_columns(rows)
                lines.append(tables.row(
                    [setting, f"{method} {label}", str(len(rows)),
                     *[fmt_mean_se(*ms[k], len(rows), spec) for k, _, spec in COLUMNS]]))
    return lines


def spread_md(runs: Mapping[str, Mapping[int, dict]]) -> tuple[list[str], dict]:
    """The measured noise: std over seeds of the unguarded runs per setting and method, and
    pooled per setting (√ of the mean variance over its methods)."""
    keys = [k for k, _, _ in PAIRED]
    head = ["setting", "method", "seeds", *[f"std {label}" for _, label, _ in PAIRED]]
    lines = tables.header(head, left=2)
    out = {}
    for setting in rl_table.SETTINGS:
        per_method = {}
        for method in main_sweep.METHODS:
            rows = [r for _, r in sorted(runs[f"{setting}-{method}-plain"].items())]
            per_method[method] = spread(rows, keys)
            lines.append(tables.row([setting, method, str(len(rows)),
                                     *[_fmt_std(per_method[method][k], spec)
                                       for k, _, spec in PAIRED]]))
        pool = pooled(list(per_method.values()), keys)
        lines.append(tables.row([setting, "**pooled**", "",
                                 *[_fmt_std(pool[k], spec) for k, _, spec in PAIRED]]))
        out[setting] = {"methods": per_method, "pooled": pool}
    return lines, out


def _fmt_std(value: float, spec: str) -> str:
    return tables.MISSING if math.isnan(value) else spec.format(value)


def rebase_md(seeds: dict) -> tuple[list[str], dict]:
    """Seed spread of the re-pretrained-base cells: per arm, std over RL seeds on the fixed
    base (seeds 0, ``SEEDS``) against std over bases re-pretrained with seed k and trained with
    RL seed k; the bases' own spread; and guarded − unguarded paired over the re-pretrained
    bases."""
    setting, method = seeds_sweep.REBASE_SETTING, seeds_sweep.REBASE_METHOD
    keys = [k for k, _, _ in PAIRED]
    rebase = seeds["rebase"]
    head = ["runs", "seeds", *[f"std {label}" for _, label, _ in PAIRED]]
    lines = tables.header(head, left=1)
    out = {}
    sources = [(f"{ARM_LABELS[arm]}, base fixed (RL seeds)", f"{arm}/fixed",
                seeds["runs"][f"{setting}-{method}-{arm}"]) for arm in main_sweep.ARMS]
    sources += [(f"{ARM_LABELS[arm]}, base re-pretrained (base seed = RL seed)", f"{arm}/rebase",
                 rebase[arm]) for arm in main_sweep.ARMS]
    for label, name, by_seed in sources:
        rows = [r for _, r in sorted(by_seed.items())]
        out[name] = spread(rows, keys)
        lines.append(tables.row([label, ",".join(map(str, sorted(by_seed))),
                                 *[_fmt_std(out[name][k], spec) for k, _, spec in PAIRED]]))
    base_keys = [k for k in keys if k != "rho"]  # a base's ρ is 1 by definition
    rows = [r for _, r in sorted(rebase["base"].items())]
    out["base"] = spread(rows, base_keys)
    lines.append(tables.row(["the bases themselves", ",".join(map(str, sorted(rebase["base"]))),
                             *[_fmt_std(out["base"][k], spec) if k in base_keys else ""
                               for k, _, spec in PAIRED]]))
    both = sorted(set(rebase["plain"]) & set(rebase["guard"]))
    diffs = paired_diffs(rebase["plain"], rebase["guard"], both) if both else None
    out["paired"] = diffs
    lines += ["", "Guarded − unguarded, paired over the re-pretrained bases (base seeds "
              f"{', '.join(map(str, both)) or 'none finished'}):"
              + ("" if diffs is None else " " + "; ".join(
                  f"{label} {fmt_diff(diffs[k], spec)}" for k, label, spec in PAIRED)
                 + f"; quality: {verdict(diffs)}.")]
    return lines, out


def noise_md(max_n: int) -> str:
    """The paragraph stating how noise is judged, with the critical values used."""
    crit = ", ".join(f"n = {n}: {t_critical(n):.2f}" for n in range(2, max(max_n, 3) + 1))
    m = len(QUALITY_SIGNS) * len(rl_table.SETTINGS) * len(main_sweep.METHODS)
    holm_t = t_critical(max(max_n, 3), ALPHA / m)
    head = (f"Noise is measured, not assumed. A guarded − unguarded difference is paired by seed "
            f"and counts as a change when |t| = |mean| / s.e. exceeds the two-sided "
            f"{ALPHA * 100:g} % critical value of Student's t with n − 1 degrees of freedom "
            f"({crit}; n = seeds with both arms finished). Each of FD, recall and judged real "
            "is tested on its own in the verdict column; the last column keeps only the tests "
            "that survive Holm's step-down correction over every quality test of the table "
            f"(three metrics × the pairs with two seeds or more, family-wise {ALPHA * 100:g} "
            f"%; with {max(max_n, 3)} seeds in all {m // len(QUALITY_SIGNS)} pairs ({m} tests) "
            f"the smallest p-value must beat "
            f"{ALPHA:g} / {m}, |t| > {holm_t:.1f}). The measured seed spread (std over seeds of the unguarded runs) is in \"Seed "
            "spread\" below.")
    if max_n < 2:
        return head + (" Only seed 0 has finished for every pair, so there is no standard "
                       "error and no verdict yet: the table below is the single-seed table, "
                       "and its differences are single runs.")
    return head


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def plot_paired(records: Sequence[dict], path: str) -> None:
    """Guarded − unguarded per setting × method: mean and the two-sided 95 % interval
    (± t_crit · s.e.) of Δ reward, Δ FD, Δ recall and Δ ρ, one panel each; a pair whose interval
    excludes 0 is drawn filled. Nothing is written when no pair has two seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r["paired"]["fd"]["n"] >= 2]
    if not records:
        return
    keys = (("reward", "Δ reward"), ("fd", "Δ FD (↓ better)"), ("recall", "Δ recall (↑ better)"),
            ("rho", "Δ ρ"))
    labels = [f"{r['setting']} {r['method']}" for r in records]
    y = np.arange(len(records))[::-1]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 0.45 * len(records) + 1.4),
                             sharey=True)
    for ax, (k, title) in zip(axes, keys):
        for yi, r in zip(y, records):
            d = r["paired"][k]
            half = t_critical(d["n"]) * d["se"]
            moved = significant_sign(d) != 0
            ax.errorbar(d["mean"], yi, xerr=half, fmt="o", color="C3" if moved else "C0",
                        mfc="C3" if moved else "white", capsize=3)
        ax.axvline(0.0, color="0.5", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.suptitle("NormGuard λ = 0.1 minus unguarded, paired over seeds (95 % intervals; "
                 "filled: excludes 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: str = "") -> dict:
    """Reads every cell (workdir, else the committed json) and writes
    ``<results>/main_table_seeds.md``, ``.json`` (with the ``cells`` a later session reads
    back) and ``_paired.png``; returns the json payload."""
    results = results or table_sweeps.RESULTS
    seeds = collect(load_archive(os.path.join(results, REPORT + ".json")))
    max_n = max_seeds(seeds["runs"])
    delta_lines, deltas = delta_md(seeds["runs"])
    spread_lines, spreads = spread_md(seeds["runs"])
    rebase_lines, rebase = rebase_md(seeds)
    os.makedirs(results, exist_ok=True)
    plot_paired(deltas, os.path.join(results, REPORT + "_paired.png"))
    seeds_text = ", ".join(map(str, seeds_sweep.SEEDS))
    lines = [
        "# The main table over seeds",
        "",
        "Command: `python experiments/main_table.py --stages bases:digits,seeds:digits` (and "
        "`bases:shapes,seeds:shapes`, `bases:digits,seeds:rebase`; each writes this file from "
        "every finished cell, and `python experiments/seed_spread.py` only rewrites it). Cells "
        "finished in an earlier session are read back from `main_table_seeds.json`, so the "
        "halves can run in different sessions.",
        "",
        f"Every cell of experiments/results/main_table.md (2 bases × 2 rewards × NFT/AWM/DPO, "
        f"unguarded and NormGuard λ = {main_sweep.GUARD_WEIGHT}, {rl_table.ITERATIONS} RL "
        f"iterations) with RL seeds {seeds_text} (configs/sweeps/table_seeds.py): the seed sets "
        "the prompts, rollout noise, re-noising and minibatch order; the base and the "
        "evaluation's sample seeds are fixed, so seeds differ only through training. All seeds, "
        "0 included, are rerun here, so a half's seeds share one machine and one base (the "
        "single-seed main_table.md is older and was run on another CPU).",
        "",
        "Where the cells ran:",
        "",
        *provenance_md(seeds["cells"]),
        "",
        wall_time_line(),
        "",
        noise_md(max_n),
        "",
        "## Guarded − unguarded, paired over seeds",
        "",
        "Mean ± s.e. (t) of the paired differences; out of range and ρ are means over the "
        "seeds; hinge active = fraction of training rows with ‖v_θ‖ > ‖v_ref‖ over the logged "
        "iterations of the guarded runs. The verdict names the quality metrics (FD, recall, "
        "judged real) whose |t| exceeds the critical value.",
        "",
        *delta_lines,
        "",
        f"![paired differences]({REPORT}_paired.png)",
        "",
        "## Mean ± s.e. of each arm",
        "",
        *mean_table_md(seeds["runs"]),
        "",
        "## Seed spread (the measured noise)",
        "",
        "Std over seeds of the unguarded runs, per setting and method, and pooled per setting "
        "(√ of the mean variance). This is the scale against which the single-seed studies "
        "(λ sweep, early stopping, few-step in main_table.md) should be read.",
        "",
        *spread_lines,
        "",
        f"## Re-pretrained bases ({seeds_sweep.REBASE_METHOD} on {seeds_sweep.REBASE_SETTING})",
        "",
        f"Base fixed: RL seeds {seeds_text} on the table's base. Base re-pretrained: base k "
        f"pretrained with seed k (configs/table_base.py:{seeds_sweep.REBASE_BASE}; base 0 is "
        "the table's) and RL seed k on it, so both rows vary the RL seed and the second also "
        "the base. Std over seeds:",
        "",
        *rebase_lines,
        "",
        missing_line(seeds["missing"]),
        "",
    ]
    payload = {"alpha": ALPHA, "seeds": list(seeds_sweep.SEEDS), "deltas": deltas,
               "spread": spreads, "rebase_spread": rebase, "runs": seeds["runs"],
               "rebase": seeds["rebase"], "missing": seeds["missing"],
               "cells": {name: {k: v for k, v in cell.items() if k != "source"}
                         for name, cell in sorted(seeds["cells"].items())}}
    table_sweeps.write_report(results, REPORT, lines, payload)
    print("\n".join(lines), flush=True)
    return payload


def wall_time_line() -> str:
    """Cells finished in this machine's workdir and their summed wall time (the cells' own
    times), the re-pretrained bases' pretraining included."""
    done = sweep.finished_seconds(os.path.join(table_sweeps.REPO, seeds_sweep.WORKROOT))
    bases = []
    for k in seeds_sweep.REBASE_SEEDS:
        path = os.path.join(table_sweeps.REPO, seeds_sweep.rebase_workdir(k), sweep.DONE_MARKER)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                bases.append(json.load(f)["seconds"])
    return (f"Wall time on this machine (sum of the cells' own times; two cells ran at a time on "
            f"the 2 cores, so each took longer than alone): {len(done)} cells, "
            f"{sum(done.values()) / 60:.0f} min, and {len(bases)} re-pretrained bases, "
            f"{sum(bases) / 60:.0f} min.")


def missing_line(missing: Sequence[str]) -> str:
    """How many cells have not finished anywhere (names when few)."""
    if not missing:
        return "Every cell has finished."
    names = [m.rsplit("/", 1)[1] for m in missing]
    return (f"Cells not finished when this was written: {len(names)}"
            + (f" ({', '.join(names)})." if len(names) <= 8 else " (listed in the json)."))


if __name__ == "__main__":
    report()

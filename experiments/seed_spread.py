"""Seeds of the main table: means ± s.e., paired differences, verdicts and the seed spread.

Seed 0 of every cell is the main table's own (configs/sweeps/table_main.py); seeds 1, 2, ...
and the re-pretrained bases come from configs/sweeps/table_seeds.py. A guarded − unguarded
difference is paired by seed (both arms of a seed share the prompts and rollout noise of its
first iteration) and judged against its own standard error: a metric moved when
|t| = |mean| / s.e. exceeds the two-sided ``ALPHA`` critical value of Student's t with n − 1
degrees of freedom (n = number of seeds with both arms finished). With one seed there is no
standard error and no verdict. Run by experiments/main_table.py (stages ``seeds`` and
``analyse``).

Conventions: a summary is table_sweeps.summarise's dict (``reward``, the ``QUALITY`` keys,
``rho``, ...); ``runs`` maps ``<setting>-<method>-<arm>`` to {seed: summary} with only the
finished seeds; standard errors are sample std (ddof = 1) / √n; spreads are sample stds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from configs import rl_table
from configs.sweeps import table_main as main_sweep
from configs.sweeps import table_seeds as seeds_sweep
from experiments import table_sweeps, tables

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


def verdict(diffs: Mapping[str, Mapping], alpha: float = ALPHA) -> str:
    """Quality verdict of guarded − unguarded from the paired differences of the
    ``QUALITY_SIGNS`` metrics: ``better``/``worse``/``mixed`` (naming the metrics that moved
    beyond the critical value), ``no difference detected`` or, for one seed, undecided."""
    n = diffs["fd"]["n"]
    if n < 2:
        return f"cannot be decided ({n} seed{'s' if n != 1 else ''})"
    labels = dict((k, label) for k, label, _ in PAIRED)
    moved = {k: s * significant_sign(diffs[k], alpha) for k, s in QUALITY_SIGNS.items()}
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


def collect(main: Mapping[str, dict | None]) -> dict:
    """The runs of every seed, the re-pretrained bases and the missing seed cells.

    Args:
      main: ``table_sweeps.collect()["main"]`` (seed 0 of every ``<setting>-<method>-<arm>``).
    Returns:
      ``runs``: ``<setting>-<method>-<arm>`` -> {seed: summary} (finished seeds only; the guarded
      summaries carry ``hinge_active``); ``rebase``: {``base``, ``plain``, ``guard``} -> {base
      seed: summary}, base seed 0 being the table's own base and cells; ``missing``: unfinished
      cells of configs/sweeps/table_seeds.py (``<workroot>/<name>``).
    """
    root = seeds_sweep.WORKROOT
    out = {"runs": {}, "rebase": {"base": {}, "plain": {}, "guard": {}}, "missing": []}

    def get(name, setting):
        row = table_sweeps.summarise(table_sweeps.load_eval(root, name), setting)
        if row is None:
            out["missing"].append(f"{root}/{name}")
        return row

    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            for arm in main_sweep.ARMS:
                key = f"{setting}-{method}-{arm}"
                found = {0: main.get(key)}
                for k in seeds_sweep.SEEDS:
                    found[k] = get(f"eval-{key}-s{k}", setting)
                    if found[k] is not None:
                        found[k]["hinge_active"] = table_sweeps.hinge_activity(
                            root, f"rl-{key}-s{k}")
                out["runs"][key] = {k: r for k, r in found.items() if r is not None}
    setting, method = seeds_sweep.REBASE_SETTING, seeds_sweep.REBASE_METHOD
    rebase = out["rebase"]
    base0 = table_sweeps.summarise(
        table_sweeps.load_eval(main_sweep.WORKROOT, f"eval-base-{seeds_sweep.REBASE_BASE}"),
        setting)
    for k in (0, *seeds_sweep.REBASE_SEEDS):
        rebase["base"][k] = base0 if k == 0 else get(
            f"eval-base-{seeds_sweep.REBASE_BASE}-b{k}", setting)
        for arm in main_sweep.ARMS:
            rebase[arm][k] = (out["runs"][f"{setting}-{method}-{arm}"].get(0) if k == 0
                              else get(f"eval-{setting}-{method}-{arm}-b{k}", setting))
    for part in rebase.values():
        for k in [k for k, r in part.items() if r is None]:
            del part[k]
    return out


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
    finished, with the verdict; and one record per pair (means, s.e., t, n, verdict)."""
    head = ["setting", "method", "seeds", *[f"Δ {label}" for _, label, _ in PAIRED],
            "out of range unguarded → guarded", "ρ unguarded → guarded",
            "hinge active (training)", "quality: guarded vs unguarded"]
    lines = [tables.row(head), "|---|---|---:|" + "---:|" * len(PAIRED) + "---|---|---:|---|"]
    records = []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            key = f"{setting}-{method}"
            seeds = paired_seeds(runs, key)
            if not seeds:
                lines.append(tables.row([setting, method, "0", "not run"]
                                        + [""] * (len(head) - 4)))
                continue
            plain, guard = runs[f"{key}-plain"], runs[f"{key}-guard"]
            diffs = paired_diffs(plain, guard, seeds)
            v = verdict(diffs)
            mean = {arm: {k: float(np.mean([rows[s][k] for s in seeds]))
                          for k in ("out_of_range", "rho")}
                    for arm, rows in (("plain", plain), ("guard", guard))}
            hinge = [guard[s].get("hinge_active") for s in seeds]
            hinge = None if any(h is None for h in hinge) else float(np.mean(hinge))
            records.append({"setting": setting, "method": method, "seeds": seeds,
                            **{k: d["mean"] for k, d in diffs.items()}, "paired": diffs,
                            "verdict": v, "out_of_range_plain": mean["plain"]["out_of_range"],
                            "out_of_range_guard": mean["guard"]["out_of_range"],
                            "rho_plain": mean["plain"]["rho"], "rho_guard": mean["guard"]["rho"],
                            "hinge_active": hinge})
            lines.append(tables.row(
                [setting, method, str(len(seeds)),
                 *[fmt_diff(diffs[k], spec) for k, _, spec in PAIRED],
                 f"{mean['plain']['out_of_range']:.3f} → {mean['guard']['out_of_range']:.3f}",
                 f"{mean['plain']['rho']:.3f} → {mean['guard']['rho']:.3f}",
                 tables.fmt(hinge, "{:.2f}"), v]))
    return lines, records


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
    head = (f"Noise is measured, not assumed. A guarded − unguarded difference is paired by seed "
            f"and counts as a change when |t| = |mean| / s.e. exceeds the two-sided "
            f"{ALPHA * 100:g} % critical value of Student's t with n − 1 degrees of freedom "
            f"({crit}; n = seeds with both arms finished). Each of FD, recall and judged real "
            "is tested on its own, with no correction for testing three metrics in twelve "
            "pairs. The measured seed spread (std over seeds of the unguarded runs) is in "
            "\"Seeds\" below.")
    if max_n < 2:
        return head + (" Only seed 0 has finished for every pair, so there is no standard "
                       "error and no verdict yet: the table below is the single-seed table, "
                       "and its differences are single runs.")
    return head

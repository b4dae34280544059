"""Does inference-time renormalisation repair an inflated run? Strength φ, late steps, seeds.

Usage (from the repository root; resumable: finished cells are skipped on rerun):
  python experiments/renormalise.py [--stages select,sweep,analyse]
      [--runs <rl workdir>[=<setting>],...] [--rho_min 1.02] [--num_hosts N --host_index i]

Stages:
- ``select``: writes the runs file of configs/sweeps/renormalise.py (``RUNS_FILE``). Without
  ``--runs``: every run of the inflation search (``experiments/results/inflation_search.json``,
  cells ``workdir/sweeps/inflation_search/rl-<candidate>-s<seed>``) whose sampling ρ is at
  least ``--rho_min``, with that candidate's evaluation overrides. With ``--runs``: those RL
  workdirs; a workdir named ``[rl-]<candidate>-s<seed>`` counts as seed <seed> of <candidate>
  (the seeds of a candidate are paired), any other as seed 0 of its own name. The evaluation
  setting (configs/eval_table.py) is the one after ``=``, else the one whose base and reward
  the run was trained with; a run trained with CFG in its rollouts is evaluated with it.
- ``sweep``: ``python -m experiments.sweep --config=configs/sweeps/renormalise.py``: per run,
  the plain sampler (φ = 0) and φ ∈ {0.5, 0.7, 1} × {every step, σ ≤ 0.6 only} (the cells and
  the reasons for the window are in that file's docstring);
- ``analyse``: writes ``experiments/results/renormalise.md`` and ``.json``: per candidate,
  each arm's reward, FD, recall, judged real, out of range and ρ (mean ± s.e. over seeds) and
  the paired difference arm − plain (mean ± s.e. over seeds, t).

ρ: θ's own sampling ρ (its plain ODE trajectory, the same in every arm of a run) picks the
runs; each arm's ρ column is the ratio ‖v‖/‖v_ref‖ of the velocity that arm's sampler applied,
on its own trajectory (1 at fully renormalised steps), averaged over the 20 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from configs import rl_table  # noqa: E402
from configs.sweeps import inflation_search as search  # noqa: E402
from configs.sweeps import renormalise as renorm  # noqa: E402
from experiments import table_sweeps, tables  # noqa: E402

REPO = table_sweeps.REPO
RESULTS = table_sweeps.RESULTS
SWEEP = "configs/sweeps/renormalise.py"
OUT = "renormalise"
SEARCH_RESULTS = "experiments/results/inflation_search.json"
STAGES = ("select", "sweep", "analyse")
# (key of a row, column label, format); rho is the applied ratio of the arm's sampler.
METRICS = (("reward", "reward ↑", "{:.3f}"), ("fd", "FD ↓", "{:.2f}"),
           ("recall", "recall ↑", "{:.3f}"), ("realism", "judged real ↑", "{:.3f}"),
           ("out_of_range", "out of range ↓", "{:.3f}"), ("rho_applied", "ρ applied", "{:.3f}"))
_SEEDED = re.compile(r"^(?:rl-)?(?P<candidate>.+)-s(?P<seed>\d+)$")


# ----------------------------------------------------------------------------------------------
# Selecting the runs.
# ----------------------------------------------------------------------------------------------


def from_search(results: dict, rho_min: float) -> list[dict]:
    """Run entries of the inflation search's finished cells whose sampling ρ ≥ ``rho_min``
    (``results``: the JSON that experiments/inflation_search.py writes)."""
    runs = []
    for key, cell in results["data"]["cells"].items():
        ev = cell.get("eval")
        if ev is None or ev["rho"] < rho_min:
            continue
        spec = search.CANDIDATES.get(cell["candidate"])
        runs.append({"name": key, "candidate": cell["candidate"], "seed": int(cell["seed"]),
                     "workdir": f"{search.WORKROOT}/rl-{key}", "setting": cell["setting"],
                     "eval": dict(spec[3]) if spec else {}, "rho": float(ev["rho"])})
    return runs


def setting_of(config: dict) -> str:
    """The configs/rl_table.py setting whose base workdir and reward weights an RL config (a
    recorded dict) was trained with. ValueError when none matches."""
    base = config.get("base", {}).get("workdir")
    weights = dict(config.get("rewards", {}))
    for setting, (base_name, setting_weights) in rl_table.SETTINGS.items():
        same_base = base is None or os.path.normpath(base) == os.path.normpath(
            rl_table.BASES[base_name])
        if same_base and weights == setting_weights:
            return setting
    raise ValueError(f"no configs/rl_table.py setting has the rewards {weights} on the base "
                     f"{base!r}; give one after '=': --runs <workdir>=<setting>")


def from_command_line(spec: str, read_config=None) -> list[dict]:
    """Run entries of ``--runs`` (``workdir[=setting],...``). ``read_config(workdir)`` returns a
    run's recorded RL config (default: its newest checkpoint's); it is read only when the
    setting is not given after "=", and always for the CFG scale of its rollouts."""
    runs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        workdir, _, setting = item.partition("=")
        workdir = os.path.normpath(workdir)
        name = os.path.basename(workdir)
        m = _SEEDED.match(name)
        candidate, seed = (m["candidate"], int(m["seed"])) if m else (name, 0)
        config = (read_config or _recorded_config)(workdir)
        setting = setting or setting_of(config)
        if setting not in rl_table.SETTINGS:
            raise ValueError(f"{item!r}: setting must be one of {sorted(rl_table.SETTINGS)}")
        cfg = float(config.get("rollout", {}).get("guidance_scale", 1.0))
        runs.append({"name": f"{candidate}-s{seed}", "candidate": candidate, "seed": seed,
                     "workdir": workdir, "setting": setting,
                     "eval": {"sample.guidance_scale": cfg} if cfg != 1.0 else {}})
    return runs


def _recorded_config(workdir: str) -> dict:
    from normguard_jax import checkpointing  # noqa: PLC0415  (imports JAX)
    _, meta = checkpointing.read_meta(os.path.join(REPO, workdir))
    return meta["config"]


def write_runs(runs: list[dict]) -> str:
    """Writes the runs file of the sweep; returns its path."""
    if not runs:
        raise SystemExit("no run to renormalise: none reached the ρ threshold (or --runs is "
                         "empty)")
    path = os.path.join(REPO, renorm.RUNS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=1)
    print(f"{len(runs)} runs -> {path}: " + ", ".join(r["name"] for r in runs), flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# Reading and statistics.
# ----------------------------------------------------------------------------------------------


def summarise(result: dict | None, setting: str) -> dict | None:
    """table_sweeps.summarise plus ``rho_applied`` (θ's ρ for the plain sampler)."""
    row = table_sweeps.summarise(result, setting)
    if row is not None:
        row["rho_applied"] = result["norm_ratio"].get("applied", {"mean": row["rho"]})["mean"]
    return row


def collect(runs: list[dict]) -> dict:
    """Every finished cell: ``{"cells": {run name: {arm: row}}, "missing": [cell names]}``."""
    out = {"cells": {}, "missing": []}
    for run in runs:
        rows = {}
        for arm in renorm.arms():
            cell = f"eval-{run['name']}-{arm}"
            row = summarise(table_sweeps.load_eval(renorm.WORKROOT, cell), run["setting"])
            if row is None:
                out["missing"].append(cell)
            else:
                rows[arm] = row
        out["cells"][run["name"]] = rows
    return out


def candidates(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by candidate (first appearance order), each group sorted by seed."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["candidate"], []).append(run)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def statistics(runs: list[dict], data: dict) -> dict:
    """Per candidate and arm: ``{metric: [mean, s.e., n]}`` over seeds, and ``{"diff/<metric>":
    [mean, s.e., t, n]}`` of the paired difference arm − plain over the seeds where both
    finished."""
    stats = {}
    for cand, group in candidates(runs).items():
        per_arm = {}
        for arm in renorm.arms():
            rows = [data["cells"][r["name"]].get(arm) for r in group]
            plain = [data["cells"][r["name"]].get(renorm.REFERENCE_ARM) for r in group]
            entry = {}
            for key, _, _ in METRICS:
                values = [row[key] for row in rows if row is not None]
                if values:
                    entry[key] = [*tables.mean_se(values), len(values)]
                pairs = [(row[key], p[key]) for row, p in zip(rows, plain)
                         if row is not None and p is not None]
                if pairs and arm != renorm.REFERENCE_ARM:
                    entry[f"diff/{key}"] = [*tables.paired_difference(
                        [a for a, _ in pairs], [b for _, b in pairs]), len(pairs)]
            per_arm[arm] = entry
        stats[cand] = per_arm
    return stats


def _mean_se(entry, spec: str) -> str:
    if entry is None:
        return tables.MISSING
    m, se = entry[0], entry[1]
    return f"{spec.format(m)} ± {spec.format(se)}"


def _diff(entry, spec: str) -> str:
    if entry is None:
        return tables.MISSING
    m, se, t, n = entry
    sign = "+" if m >= 0 else ""
    tt = "" if t != t else f" (t {t:+.1f})"   # nan for one seed
    return f"{sign}{spec.format(m)} ± {spec.format(se)}{tt}"


def _arm_label(arm: str) -> str:
    phi, sigma_max = renorm.arm_options(arm)
    if phi == 0:
        return "plain (φ = 0)"
    return f"φ = {phi:g}, " + ("every step" if sigma_max >= 1 else f"σ ≤ {sigma_max:g}")


def candidate_tables(cand: str, group: list[dict], data: dict, stats: dict) -> list[str]:
    """Markdown: the values (mean ± s.e. over seeds) and the paired differences of one
    candidate."""
    rho = [data["cells"][r["name"]].get(renorm.REFERENCE_ARM, {}).get("rho") for r in group]
    seeds = ", ".join(f"s{r['seed']}" + ("" if p is None else f" {p:.3f}")
                      for r, p in zip(group, rho))
    lines = [f"### {cand} ({group[0]['setting']}; seeds and θ's sampling ρ: {seeds})", "",
             "Mean ± s.e. over seeds:", ""]
    lines += tables.header(["arm", *[label for _, label, _ in METRICS], "seeds"])
    for arm in renorm.arms():
        entry = stats[cand][arm]
        n = max((v[-1] for k, v in entry.items() if not k.startswith("diff/")), default=0)
        lines.append(tables.row([_arm_label(arm), *[_mean_se(entry.get(k), spec)
                                                    for k, _, spec in METRICS], str(n)]))
    lines += ["", "Paired difference arm − plain, mean ± s.e. over seeds (t = mean / s.e.):",
              ""]
    lines += tables.header(["arm", *[f"Δ {label}" for _, label, _ in METRICS], "pairs"])
    for arm in list(renorm.arms())[1:]:
        entry = stats[cand][arm]
        n = max((v[-1] for k, v in entry.items() if k.startswith("diff/")), default=0)
        lines.append(tables.row([_arm_label(arm), *[_diff(entry.get(f"diff/{k}"), spec)
                                                     for k, _, spec in METRICS], str(n)]))
    return lines


def cell_table(runs: list[dict], data: dict) -> list[str]:
    """Markdown: every finished cell, one row each."""
    lines = tables.header(["run", "arm", *[label for _, label, _ in METRICS]], left=2)
    for run in runs:
        for arm, row in data["cells"][run["name"]].items():
            lines.append(tables.row([run["name"], _arm_label(arm),
                                     *[tables.fmt(row.get(k), spec) for k, _, spec in METRICS]]))
    return lines


def analyse(command: str) -> dict:
    """Writes the markdown and JSON of the finished cells; returns the JSON's dict."""
    runs = renorm.read_runs()
    data = collect(runs)
    stats = statistics(runs, data)
    lines = [
        "# Inference-time renormalisation of inflated runs: strength φ and late steps", "",
        f"Command: `{command}` (sweep: `{SWEEP}`). Runs: {len(runs)} "
        f"({', '.join(r['name'] for r in runs)}); evaluation configs/eval_table.py:<setting> "
        "(300 samples at fixed seeds, 20-step ODE, shift 3) of each run's last checkpoint.", "",
        "Arms: v_θ ← v_θ·(1 + φ·(‖v_ref‖/‖v_θ‖ − 1)) per sample (the norm moves linearly "
        "towards the base's ‖v_ref‖ on the same state; φ = 1 rescales to it), at every step or "
        f"only at σ_k ≤ {renorm.LATE_SIGMA:g} (the last 7 of 20 steps). ρ applied = mean over "
        "the steps of ‖v‖/‖v_ref‖ of the velocity the arm's sampler used (θ's own ρ for the "
        "plain sampler). Judged real = realism; out of range = fraction of pixels beyond "
        "[-1.05, 1.05].", "",
        ("Every cell finished." if not data["missing"] else
         f"Cells not finished when this was written ({len(data['missing'])}): "
         + ", ".join(data["missing"]) + "."), "",
        "## Per candidate", ""]
    for cand, group in candidates(runs).items():
        lines += candidate_tables(cand, group, data, stats) + [""]
    lines += ["## Every cell", ""] + cell_table(runs, data)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, OUT + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = {"runs": runs, "arms": renorm.arms(), "data": data, "stats": stats}
    with open(os.path.join(RESULTS, OUT + ".json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print("\n".join(lines), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages, in order: {', '.join(STAGES)}")
    parser.add_argument("--runs", default="",
                        help="comma-separated RL workdirs, each optionally =<setting> "
                             "('' = the inflation search's runs with ρ >= --rho_min)")
    parser.add_argument("--rho_min", type=float, default=renorm.RHO_MIN)
    parser.add_argument("--num_hosts", type=int, default=0)
    parser.add_argument("--host_index", type=int, default=-1)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    hosts = ([f"--config.num_hosts={args.num_hosts}"] if args.num_hosts else []) + (
        [f"--config.host_index={args.host_index}"] if args.host_index >= 0 else [])
    os.chdir(REPO)
    for stage in stages:
        if stage == "select":
            if args.runs:
                runs = from_command_line(args.runs)
            else:
                if not os.path.exists(SEARCH_RESULTS):
                    parser.error(f"{SEARCH_RESULTS} is missing: run experiments/"
                                 "inflation_search.py first, or name the runs with --runs")
                with open(SEARCH_RESULTS, encoding="utf-8") as f:
                    runs = from_search(json.load(f), args.rho_min)
            write_runs(runs)
        elif stage == "sweep":
            table_sweeps.run_sweep(SWEEP, hosts)
        elif stage == "analyse":
            flags = (f" --runs {args.runs}" if args.runs else "") + (
                f" --rho_min {args.rho_min:g}" if args.rho_min != renorm.RHO_MIN else "")
            analyse("python experiments/renormalise.py" + flags)


if __name__ == "__main__":
    main()

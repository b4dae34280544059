"""Every analysis of experiments/README.md from one command, with the compute it took.

Usage (from the repository root, on a fresh clone or after an interruption: finished work is
skipped, interrupted cells resume from their checkpoints):
  .venv/bin/python experiments/run_all.py [--stages core] [--stages all] [--stages main_table_digits,norm_runs]
      [--list] [--report] [--redo norm_analyses]

Stages run in order, each in its own process (the commands are in ``STAGES``):
- ``main_table_digits``: experiments/main_table.py on the digits base: pretrains it (small
  UNet on 4,500 MNIST digits, 600 steps at batch 64), trains the auxiliary nets the metrics
  need, then 2 rewards × NFT/AWM/DPO × {λ = 0, 0.1} (12 RL iterations of 8 prompts × 8
  samples, 10-step rollouts), the λ sweep, the early-stopping control and few-step inference
  (analyses 4–7 of issue #6);
- ``norm_runs``: GRPO and RAM, unguarded and guarded, on the digits log p(class) setting
  (configs/sweeps/table_norms.py), so every method has a run;
- ``norm_analyses``: ρ_k per step and over training, inference-time renormalisation and the
  adjoint sensitivity (analyses 1–3) of the ten digits log p(class) runs of all five methods;
- ``main_table_shapes``: the shapes half of the main table: pretrains the shapes base (small
  DiT on the procedurally generated shapes, 2000 steps at batch 64), its 12 RL cells and
  evaluations, and rewrites the table;
- ``validity``: do the quality metrics rank degraded real images below real ones, and the
  table's two bases in between (results/validity_table_bases.md; results/validity.md is the
  same check on the four pretraining-grid bases, after ``pretrain_grid``);
- extended (not in ``core``): ``main_table_seeds_digits``, ``main_table_seeds_shapes``
  (RL seeds 0, 1 and 2 of one base's half of the main table, configs/sweeps/table_seeds.py,
  about 2 h and 1.5 h on one process) and ``main_table_seeds_rebase`` (NFT on digits
  contrast, both arms, on two digits bases re-pretrained with seeds 1 and 2, about 35 min),
  each writing results/main_table_seeds.md from every finished seed cell; ``guard_ablation_awm_contrast``, ``guard_ablation`` (the
  multi-seed guard studies), ``rl_methods`` (24-iteration runs at 64 rollouts),
  ``pretrain_grid`` (every dataset × architecture), ``inflation_search`` (unguarded
  candidates × 3 seeds: where does ρ reach 1.05?), ``lambda_calibration`` (λ set per
  method so the penalty's gradient is 3 / 10 / 30 % of the base loss's, NFT/AWM/DPO on digits
  contrast, about 40 min) and ``guard_variants`` (NormGuard's per-sample, batch, σ-binned and
  σ-ramped hinges on NFT contrast, and the conditional- and guided-velocity hinges under CFG,
  × 3 seeds, about 100 min).

``core`` is the set planned for the 2-core, ~3-hour budget; ``all`` adds the extended stages.
The wall time of every attempt at a stage is added to ``workdir/run_all/timings.json`` (an
interrupted attempt counts too), and ``experiments/results/compute.md`` is rewritten after
each stage with the time per stage, the total, and the machine. A stage that finished is not
rerun unless named in ``--redo``; a redone stage's earlier attempts are moved to its
``replaced`` list and no longer counted, since the result they made is replaced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

from configs import rl_table
from configs.sweeps import table_norms
from experiments import sweep, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# The main table runs in two stages, its digits half first (as main_table.py's default order
# does), so that an interrupted run leaves the norm analyses done; the validity check needs
# both of the table's bases, so it comes last.
STAGES = {
    "main_table_digits": [PY, "experiments/main_table.py", "--stages",
                          "bases:digits,main:*digits*,lambda,earlystop,fewstep,analyse"],
    "norm_runs": [PY, "-m", "experiments.sweep", "--config=configs/sweeps/table_norms.py"],
    "norm_analyses": [PY, "experiments/norm_analyses.py", "--runs", ",".join(table_norms.run_dirs()),
                      "--out", "experiments/results/norm_table"],
    "main_table_shapes": [PY, "experiments/main_table.py", "--stages", "bases:shapes,main,analyse"],
    "validity": [PY, "experiments/validity.py", "--datasets=digits_mnist,shapes",
                 "--aux_dir=workdir/aux_nets", *(f"--base={b}" for b in rl_table.BASES.values()),
                 "--out=experiments/results/validity_table_bases.md"],
    "main_table_seeds_digits": [PY, "experiments/main_table.py", "--stages",
                                "bases:digits,seeds:digits"],
    "main_table_seeds_shapes": [PY, "experiments/main_table.py", "--stages",
                                "bases:shapes,seeds:shapes"],
    "main_table_seeds_rebase": [PY, "experiments/main_table.py", "--stages",
                                "bases:digits,seeds:rebase"],
    "guard_ablation_awm_contrast": [PY, "experiments/guard_ablation.py", "--study",
                                    "awm_contrast"],
    "guard_ablation": [PY, "experiments/guard_ablation.py"],
    "rl_methods": [PY, "experiments/rl_methods.py"],
    "pretrain_grid": [PY, "experiments/pretrain_grid.py"],
    "inflation_search": [PY, "experiments/inflation_search.py"],
    "lambda_calibration": [PY, "experiments/lambda_calibration.py"],
    "guard_variants": [PY, "experiments/guard_variants.py"],
}
CORE = ("main_table_digits", "norm_runs", "norm_analyses", "main_table_shapes", "validity")
BUDGET_MIN = 180
TIMINGS = os.path.join(REPO, "workdir", "run_all", "timings.json")
REPORT = os.path.join(REPO, "experiments", "results", "compute.md")


def parse_stages(spec: str) -> list[str]:
    """``core`` | ``all`` | comma-separated stage names -> stage names in ``STAGES`` order."""
    if spec == "core":
        return list(CORE)
    if spec == "all":
        return list(STAGES)
    names = [s for s in spec.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise SystemExit(f"unknown stage(s) {unknown or spec!r}; choose from core, all or "
                         f"{', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def load_timings() -> dict:
    if not os.path.exists(TIMINGS):
        return {}
    with open(TIMINGS, encoding="utf-8") as f:
        return json.load(f)


def save_timings(timings: dict) -> None:
    os.makedirs(os.path.dirname(TIMINGS), exist_ok=True)
    tmp = TIMINGS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(timings, f, indent=1)
    os.replace(tmp, TIMINGS)  # never a half-written file after an interruption


def machine() -> str:
    """Cores, CPU model and Python version, for compute.md."""
    return f"{os.cpu_count()} cores, {tables.cpu()[0]}, Python {platform.python_version()}"


def cell_times(sweeps_root: str = os.path.join(REPO, "workdir", "sweeps")) -> list[tuple]:
    """Finished sweep cells grouped by (workroot, kind, base): rows of (workroot, kind, base,
    cells, minutes). Kind is the cell name's prefix (``rl``, ``eval``); base is ``shapes``
    when the name says so, else ``digits``. Read from each cell's done marker."""
    groups = {}
    for root in sorted(os.listdir(sweeps_root)) if os.path.isdir(sweeps_root) else []:
        for cell, seconds in sweep.finished_seconds(os.path.join(sweeps_root, root)).items():
            key = (root, cell.split("-", 1)[0], "shapes" if "shapes" in cell else "digits")
            n, total = groups.get(key, (0, 0.0))
            groups[key] = (n + 1, total + seconds / 60)
    return [(*key, n, minutes) for key, (n, minutes) in sorted(groups.items())]


def shown(command: list[str]) -> list[str]:
    """The command as the docs write it: ``python`` for this interpreter."""
    return ["python" if c == PY else c for c in command]


def stage_minutes(entry: dict) -> float:
    """Wall time of every recorded attempt at a stage, in minutes."""
    return sum(a["seconds"] for a in entry["attempts"]) / 60


def write_report(timings: dict, argv: list[str]) -> None:
    """experiments/results/compute.md: minutes per stage (all attempts summed) and the total."""
    lines = ["# Compute of the analyses", "",
             "Command: `" + " ".join(["python experiments/run_all.py", *argv]) + "`", "",
             f"Machine: {machine()}. Times are wall-clock minutes summed over every attempt "
             "at a stage (an interrupted attempt counts), from `workdir/run_all/timings.json`.",
             "", "| stage | in core | status | attempts | minutes | command |",
             "|---|---|---|---:|---:|---|"]
    total = {"core": 0.0, "all": 0.0}
    for name in STAGES:
        t = timings.get(name)
        if t is None:
            continue
        minutes = stage_minutes(t)
        total["all"] += minutes
        if name in CORE:
            total["core"] += minutes
        lines.append(f"| {name} | {'yes' if name in CORE else 'no'} | {t['status']} | "
                     f"{len(t['attempts'])} | {minutes:.1f} | `{' '.join(t['command'])}` |")
    done_core = all(timings.get(n, {}).get("status") == "done" for n in CORE)
    lines += ["", f"Core stages: {total['core']:.0f} min "
              f"({'all finished' if done_core else 'not all finished yet'}; "
              f"budget {BUDGET_MIN} min). All recorded stages: {total['all']:.0f} min."]
    rows = cell_times()
    if rows:
        lines += ["", "Where the time went: finished sweep cells (their own `sweep_done.json`; "
                  "the stages' totals also include pretraining, plots and the norm analyses).",
                  "", "| workroot | kind | base | cells | minutes | minutes per cell |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| `workdir/sweeps/{root}` | {kind} | {base} | {n} | {m:.1f} | {m / n:.2f} |"
                  for root, kind, base, n, m in rows]
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def run_stage(name: str, timings: dict, argv: list[str]) -> str:
    """Runs one stage, recording its wall time however it ends.

    Returns "done", "failed" or "interrupted". SIGINT or SIGTERM to this process is passed on
    to the stage (whose jobs checkpoint and stop), and the attempt is recorded before exiting.
    """
    command = STAGES[name]
    entry = timings.setdefault(name, {"attempts": [], "status": "todo"})
    entry["command"] = shown(command)
    start = time.time()
    stopped = []
    proc = subprocess.Popen(command, cwd=REPO)

    def forward(signum, _frame):
        stopped.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        status = "interrupted" if stopped else ("done" if returncode == 0 else "failed")
        entry["status"] = status
        entry["attempts"].append({
            "started": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"),
            "seconds": round(time.time() - start, 1), "status": status})
        save_timings(timings)
        write_report(timings, argv)
    return status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stages", default="core",
                        help="core (default), all, or comma-separated stage names")
    parser.add_argument("--redo", default="", help="comma-separated stages to rerun")
    parser.add_argument("--list", action="store_true", help="print the stages and stop")
    parser.add_argument("--report", action="store_true",
                        help="rewrite experiments/results/compute.md from the recorded times and stop")
    args = parser.parse_args(argv)
    stages = parse_stages(args.stages)
    redo = set(parse_stages(args.redo)) if args.redo else set()
    timings = load_timings()
    if args.report:  # the header names the command that ran the stages, not this one
        write_report(timings, [a for a in argv if a != "--report"])
        print(f"[run_all] wrote {os.path.relpath(REPORT, REPO)}")
        return 0
    if args.list:
        for name in stages:
            t = timings.get(name, {"status": "todo", "attempts": []})
            print(f"{name:28s} {t['status']:11s} {stage_minutes(t):6.1f} min  "
                  + " ".join(shown(STAGES[name])))
        return 0
    for i, name in enumerate(stages, 1):
        if timings.get(name, {}).get("status") == "done" and name not in redo:
            print(f"[run_all] {i}/{len(stages)} {name}: finished before, skipped", flush=True)
            continue
        if name in redo and name in timings:  # the new result replaces the old: so does its time
            entry = timings[name]
            entry["replaced"] = entry.get("replaced", []) + entry["attempts"]
            entry["attempts"] = []
        print(f"[run_all] {i}/{len(stages)} {name} ({datetime.datetime.now():%H:%M}): "
              + " ".join(STAGES[name]), flush=True)
        status = run_stage(name, timings, argv)
        if status != "done":
            print(f"[run_all] {name} {status}; rerun to go on (finished stages are skipped, "
                  f"interrupted cells resume). Times so far: {os.path.relpath(REPORT, REPO)}",
                  file=sys.stderr)
            return 130 if status == "interrupted" else 1
    print(f"[run_all] done; times in {os.path.relpath(REPORT, REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

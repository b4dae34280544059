"""The main table's sweeps: running them (and their base models), reading their finished cells.

Shared by the claim modules of the main table (main_table.py, lambda_sweep.py, few_step.py,
early_stopping.py, sample_grids.py) and by guard_ablation.py. The sweeps themselves are
configs/sweeps/table_{main,lambda,earlystop,fewstep}.py; a cell is finished when
experiments/sweep.py has written its done marker.

Paths are relative to ``REPO`` (read at call time, so tests can point it elsewhere); results go
to ``RESULTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from configs import rl_table, table_base
from configs.sweeps import table_earlystop, table_fewstep
from configs.sweeps import table_main as main_sweep
from experiments import sweep, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")

# Columns: (key in a summary and in evaluation.json["generated"]["quality"], label).
QUALITY = (("fd", "FD ↓"), ("recall", "recall ↑"), ("realism", "judged real ↑"),
           ("precision", "precision ↑"), ("out_of_range", "out of range ↓"))
# Run-to-run spread of two identical single-seed RL runs (experiments/README.md "Noise"):
# differences below these say nothing. Only the single-seed early-stopping and few-step
# sections read it (FD); the main table's verdict is decided over seeds (seed_spread.py).
NOISE = {"fd": 3.0, "recall": 0.1, "realism": 0.15}


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------


def base_finished(workdir: str, steps: int) -> bool:
    """Whether a pretraining workdir has a checkpoint at (or past) ``steps``."""
    from normguard_jax import checkpointing  # noqa: PLC0415  (imports JAX)
    try:
        step, _ = checkpointing.read_meta(os.path.join(REPO, workdir))
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
    cmd = [sys.executable, "-m", "experiments.sweep", f"--config={spec}", *hosts]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode == 0


def stage_parser(doc: str, stages) -> argparse.ArgumentParser:
    """An argument parser (description: the first line of ``doc``) with ``--stages``, the
    comma-separated subset of ``stages`` to run (default: all, in order)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--stages", default=",".join(stages),
                        help=f"comma-separated stages, in order: {', '.join(stages)}")
    return parser


def chosen_stages(parser: argparse.ArgumentParser, spec: str, stages) -> list[str]:
    """The stage names of ``spec`` (comma-separated); ``parser.error`` names unknown ones."""
    chosen = [s for s in spec.split(",") if s]
    unknown = sorted(set(chosen) - set(stages))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(stages)}")
    return chosen


def write_report(results: str, out: str, lines: list[str], payload: dict) -> None:
    """``<results>/<out>.md`` (the markdown ``lines``) and ``<out>.json`` (``payload``; numpy
    scalars as floats), creating ``results`` if needed."""
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, out + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(results, out + ".json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)


# ----------------------------------------------------------------------------------------------
# Reading.
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


def base_of(setting: str) -> str:
    return rl_table.SETTINGS[setting][0]


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


def metric_rows(workdir: str, key: str) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` that carry ``key``, one per step (a resumed run
    logs an iteration again: the last line wins), sorted by step; [] when the file is missing."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        by_step = {r["step"]: r for r in map(json.loads, filter(str.strip, f)) if key in r}
    return [by_step[s] for s in sorted(by_step)]


def hinge_activity(workroot: str, name: str) -> float | None:
    """Mean over the logged iterations of the fraction of training rows where the hinge was
    active (``train/normguard/active_frac`` in the RL cell's metrics.jsonl; an iteration logged
    again after a resume counts once, its last line), or None."""
    key = "train/normguard/active_frac"
    values = [r[key] for r in metric_rows(os.path.join(REPO, workroot, name), key)]
    return float(np.mean(values)) if values else None


def collect() -> dict:
    """Every finished evaluation of the main, early-stopping and few-step sweeps, summarised
    (the λ sweep is read by lambda_sweep.collect_lambda)."""
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


def row_cells(row: dict | None) -> list[str]:
    """Table cells of one summary: reward, the ``QUALITY`` columns, ρ ("not run" if None)."""
    if row is None:
        return ["not run"] + [""] * (len(QUALITY) + 1)
    return ([tables.fmt(row["reward"])]
            + [tables.fmt(row[k], "{:.2f}" if k == "fd" else "{:.3f}") for k, _ in QUALITY]
            + [tables.fmt(row["rho"])])

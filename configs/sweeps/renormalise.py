"""Inference-time renormalisation of inflated RL runs: strength φ and late steps only, per seed.

Run (from the repository root; experiments/renormalise.py writes the runs file first, then
runs this and writes the table):
  python -m experiments.sweep --config=configs/sweeps/renormalise.py
The runs come from ``RUNS_FILE`` (``<WORKROOT>/runs.json``, or another file given as the config
argument: ``configs/sweeps/renormalise.py:<path>``), a JSON list of entries
``{"name", "candidate", "seed", "workdir", "setting", "eval"}``: by default the runs of the
inflation search (configs/sweeps/inflation_search.py) whose sampling ρ reached ``RHO_MIN``,
or RL workdirs named on experiments/renormalise.py's command line.

Cells (workdirs under ``WORKROOT``), all on the run's last checkpoint with
configs/eval_table.py:<setting> (300 digits at fixed seeds, 20-step ODE) plus the run's
evaluation overrides (``eval``: e.g. CFG 1.5 for a run trained with it):
- ``eval-<name>-phi0``: the plain sampler, the reference of every paired difference (φ = 0
  computes the plain sampler exactly, so it is one cell for both windows);
- ``eval-<name>-phi<φ>-all``: v_θ moved towards ‖v_ref‖ at every step with strength φ ∈
  ``PHIS`` (``sample.renormalize_phi``; φ = 1 is the full rescale of norm_analyses.py);
- ``eval-<name>-phi<φ>-late``: the same at the late steps only, σ_k ≤ ``LATE_SIGMA``
  (``sample.renormalize_sigma_max``): the last 7 of the 20 steps of the shift-3 schedule
  (σ = 0.58 … 0.009), where the contrast reward's adjoint sensitivity asks for a larger
  velocity (experiments/results/guard_ablation_norms.md) and the run's late-step norm is what
  renormalisation would correct. The early steps then follow θ's own velocity unchanged.
"""

import json
import os

from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKROOT = "workdir/sweeps/renormalise"
RUNS_FILE = WORKROOT + "/runs.json"   # written by experiments/renormalise.py --stages select
RHO_MIN = 1.02        # runs renormalised: sampling ρ at least this (issue: "ρ ≥ 1.02")
PHIS = (0.5, 0.7, 1.0)
LATE_SIGMA = 0.6
WINDOWS = {"all": 1.0, "late": LATE_SIGMA}   # window -> sample.renormalize_sigma_max
REFERENCE_ARM = "phi0"
RUN_FIELDS = ("name", "candidate", "seed", "workdir", "setting", "eval")


def arms() -> dict[str, dict]:
    """Arm name -> evaluation overrides: ``phi0`` (plain), then ``phi<φ>-<window>``."""
    out = {REFERENCE_ARM: {}}
    for phi in PHIS:
        for window, sigma_max in WINDOWS.items():
            out[f"phi{phi:g}-{window}"] = {"sample.renormalize": True,
                                           "sample.renormalize_phi": float(phi),
                                           "sample.renormalize_sigma_max": float(sigma_max)}
    return out


def arm_options(arm: str) -> tuple[float, float]:
    """``(φ, σ_max)`` of an arm (φ = 0 for the plain one)."""
    over = arms()[arm]
    return (over.get("sample.renormalize_phi", 0.0),
            over.get("sample.renormalize_sigma_max", 1.0))


def read_runs(path: str = "") -> list[dict]:
    """The runs file (``path`` or ``RUNS_FILE``, relative to the repository): a list of run
    entries with every key of ``RUN_FIELDS``. ValueError when it is missing or malformed."""
    path = os.path.join(REPO, path or RUNS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no runs file {path}: write it with `python experiments/renormalise.py "
                         "--stages select [--runs <rl workdirs>]`")
    with open(path, encoding="utf-8") as f:
        runs = json.load(f)
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path} must hold a non-empty JSON list of runs")
    for run in runs:
        missing = [k for k in RUN_FIELDS if k not in run]
        if missing:
            raise ValueError(f"{path}: run {run.get('name', run)!r} lacks {missing}")
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names must be unique, got {names}")
    return runs


def get_config(runs_file: str = ""):
    """Evaluation cells of every run of ``runs_file`` ("" = ``RUNS_FILE``) × ``arms()``."""
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [sweep.grid(name=f"eval-{run['name']}-{{arm}}",
                          config=f"configs/eval_table.py:{run['setting']}",
                          axes={"arm": arms()},
                          fixed={"checkpoint": run["workdir"], **run["eval"]},
                          group=run["name"], expect=["evaluation.json"])
               for run in read_runs(runs_file)]
    return c

"""λ calibrated per method: the penalty's gradient a stated fraction of the base loss's.

Run (from the repository root; experiments/lambda_calibration.py runs both passes after making
the digits base when it is missing, then writes the results):
  python -m experiments.sweep --config=configs/sweeps/lambda_calibration.py:calibrate
  python -m experiments.sweep --config=configs/sweeps/lambda_calibration.py

Every RL cell is ``configs/rl_table.py:<method>,digits_contrast`` on the quickstart's digits
base, ``ITERATIONS`` iterations (the main table's), seed 0, scalars logged every iteration with
``normguard.log_grad_norms=True`` (the gradient norms of the base loss and of the penalty,
taken separately; the update is unchanged). Per method of ``METHODS``:

- ``rl-<m>-calib``: unguarded (λ = 0); its logs give ‖∇ base_loss‖ and ‖∇ penalty‖ (the
  penalty's gradient is measured whatever λ), averaged over the iterations where the hinge
  was active (:func:`calibration_norms`);
- ``rl-<m>-f<pct>`` for ``FRACTIONS``: λ = fraction · ‖∇ base‖ / ‖∇ penalty‖
  (normguard.lambda_for_fraction, :func:`calibrated_lambdas`), so the penalty's gradient is
  that fraction of the base loss's when the hinge is active; the logs give the fraction
  achieved;
- ``rl-<m>-lam0.1``: the library's default λ = ``DEFAULT_LAMBDA``, for comparison (left out
  for the methods of ``SKIP_DEFAULT``);
- ``eval-<m>-<arm>`` (configs/eval_table.py:digits_contrast on the RL cell) and ``eval-base``.

λ of a fraction cell depends on a finished calibration cell, so the grid is built from the
calibration logs when the config is loaded: the argument ``calibrate`` gives the calibration
cells (and the base's evaluation) only; without it, a method whose calibration has not
finished (or whose hinge was never active in it) has no fraction cells, and the reason is
printed to stderr (:func:`calibrated_lambdas` raises :class:`NotCalibrated`).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from configs import rl_table
from experiments import sweep, table_sweeps
from normguard_jax import normguard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKROOT = "workdir/sweeps/lambda_calibration"
SETTING = "digits_contrast"
METHODS = ("nft", "awm", "dpo")
FRACTIONS = (0.03, 0.1, 0.3)   # wanted ‖∇ λ·penalty‖ / ‖∇ base_loss‖ when the hinge is active
DEFAULT_LAMBDA = 0.1           # the library's default λ (the main table's guarded arm)
SKIP_DEFAULT = ()              # methods without a λ = DEFAULT_LAMBDA cell (to save time)
SEED = 0
ITERATIONS = rl_table.ITERATIONS
RL_DONE = f"samples/samples_{ITERATIONS:07d}.png"  # the last sample grid of a finished run
METRIC = "train/normguard/"    # prefix of NormGuard's per-iteration scalars in metrics.jsonl
SIGNIFICANT = 4                # significant digits of a calibrated λ (a stable command line)


class NotCalibrated(RuntimeError):
    """λ of a method cannot be computed: its calibration cell has not finished, or its hinge
    was never active there."""


def arm_name(fraction: float) -> str:
    """The arm of a fraction, in per cent: 0.03 -> ``"f3"``, 0.1 -> ``"f10"``."""
    return f"f{100 * fraction:g}"


def read_metrics(cell: str) -> list[dict]:
    """The rows of ``<REPO>/<WORKROOT>/<cell>/metrics.jsonl`` that carry NormGuard's gradient
    norms, one per step (the last logged wins), sorted by step ([] when the file is missing)."""
    return table_sweeps.metric_rows(os.path.join(REPO, WORKROOT, cell), METRIC + "grad_norm_base")


def active_norms(rows: list[dict]) -> dict:
    """Gradient norms of the iterations where the hinge was active.

    Args:
      rows: metrics.jsonl rows of one RL cell (:func:`read_metrics`), one per iteration.

    Returns:
      ``{"iterations": n rows, "active_iterations": k, "active_steps": [k steps],
      "base": [k], "penalty": [k]}`` (‖∇ base_loss‖ and ‖∇ penalty‖, unweighted, of the rows
      with ``active_frac > 0``), plus ``mean_base``, ``mean_penalty``, ``median_base``,
      ``median_penalty`` over them (NaN when k = 0).
    """
    act = [r for r in rows if r.get(METRIC + "active_frac", 0.0) > 0]
    base = [float(r[METRIC + "grad_norm_base"]) for r in act]
    pen = [float(r[METRIC + "grad_norm_penalty_unweighted"]) for r in act]
    nan = float("nan")
    return {"iterations": len(rows), "active_iterations": len(act),
            "active_steps": [r["step"] for r in act], "base": base, "penalty": pen,
            "mean_base": float(np.mean(base)) if base else nan,
            "mean_penalty": float(np.mean(pen)) if pen else nan,
            "median_base": float(np.median(base)) if base else nan,
            "median_penalty": float(np.median(pen)) if pen else nan}


def calibration_norms(method: str) -> dict:
    """:func:`active_norms` of ``rl-<method>-calib``.

    Raises:
      NotCalibrated: the cell has no done marker, or its hinge was active in no iteration.
    """
    cell = f"rl-{method}-calib"
    if not os.path.exists(os.path.join(REPO, WORKROOT, cell, sweep.DONE_MARKER)):
        raise NotCalibrated(f"{method}: the calibration cell {WORKROOT}/{cell} has not finished; "
                            "run the sweep with the argument 'calibrate' first")
    norms = active_norms(read_metrics(cell))
    if norms["active_iterations"] == 0:
        raise NotCalibrated(f"{method}: the hinge was never active in the "
                            f"{norms['iterations']} logged iterations of {cell}, so the "
                            "penalty's gradient (and λ) is undefined")
    return norms


def calibrated_lambdas(method: str) -> dict[float, float]:
    """fraction -> λ of ``method`` for every fraction of ``FRACTIONS``, from the means of
    :func:`calibration_norms`, rounded to ``SIGNIFICANT`` significant digits.

    Raises:
      NotCalibrated: see :func:`calibration_norms`.
    """
    n = calibration_norms(method)
    lams = {f: normguard.lambda_for_fraction(f, n["mean_base"], n["mean_penalty"])
            for f in FRACTIONS}
    return {f: float(f"{lam:.{SIGNIFICANT}g}") for f, lam in lams.items()}


def _fixed(weight: float) -> dict:
    return {"seed": SEED, "normguard.weight": float(weight), "normguard.log_grad_norms": True,
            "train.iterations": ITERATIONS, "train.log_every": 1,
            "train.sample_every": ITERATIONS}


def _pair(method: str, arm: str, weight: float) -> list[dict]:
    """The RL grid of one arm of one method and its evaluation (one group: RL first)."""
    rl = sweep.grid(name=f"rl-{method}-{arm}", config=f"configs/rl_table.py:{method},{SETTING}",
                    axes={}, fixed=_fixed(weight), group=f"{method}-{arm}", expect=[RL_DONE])
    ev = sweep.grid(name=f"eval-{method}-{arm}", config=f"configs/eval_table.py:{SETTING}",
                    axes={}, fixed={"checkpoint": f"{WORKROOT}/rl-{method}-{arm}"},
                    group=f"{method}-{arm}", expect=["evaluation.json"])
    return [rl, ev]


def arms(method: str, calibrate_only: bool = False) -> dict[str, float]:
    """Arm name -> λ of one method's cells: ``calib`` (0), then the fraction arms when its
    calibration is finished (else left out, with the reason on stderr), then ``lam0.1``."""
    out = {"calib": 0.0}
    if calibrate_only:
        return out
    try:
        out.update({arm_name(f): lam for f, lam in calibrated_lambdas(method).items()})
    except NotCalibrated as e:
        print(f"[lambda_calibration] fraction cells left out: {e}", file=sys.stderr)
    if method not in SKIP_DEFAULT:
        out[f"lam{DEFAULT_LAMBDA:g}"] = DEFAULT_LAMBDA
    return out


def get_config(arg: str = ""):
    """The sweep: ``eval-base``, then per method its calibration, fraction and λ = 0.1 cells
    (fraction cells of every method before the λ = 0.1 cells). ``arg``: "" (every cell that can
    be built) or ``calibrate`` (the calibration cells only)."""
    if arg not in ("", "calibrate"):
        raise ValueError(f"argument must be '' or 'calibrate', got {arg!r}")
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [sweep.grid(name="eval-base", config=f"configs/eval_table.py:{SETTING}", axes={},
                          fixed={"checkpoint": rl_table.BASES["digits"]}, group="base",
                          expect=["evaluation.json"])]
    per_method = {m: arms(m, arg == "calibrate") for m in METHODS}
    default = f"lam{DEFAULT_LAMBDA:g}"
    for m in METHODS:
        for arm, lam in per_method[m].items():
            if arm != default:
                c.grids += _pair(m, arm, lam)
    for m in METHODS:
        if default in per_method[m]:
            c.grids += _pair(m, default, DEFAULT_LAMBDA)
    return c

"""NormGuard ablation where the norm inflates: seeds, strength λ, form, power and margin.

Run (from the repository root; experiments/guard_ablation.py runs this after making the base
model if it is missing, then writes the tables and plots):
  python -m normguard_jax.sweep --config=configs/sweeps/guard_ablation.py
On N hosts sharing the file system: add --config.num_hosts=N --config.host_index=<i> on each.

Setting: RAM (configs/rl_ram.py: correction scale m = 4, lr 3e-4) on the quickstart's digits
base with the log p(class) reward (configs/rl_table.py:ram,digits_logprob), ``ITERATIONS``
RL iterations. This is the setting where the unguarded trajectory-mean ρ reached 1.04 in
experiments/results/guard_where_inflated.md, so the hinge has something to act on.

Cells (workdirs under ``WORKROOT``):
- ``eval-base``: the base model;
- ``rl-<arm>-s<seed>`` and ``eval-<arm>-s<seed>``: the unguarded arm (``plain``, λ = 0) and
  the default guard (``guard``: relative hinge, power 1, no margin, λ = 0.1) for each seed
  of ``SEEDS``, to measure the run-to-run spread the single-seed rows are read against;
- ``eval-plain-s<seed>-it<k>``: the unguarded runs at iterations ``EARLY_STEPS``, the
  early-stopping control (does an earlier unguarded checkpoint at the guarded reward have the
  guarded quality?);
- ``rl-<arm>-s0`` and ``eval-<arm>-s0`` for the ablation arms of ``ABLATION`` (seed 0).

Why these λ for the other forms. The gradient of the penalty with respect to v_θ has size
λ·p·excess^(p-1)/‖v_ref‖ for the relative form and λ·p·excess^(p-1) for the absolute one.
``ABS_WEIGHT`` = 0.1/40 matches the relative λ = 0.1 at ‖v_ref‖ ≈ 40 (the per-sample L2 norm of
ε − x0 over 32×32×1 pixels: √1024 · ~1.25). ``POW2_WEIGHT`` = 1 gives 2·λ·excess = 0.08 at the
4 % excess seen unguarded, close to the hinge's 0.1; the squared hinge then fades out as the
excess shrinks instead of pushing with constant force.
"""

import os
import sys

from normguard_jax import sweep

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl_table  # noqa: E402  (configs/ is not a package)

WORKROOT = "workdir/sweeps/guard_ablation"
METHOD, SETTING = "ram", "digits_logprob"
ITERATIONS = 24        # as experiments/results/guard_where_inflated.md (ρ 1.04 unguarded).
CHECKPOINT_EVERY = 8
SEEDS = (0, 1, 2)
GUARD_WEIGHT = 0.1
ABS_WEIGHT = 0.0025
POW2_WEIGHT = 1.0
# arm -> NormGuard overrides. plain and guard run for every seed, the others for seed 0.
REPEATED = {"plain": {"normguard.weight": 0.0},
            "guard": {"normguard.weight": GUARD_WEIGHT}}
ABLATION = {
    "lam0.03": {"normguard.weight": 0.03},
    "lam0.3": {"normguard.weight": 0.3},
    "lam1": {"normguard.weight": 1.0},
    "margin0.02": {"normguard.weight": GUARD_WEIGHT, "normguard.margin": 0.02},
    "pow2": {"normguard.weight": POW2_WEIGHT, "normguard.power": 2},
    "absolute": {"normguard.weight": ABS_WEIGHT, "normguard.form": "absolute"},
}
RL_DONE = f"samples/samples_{ITERATIONS:07d}.png"  # a finished RL cell's last sample grid
RL_FIXED = {"train.iterations": ITERATIONS, "train.sample_every": ITERATIONS,
            "train.checkpoint_every": CHECKPOINT_EVERY,
            "train.keep_checkpoints": ITERATIONS // CHECKPOINT_EVERY + 1,
            "train.log_every": 1}  # every iteration: the training-time ρ curves of the plots
EARLY_STEPS = (8, 16)  # early-stopping control: unguarded checkpoints evaluated at these


def seed_axis(seeds):
    """Seed levels ``s<k>`` (the outer axis: seed 0 of every arm runs before seed 1)."""
    return {f"s{s}": {"seed": s} for s in seeds}


def rl_cells(arms, seeds):
    """RL cells ``rl-<arm>-s<seed>`` of configs/rl_table.py:ram,digits_logprob."""
    return sweep.grid(name="rl-{arm}-{seed}", config=f"configs/rl_table.py:{METHOD},{SETTING}",
                      axes={"seed": seed_axis(seeds), "arm": arms}, fixed=RL_FIXED,
                      group="{arm}-{seed}", expect=[RL_DONE])


def eval_cells(arms, seeds):
    """Evaluation cells ``eval-<arm>-s<seed>`` of the RL cells' last checkpoints."""
    return sweep.grid(name="eval-{arm}-{seed}", config=f"configs/eval_table.py:{SETTING}",
                      axes={"seed": {f"s{s}": {} for s in seeds}, "arm": {a: {} for a in arms}},
                      fixed={"checkpoint": WORKROOT + "/rl-{arm}-{seed}"},
                      group="{arm}-{seed}", expect=["evaluation.json"])


def earlystop_cells(seeds):
    """``eval-plain-s<seed>-it<k>``: the unguarded runs' checkpoints at ``EARLY_STEPS``."""
    return sweep.grid(name="eval-{arm}-{seed}-it{it}", config=f"configs/eval_table.py:{SETTING}",
                      axes={"seed": {f"s{s}": {} for s in seeds}, "arm": {"plain": {}},
                            "it": {str(k): {"checkpoint_step": k} for k in EARLY_STEPS}},
                      fixed={"checkpoint": WORKROOT + "/rl-{arm}-{seed}"},
                      group="{arm}-{seed}", expect=["evaluation.json"])


def get_config():
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [
        sweep.grid(name="eval-base", config=f"configs/eval_table.py:{SETTING}", axes={},
                   fixed={"checkpoint": rl_table.BASES["digits"]}, group="base",
                   expect=["evaluation.json"]),
        rl_cells(REPEATED, SEEDS), eval_cells(REPEATED, SEEDS), earlystop_cells(SEEDS),
        rl_cells(ABLATION, (0,)), eval_cells(ABLATION, (0,)),
    ]
    return c

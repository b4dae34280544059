"""NormGuard ablation where the norm inflates: seeds, strength λ, form, power and margin.

Run (from the repository root; experiments/guard_ablation.py runs this after making the base
model if it is missing, then writes the tables and plots):
  python -m experiments.sweep --config=configs/sweeps/guard_ablation.py[:<study>]
On N hosts sharing the file system: add --config.num_hosts=N --config.host_index=<i> on each.

Studies (``STUDIES``; the config argument picks one, default ``ram_logprob``):
- ``ram_logprob``: RAM (configs/rl_ram.py: correction scale m = 4, lr 3e-4) on the
  quickstart's digits base with the log p(class) reward (configs/rl_table.py:ram,
  digits_logprob), 24 RL iterations. This is the setting where the unguarded trajectory-mean
  ρ reached 1.04 in experiments/results/guard_where_inflated.md, so the hinge has something
  to act on. Every ablation arm runs here.
- ``awm_contrast``: AWM with the pixel-contrast reward (configs/rl_table.py:awm,
  digits_contrast), 12 iterations as in the main table. Its reward's adjoint sensitivity
  favours a larger late-step velocity, and in the main table this run hacked the reward
  hardest while inflating ρ (contrast 0.50 -> 0.77, FD 53, ρ 1.03). NFT, the run with the
  table's largest ρ (1.05), lowered the contrast it was trained on, so it is not used.
  Seeds and the early-stopping control only.

Cells (workdirs under the study's ``workroot``):
- ``eval-base``: the base model;
- ``rl-<arm>-s<seed>`` and ``eval-<arm>-s<seed>``: the unguarded arm (``plain``, λ = 0) and
  the default guard (``guard``: relative hinge, power 1, no margin, λ = 0.1) for each seed
  of ``SEEDS``, to measure the run-to-run spread the single-seed rows are read against;
- ``eval-plain-s<seed>-it<k>``: the unguarded runs at the study's ``early_steps``, the
  early-stopping control (does an earlier unguarded checkpoint at the guarded reward have the
  guarded quality?);
- ``rl-<arm>-s0`` and ``eval-<arm>-s0`` for the study's ablation arms (seed 0).

Why these λ for the other forms. The gradient of the penalty with respect to v_θ has size
λ·p·excess^(p-1)/‖v_ref‖ for the relative form and λ·p·excess^(p-1) for the absolute one.
``ABS_WEIGHT`` = 0.1/40 matches the relative λ = 0.1 at ‖v_ref‖ ≈ 40 (the per-sample L2 norm of
ε − x0 over 32×32×1 pixels: √1024 · ~1.25). ``POW2_WEIGHT`` = 1 gives 2·λ·excess = 0.08 at the
4 % excess seen unguarded, close to the hinge's 0.1; the squared hinge then fades out as the
excess shrinks instead of pushing with constant force.
"""

import dataclasses

from configs import rl_table
from experiments import sweep

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


@dataclasses.dataclass(frozen=True)
class Study:
    """One setting of the ablation: which RL run, how long, where, and which arms."""
    name: str
    method: str            # configs/rl_table.py method
    setting: str           # configs/rl_table.py / eval_table.py setting
    iterations: int
    checkpoint_every: int
    early_steps: tuple     # unguarded checkpoints evaluated for the early-stopping control
    workroot: str
    ablation: dict         # seed-0 arms beyond plain / guard

    @property
    def rl_done(self) -> str:
        """The file a finished RL cell leaves: its last sample grid."""
        return f"samples/samples_{self.iterations:07d}.png"


STUDIES = {
    # As experiments/results/guard_where_inflated.md (ρ 1.04 unguarded), with every arm.
    "ram_logprob": Study("ram_logprob", "ram", "digits_logprob", iterations=24,
                         checkpoint_every=8, early_steps=(8, 16),
                         workroot="workdir/sweeps/guard_ablation", ablation=ABLATION),
    # A reward whose adjoint sensitivity favours a larger late-step velocity, and the main
    # table's run that hacked it hardest while inflating ρ (AWM: contrast 0.50 -> 0.77, FD 53,
    # ρ 1.03 after 12 iterations): seeds and early stopping only.
    "awm_contrast": Study("awm_contrast", "awm", "digits_contrast", iterations=12,
                          checkpoint_every=4, early_steps=(4, 8),
                          workroot="workdir/sweeps/guard_ablation_awm_contrast", ablation={}),
}
DEFAULT_STUDY = "ram_logprob"


def study(name: str = "") -> Study:
    """The study called ``name`` ("" = ``DEFAULT_STUDY``); ValueError names the choices."""
    name = name or DEFAULT_STUDY
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    return STUDIES[name]


def seed_axis(seeds):
    """Seed levels ``s<k>`` (the outer axis: seed 0 of every arm runs before seed 1)."""
    return {f"s{s}": {"seed": s} for s in seeds}


def rl_cells(st: Study, arms, seeds):
    """RL cells ``rl-<arm>-s<seed>`` of configs/rl_table.py:<method>,<setting>."""
    fixed = {"train.iterations": st.iterations, "train.sample_every": st.iterations,
             "train.checkpoint_every": st.checkpoint_every,
             "train.keep_checkpoints": st.iterations // st.checkpoint_every + 1,
             "train.log_every": 1}  # every iteration: the training-time ρ curves of the plots
    return sweep.grid(name="rl-{arm}-{seed}",
                      config=f"configs/rl_table.py:{st.method},{st.setting}",
                      axes={"seed": seed_axis(seeds), "arm": arms}, fixed=fixed,
                      group="{arm}-{seed}", expect=[st.rl_done])


def eval_cells(st: Study, arms, seeds):
    """Evaluation cells ``eval-<arm>-s<seed>`` of the RL cells' last checkpoints."""
    return sweep.grid(name="eval-{arm}-{seed}", config=f"configs/eval_table.py:{st.setting}",
                      axes={"seed": {f"s{s}": {} for s in seeds}, "arm": {a: {} for a in arms}},
                      fixed={"checkpoint": st.workroot + "/rl-{arm}-{seed}"},
                      group="{arm}-{seed}", expect=["evaluation.json"])


def earlystop_cells(st: Study, seeds):
    """``eval-plain-s<seed>-it<k>``: the unguarded runs' checkpoints at ``early_steps``."""
    return sweep.grid(name="eval-{arm}-{seed}-it{it}",
                      config=f"configs/eval_table.py:{st.setting}",
                      axes={"seed": {f"s{s}": {} for s in seeds}, "arm": {"plain": {}},
                            "it": {str(k): {"checkpoint_step": k} for k in st.early_steps}},
                      fixed={"checkpoint": st.workroot + "/rl-{arm}-{seed}"},
                      group="{arm}-{seed}", expect=["evaluation.json"])


def get_config(name: str = ""):
    """The sweep of study ``name`` (a key of ``STUDIES``; "" = ``DEFAULT_STUDY``)."""
    st = study(name)
    c = sweep.base_config()
    c.workroot = st.workroot
    c.grids = [
        sweep.grid(name="eval-base", config=f"configs/eval_table.py:{st.setting}", axes={},
                   fixed={"checkpoint": rl_table.BASES["digits"]}, group="base",
                   expect=["evaluation.json"]),
        rl_cells(st, REPEATED, SEEDS), eval_cells(st, REPEATED, SEEDS),
        earlystop_cells(st, SEEDS),
    ]
    if st.ablation:
        c.grids += [rl_cells(st, st.ablation, (0,)), eval_cells(st, st.ablation, (0,))]
    return c

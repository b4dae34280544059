"""NormGuard's variants where the norm inflates: per-sample, batch-level, σ-binned and σ-ramped.

Run (from the repository root; experiments/guard_variants.py runs this after making the base
model if it is missing, then writes the tables and plots):
  python -m experiments.sweep --config=configs/sweeps/guard_variants.py

Setting: DiffusionNFT on the pixel-contrast reward (configs/rl_table.py:nft,digits_contrast)
on the quickstart's digits base, 24 RL iterations of 8 prompts × 8 samples: the inflation
search's NFT candidate (unguarded sampling ρ 1.046-1.067 over 3 seeds, training ρ up to 1.12).
Every arm logs the gradient norms of the base loss and of the penalty separately
(``normguard.log_grad_norms``), so the penalty's share of the update is measured per arm.

Arms (``ARMS``; each is one NormGuard field away from the default ``sample``):
- ``plain``: unguarded, λ = 0 (the ratio is still measured and logged);
- ``sample``: the default guard, one relative hinge per sample, λ = 0.1;
- ``batch``: one hinge on the batch's ratio mean‖v_θ‖ / mean‖v_ref‖ (``aggregate="batch"``);
- ``bins``: one hinge per σ bin, 4 equal-width bins (``aggregate="sigma_bins"``);
- ``ramp``: the per-sample hinge weighted by a cosine ramp in σ, 1 at σ = 1 and 0 at σ = 0
  (``sigma_ramp="cosine"``, ``ramp_low=0``), so the guard fades out where the per-sample hinge
  pulls the ratio furthest below 1 (the last ODE steps).

Cells (workdirs under ``WORKROOT``), seed-major so that an interrupted sweep leaves whole seeds:
- ``eval-base``: the base model (20 steps), ``eval-base-n4``: at 4 steps;
- ``rl-<arm>-s<seed>`` and ``eval-<arm>-s<seed>`` for every arm and seed of ``SEEDS``;
- ``eval-plain-s<seed>-it<k>``: the unguarded runs at ``EARLY_STEPS``, the early-stopping
  control (does an earlier unguarded checkpoint at the guarded reward have its quality?);
- ``eval-<arm>-s<seed>-n4`` for ``FEWSTEP_ARMS``: 4-step sampling of the same checkpoints
  (the few-step claim);
- under CFG (``CFG_ARMS``, run last): the same setting with classifier-free guidance
  ``CFG_SCALE`` in the rollouts, the sample grids and the evaluation, where the sampler
  integrates the guided velocity v_u + w·(v_c − v_u). ``cfg_plain`` is unguarded,
  ``cfg_cond`` guards the conditional velocity v_θ(x, σ, c) against v_ref(x, σ, c) and
  ``cfg_guided`` the guided one, the velocity the sampler integrates and the evaluation's ρ is
  measured on. ``rl-<arm>-s<seed>`` and ``eval-<arm>-s<seed>`` for every seed.
"""

from configs import rl_table
from experiments import sweep

WORKROOT = "workdir/sweeps/guard_variants"
METHOD, SETTING = "nft", "digits_contrast"
SEEDS = (0, 1, 2)
ITERATIONS = 24
CHECKPOINT_EVERY = 8
EARLY_STEPS = (8, 16)
FEWSTEP = 4
GUARD_WEIGHT = 0.1
ARMS = {
    "plain": {"normguard.weight": 0.0},
    "sample": {"normguard.weight": GUARD_WEIGHT},
    "batch": {"normguard.weight": GUARD_WEIGHT, "normguard.aggregate": "batch"},
    "bins": {"normguard.weight": GUARD_WEIGHT, "normguard.aggregate": "sigma_bins",
             "normguard.sigma_bins": 4},
    "ramp": {"normguard.weight": GUARD_WEIGHT, "normguard.sigma_ramp": "cosine",
             "normguard.ramp_low": 0.0},
}
FEWSTEP_ARMS = ("plain", "sample")
CFG_SCALE = 1.5
_CFG = {"rollout.guidance_scale": CFG_SCALE, "sample.guidance_scale": CFG_SCALE}
CFG_ARMS = {
    "cfg_plain": {**_CFG, "normguard.weight": 0.0},
    "cfg_cond": {**_CFG, "normguard.weight": GUARD_WEIGHT, "normguard.velocity": "conditional"},
    "cfg_guided": {**_CFG, "normguard.weight": GUARD_WEIGHT, "normguard.velocity": "guided"},
}
CFG_EVAL = {"sample.guidance_scale": CFG_SCALE}
RL_DONE = f"samples/samples_{ITERATIONS:07d}.png"  # the last sample grid of a finished run


def _eval(name: str, checkpoint: str, group: str, **overrides) -> dict:
    return sweep.grid(name=name, config=f"configs/eval_table.py:{SETTING}", axes={},
                      fixed={"checkpoint": checkpoint, **overrides}, group=group,
                      expect=["evaluation.json"])


def _rl_fixed(seed: int) -> dict:
    return {"seed": seed, "train.iterations": ITERATIONS, "train.sample_every": ITERATIONS,
             "train.checkpoint_every": CHECKPOINT_EVERY,
             "train.keep_checkpoints": ITERATIONS // CHECKPOINT_EVERY + 1,
             "train.log_every": 1, "normguard.log_grad_norms": True}


def seed_grids(seed: int) -> list[dict]:
    """RL, evaluation and early-stopping cells of one seed (every arm of ``ARMS``)."""
    s, fixed = f"s{seed}", _rl_fixed(seed)
    grids = [sweep.grid(name=f"rl-{{arm}}-{s}", config=f"configs/rl_table.py:{METHOD},{SETTING}",
                        axes={"arm": ARMS}, fixed=fixed, group=f"{{arm}}-{s}",
                        expect=[RL_DONE])]
    grids += [_eval(f"eval-{arm}-{s}", f"{WORKROOT}/rl-{arm}-{s}", f"{arm}-{s}") for arm in ARMS]
    grids += [_eval(f"eval-plain-{s}-it{k}", f"{WORKROOT}/rl-plain-{s}", f"plain-{s}",
                    checkpoint_step=k) for k in EARLY_STEPS]
    return grids


def fewstep_grids() -> list[dict]:
    """4-step evaluations of the base and of ``FEWSTEP_ARMS`` on every seed."""
    n = {"sample.num_steps": FEWSTEP}
    grids = [_eval(f"eval-base-n{FEWSTEP}", rl_table.BASES["digits"], "base", **n)]
    grids += [_eval(f"eval-{arm}-s{seed}-n{FEWSTEP}", f"{WORKROOT}/rl-{arm}-s{seed}",
                    f"{arm}-s{seed}", **n) for seed in SEEDS for arm in FEWSTEP_ARMS]
    return grids


def cfg_grids(seed: int) -> list[dict]:
    """RL and evaluation cells of one seed under CFG (every arm of ``CFG_ARMS``)."""
    s = f"s{seed}"
    grids = [sweep.grid(name=f"rl-{{arm}}-{s}", config=f"configs/rl_table.py:{METHOD},{SETTING}",
                        axes={"arm": CFG_ARMS}, fixed=_rl_fixed(seed), group=f"{{arm}}-{s}",
                        expect=[RL_DONE])]
    grids += [_eval(f"eval-{arm}-{s}", f"{WORKROOT}/rl-{arm}-{s}", f"{arm}-{s}", **CFG_EVAL)
              for arm in CFG_ARMS]
    return grids


def get_config():
    """The variants sweep: base evaluation, then per seed every arm's RL and evaluation cells
    and the early-stopping control, the few-step evaluations, and the CFG arms."""
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [_eval("eval-base", rl_table.BASES["digits"], "base")]
    for seed in SEEDS:
        c.grids += seed_grids(seed)
    c.grids += fewstep_grids()
    c.grids.append(_eval("eval-base-cfg", rl_table.BASES["digits"], "base-cfg", **CFG_EVAL))
    for seed in SEEDS:
        c.grids += cfg_grids(seed)
    return c

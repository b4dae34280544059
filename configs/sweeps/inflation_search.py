"""Search for a setting where unguarded RL inflates the velocity norm by 5-15 %.

Run (from the repository root; experiments/inflation_search.py runs this after making the
digits base when it is missing, then writes the table and the plot):
  python -m experiments.sweep --config=configs/sweeps/inflation_search.py
Seeds 0 and 1 of every candidate first (``--config.only='*-s[01]'``), seed 2 where those
inflate.

Every cell is unguarded (λ = 0): NormGuard's ratio ‖v_θ‖/‖v_ref‖ is still computed on the
training rows and logged every iteration (``train/normguard/ratio``), which is the training-
time ρ curve; the evaluation cell of each run measures the sampling ρ on θ's own ODE
trajectory (the paper's measure) and the quality metrics.

Candidates (``CANDIDATES``), all on the quickstart's digits base (configs/rl_table.py), 24 RL
iterations of 8 prompts × 8 samples, chosen from what inflated in earlier single-seed runs:
- ``nft_contrast``: DiffusionNFT on the pixel-contrast reward (main table: sampling ρ 1.055
  after 12 iterations, the largest of the table);
- ``awm_contrast`` and ``awm_contrast_lr3e-4``: AWM on contrast (ρ rose steadily to 1.02-1.03
  on 3 seeds after 12 iterations, guard_ablation_awm_contrast.md), and at 3× its learning rate;
- ``grpo_logprob``: Flow-GRPO on log p(class) (ρ 1.04 after 24 iterations,
  guard_where_inflated.md);
- ``nft_logprob_cfg``: NFT on log p(class) with CFG 1.5 in rollouts and evaluation (an early
  run with CFG 1.5 reached a training ratio of 1.05 after 30 iterations).
"""

from configs import rl_table
from experiments import sweep

SEEDS = (0, 1, 2)
ITERATIONS = 24
WORKROOT = "workdir/sweeps/inflation_search"
# name -> (method, setting, RL overrides, evaluation overrides).
CANDIDATES = {
    "nft_contrast": ("nft", "digits_contrast", {}, {}),
    "awm_contrast": ("awm", "digits_contrast", {}, {}),
    "awm_contrast_lr3e-4": ("awm", "digits_contrast", {"optim.lr": 3e-4}, {}),
    "grpo_logprob": ("grpo", "digits_logprob", {}, {}),
    "nft_logprob_cfg": ("nft", "digits_logprob",
                        {"rollout.guidance_scale": 1.5, "sample.guidance_scale": 1.5},
                        {"sample.guidance_scale": 1.5}),
}
RL_DONE = f"samples/samples_{ITERATIONS:07d}.png"  # the last sample grid of a finished run


def _cells(name: str, method: str, setting: str, rl_overrides: dict, eval_overrides: dict):
    seeds = {f"s{s}": {"seed": s} for s in SEEDS}
    fixed = {"normguard.weight": 0.0, "train.iterations": ITERATIONS,
             "train.sample_every": ITERATIONS, "train.checkpoint_every": 8,
             "train.keep_checkpoints": ITERATIONS // 8 + 1, "train.log_every": 1,
             **rl_overrides}
    rl = sweep.grid(name=f"rl-{name}-{{seed}}", config=f"configs/rl_table.py:{method},{setting}",
                    axes={"seed": seeds}, fixed=fixed, group="{seed}", expect=[RL_DONE])
    ev = sweep.grid(name=f"eval-{name}-{{seed}}", config=f"configs/eval_table.py:{setting}",
                    axes={"seed": {k: {} for k in seeds}},
                    fixed={"checkpoint": WORKROOT + f"/rl-{name}-{{seed}}", **eval_overrides},
                    group="{seed}", expect=["evaluation.json"])
    return [rl, ev]


def get_config():
    """The search sweep: RL and evaluation cells of every candidate and seed, seed-major."""
    c = sweep.base_config()
    c.workroot = WORKROOT
    settings = sorted({spec[1] for spec in CANDIDATES.values()})
    c.grids = [sweep.grid(name="eval-base-{setting}", config="configs/eval_table.py:{setting}",
                          axes={"setting": {s: {} for s in settings}},
                          fixed={"checkpoint": rl_table.BASES["digits"]}, group="s0",
                          expect=["evaluation.json"])]
    for name, spec in CANDIDATES.items():
        c.grids += _cells(name, *spec)
    return c

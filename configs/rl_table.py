"""RL cell of the main table: one method on one base model with one reward.

Run one cell (from the repository root; the sweep runs every cell this way):
  python -m normguard_jax.main --config=configs/rl_table.py:nft,digits_logprob \
      --workdir=workdir/sweeps/main_table/rl-digits_logprob-nft-plain
With NormGuard: add --config.normguard.weight=0.1 (and another workdir).

The argument is ``<method>,<setting>``: method a name of normguard_jax.objectives.METHODS
(settings of configs/rl_<method>.py), setting
a key of ``SETTINGS`` (a base model and a reward set). Every setting pairs an alignment reward
that saturates with a proxy that is cheap to over-optimise, on each base:

- digits_logprob / digits_contrast: the quickstart base (small UNet, digits_mnist, 600 steps);
- shapes_rule / shapes_saturation: the small DiT on shapes (configs/table_base.py:shapes).

RL sizes are the quickstart's per iteration (8 prompts × 8 samples, 10-step ODE rollouts,
2 re-noise draws) with fewer iterations (``ITERATIONS``) so the 24+ cells of the table fit
the 2-core budget. No CFG in rollouts, sample grids or (configs/eval_table.py) evaluation, on
either base: RL is asked to supply the alignment CFG would (as DiffusionNFT does); rollouts
cost half as much; and under CFG the unconditional branch, which RL does not train, would
be mixed into the policy being measured. The shapes base needs CFG ~3 for clean samples, so
without CFG its alignment reward has headroom (wrong colours and shapes in some samples).
Checkpoints every ``CHECKPOINT_EVERY`` iterations are all kept: the early-stopping control
evaluates the intermediate ones.
"""

import importlib

import ml_collections

from normguard_jax.objectives import METHODS

# Base models: name -> pretraining workdir (made by experiments/main_table.py when missing,
# from configs/table_base.py).
BASES = {"digits": "workdir/quickstart/base", "shapes": "workdir/table_base_shapes_dit"}
# setting -> (base, reward weights). Names of rewards: normguard_jax.rewards.REWARDS.
SETTINGS = {
    "digits_logprob": ("digits", {"classifier_logprob": 1.0}),   # alignment, saturates at 0.
    "digits_contrast": ("digits", {"contrast": 1.0}),             # proxy: pixel std.
    "shapes_rule": ("shapes", {"shapes_rule": 1.0}),              # alignment, exact, in [0, 1].
    "shapes_saturation": ("shapes", {"saturation": 1.0}),         # proxy: mean chroma.
}
ITERATIONS = 12        # RL iterations per cell.
CHECKPOINT_EVERY = 4   # checkpoints at 4, 8, 12: all kept.


def parse(arg: str) -> tuple[str, str]:
    """``"<method>,<setting>"`` -> (method, setting), checked."""
    method, _, setting = arg.partition(",")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    return method, setting


def get_config(arg: str = "nft,digits_logprob"):
    method, setting = parse(arg)
    base, weights = SETTINGS[setting]
    c = importlib.import_module(f"configs.rl_{method}").get_config()
    c.base.workdir = BASES[base]
    c.rewards = ml_collections.ConfigDict(weights)
    c.train.iterations = ITERATIONS
    c.rollout.prompts_per_iter = 8
    c.rollout.group_size = 8
    c.train.renoise_draws = 2              # NFT/AWM: 128 training rows per iteration.
    c.rollout.guidance_scale = 1.0         # no CFG (see the module docstring).
    c.sample.guidance_scale = 1.0
    c.rollout.policy = "current"           # rollouts from θ, as the committed tables were made
                                           # (NFT's and RAM's references sample from θ_old).
    if method == "dpo":
        c.train.minibatch_size = c.rollout.prompts_per_iter  # one pair per prompt.
    c.train.log_every = 4
    c.train.sample_every = ITERATIONS
    c.train.checkpoint_every = CHECKPOINT_EVERY
    c.train.keep_checkpoints = ITERATIONS // CHECKPOINT_EVERY + 1
    return c

"""Quickstart: pretrain a base model, RL-fine-tune it with and without NormGuard, compare.

Run (from the repository root; this is the README's main command):
  python -m normguard_jax.main --config=configs/quickstart.py --workdir=workdir/quickstart
Another method: --config=configs/quickstart.py:awm (any name of normguard_jax.objectives.METHODS;
configs/rl_<method>.py holds its settings).
Writes <workdir>/quickstart.md and quickstart.json (the table is also printed); every stage
is cached in <workdir> and in aux_dir, so a second call reuses it.

Another reward set: --config=configs/quickstart.py:nft,digits_logprob (names: rewards.DEFAULT_WEIGHTS;
default digits_contrast, the pixel-contrast proxy on which unguarded NFT inflates ‖v_θ‖).

Sizes are chosen for a 2-core CPU: the base is the small UNet on digits_mnist trained for 600
steps at batch 64 (digit-like samples in a few minutes, weakly aligned to their class without
CFG); RL runs 24 iterations of 8 prompts × 8
samples, 10-step ODE rollouts without CFG; evaluation uses 30 samples per class.
"""

import importlib

import ml_collections

from configs import evaluate as evaluate_config
from configs import pretrain_common
from normguard_jax import rewards
from normguard_jax.objectives import METHODS


def get_config(arg: str = "nft"):
    """``arg`` is ``<method>`` or ``<method>,<reward set>`` (a key of rewards.DEFAULT_WEIGHTS)."""
    method, _, reward_set = arg.partition(",")
    if method not in METHODS:
        raise ValueError(f"quickstart method must be one of {sorted(METHODS)}, got {method!r}")
    c = ml_collections.ConfigDict()
    c.job = "quickstart"        # main.py dispatches to experiments.quickstart.run.
    c.aux_dir = "workdir/aux_nets"  # reward + metric nets, trained on first use and shared.
    c.guard_weight = 0.1        # λ of the guarded arm (the unguarded arm uses 0).
    c.arms = "unguarded,normguard"  # which RL arms to run (a comma-separated subset).
    c.base_workdir = ""         # base model workdir; "" = <workdir>/base (trained if unfinished).

    # Base model: <workdir>/base.
    c.pretrain = pretrain_common.make(dataset="digits_mnist", arch="unet")
    c.pretrain.train.steps = 600
    c.pretrain.train.batch_size = 64
    c.pretrain.optim.lr = 1e-3
    c.pretrain.optim.warmup_steps = 50
    c.pretrain.optim.ema_decay = 0.99
    c.pretrain.train.sample_every = 600
    c.pretrain.train.checkpoint_every = 200

    # RL arms: <workdir>/rl_unguarded and <workdir>/rl_normguard (base.workdir is set by the job).
    c.rl = importlib.import_module(f"configs.rl_{method}").get_config()
    reward_set = reward_set or "digits_contrast"
    if reward_set not in rewards.DEFAULT_WEIGHTS:
        raise ValueError(f"reward set must be one of {sorted(rewards.DEFAULT_WEIGHTS)}, "
                         f"got {reward_set!r}")
    # Default: the pixel-contrast proxy, the setting where unguarded NFT inflates ‖v_θ‖ on every
    # seed tried (sampling ρ 1.046-1.067, experiments/results/inflation_search.md), so the guard
    # has something to act on. `:nft,digits_logprob` is the classifier's log p(class) (no
    # inflation there: ρ 0.94-1.0).
    c.rl.rewards = ml_collections.ConfigDict(rewards.DEFAULT_WEIGHTS[reward_set])
    c.rl.train.iterations = 24
    c.rl.rollout.prompts_per_iter = 8
    c.rl.rollout.group_size = 8
    c.rl.train.renoise_draws = 2         # NFT/AWM/RAM: 128 training rows per iteration.
    # No CFG anywhere: RL is asked to supply the alignment CFG would (as DiffusionNFT does), and
    # rollouts cost half as much.
    c.rl.rollout.guidance_scale = 1.0
    c.rl.sample.guidance_scale = 1.0
    # Rollouts from θ for every method: the committed results (experiments/results/) were made
    # so. NFT's and RAM's references sample from θ_old (rollout.policy=default does that).
    c.rl.rollout.policy = "current"
    if method == "dpo":
        c.rl.train.minibatch_size = c.rl.rollout.prompts_per_iter  # one pair per prompt.
    c.rl.train.log_every = 4
    c.rl.train.sample_every = 24
    c.rl.train.checkpoint_every = 8

    # Evaluation of the base and both arms: <workdir>/eval_*.
    c.evaluate = evaluate_config.get_config("digits")
    c.evaluate.sample.per_class = 30
    c.evaluate.sample.batch_size = 100
    c.evaluate.sample.guidance_scale = 1.0
    return c

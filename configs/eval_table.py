"""Evaluation cell of the main table: every reward and quality metric of one checkpoint.

Run one cell (from the repository root; the sweep runs every cell this way):
  python -m normguard_jax.main --config=configs/eval_table.py:digits_logprob \
      --config.checkpoint=workdir/sweeps/main_table/rl-digits_logprob-nft-plain \
      --workdir=workdir/sweeps/main_table/eval-digits_logprob-nft-plain

The argument is a setting of configs/rl_table.py: its reward set becomes the combined reward
reported (every other reward of the dataset is reported too). No CFG (see rl_table.py); the
20-step ODE with shift 3; ``PER_CLASS`` samples per class at fixed seeds (300 digits, 320
shapes). Few-step inference overrides ``sample.num_steps``; the early-stopping control
overrides ``checkpoint_step``.
"""

import ml_collections

from configs import evaluate as evaluate_config
from configs import rl_table

PER_CLASS = {"digits": 30, "shapes": 20}  # 10 digit classes, 16 shape classes.


def get_config(setting: str = "digits_logprob"):
    if setting not in rl_table.SETTINGS:
        raise ValueError(f"setting must be one of {sorted(rl_table.SETTINGS)}, got {setting!r}")
    base, weights = rl_table.SETTINGS[setting]
    c = evaluate_config.get_config("digits" if base == "digits" else "shapes")
    c.checkpoint = rl_table.BASES[base]   # overridden with an RL workdir by the sweeps.
    c.rewards = ml_collections.ConfigDict(weights)
    c.sample.per_class = PER_CLASS[base]
    c.sample.batch_size = 160 if base == "shapes" else 100
    c.sample.guidance_scale = 1.0
    return c

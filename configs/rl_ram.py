"""RL post-training with Reinforce Adjoint Matching (regression onto a reward-corrected target).

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_ram.py --workdir=workdir/rl_ram
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_common  # noqa: E402  (configs/ is not a package; its shared base sits beside it)


def get_config():
    config = rl_common.make("ram", dict(
        scale=0.1,                         # m: step size of the advantage correction of the target.
        adv_clip_max=5.0,                  # advantage clip.
        old_velocity="self",               # v_old in the target: self (sg θ) | old (θ_old).
    ))
    return config

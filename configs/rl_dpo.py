"""RL post-training with online flow DPO (best vs worst sample of each group).

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_dpo.py --workdir=workdir/rl_dpo
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).
"""

from configs import rl_common


def get_config():
    config = rl_common.make("dpo", dict(
        beta=100.0,                        # DPO β on the velocity-error difference.
        reference="ref",                   # implicit reward relative to: ref (frozen) | old (refreshed).
        ties="drop",                       # tied group: drop (no pair) | pair (Flow-GRPO tracker: 1 beats 0).
    ))
    config.train.minibatch_size = 8      # pairs per optimizer step (one per prompt).
    return config

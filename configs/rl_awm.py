"""RL post-training with Advantage Weighted Matching.

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_awm.py --workdir=workdir/rl_awm
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).
"""

from configs import rl_common


def get_config():
    config = rl_common.make("awm", dict(
        weighting="ghuber",                # velocity-matching weighting: uniform | t | t2 | huber | ghuber.
        ghuber_power=0.25,                 # power p of the generalised Huber error.
        clip_range=1.0,                    # PPO clip ε of the ratio.
        adv_clip_max=5.0,                  # advantage clip.
        advantage_max=1.0,                 # advantages rescaled to this maximum.
        kl_weight=0.003,                   # KL-like velocity term to the reference.
        kl_time_weighting="uniform",       # σ weighting of that term.
        ema_kl_weight=1.0,                 # velocity term to the old/EMA policy.
        ema_kl_time_weighting="uniform",   # σ weighting of that term.
        off_policy=False,                  # ratio against θ_old instead of sg(θ).
        old_params="ema",                  # θ_old of the off-policy ratio: ema (θ_old EMA) | rollout (θ at sampling).
        ema_params="ema",                  # θ_EMA, anchor of the ema_kl term: ema | rollout.
        loss_type="exp_first",             # exp_first: a ratio per (sample, σ) | sum_first: Σ_σ log-probs, one ratio per sample.
    ))
    config.train.old_policy = "awm"      # AWM's linear EMA schedule for θ_old.
    return config

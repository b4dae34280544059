"""RL post-training with Flow-GRPO (SDE rollouts, clipped ratio, optional KL).

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_grpo.py --workdir=workdir/rl_grpo
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).
"""

from configs import rl_common


def get_config():
    config = rl_common.make("grpo", dict(
        cps_true_density=False,            # CPS only: score with the true Gaussian density.
        clip_range=1e-4,                   # PPO clip ε of the likelihood ratio (reference default).
        adv_clip_max=5.0,                  # advantage clip inside the loss.
        kl_weight=0.0,                     # β of the KL to the reference policy.
        guidance_scale=1.0,                # CFG scale when recomputing log-probs (must match rollout CFG).
    ))
    config.rollout.sampler = "sde"       # stochastic rollouts: log-probs are needed.
    config.rollout.guidance_scale = 1.0  # train and sample with the same (plain) velocity.
    config.rollout.sde_window_end = 6    # train the first 6 of 10 steps.
    config.train.minibatch_size = 64     # transitions per optimizer step.
    return config

"""RL post-training with Adjoint Matching (regression onto the lean-adjoint control target).

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_am.py --workdir=workdir/rl_am
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).

Adjoint matching differentiates the reward: only rewards whose registry flag
``differentiable`` is true are accepted (classifier_logprob, contrast, ...; not
classifier_correct, jpeg_zeros, shapes_correct). Rollouts use the memoryless sampler on every
step and no CFG (normguard_jax/objectives/am.py says why).
"""

from configs import rl_common


def get_config():
    config = rl_common.make("am", dict(
        # λ: the tilt is exp(r/λ) (the paper's reward multiplier is 1/λ). r is one number per
        # image and the loss a per-pixel mean, so ∇r per pixel is O(1/pixels): λ must be small
        # for the correction γ·ã/λ of the target to matter.
        kl_weight=0.01,
        weighting="control",     # control: the paper's loss | velocity: unit-weight regression.
    ))
    config.rewards.classifier_logprob = 1.0   # differentiable (log p(class | image)).
    config.rewards.contrast = 1.0             # differentiable (pixel std).
    config.rollout.sampler = "memoryless"     # Adjoint Matching's memoryless SDE (DDPM step).
    config.rollout.guidance_scale = 1.0       # no CFG: the tilt is of the conditional model.
    config.rollout.sde_window_start = 0       # every step memoryless and trained.
    config.rollout.sde_window_end = -1
    config.train.minibatch_size = 64          # rows = num_steps · G · K = 640 per iteration.
    return config

"""RL post-training with DiffusionNFT (implicit positive/negative velocities).

Run (from the repository root, after pretraining the base model):
  python -m normguard_jax.main --config=configs/rl_nft.py --workdir=workdir/rl_nft
With NormGuard: add --config.normguard.weight=0.1 (and a different --workdir).
"""

from configs import rl_common


def get_config():
    config = rl_common.make("nft", dict(
        beta=1.0,                          # β mixing v_θ and v_old into v⁺ and v⁻.
        adv_clip_max=5.0,                  # A_max in r = clip(A/(2·A_max) + ½, 0, 1).
        kl_weight=1e-4,                    # weight of mean((v_θ - v_ref)²).
        advantage_mode="all",              # which samples train: all | positive | negative | binary.
        weight_floor=1e-5,                 # floor of the adaptive x0-error normaliser.
    ))
    config.optim.lr = 3e-4               # the reference's learning rate.
    return config

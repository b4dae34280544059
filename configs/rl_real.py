"""Shared settings of RL fine-tuning on a real diffusers pipeline (configs/rl_sd35m.py,
configs/rl_flux.py): the method's config (configs/rl_<method>.py) with a diffusers base, LoRA,
bfloat16, the reference codebases' batch layout and the PickScore reward.

Sources of the numbers (read, not copied): Flow-GRPO, yifan123/flow_grpo config/base.py and
config/grpo.py (pickscore_sd3, geneval_sd3, pickscore_flux); DiffusionNFT,
NVlabs/DiffusionNFT config/nft.py (_get_config, sd3_pickscore).
"""

import importlib

import ml_collections


def make(method: str, family: str) -> ml_collections.ConfigDict:
    """The ``configs/rl_<method>.py`` config set up for a diffusers pipeline of ``family``
    ("sd3" | "flux"); the pipeline, embeddings and reward model folders are given on the
    command line (``--config.base.diffusers_dir``, ``--config.base.embeddings``,
    ``--config.reward_models.pickscore``)."""
    config = importlib.import_module(f"configs.rl_{method}").get_config()
    c = config
    c.base.workdir = ""              # unused: the base is the pipeline below.
    c.base.diffusers_dir = ""        # REQUIRED: the local pipeline folder (transformer/, vae/).
    c.base.family = family
    c.base.embeddings = ""           # REQUIRED: the embed_prompts workdir of this family.
    c.base.resolution = 512          # both references train at 512².
    c.base.param_dtype = "bfloat16"  # the frozen base (θ_ref, under the adapter) in bfloat16.
    c.base.remat = "full"            # recompute each block in the backward pass (memory).

    # Rewards: PickScore, the preference reward both references report on SD3.5-M
    # (Flow-GRPO pickscore_sd3 / pickscore_flux, DiffusionNFT sd3_pickscore). Its folder holds
    # the PickScore CLIPModel and the CLIP-H tokenizer (normguard_jax/clip_score.py).
    c.rewards = ml_collections.ConfigDict({"pickscore": 1.0})
    c.aux_dir = ""                   # no reward classifier for a pipeline's prompts.

    # 48 prompts × 24 samples per iteration (Flow-GRPO: num_image_per_prompt 24 over 48
    # groups per epoch; DiffusionNFT: the same 24 × 48). Advantages use the whole batch's std
    # (Flow-GRPO's global_std=True).
    c.rollout.prompts_per_iter = 48
    c.rollout.group_size = 24
    # Sampled in 16 sequential calls of 3 prompts × 24 = 72 images (9 per chip on 8 chips, the
    # references' per-GPU sampling batch of 8-9): the sampler's attention and the VAE decode at
    # 512² do not fit 1152 images at once.
    c.rollout.chunks = 16
    c.advantages.global_std = True
    c.advantages.clip = 5.0          # adv_clip_max 5 in both.

    # LoRA r 32, α 64 on the attention projections (Flow-GRPO's SD3.5-M target list; the
    # `attention` preset of normguard_jax/lora.py also covers FLUX's blocks).
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.targets = "attention"

    # bfloat16 compute (Flow-GRPO's FLUX configs: mixed_precision bf16) with float32 adapter
    # and optimizer; θ_ref (= the frozen base under the adapter) stored in bfloat16.
    c.precision.compute = "bfloat16"
    c.precision.reference = "bfloat16"

    # AdamW as in Flow-GRPO config/base.py: lr 3e-4, β 0.9/0.999, weight decay 1e-4, ε 1e-8,
    # gradient norm clipped at 1.
    c.optim.lr = 3e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip = 1.0

    c.train.iterations = 1000        # the references train until stopped by hand.
    c.train.log_every = 1
    c.train.sample_every = 20
    c.train.checkpoint_every = 10
    c.sample.per_class = 2           # grid: 2 images per class of the compositional prompts
                                     # (or 8 prompts × 2 for a prompt file without classes).
    return c


def transitions_layout(config: ml_collections.ConfigDict, rows: int, updates: int,
                       minibatch: int = 72) -> None:
    """Sets ``train.minibatch_size`` and ``optim.accumulate_steps`` so that one iteration's
    ``rows`` training rows make ``updates`` optimizer updates of ``minibatch``-row micro-steps
    (72 rows = 9 per chip on 8 chips, Flow-GRPO's per-GPU train batch of 9)."""
    assert rows % (minibatch * updates) == 0, (rows, minibatch, updates)
    config.train.minibatch_size = minibatch
    config.optim.accumulate_steps = rows // (minibatch * updates)

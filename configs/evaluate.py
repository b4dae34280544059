"""Evaluate a generator checkpoint: every reward and every quality metric, at fixed seeds.

Run (from the repository root), after pretraining:
  python -m normguard_jax.main --config=configs/evaluate.py \
      --config.checkpoint=workdir/pretrain_mnist_dit --workdir=workdir/eval_mnist_dit
For a `shapes` checkpoint, take the shapes combined reward with the config argument:
  python -m normguard_jax.main --config=configs/evaluate.py:shapes \
      --config.checkpoint=workdir/pretrain_shapes_dit --workdir=workdir/eval_shapes_dit
Writes <workdir>/evaluation.json, <workdir>/evaluation.md and <workdir>/samples_eval.png.
A run on a real model (configs/rl_sd35m.py, configs/rl_flux.py) is evaluated per test prompt
with PickScore (its folder given):
  python -m normguard_jax.main --config=configs/evaluate.py:sd35m \
      --config.checkpoint=workdir/rl_sd35m_nft --config.reward_models.pickscore=/models/PickScore_v1 \
      --workdir=workdir/eval_sd35m_nft
and the base itself, for comparison: the pipeline folder as the checkpoint, with its prompts:
  python -m normguard_jax.main --config=configs/evaluate.py:sd35m \
      --config.checkpoint=/models/stable-diffusion-3.5-medium \
      --config.base.embeddings=workdir/prompts_sd3 \
      --config.reward_models.pickscore=/models/PickScore_v1 --workdir=workdir/eval_sd35m_base
Re-running gives identical numbers. The first run on a dataset also trains the reward and
metric nets into config.aux.dir (about a minute each on 2 CPU cores); later runs reuse them.
"""

import ml_collections

from normguard_jax import rewards


def get_config(reward_set: str = "digits"):
    c = ml_collections.ConfigDict()
    c.job = "evaluate"          # which run() main.py dispatches to.
    c.seed = 0                  # sampling seed; batch i uses fold_in(key(seed), i).
    c.checkpoint = ""           # pretraining workdir to evaluate (required).
    c.checkpoint_step = -1      # checkpoint step; -1 = the newest.
    c.use_ema = True            # evaluate the EMA parameters (False: the raw parameters).
    c.data_dir = ""             # TFDS data dir; "" = the one the checkpoint was trained with.
    c.reference_split = "test"  # held-out real images that samples are compared with.

    c.aux = ml_collections.ConfigDict()
    c.aux.dir = "workdir/aux_nets"  # cache of the reward classifier and metric nets (shared with RL).
    c.aux.preset = "default"    # training preset of those nets: "default" | "tiny" (tests).

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "ode"     # sampler: "ode" | "sde" | "cps" | "dance".
    c.sample.num_steps = 20     # sampler steps.
    c.sample.shift = 3.0        # inference time shift of the schedule.
    c.sample.guidance_scale = 1.5  # classifier-free guidance scale (1 = off).
    c.sample.noise_level = -1.0    # stochastic samplers' noise level; -1 = the method's default.
    c.sample.per_class = 50     # samples per class (the set evaluated).
    c.sample.batch_size = 100   # samples per generation call.
    c.sample.renormalize = False  # RL checkpoints: rescale v_θ to ‖v_ref‖ (its base) at every step.
    # With renormalize: the strength φ ∈ [0, 1], v ← v·(1 + φ·(‖v_ref‖/‖v_θ‖ - 1)) per sample
    # (1 = full rescale, 0 = plain; sampling.renormalize_velocity).
    c.sample.renormalize_phi = 1.0
    # With renormalize: only the steps with σ_k <= this (the late, low-noise steps); 1 = every step.
    c.sample.renormalize_sigma_max = 1.0

    c.metrics = ml_collections.ConfigDict()
    c.metrics.knn_k = 3         # k of k-NN precision/recall.
    c.metrics.range_tolerance = 0.05  # out_of_range counts |x| > 1 + this.
    c.metrics.batch_size = 250  # images per network call.

    # names -> weights of the combined reward reported next to every single reward (names:
    # normguard_jax.rewards.REWARDS). The defaults ("digits": classifier_logprob + contrast,
    # "shapes": shapes_rule + saturation) pair an alignment term that saturates with a proxy
    # that keeps rising; the config argument picks the set.
    c.rewards = ml_collections.ConfigDict({"pickscore": 1.0} if reward_set in REAL_MODELS
                                          else rewards.DEFAULT_WEIGHTS[reward_set])
    # "name=weight,..." added to (or re-weighting) config.rewards: registered names or
    # module:function rewards from outside the library.
    c.extra_rewards = ""
    c.reward_models = ml_collections.ConfigDict()  # reward name -> model folder.
    c.reward_models.clip_score = ""   # transformers CLIPModel folder (weights + tokenizer).
    c.reward_models.pickscore = ""    # PickScore's CLIPModel folder (same architecture).
    # Runs on a diffusers pipeline (and text models whose test prompts do not cover every
    # class) are evaluated per test prompt (evaluate.run_prompts): sample.per_class images of
    # each prompt, every applicable reward, no per-class image metrics.
    c.max_prompts = 0           # test prompts evaluated (the first ones); 0 = all.
    # When config.checkpoint is a diffusers pipeline folder (the base model before RL), how to
    # load it (the fields of an RL config's base block, configs/rl_common.py).
    c.base = ml_collections.ConfigDict()
    c.base.family = "auto"      # sd3 | flux | auto (from transformer/config.json).
    c.base.embeddings = ""      # embed_prompts workdir of its text encoders (test prompts).
    c.base.resolution = 512     # image side in pixels.
    c.base.param_dtype = "float32"  # float32 | bfloat16: the transformer's weights.
    c.base.guidance = 3.5       # FLUX.1-dev's embedded guidance value.
    c.base.remat = "none"       # unused for sampling (no backward pass).
    if reward_set in REAL_MODELS:   # the references' evaluation settings (configs/rl_sd35m.py,
        c.sample.update(REAL_MODELS[reward_set])  # configs/rl_flux.py); reward PickScore.
        c.base.param_dtype = "bfloat16"         # as the RL configs load the base.
    return c


# Evaluation of the real-model RL runs: `configs/evaluate.py:sd35m` / `:flux` (reward
# PickScore, its folder in --config.reward_models.pickscore). 40 steps / CFG 4.5 for SD3.5-M,
# 28 steps with the embedded guidance (no CFG) for FLUX.1-dev, as both references evaluate.
REAL_MODELS = {
    "sd35m": dict(num_steps=40, shift=3.0, guidance_scale=4.5, per_class=4, batch_size=16),
    "flux": dict(num_steps=28, shift=1.88, guidance_scale=1.0, per_class=4, batch_size=16),
}

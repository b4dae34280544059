"""RL fine-tuning of FLUX.1-dev (or another FLUX-class pipeline) from a local diffusers folder,
any method.

Run (from the repository root; local folders only):
  python -m normguard_jax.main --config=configs/rl_flux.py:grpo \
      --config.base.diffusers_dir=/models/FLUX.1-dev \
      --config.base.embeddings=workdir/prompts_flux \
      --config.reward_models.pickscore=/models/PickScore_v1 --workdir=workdir/rl_flux_grpo
<method> is any name of normguard_jax.objectives.METHODS; NormGuard:
--config.normguard.weight=0.1. Embeddings: configs/embed_prompts.py:flux with
max_sequence_length 512 (README, "Running on a real model").

From Flow-GRPO's pickscore_flux (yifan123/flow_grpo config/grpo.py): 512², 6 rollout steps
(28 for evaluation), FLUX.1-dev's embedded guidance 3.5 and no classifier-free guidance, SDE
noise level 0.9, the first 5 steps trained (timestep_fraction 0.99), no KL, 24 samples × 48
prompts, LoRA, bfloat16; on a TPU add --config.base.attention=flash (the Pallas flash-attention kernel:
the update's memory and roofline figures in benchmarks/README.md assume it). The other methods keep their library defaults with the same model,
batch, LoRA and optimizer settings, all without CFG (a guidance-distilled model).

Schedule: FLUX.1-dev's scheduler shifts σ by exp(μ) with μ linear in the image token count
(0.5 at 256 tokens, 1.15 at 4096); at 512² (1024 tokens) μ = 0.63, i.e. the SD3 shift
s = exp(0.63) = 1.88 used here. diffusers' FLUX pipeline spaces the unshifted σ as
linspace(1, 1/N, N), the library as SD3's schedule (normguard_jax/flow.py): close, not equal.
"""

from configs import rl_real

SHIFT = 1.88
# Rows per micro-step: 4 per chip on 8 chips. At the references' 8–9 rows per chip the LoRA
# update does not fit a 16 GiB v5e chip (compiled: ≈ 17.8 GiB with flash attention, more with
# XLA's); at 4 rows it needs ≈ 10.9 GiB with flash attention (benchmarks/README.md, tpu_aot).
# The micro-steps are accumulated (optax.MultiSteps) to the references' optimizer updates.
MINIBATCH = 32


def get_config(method: str = "grpo"):
    c = rl_real.make(method, "flux")
    c.base.guidance = 3.5            # FLUX.1-dev's guidance embedding value (sample.guidance_scale).
    c.rollout.num_steps = 6
    c.rollout.shift = SHIFT
    c.rollout.guidance_scale = 1.0   # no CFG: the guidance is embedded.
    c.sample.num_steps = 28
    c.sample.shift = SHIFT
    c.sample.guidance_scale = 1.0
    n = c.rollout.prompts_per_iter * c.rollout.group_size          # 1152 samples
    if method == "grpo":
        c.rollout.sampler = "sde"
        c.rollout.noise_level = 0.9
        c.objective.guidance_scale = 1.0
        c.rollout.sde_window_start, c.rollout.sde_window_end = 0, 5   # int(6 · 0.99) steps
        c.objective.clip_range = 1e-4
        c.objective.kl_weight = 0.0
        rl_real.transitions_layout(c, rows=n * 5, updates=2, minibatch=MINIBATCH)
    elif method == "am":
        rl_real.transitions_layout(c, rows=n * c.rollout.num_steps, updates=1,
                                  minibatch=MINIBATCH)
    elif method == "dpo":
        c.train.minibatch_size = 8
        c.optim.accumulate_steps = c.rollout.prompts_per_iter // 8
    else:
        c.rollout.sampler = "ode"
        if method == "nft":
            c.objective.beta = 1.0
            c.objective.kl_weight = 1e-4
        rl_real.transitions_layout(c, rows=n * c.train.renoise_draws, updates=1,
                                  minibatch=MINIBATCH)
    return c

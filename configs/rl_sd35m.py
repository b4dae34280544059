"""RL fine-tuning of Stable Diffusion 3.5 Medium from a local diffusers folder, any method.

Run (from the repository root; the three folders are local copies, nothing is downloaded):
  python -m normguard_jax.main --config=configs/rl_sd35m.py:nft \
      --config.base.diffusers_dir=/models/stable-diffusion-3.5-medium \
      --config.base.embeddings=workdir/prompts_sd3 \
      --config.reward_models.pickscore=/models/PickScore_v1 --workdir=workdir/rl_sd35m_nft
<method> is any name of normguard_jax.objectives.METHODS (grpo, nft, awm, dpo, ram, am);
NormGuard: --config.normguard.weight=0.1. The embeddings come from
configs/embed_prompts.py (README, "Running on a real model").

Per method, from the references (configs/rl_real.py lists the files):
  grpo  Flow-GRPO pickscore/geneval_sd3: SDE rollouts (noise 0.7), 10 steps, CFG 4.5, the
        first 9 steps trained (timestep_fraction 0.99), clip range 1e-4, KL β 0.04 (geneval /
        ocr; pickscore_sd3 uses 0.01), two optimizer updates per iteration.
  nft   DiffusionNFT sd3_pickscore: deterministic rollouts without CFG (guidance 1; the
        reference's 2nd-order "dpm2" solver is Euler here), 10 steps, β 1, KL 1e-4,
        θ_old decay type 1, one optimizer update per iteration.
  awm, dpo, ram, am: the library's method defaults (configs/rl_<method>.py) with the same
        model, batch, LoRA and optimizer settings; ram and awm sample like nft (no CFG), dpo
        with CFG 4.5, am memoryless without CFG (its rewards must be differentiable:
        PickScore is).
Evaluation samples 40 steps with CFG 4.5 (both references' eval_num_steps / guidance).
"""

from configs import rl_real

RESOLUTION_SHIFT = 3.0   # SD3.5's FlowMatchEulerDiscreteScheduler shift.


def get_config(method: str = "nft"):
    c = rl_real.make(method, "sd3")
    c.rollout.num_steps = 10
    c.rollout.shift = RESOLUTION_SHIFT
    c.sample.num_steps = 40          # eval_num_steps 40.
    c.sample.shift = RESOLUTION_SHIFT
    c.sample.guidance_scale = 4.5
    n = c.rollout.prompts_per_iter * c.rollout.group_size          # 1152 samples
    if method == "grpo":
        c.rollout.sampler = "sde"
        c.rollout.noise_level = 0.7
        c.rollout.guidance_scale = 4.5
        c.objective.guidance_scale = 4.5
        c.rollout.sde_window_start, c.rollout.sde_window_end = 0, 9   # int(10 · 0.99) steps
        c.objective.clip_range = 1e-4
        c.objective.kl_weight = 0.04
        rl_real.transitions_layout(c, rows=n * 9, updates=2)
    elif method == "am":
        rl_real.transitions_layout(c, rows=n * c.rollout.num_steps, updates=1)
    elif method == "dpo":
        c.rollout.guidance_scale = 4.5
        c.train.minibatch_size = 8   # one pair per prompt: 48 rows, 8 per micro-step.
        c.optim.accumulate_steps = c.rollout.prompts_per_iter // 8
    else:                            # nft, awm, ram: ODE rollouts without CFG
        c.rollout.sampler = "ode"
        c.rollout.guidance_scale = 1.0
        if method == "nft":
            c.objective.beta = 1.0
            c.objective.kl_weight = 1e-4
            c.train.old_policy = "nft"
        rl_real.transitions_layout(c, rows=n * c.train.renoise_draws, updates=1)
    return c

"""Shared RL post-training config; ``rl_<method>.py`` add the method's ``objective`` block.

Any field can be overridden on the command line, e.g. ``--config.normguard.weight=0.1``.
"""

import ml_collections


def make(method: str, objective: dict) -> ml_collections.ConfigDict:
    """RL config for ``method`` (a key of normguard_jax.objectives.METHODS)."""
    c = ml_collections.ConfigDict()
    c.job = "rl"                # main.py dispatches to normguard_jax.rl.run.
    c.seed = 0                  # prompts, rollout noise, re-noising and minibatch order.
    c.method = method           # RL method: a name of normguard_jax.objectives.METHODS.
    c.aux_dir = "workdir/aux_nets"  # cache of the reward classifier (trained on first use).

    c.base = ml_collections.ConfigDict()
    c.base.workdir = "workdir/pretrain_mnist_unet"  # pretraining workdir: base model θ_ref = θ_0.
    c.base.use_ema = True       # start from (and regularise towards) the EMA parameters.
    # A real text-to-image model instead (configs/rl_sd35m.py, configs/rl_flux.py): a local
    # diffusers pipeline folder (its transformer/ and vae/ subfolders; base.workdir is then
    # unused). Rewards see the VAE's decode of the latents; prompts come from base.embeddings.
    c.base.diffusers_dir = ""   # "" = the library pretraining workdir above.
    c.base.family = "auto"      # sd3 | flux | auto (from transformer/config.json); a mismatch
                                # with the folder or the embeddings is refused.
    c.base.embeddings = ""      # embed_prompts workdir of this pipeline's text encoders
                                # (configs/embed_prompts.py): train prompts for the rollouts,
                                # test prompts for evaluation, the empty prompt for CFG.
    c.base.resolution = 512     # image side in pixels; latents are resolution/8 (divisible by
                                # 8·patch: 16 for SD3 and FLUX).
    c.base.param_dtype = "float32"  # float32 | bfloat16: dtype the transformer's weights are
                                    # loaded in (bfloat16 halves θ_ref; full fine-tuning still
                                    # trains float32 master weights).
    c.base.guidance = 3.5       # FLUX.1-dev's embedded guidance value (unused by SD3 and by
                                # FLUX models without a guidance embedding).
    c.base.remat = "none"       # none | full | dots: rematerialisation of the transformer blocks
                                # in the backward pass (models.layers.REMAT_POLICIES).
    c.base.attention = "xla"    # xla | flash: the MMDiT/FLUX attention kernel in rollouts and
                                # updates (models.attention_impl; flash = Pallas, TPU only).

    c.rewards = ml_collections.ConfigDict()   # reward name -> weight (normguard_jax.rewards.REWARDS).
    c.rewards.classifier_logprob = 1.0        # alignment: log p(class | image); saturates near 0.
    c.rewards.contrast = 1.0                  # over-optimisable proxy with headroom (pixel std).
    # "name=weight,..." added to (or re-weighting) config.rewards: any registered name or a
    # reward outside the library as module:function, e.g. "shapes_rule=1,my_pkg.r:fn=0.5".
    c.extra_rewards = ""
    c.reward_models = ml_collections.ConfigDict()  # reward name -> model folder.
    c.reward_models.clip_score = ""   # transformers CLIPModel folder (weights + tokenizer).
    c.reward_models.pickscore = ""    # PickScore's CLIPModel folder (same architecture).

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_iter = 8   # G: distinct class prompts per iteration.
    c.rollout.group_size = 8         # K: samples per prompt (advantages are per group).
    c.rollout.sampler = "ode"        # ode | sde (Flow-GRPO) | cps | dance.
    c.rollout.noise_level = -1.0     # sampler noise level; -1 = the sampler's reference default.
    c.rollout.num_steps = 10         # sampling steps per rollout.
    c.rollout.shift = 3.0            # schedule time shift.
    c.rollout.guidance_scale = 1.5   # CFG scale of the rollouts (1 = off).
    c.rollout.policy = "default"     # sampling parameters: current (θ) | old (θ_old EMA) |
                                     # default (the method's reference: old for nft and ram).
    c.rollout.sde_window_start = 0   # first stochastic (trained) step, Flow-GRPO only.
    c.rollout.sde_window_end = -1    # one past the last stochastic step; -1 = num_steps.
    c.rollout.chunks = 1             # sequential sampler calls per iteration, each on
                                     # G/chunks whole groups (peak memory of G·K/chunks samples);
                                     # advantages are computed over all G·K afterwards.

    c.advantages = ml_collections.ConfigDict()
    c.advantages.clip = 5.0          # advantages clipped to ±clip.
    c.advantages.global_std = False  # normalise by the batch std instead of the group's.

    c.objective = ml_collections.ConfigDict(objective)  # method hyper-parameters (see rl_<method>.py).

    c.normguard = ml_collections.ConfigDict()
    c.normguard.weight = 0.0         # λ; 0 = off (the ratio is still measured and logged).
    c.normguard.form = "relative"    # relative: ‖v_θ‖/‖v_ref‖ - 1; absolute: ‖v_θ‖ - ‖v_ref‖.
    c.normguard.power = 1            # 1 = hinge, 2 = squared hinge.
    c.normguard.margin = 0.0         # slack before the hinge activates.
    c.normguard.velocity = "auto"    # guarded velocity: conditional | guided (CFG at the rollout
                                     # scale) | auto (guided iff rollout.guidance_scale != 1) |
                                     # points (the objective's own velocities; runs recorded
                                     # before this field).
    # Guard variants (normguard_jax/normguard.py); the defaults are the per-sample hinge above.
    c.normguard.aggregate = "sample"  # sample: one hinge per sample | batch: one hinge on
                                     # mean‖v_θ‖/mean‖v_ref‖ of the minibatch | sigma_bins: one
                                     # per non-empty σ bin on its ratio of mean norms, averaged.
    c.normguard.sigma_bins = 4       # equal-width σ bins over [0, 1] of aggregate=sigma_bins.
    c.normguard.sigma_ramp = "none"  # hinge weight w(σ), 1 at σ=1 and ramp_low at σ=0: none (1) |
                                     # linear (ramp_low + (1-ramp_low)·σ) | cosine (… ·sin²(πσ/2)).
    c.normguard.ramp_low = 0.0       # the ramp's weight at σ=0 (data end), in [0, 1].
    c.normguard.sigma_margin = 0.0   # extra margin at σ=0, down to 0 at σ=1:
                                     # margin(σ) = margin + sigma_margin·(1-σ).
    c.normguard.log_grad_norms = False  # log ‖∇ base loss‖ and ‖∇ λ·penalty‖ separately
                                     # (train/normguard/grad_norm_*; extra backward passes),
                                     # for normguard.lambda_for_fraction.

    # LoRA: train low-rank adapters on the base's linear projections instead of all of θ
    # (normguard_jax/lora.py). θ, θ_old and the optimizer state are then adapter-only, θ_ref is
    # the base itself and checkpoints hold only the adapter. Flow-GRPO's SD3.5-M: 32, 64.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0                  # adapter rank r; 0 = off (full fine-tuning).
    c.lora.alpha = 64.0              # α; the update is (α/r)·A@B.
    c.lora.targets = "attention"     # lora.TARGET_PRESETS name (attention | attention_mlp) or
                                     # comma-separated patterns matched as module-path suffixes.

    # Mixed precision. Trainable parameters (θ or the adapter) and the optimizer state stay
    # float32 (master weights); losses, norms (NormGuard's ‖v‖) and velocities are float32.
    c.precision = ml_collections.ConfigDict()
    c.precision.compute = "float32"  # float32 | bfloat16: dtype of the generator's matmuls and
                                     # activations (parameters are cast where they are used).
    c.precision.reference = "float32"  # float32 | bfloat16: storage of θ_ref (and, with LoRA,
                                       # of the frozen base under the adapter): half the memory.

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4               # learning rate (after warm-up).
    c.optim.warmup_steps = 0        # linear warm-up in optimizer steps.
    c.optim.schedule = "constant"   # constant | cosine.
    c.optim.final_lr_fraction = 1.0  # cosine floor (unused for constant).
    c.optim.b1 = 0.9                # AdamW β1.
    c.optim.b2 = 0.999              # AdamW β2.
    c.optim.eps = 1e-8              # AdamW ε.
    c.optim.weight_decay = 0.0      # decoupled weight decay.
    c.optim.grad_clip = 1.0         # global-norm clip (0 = off).
    c.optim.accumulate_steps = 1    # minibatches whose mean gradient makes one update
                                    # (optax.MultiSteps); the schedule counts updates.

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 100        # rollout + update iterations.
    c.train.inner_epochs = 1        # passes over each iteration's training batch.
    c.train.minibatch_size = 32     # rows per optimizer step.
    c.train.renoise_draws = 1       # NFT/AWM/RAM: noise/σ draws per rollout sample (rows = D·G·K).
    c.train.sigma_sampler = "schedule"  # σ of re-noised batches: schedule | uniform | logit_normal.
    c.train.old_policy = "nft"      # θ_old EMA preset (rl_state.OLD_POLICY_DECAY_PRESETS).
    c.train.log_every = 5           # iterations between scalar logs (and device reads).
    c.train.sample_every = 50       # iterations between fixed-seed sample grids.
    c.train.checkpoint_every = 10   # iterations between checkpoints (also at the end, on SIGTERM
                                    # and on a TPU preemption notice).
    c.train.keep_checkpoints = 3    # checkpoints kept.
    c.train.max_nonfinite = 5       # stop after this many iterations in a row with a skipped
                                    # (non-finite loss, gradient or reward) update; found at the
                                    # next log or checkpoint iteration.

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 20         # ODE steps of the sample grids.
    c.sample.shift = 3.0            # schedule shift of the sample grids.
    c.sample.guidance_scale = 1.5   # CFG scale of the sample grids.
    c.sample.per_class = 6          # grid columns per class.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # data-parallel axis (-1: all devices).
    c.mesh.fsdp = 1                 # parameter-sharding axis (θ, θ_old, θ_ref, optimizer).
    c.mesh.min_shard_size = 2**16   # arrays with fewer elements stay replicated over fsdp.

    # Multi-process runs (one process per host); see normguard_jax/distributed.py and
    # experiments/tpu_vm.sh. Neither address nor auto: a single process.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "host:port" of process 0 ("" = no explicit set-up).
    c.distributed.num_processes = 1  # with coordinator_address: how many processes in all.
    c.distributed.process_id = 0     # with coordinator_address: this process, in [0, num_processes).
    c.distributed.auto = False       # jax.distributed.initialize() detects TPU pod / SLURM / MPI.
    return c

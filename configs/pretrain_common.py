"""Shared pretraining config: class-conditional flow matching on an offline dataset.

The per-dataset/architecture files (``pretrain_<data>_<arch>.py``) call :func:`make` and hold the
exact run command and what it produced on a 2-core CPU. Any field can be overridden on the
command line, e.g. ``--config.train.steps=100 --config.model.size=tiny``.
"""

import ml_collections


def make(dataset: str, arch: str) -> ml_collections.ConfigDict:
    """Returns the pretraining config for ``dataset`` (a name in normguard_jax.data.DATASETS)
    and ``arch`` ("dit", "unet" or "mmdit")."""
    c = ml_collections.ConfigDict()
    c.job = "pretrain"          # which run() main.py dispatches to.
    c.seed = 0                  # one seed for init, data order, noise and σ draws.

    c.data = ml_collections.ConfigDict()
    c.data.name = dataset       # dataset name: digits_mnist | digits_sklearn | shapes | any TFDS name.
    c.data.data_dir = ""        # TFDS data dir; "" = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    c.data.split = "train"      # split trained on; "test" is held out for metrics.
    c.data.captions = ""        # "" = class labels; "shapes" = each image conditioned on one of its
                                # class's captions (text models: model.arch="mmdit").

    c.model = ml_collections.ConfigDict()
    c.model.arch = arch         # generator architecture: "dit" (patch transformer) | "unet" |
                                # "mmdit" (text-conditioned, needs data.captions).
    c.model.size = "small"      # preset from normguard_jax.models.SIZES: "tiny" (tests) | "small".
    c.model.dtype = "float32"   # compute dtype: "float32" | "bfloat16" (TPU); params stay float32.
    c.model.remat = False       # rematerialise blocks in the backward pass (less memory, more compute).

    c.flow = ml_collections.ConfigDict()
    c.flow.sigma_sampler = "logit_normal"  # training σ distribution: "logit_normal" | "uniform".
    c.flow.logit_mean = 0.0     # logit-normal location m: σ = sigmoid(m + s·z).
    c.flow.logit_std = 1.0      # logit-normal scale s.
    c.flow.train_shift = 1.0    # time shift applied to training σ (1 = none).
    c.flow.label_dropout = 0.1  # probability of training on the null class (enables CFG).

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4           # peak learning rate.
    c.optim.warmup_steps = 100  # linear warm-up length.
    c.optim.schedule = "cosine"  # after warm-up: "cosine" | "constant".
    c.optim.final_lr_fraction = 0.1  # cosine floor as a fraction of lr.
    c.optim.b1 = 0.9            # AdamW β1.
    c.optim.b2 = 0.99           # AdamW β2.
    c.optim.eps = 1e-8          # AdamW ε.
    c.optim.weight_decay = 0.0  # decoupled weight decay.
    c.optim.grad_clip = 1.0     # global-norm clipping threshold (0 = off).
    c.optim.accumulate_steps = 1  # batches whose mean gradient makes one update (optax.MultiSteps);
                                  # train.steps counts batches, the lr schedule counts updates.
    c.optim.ema_decay = 0.995   # EMA of params (samples, RL base); warmed up as min(d, (1+t)/(10+t)).

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1200        # optimizer steps in the whole run.
    c.train.batch_size = 128    # global batch, split over all devices and processes.
    c.train.log_every = 50      # scalars (loss, grad/param norm, lr, steps/s) every N steps;
                                # the host reads the device only then (and at checkpoints).
    c.train.sample_every = 300  # sample grid (TensorBoard + PNG) every N steps and at the end.
    c.train.checkpoint_every = 200  # checkpoint interval; also at the end, on SIGTERM and on a
                                    # TPU preemption notice.
    c.train.keep_checkpoints = 3    # how many recent checkpoints to keep.
    c.train.max_nonfinite = 5   # stop after this many skipped (non-finite) updates in a row
                                # (found at the next log or checkpoint step).

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 20     # ODE steps for the sample grids.
    c.sample.shift = 3.0        # inference time shift (diffusers FlowMatchEuler schedule).
    c.sample.guidance_scale = 1.5  # classifier-free guidance scale (1 = off).
    c.sample.per_class = 8      # grid columns: samples per class, at fixed seeds.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1            # data-parallel axis size (-1: all devices / fsdp).
    c.mesh.fsdp = 1             # parameter-sharding axis size (params, EMA, optimizer state).
    c.mesh.min_shard_size = 2**16  # arrays with fewer elements stay replicated over fsdp.

    # Multi-process runs (one process per host); see normguard_jax/distributed.py and
    # experiments/tpu_vm.sh. Neither address nor auto: a single process.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "host:port" of process 0 ("" = no explicit set-up).
    c.distributed.num_processes = 1  # with coordinator_address: how many processes in all.
    c.distributed.process_id = 0     # with coordinator_address: this process, in [0, num_processes).
    c.distributed.auto = False       # jax.distributed.initialize() detects TPU pod / SLURM / MPI.
    return c

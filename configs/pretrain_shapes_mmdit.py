"""Pretrain a text-conditioned MMDiT on `shapes` with captions, by flow matching.

Run (from the repository root):
  python -m normguard_jax.main --config=configs/pretrain_shapes_mmdit.py --workdir=workdir/pretrain_shapes_mmdit
or as one cell of ``python -m experiments.pretrain_grid --only shapes_mmdit``.

The model is the SD3-class MMDiT of models/mmdit.py on pixels (models/pixel_mmdit.py, "small":
4 joint blocks of width 128, 4×4 patches, 2.3M parameters). Every image is trained on one of
the 6 train captions of its class ("a red circle", "a circle in red", ...; data/prompts.py
shapes_captions), embedded by the built-in word encoder (normguard_jax/word_encoder.py); the
empty prompt (zeros) is the dropped-out conditioning for classifier-free guidance. RL on it
(configs/quickstart_text.py) draws the train captions; evaluation uses the 2 held-out captions
per class. Batch, steps and lr as the DiT base on the same data (configs/pretrain_shapes_dit.py).
Its result is in experiments/results/pretrain.md.
"""

from configs import pretrain_common


def get_config():
    c = pretrain_common.make(dataset="shapes", arch="mmdit")
    c.data.captions = "shapes"
    c.train.batch_size = 64
    c.train.steps = 2000
    c.optim.lr = 1e-3
    c.train.sample_every = 1000
    c.train.checkpoint_every = 500
    c.sample.guidance_scale = 3.0
    return c

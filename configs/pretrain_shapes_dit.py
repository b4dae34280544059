"""Pretrain a class-conditional DIT on `shapes` by flow matching (small size).

Run (from the repository root):
  python -m normguard_jax.main --config=configs/pretrain_shapes_dit.py --workdir=workdir/pretrain_shapes_dit
or as one cell of ``python experiments/pretrain_grid.py --only shapes_dit``.

Why it differs from the shared defaults: the DiT "small" preset now has a conv stem, a conv
refinement head and a learnt input skip (see normguard_jax.models.SIZES); the plain
transformer gave noise-shaped fragments after 1200 steps at batch 128. Short trials trained
faster at batch 64 with peak lr 1e-3, so the full run takes more, smaller steps in about the
same wall time.

Result (shared, loaded CPU): loss 0.051 at step 1300, 18.1 min, 1.32 steps/s; right colour in
every row, but the shapes are indistinguishable blobs.
See experiments/results/pretrain.md for the loss, wall time and sample grid
this produced.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_common  # noqa: E402  (configs/ is not a package; its shared base sits beside it)


def get_config():
    c = pretrain_common.make(dataset="shapes", arch="dit")
    c.train.batch_size = 64
    c.train.steps = 1300
    c.optim.lr = 1e-3
    c.train.sample_every = 650
    c.train.checkpoint_every = 650
    c.sample.guidance_scale = 3.0  # CFG 1.5 put wrong colours in some rows of the shapes trials.
    return c

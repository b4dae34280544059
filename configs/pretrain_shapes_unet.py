"""Pretrain a class-conditional UNET on `shapes` by flow matching ("small_wide" size).

Run (from the repository root):
  python -m normguard_jax.main --config=configs/pretrain_shapes_unet.py --workdir=workdir/pretrain_shapes_unet
or as one cell of ``python experiments/pretrain_grid.py --only shapes_unet``.

Why it differs from the shared defaults: the "small" U-Net has 8 channels at full resolution;
on `shapes` it learnt the colours but not the outlines, with a noisy background (loss 0.140
after 1200 steps at batch 128). "small_wide" (16/32/64/96 channels) reached loss 0.090 in a
400-step trial at batch 64, so the full run uses it with the smaller batch, twice the peak
learning rate and more steps for the same wall time. Its grids use CFG 3: in that trial CFG 1.5
still put a wrong colour in some rows, CFG 3 did not.

Result (shared CPU at load 8-11): loss 0.041 at step 1100, 37.7 min, 0.72 steps/s; right
colour in every row, clear circles and triangles, crosses in about half the samples,
squares mostly rounded.
See experiments/results/pretrain.md for the loss, wall time and sample grid this produced.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_common  # noqa: E402  (configs/ is not a package; its shared base sits beside it)


def get_config():
    c = pretrain_common.make(dataset="shapes", arch="unet")
    c.model.size = "small_wide"
    # Batch 64 (the main table's shapes base, configs/table_base.py) took ~24 min on an idle
    # 2-core machine; 48 keeps the number of updates within the 20-minute budget.
    c.train.batch_size = 48
    c.train.steps = 1100
    c.optim.lr = 1e-3
    c.train.sample_every = 550
    c.train.checkpoint_every = 550
    c.sample.guidance_scale = 3.0
    return c

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

Result (idle 2-core AMD EPYC, 2026-12-01, batch 48): loss 0.046 at step 1100, 17.4 min wall,
median 1.2 steps/s; right colour in every row, clear circles and most triangles, squares
mostly rounded, crosses fragmented in half the rows; 54.0 % ± 1.8 % of 800 samples (50 per
class, CFG 3) have both the requested colour and shape by the exact rule. At batch 64 (shared
CPU, 37.7 min) the same run reached 61.5 % ± 1.7 %.
See experiments/results/pretrain.md for the loss, wall time and sample grid this produced.
"""

from configs import pretrain_common


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

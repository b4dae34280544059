"""Pretrain a class-conditional DIT on `shapes` by flow matching (small size).

Run (from the repository root):
  python -m normguard_jax.main --config=configs/pretrain_shapes_dit.py --workdir=workdir/pretrain_shapes_dit
See experiments/results/pretrain.md for the loss, wall time and sample grid this produced.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_common  # noqa: E402  (configs/ is not a package; its shared base sits beside it)


def get_config():
    return pretrain_common.make(dataset="shapes", arch="dit")

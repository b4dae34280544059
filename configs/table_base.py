"""Pretraining of the main table's base models, for a clean clone that has none yet.

Run (from the repository root; experiments/main_table.py does it when a base is missing):
  python -m normguard_jax.main --config=configs/table_base.py:digits --workdir=workdir/quickstart/base
  python -m normguard_jax.main --config=configs/table_base.py:shapes --workdir=workdir/table_base_shapes

``digits`` is the quickstart's base (its ``pretrain`` section: small UNet on digits_mnist,
600 steps at batch 64, ~4 min on the 2 idle cores of 2026-11-22, 7 min on the slower
machine of 2026-12-01); ``shapes`` is configs/pretrain_shapes_unet.py
with the batch the main table was made with (wide UNet, 1100 steps at batch 64, ~24 min on 2
idle cores; the pretraining grid's cell now uses batch 48). The workdirs are those of
configs/rl_table.py's ``BASES``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_shapes_unet  # noqa: E402  (configs/ is not a package)
import quickstart  # noqa: E402

def shapes_base():
    """configs/pretrain_shapes_unet.py at batch 64, as experiments/results/main_table.md used."""
    c = pretrain_shapes_unet.get_config()
    c.train.batch_size = 64
    return c


BASE_CONFIGS = {"digits": lambda: quickstart.get_config("nft").pretrain, "shapes": shapes_base}


def get_config(base: str = "digits"):
    if base not in BASE_CONFIGS:
        raise ValueError(f"base must be one of {sorted(BASE_CONFIGS)}, got {base!r}")
    return BASE_CONFIGS[base]()

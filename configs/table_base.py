"""Pretraining of the main table's base models, for a clean clone that has none yet.

Run (from the repository root; experiments/main_table.py does it when a base is missing):
  python -m normguard_jax.main --config=configs/table_base.py:digits --workdir=workdir/quickstart/base
  python -m normguard_jax.main --config=configs/table_base.py:shapes --workdir=workdir/pretrain_shapes_unet

``digits`` is the quickstart's base (its ``pretrain`` section: small UNet on digits_mnist,
600 steps at batch 64, ~10 min on 2 idle cores); ``shapes`` is
configs/pretrain_shapes_unet.py (wide UNet, 1100 steps, ~40 min on 2 shared cores). The
workdirs are those of configs/rl_table.py's ``BASES``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_shapes_unet  # noqa: E402  (configs/ is not a package)
import quickstart  # noqa: E402

BASE_CONFIGS = {"digits": lambda: quickstart.get_config("nft").pretrain,
                "shapes": pretrain_shapes_unet.get_config}


def get_config(base: str = "digits"):
    if base not in BASE_CONFIGS:
        raise ValueError(f"base must be one of {sorted(BASE_CONFIGS)}, got {base!r}")
    return BASE_CONFIGS[base]()

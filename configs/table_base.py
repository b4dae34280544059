"""Pretraining of the main table's base models, for a clean clone that has none yet.

Run (from the repository root; experiments/main_table.py does it when a base is missing):
  python -m normguard_jax.main --config=configs/table_base.py:digits --workdir=workdir/quickstart/base
  python -m normguard_jax.main --config=configs/table_base.py:shapes --workdir=workdir/table_base_shapes_dit

``digits`` is the quickstart's base (its ``pretrain`` section: small UNet on digits_mnist,
600 steps at batch 64, ~4 min on the 2 idle cores of 2026-11-22, 7 min on the slower
machine of 2026-12-01); ``shapes`` is configs/pretrain_shapes_dit.py (small DiT on the
procedurally generated shapes, 2000 steps at batch 64, 13.0 min on 2 idle cores). The two
bases differ in architecture as well as data. The shapes base was the wide UNet of
configs/pretrain_shapes_unet.py until 2026-12-01: with about the same sample accuracy (54.0 %
against the DiT's 53.1 % by the exact rule, experiments/results/pretrain.md) it costs about
3× as much per sample (58 against 178 training samples/s), which put the table over the
3-hour budget. The workdirs are those of configs/rl_table.py's ``BASES``.
"""

from configs import pretrain_shapes_dit, quickstart

BASE_CONFIGS = {"digits": lambda: quickstart.get_config("nft").pretrain,
                "shapes": pretrain_shapes_dit.get_config}


def get_config(base: str = "digits"):
    if base not in BASE_CONFIGS:
        raise ValueError(f"base must be one of {sorted(BASE_CONFIGS)}, got {base!r}")
    return BASE_CONFIGS[base]()

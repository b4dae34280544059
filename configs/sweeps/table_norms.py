"""GRPO, RAM and Adjoint Matching cells beside the main table's NFT/AWM/DPO ones, for the norm analyses.

Run (from the repository root; experiments/run_all.py runs it after the main table):
  python -m experiments.sweep --config=configs/sweeps/table_norms.py

The main table trains NFT, AWM and DPO; the norm-inflation analysis asks for every method.
These cells train GRPO, RAM and AM on the same setting (``SETTING``), at the same size and in the
same workroot as the main table's cells (``rl-<setting>-<method>-<arm>``, arms ``plain`` and
``guard``), so that experiments/norm_analyses.py can read all six methods, with and without
NormGuard, from one place. No evaluation cells: norm_analyses.py evaluates each run itself
(plainly and renormalised).
"""

from configs.sweeps import table_main
from experiments import sweep

SETTING = "digits_logprob"
METHODS = ("grpo", "ram", "am")


def run_dirs(methods=table_main.METHODS + METHODS) -> list[str]:
    """Workdirs (relative to the repository root) of the RL cells of every method, both arms,
    on ``SETTING``: the main table's and this sweep's."""
    return [f"{table_main.WORKROOT}/rl-{SETTING}-{m}-{arm}"
            for m in methods for arm in table_main.ARMS]


def get_config():
    c = sweep.base_config()
    c.workroot = table_main.WORKROOT
    c.grids = [table_main.rl_grid([SETTING], METHODS, table_main.ARMS)]
    return c

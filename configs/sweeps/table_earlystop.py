"""Early-stopping control: the intermediate checkpoints of the main table's unguarded runs.

Run (from the repository root, after configs/sweeps/table_main.py):
  python -m experiments.sweep --config=configs/sweeps/table_earlystop.py
RL cells keep a checkpoint every rl_table.CHECKPOINT_EVERY iterations; this evaluates the
unguarded (``plain``) runs at each of them before the last (the last is the main table's).
experiments/main_table.py then matches every guarded run with the unguarded checkpoint whose
reward is closest to its own, and compares their quality. Cells
``eval-<setting>-<method>-plain-it<k>`` in ``WORKROOT``.
"""

from configs import rl_table
from configs.sweeps import table_main
from experiments import sweep

WORKROOT = "workdir/sweeps/table_earlystop"
STEPS = tuple(range(rl_table.CHECKPOINT_EVERY, rl_table.ITERATIONS, rl_table.CHECKPOINT_EVERY))
SETTINGS = ("digits_contrast",)  # where the guard changed ρ (what the budget allows); any of
# rl_table.SETTINGS can be added (finished cells are kept).


def get_config():
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [table_main.eval_grid(
        SETTINGS, table_main.METHODS, {"plain": {}}, table_main.WORKROOT,
        name="eval-{setting}-{method}-{arm}-it{it}",
        extra_axes={"it": {str(k): {"checkpoint_step": k} for k in STEPS}})]
    return c

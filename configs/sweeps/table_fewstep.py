"""Few-step inference: the main table's checkpoints evaluated with 2, 4, 8, 16 and 40 ODE steps.

Run (from the repository root, after configs/sweeps/table_main.py):
  python -m experiments.sweep --config=configs/sweeps/table_fewstep.py
The 20-step evaluations are the main table's own. Cells ``eval-<setting>-<method>-<arm>-n<N>``
(and ``eval-base-<base>-n<N>``) in ``WORKROOT``, each grouped with its RL run. ``SETTINGS``
limits the cells to the settings that fit the budget.
"""

from configs.sweeps import table_main
from experiments import sweep

WORKROOT = "workdir/sweeps/table_fewstep"
STEPS = (2, 4, 8, 16, 40)
# What the budget allows: the λ-sweep setting (unguarded ρ 1.05, the hinge active) and one
# method; finished cells are kept when these are extended.
SETTINGS = ("digits_contrast",)
METHODS = ("nft",)
BASES = ("digits",)


def get_config():
    c = sweep.base_config()
    c.workroot = WORKROOT
    steps = {"steps": {str(n): {"sample.num_steps": n} for n in STEPS}}
    c.grids = [g for g in table_main.base_eval_grid(steps, name="eval-base-{base}-n{steps}")
               if list(g["axes"]["base"])[0] in BASES]
    c.grids.append(table_main.eval_grid(
        SETTINGS, METHODS, table_main.ARMS, table_main.WORKROOT,
        name="eval-{setting}-{method}-{arm}-n{steps}", extra_axes=steps))
    return c

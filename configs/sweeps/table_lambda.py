"""λ sweep of NormGuard on one setting of the main table (λ = 0 and 0.1 are its two arms).

Run (from the repository root, after configs/sweeps/table_main.py):
  python -m experiments.sweep --config=configs/sweeps/table_lambda.py:<setting>,<method>
e.g. ``:digits_contrast,dpo``. experiments/main_table.py picks the setting and method whose
unguarded run has the highest ρ in the main table (the hinge only acts where ‖v_θ‖ > ‖v_ref‖)
and says so in its results. Cells ``rl-<setting>-<method>-lam<λ>`` and their evaluations, in
``WORKROOT``.
"""

from configs import rl_table
from configs.sweeps import table_main
from experiments import sweep

WORKROOT = "workdir/sweeps/table_lambda"
WEIGHTS = (0.03, 0.3, 1.0)   # with the main table's 0 and 0.1: 0, 0.03, 0.1, 0.3, 1.
ARMS = {f"lam{w:g}": {"normguard.weight": w} for w in WEIGHTS}


def get_config(arg: str = "digits_contrast,dpo"):
    setting, _, method = arg.partition(",")
    rl_table.parse(f"{method},{setting}")  # checks both names
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = [table_main.rl_grid([setting], [method], ARMS),
               table_main.eval_grid([setting], [method], ARMS, WORKROOT)]
    return c

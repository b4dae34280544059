"""Main table: 2 bases × 2 rewards × 3 methods (NFT, AWM, DPO), without and with NormGuard.

Run (from the repository root; experiments/main_table.py runs this and the other table sweeps,
after making the base models if they are missing):
  python -m experiments.sweep --config=configs/sweeps/table_main.py
On N hosts sharing the file system: add --config.num_hosts=N --config.host_index=<i> on each.

Cells (workdirs under ``WORKROOT``):
- ``eval-base-<base>``: the base model, once per base (every reward of the dataset is
  reported, so both settings of a base read the same evaluation);
- ``rl-<setting>-<method>-<arm>``: configs/rl_table.py:<method>,<setting>; arm ``plain``
  is λ = 0, arm ``guard`` is NormGuard with λ = ``GUARD_WEIGHT`` (relative hinge, power 1,
  no margin: configs/rl_common.py);
- ``eval-<setting>-<method>-<arm>``: configs/eval_table.py:<setting> on that RL workdir's
  last checkpoint (same group, so the same host runs it after its RL cell).
"""

from configs import rl_table
from experiments import sweep

WORKROOT = "workdir/sweeps/main_table"
GUARD_WEIGHT = 0.1
METHODS = ("nft", "awm", "dpo")
ARMS = {"plain": {"normguard.weight": 0.0}, "guard": {"normguard.weight": GUARD_WEIGHT}}
# The file a finished RL cell leaves: its final sample grid (not written after a SIGTERM stop).
RL_DONE = f"samples/samples_{rl_table.ITERATIONS:07d}.png"
BASE_SETTING = {"digits": "digits_logprob", "shapes": "shapes_rule"}  # eval config of a base


def rl_grid(settings, methods, arms, name="rl-{setting}-{method}-{arm}"):
    """RL cells: ``configs/rl_table.py:<method>,<setting>`` with each arm's overrides."""
    return sweep.grid(
        name=name, config="configs/rl_table.py:{method},{setting}",
        axes={"setting": {s: {} for s in settings}, "method": {m: {} for m in methods},
              "arm": dict(arms)},
        group=name.replace("rl-", "", 1), expect=[RL_DONE])


def eval_grid(settings, methods, arms, rl_workroot, name="eval-{setting}-{method}-{arm}",
              group="{setting}-{method}-{arm}", extra_axes=None):
    """Evaluation cells of the RL cells ``<rl_workroot>/rl-<setting>-<method>-<arm>``."""
    axes = {"setting": {s: {} for s in settings}, "method": {m: {} for m in methods},
            "arm": {a: {} for a in arms}}
    axes.update(extra_axes or {})
    return sweep.grid(
        name=name, config="configs/eval_table.py:{setting}",
        axes=axes, fixed={"checkpoint": rl_workroot + "/rl-{setting}-{method}-{arm}"},
        group=group, expect=["evaluation.json"])


def base_eval_grid(extra_axes=None, name="eval-base-{base}"):
    """Evaluation cells of the base models: one grid per base (its own evaluation setting)."""
    return [sweep.grid(name=name, config=f"configs/eval_table.py:{BASE_SETTING[b]}",
                       axes={"base": {b: {"checkpoint": rl_table.BASES[b]}},
                             **(extra_axes or {})},
                       group=f"base-{b}", expect=["evaluation.json"])
            for b in BASE_SETTING]


def get_config():
    c = sweep.base_config()
    c.workroot = WORKROOT
    settings = list(rl_table.SETTINGS)
    c.grids = [*base_eval_grid(),
               rl_grid(settings, METHODS, ARMS),
               eval_grid(settings, METHODS, ARMS, WORKROOT)]
    return c

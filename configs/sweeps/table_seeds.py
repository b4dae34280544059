"""The main table over seeds, and one table cell on bases re-pretrained per seed.

Every seed, seed 0 included, runs here in its own workroot, so that the seeds of one base's half
are trained on one machine from one base (the single-seed table of configs/sweeps/table_main.py
stays as it was). Run (from the repository root; experiments/main_table.py's ``seeds`` stage
makes the bases and runs this):
  python -m experiments.sweep --config=configs/sweeps/table_seeds.py[:<parts>]
``<parts>`` is a comma-separated subset of ``PARTS`` ("" = all of them, in that order):
``digits`` and ``shapes`` are the seeds of one base's half of the table (the base's evaluation,
then 12 RL cells and their evaluations per seed), ``rebase`` the re-pretrained bases. On N hosts sharing the file
system: add --config.num_hosts=N --config.host_index=<i> on each.

Cells (workdirs under ``WORKROOT`` unless said otherwise):
- ``eval-base-<base>``: the base's evaluation (as in the main table), the reference of the
  re-pretrained bases' spread (base seed 0);
- ``rl-<setting>-<method>-<arm>-s<k>`` and ``eval-<setting>-<method>-<arm>-s<k>``: the main
  table's cell ``rl-<setting>-<method>-<arm>`` (configs/sweeps/table_main.py) with
  ``--config.seed=k`` (prompts, rollout noise, re-noising and minibatch order), for k in
  ``SEEDS`` (seed 0 is the main table's configuration, rerun here). The evaluation keeps its
  fixed sample seeds, so seeds differ only through training. Seed-major: every cell of seed 0
  runs before any of seed 1, so an interrupted sweep leaves whole seeds.
- ``rebase``, for ``REBASE_METHOD`` on ``REBASE_SETTING`` only (NFT on digits contrast, where
  unguarded NFT inflated ‖v_θ‖ on every seed of experiments/results/inflation_search.md), for
  k in ``REBASE_SEEDS`` (base seed 0 is the ``digits`` part: ``eval-base-digits`` and the
  ``-s0`` cells):
  - ``pretrain-digits-b<k>``: configs/table_base.py:digits with ``--config.seed=k``
    (initialisation, data order, noise and σ draws), in ``rebase_workdir(k)`` =
    ``workdir/table_base_digits_s<k>`` (base seed 0 is the table's own base,
    ``rl_table.BASES["digits"]``);
  - ``eval-base-digits-b<k>``: that base's evaluation (as ``eval-base-digits`` of the table);
  - ``rl-<setting>-<method>-<arm>-b<k>`` and ``eval-...-b<k>``: the table's RL cell with
    ``--config.seed=k`` on base k (``base.workdir`` overridden). RL seed and base seed are the
    same, so against the ``-s<k>`` cells (RL seed k on base 0) only the base differs.
  One group per k: the base is pretrained before the RL cells that read it, on the same host.
"""

from configs import rl_table, table_base
from configs.sweeps import table_main
from experiments import sweep

WORKROOT = "workdir/sweeps/table_seeds"
SEEDS = (0, 1, 2)                  # RL seeds of every table cell.
PARTS = ("digits", "shapes", "rebase")
REBASE_SETTING = "digits_contrast"
REBASE_METHOD = "nft"
REBASE_BASE = "digits"             # the base of REBASE_SETTING (configs/rl_table.py SETTINGS).
REBASE_SEEDS = (1, 2)              # base seed 0 is rl_table.BASES[REBASE_BASE].
PRETRAIN_DONE = "samples/samples_ema_{steps:07d}.png"  # the last grid of a finished pretraining


def parse_parts(arg: str) -> tuple[str, ...]:
    """``"digits,rebase"`` -> ("digits", "rebase") in ``PARTS`` order; "" -> all ``PARTS``."""
    names = [p for p in arg.split(",") if p] or list(PARTS)
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def settings_of(base: str) -> list[str]:
    """The settings of configs/rl_table.py on ``base``, in table order."""
    return [s for s, (b, _) in rl_table.SETTINGS.items() if b == base]


def rebase_workdir(k: int) -> str:
    """Pretraining workdir of the base re-pretrained with seed ``k`` (k = 0: the table's)."""
    return rl_table.BASES[REBASE_BASE] if k == 0 else f"workdir/table_base_{REBASE_BASE}_s{k}"


def seed_grids(settings, seeds):
    """RL and evaluation cells ``-s<k>`` of ``settings`` × every method × both arms; the seed
    is the outer axis of the RL grid, which orders the groups seed-major."""
    seed_axis = {f"s{k}": {"seed": k} for k in seeds}
    axes = {"setting": {s: {} for s in settings}, "method": {m: {} for m in table_main.METHODS}}
    group = "{setting}-{method}-{arm}-{seed}"
    rl = sweep.grid(name="rl-" + group, config="configs/rl_table.py:{method},{setting}",
                    axes={"seed": seed_axis, **axes, "arm": dict(table_main.ARMS)},
                    group=group, expect=[table_main.RL_DONE])
    ev = sweep.grid(name="eval-" + group, config="configs/eval_table.py:{setting}",
                    axes={"seed": {s: {} for s in seed_axis}, **axes,
                          "arm": {a: {} for a in table_main.ARMS}},
                    fixed={"checkpoint": WORKROOT + "/rl-" + group}, group=group,
                    expect=["evaluation.json"])
    return [rl, ev]


def rebase_grids(k: int):
    """Cells of base seed ``k``: pretraining, the base's evaluation, both RL arms on it and
    their evaluations, all in group ``rebase-b<k>`` (run in that order)."""
    steps = table_base.get_config(REBASE_BASE).train.steps
    group, base = f"rebase-b{k}", rebase_workdir(k)
    cell = f"{REBASE_SETTING}-{REBASE_METHOD}-{{arm}}-b{k}"
    return [
        sweep.grid(name=f"pretrain-{REBASE_BASE}-b{k}",
                   config=f"configs/table_base.py:{REBASE_BASE}", axes={},
                   fixed={"seed": k}, workdir=base, group=group,
                   expect=[PRETRAIN_DONE.format(steps=steps)]),
        sweep.grid(name=f"eval-base-{REBASE_BASE}-b{k}",
                   config=f"configs/eval_table.py:{table_main.BASE_SETTING[REBASE_BASE]}",
                   axes={}, fixed={"checkpoint": base}, group=group,
                   expect=["evaluation.json"]),
        sweep.grid(name="rl-" + cell, config=f"configs/rl_table.py:{REBASE_METHOD},"
                   f"{REBASE_SETTING}", axes={"arm": dict(table_main.ARMS)},
                   fixed={"seed": k, "base.workdir": base}, group=group,
                   expect=[table_main.RL_DONE]),
        sweep.grid(name="eval-" + cell, config=f"configs/eval_table.py:{REBASE_SETTING}",
                   axes={"arm": {a: {} for a in table_main.ARMS}},
                   fixed={"checkpoint": WORKROOT + "/rl-" + cell}, group=group,
                   expect=["evaluation.json"]),
    ]


def base_eval_grids(bases):
    """The evaluation ``eval-base-<base>`` of each of ``bases``, each its own group."""
    return [sweep.grid(name=f"eval-base-{b}",
                       config=f"configs/eval_table.py:{table_main.BASE_SETTING[b]}", axes={},
                       fixed={"checkpoint": rl_table.BASES[b]}, group=f"base-{b}",
                       expect=["evaluation.json"]) for b in bases]


def get_config(arg: str = ""):
    """The sweep of ``arg``'s parts (see ``parse_parts``): base evaluations, seed cells, then
    re-pretrained bases."""
    parts = parse_parts(arg)
    bases = [b for b in ("digits", "shapes") if b in parts]
    settings = [s for base in bases for s in settings_of(base)]
    grids = base_eval_grids(bases) + (seed_grids(settings, SEEDS) if settings else [])
    for k in REBASE_SEEDS if "rebase" in parts else ():
        grids += rebase_grids(k)
    c = sweep.base_config()
    c.workroot = WORKROOT
    c.grids = grids
    return c

"""Main table, λ sweep, few-step inference and early-stopping control, from one command.

Usage (from the repository root; resumable: rerun after an interruption and finished cells
are skipped):
  python experiments/main_table.py [--stages <see DEFAULT_STAGES>] \
      [--lambda_setting digits_contrast,dpo] [--num_hosts N --host_index i]
(or ``python -m experiments.main_table`` with the same options). ``--stages analyse`` only
rewrites the results from the finished cells.

Stages (the default runs the digits half of the table, the λ sweep, the early-stopping
evaluations and an analysis first, then the shapes half and few-step inference):
- ``bases``: pretrains the two base models (configs/table_base.py) when they are missing;
  ``bases:digits`` (or ``bases:shapes``) only that one;
- ``main``: ``python -m experiments.sweep --config=configs/sweeps/table_main.py``
  (2 bases × 2 rewards × NFT/AWM/DPO × {λ = 0, λ = 0.1});
- ``main:<pattern>|<pattern>``: only the table cells whose names match;
- ``lambda``: configs/sweeps/table_lambda.py on one setting; by default the digits setting
  and method whose unguarded run has the largest ρ in the main table (the hinge acts only
  where ‖v_θ‖ > ‖v_ref‖), else ``--lambda_setting``; the choice is recorded in
  ``workdir/sweeps/table_lambda/choice.json`` and kept by later calls;
- ``earlystop``: configs/sweeps/table_earlystop.py (intermediate checkpoints of the unguarded
  runs);
- ``fewstep``: configs/sweeps/table_fewstep.py (2, 4, 8, 16, 40 ODE steps);
- ``seeds``: configs/sweeps/table_seeds.py, every table cell with seeds 0, 1, 2 and NFT on
  digits contrast over re-pretrained bases; ``seeds:digits`` (``shapes``, ``rebase``, or
  several joined by ``|``) only those parts; then seed_spread.report() writes
  ``experiments/results/main_table_seeds.md`` from every finished seed cell (this session's,
  and earlier sessions' read back from its json). Not in the default stages (on 2 cores about
  2 h for ``digits``, 1.5 h for ``shapes``, 35 min for ``rebase``; use 2 host processes);
- ``analyse``: reads every evaluation.json of the single-seed sweeps and writes
  ``experiments/results/main_table.md``, ``.json`` and ``main_table_*.png`` with whatever has
  finished (missing cells are listed).

With ``--num_hosts``, every host runs its share of each sweep (shared file system); run the
``analyse`` stage once all hosts are done.

This module holds the command, the main table itself and the report; each other claim has its
own module: seed_spread.py (guarded minus unguarded paired over seeds, with a verdict against
its own standard error, and the seed spread), lambda_sweep.py (λ sweep), early_stopping.py
(early-stopping control), few_step.py (few-step inference), sample_grids.py (side-by-side
samples). table_sweeps.py runs the sweeps and reads
their finished cells; tables.py formats.
"""

from __future__ import annotations

import argparse
import json
import os

from configs import eval_table, rl_table, table_base
from configs.sweeps import table_earlystop, table_fewstep, table_lambda, table_norms
from configs.sweeps import table_main as main_sweep
from configs.sweeps import table_seeds as seeds_sweep
from experiments import (early_stopping, few_step, lambda_sweep, sample_grids, seed_spread,
                         sweep, table_sweeps, tables)
from experiments.table_sweeps import NOISE, QUALITY

NORM_CELLS = {os.path.basename(d) for d in table_norms.run_dirs(table_norms.METHODS)}

STAGES = ("bases", "main", "lambda", "earlystop", "fewstep", "seeds", "analyse")
# Default order: the digits half of the table first, then the analyses on it, then the shapes
# half, so that an interrupted run leaves every analysis on one base rather than none.
DEFAULT_STAGES = ("bases,main:eval-base-*|*digits*,lambda,earlystop,analyse,"
                  "main:*shapes_rule*,fewstep,main,analyse")


# ----------------------------------------------------------------------------------------------
# The main table: every setting and method, unguarded and guarded.
# ----------------------------------------------------------------------------------------------


def main_table_md(data: dict) -> list[str]:
    """Seed 0 of every setting × method × arm, with the base, one row each."""
    head = ["setting", "model", "reward ↑"] + [label for _, label in QUALITY] + ["ρ"]
    lines = tables.header(head, left=2)
    for setting in rl_table.SETTINGS:
        lines.append(tables.row([setting, "base",
                                 *table_sweeps.row_cells(data["base"][setting])]))
        for method in main_sweep.METHODS:
            for arm, label in (("plain", "unguarded"), ("guard",
                                                        f"NormGuard λ={main_sweep.GUARD_WEIGHT}")):
                row = data["main"][f"{setting}-{method}-{arm}"]
                lines.append(tables.row([setting, f"{method} {label}",
                                         *table_sweeps.row_cells(row)]))
    return lines


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def wall_time_md() -> str:
    """Cells and summed wall time per sweep, from the cells' done markers."""
    parts = []
    for label, root in (("table", main_sweep.WORKROOT), ("λ", table_lambda.WORKROOT),
                        ("early stopping", table_earlystop.WORKROOT),
                        ("few-step", table_fewstep.WORKROOT)):
        # experiments/run_all.py's GRPO/RAM cells share the table's workroot: not counted.
        done = sweep.finished_seconds(os.path.join(table_sweeps.REPO, root))
        seconds = [t for name, t in done.items() if name not in NORM_CELLS]
        parts.append(f"{label} {len(seconds)} cells, {sum(seconds) / 60:.0f} min")
    return ("Wall time (sum of the cells' own times; more than the compute if other jobs shared "
            "the cores, see experiments/results/compute.md): " + "; ".join(parts) + ".")


def missing_md(missing: list[str]) -> str:
    """One line: how many cells of each sweep had not finished (names when few)."""
    if not missing:
        return "Every cell of the sweeps finished."
    by_root = {}
    for m in missing:
        root, name = m.rsplit("/", 1)
        by_root.setdefault(root, []).append(name)
    parts = [f"`{root}`: {len(names)} ({', '.join(names) if len(names) <= 6 else 'see json'})"
             for root, names in by_root.items()]
    return "Cells not finished when this was written: " + "; ".join(parts) + "."


def sizes_md() -> list[str]:
    rl = rl_table.get_config("nft,digits_logprob")
    ev = eval_table.get_config("digits_logprob")
    digits, shapes = table_base.get_config("digits"), table_base.get_config("shapes")
    return [
        "Sizes (seed 0 everywhere except in \"Seeds\"):",
        f"- Bases: `{rl_table.BASES['digits']}` = {digits.model.arch}/{digits.model.size} on "
        f"{digits.data.name}, {digits.train.steps} steps at batch {digits.train.batch_size}; "
        f"`{rl_table.BASES['shapes']}` = {shapes.model.arch}/{shapes.model.size} on "
        f"{shapes.data.name}, {shapes.train.steps} steps at batch {shapes.train.batch_size}.",
        f"- RL (configs/rl_table.py): {rl.train.iterations} iterations of "
        f"{rl.rollout.prompts_per_iter} prompts × {rl.rollout.group_size} samples, "
        f"{rl.rollout.num_steps}-step ODE rollouts (shift {rl.rollout.shift}), no CFG, "
        f"{rl.train.renoise_draws} re-noise draws (NFT/AWM), minibatch {rl.train.minibatch_size}"
        f" (DPO: {rl_table.get_config('dpo,digits_logprob').train.minibatch_size} pairs); "
        "learning rates and objective settings of configs/rl_<method>.py (NFT 3e-4, AWM and "
        f"DPO 1e-4); checkpoints every {rl_table.CHECKPOINT_EVERY} iterations.",
        f"- NormGuard: relative hinge max(0, ‖v_θ‖/‖v_ref‖ − 1), power 1, no margin, λ = "
        f"{main_sweep.GUARD_WEIGHT} in the main table.",
        f"- Evaluation (configs/eval_table.py): {ev.sample.per_class} samples per class for "
        f"digits (300), {eval_table.PER_CLASS['shapes']} for shapes (320), fixed seeds, "
        f"{ev.sample.num_steps}-step ODE (shift {ev.sample.shift}), no CFG. FD, recall, "
        "judged real and precision against the held-out split (quality metrics, not the "
        "reward); out of range = fraction of pixels beyond [-1.05, 1.05]; ρ = mean over ODE "
        "steps and the first 100 samples of ‖v_θ(x_k)‖/‖v_ref(x_k)‖ on θ's own trajectory.",
    ]


def analyse(lambda_choice: tuple[str, str] | None) -> None:
    data = table_sweeps.collect()
    choice = lambda_choice or lambda_sweep.choose_lambda_setting(data["main"])
    lam_rows = lambda_sweep.collect_lambda(*choice) if choice else {}
    # This table has one seed (0); the seeds are main_table_seeds.md (seed_spread.report()).
    runs = {key: ({0: row} if row is not None else {}) for key, row in data["main"].items()}
    delta_lines, deltas = seed_spread.delta_md(runs)
    few_lines, gaps = few_step.fewstep_md(data)
    early_lines, early = early_stopping.earlystop_md(data)
    results = table_sweeps.RESULTS
    os.makedirs(results, exist_ok=True)
    if choice:
        lambda_sweep.plot_lambda(lam_rows, *choice, os.path.join(results, "main_table_lambda.png"))
    few_step.plot_fewstep(data, os.path.join(results, "main_table_fewstep.png"))
    early_stopping.plot_earlystop(data, os.path.join(results, "main_table_earlystop.png"))
    lines = [
        "# Main table, λ sweep, few-step inference, early-stopping control",
        "",
        "Command: `python experiments/main_table.py` (runs the sweeps configs/sweeps/"
        "{table_main,table_lambda,table_earlystop,table_fewstep}.py, then this analysis; "
        "`--stages analyse` rewrites this file from the finished cells).",
        "",
        *sizes_md(),
        f"- Scope (budget): the λ sweep on one setting; the early-stopping checkpoints "
        f"(iterations {', '.join(map(str, table_earlystop.STEPS))}) for "
        f"{', '.join(table_earlystop.SETTINGS)}; few-step inference for "
        f"{', '.join(table_fewstep.METHODS)} on {', '.join(table_fewstep.SETTINGS)}.",
        "",
        wall_time_md(),
        "",
        "Every cell here is a single run (seed 0), so no difference below has a standard "
        "error or a verdict. The table over seeds, with paired differences, verdicts and the "
        "measured seed spread, is [main_table_seeds.md](main_table_seeds.md) "
        "(`--stages seeds`).",
        "",
        "The early-stopping control and few-step inference below are single-seed (seed 0) and "
        f"still read FD gaps against a fixed {NOISE['fd']:g} (two identical single-seed NFT runs "
        "differed by about 3 in FD, experiments/README.md \"Noise\"); compare it with the "
        "measured FD spread in main_table_seeds.md.",
        "",
        "## Main table",
        "",
        "Reward = the reward the run optimised (`digits_logprob`: log p(class); "
        "`digits_contrast`: pixel std; `shapes_rule`: exact shape × colour match; "
        "`shapes_saturation`: mean chroma).",
        "",
        *main_table_md(data),
        "",
        "Guarded minus unguarded, seed 0 (one run per arm: no standard error, no verdict; see "
        "main_table_seeds.md). Hinge active = fraction of training rows with ‖v_θ‖ > ‖v_ref‖, "
        "averaged over the logged iterations (4, 8, 12) of the guarded runs. A hinge that never "
        "acts leaves the run bit-identical to the unguarded one; where it acted on only a few "
        "rows, the gap between the two runs is mostly run-to-run divergence, which RL amplifies "
        "from tiny differences: those pairs show the noise at this size.",
        "",
        *delta_lines,
        "",
        "## Samples",
        "",
        *(sample_grids.samples_md(data) or ["no finished pair yet"]),
        "",
        "## λ sweep",
        "",
        *(lambda_sweep.lambda_md(lam_rows, *choice) if choice else ["not run yet"]),
        "",
        "![λ sweep](main_table_lambda.png)" if choice else "",
        "",
        "## Few-step inference",
        "",
        *few_lines,
        "",
        "![few-step](main_table_fewstep.png)",
        "",
        "## Early-stopping control",
        "",
        "Each guarded run is matched with the checkpoint of the unguarded run of the same "
        "setting and method (base = iteration 0, then every "
        f"{rl_table.CHECKPOINT_EVERY} iterations) whose reward is closest to the guarded "
        "run's final reward. If NormGuard only slowed the optimisation down, the matched "
        "checkpoint would have the guarded run's quality. Intermediate checkpoints were "
        f"evaluated for {', '.join(table_earlystop.SETTINGS)}; for the other settings the "
        "unguarded path is only the base and the final checkpoint. When the closest checkpoint "
        "is far from the guarded reward, the unguarded path interpolated at that reward is the "
        "fairer control: a verdict \"yes, between checkpoints\" means that interpolation has "
        "the guarded FD or better (linear between two checkpoints, so an estimate).",
        "",
        *early_lines,
        "",
        "![early stopping](main_table_earlystop.png)",
        "",
        missing_md(data["missing"]),
        "",
    ]
    with open(os.path.join(results, "main_table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(results, "main_table.json"), "w", encoding="utf-8") as f:
        json.dump({"data": data, "lambda_setting": choice,
                   "lambda": {f"{k:g}": v for k, v in lam_rows.items()}, "deltas": deltas,
                   "fewstep_gaps": gaps, "earlystop": early}, f, indent=1)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=DEFAULT_STAGES,
                        help="comma-separated stages, run in order; 'main:<pattern>|<pattern>' "
                        "runs only the table cells whose names match")
    parser.add_argument("--lambda_setting", default="",
                        help="<setting>,<method> of the λ sweep ('' = largest unguarded ρ)")
    parser.add_argument("--num_hosts", type=int, default=0)
    parser.add_argument("--host_index", type=int, default=-1)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted({s.partition(":")[0] for s in stages} - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    for stage in stages:
        name, _, only = stage.partition(":")
        if name == "seeds":
            try:
                seeds_sweep.parse_parts(only.replace("|", ","))
            except ValueError as e:
                parser.error(f"stage {stage!r}: {e}")
    choice = None
    if args.lambda_setting:
        setting, _, method = args.lambda_setting.partition(",")
        rl_table.parse(f"{method},{setting}")
        choice = (setting, method)
    hosts = ([f"--config.num_hosts={args.num_hosts}"] if args.num_hosts else []) + (
        [f"--config.host_index={args.host_index}"] if args.host_index >= 0 else [])
    os.chdir(table_sweeps.REPO)
    for stage in stages:
        name, _, only = stage.partition(":")
        only_flag = [f"--config.only={only.replace('|', ',')}"] if only else []
        if name == "bases":
            table_sweeps.make_bases(tuple(only.split("|")) if only else tuple(rl_table.BASES))
        elif name == "main":
            table_sweeps.run_sweep("configs/sweeps/table_main.py", hosts + only_flag)
        elif name == "lambda":
            rule = ("given on the command line" if choice else
                    "largest ρ among the unguarded digits runs of the main table")
            choice = choice or lambda_sweep.choose_lambda_setting(
                table_sweeps.collect()["main"])
            if choice is None:
                print("λ sweep skipped: the main table's unguarded digits runs are not all "
                      "evaluated (pass --lambda_setting to choose without them)", flush=True)
                continue
            lambda_sweep.record_lambda_choice(choice, rule)
            print(f"λ sweep on {choice} ({rule})", flush=True)
            table_sweeps.run_sweep(f"configs/sweeps/table_lambda.py:{choice[0]},{choice[1]}",
                                   hosts + only_flag)
        elif name == "earlystop":
            table_sweeps.run_sweep("configs/sweeps/table_earlystop.py", hosts + only_flag)
        elif name == "fewstep":
            table_sweeps.run_sweep("configs/sweeps/table_fewstep.py", hosts + only_flag)
        elif name == "seeds":
            parts = seeds_sweep.parse_parts(only.replace("|", ","))
            table_sweeps.run_sweep(f"configs/sweeps/table_seeds.py:{','.join(parts)}", hosts)
            seed_spread.report()
        elif name == "analyse":
            analyse(choice)


if __name__ == "__main__":
    main()

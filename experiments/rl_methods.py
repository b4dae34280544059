"""Every RL method, with and without NormGuard, from one shared base model: reward and quality.

Usage (from the repository root, after the quickstart has trained its base model):
  .venv/bin/python experiments/rl_methods.py [--methods nft,awm] [--iterations 24] \
      [--early_stop_steps 8,16] [--out rl_methods] \
      [--base workdir/quickstart/base] [--workroot workdir/rl_methods]

Each method runs the quickstart job (``configs/quickstart.py:<method>``) on the shared base, in
its own process and workdir (a finished method is reused; an interrupted one resumes). The
per-method tables are merged into ``experiments/results/<out>.md`` and ``.json``, with the
sample grids of the evaluated models copied beside them. With ``--early_stop_steps``, every arm
is also evaluated at those earlier RL iterations (its kept checkpoints), in the same way: the
early-stopping control for "the guard only helps because it slows training down".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from normguard_jax import checkpointing
from normguard_jax.objectives import METHODS  # the method names (configs/rl_<method>.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")


def run_method(method: str, args) -> tuple[dict, float]:
    """Runs (or reuses) one method's quickstart; returns its quickstart.json and wall time."""
    workdir = os.path.join(args.workroot, method)
    done = os.path.join(workdir, "quickstart.json")
    if os.path.exists(done):  # a finished method with these settings is reused as it is
        with open(done, encoding="utf-8") as f:
            previous = json.load(f)
        c = previous["config"]
        if (c["rl"]["train"]["iterations"] == args.iterations and c["arms"] == args.arms
                and c["guard_weight"] == args.guard_weight
                and os.path.abspath(c["base_workdir"]) == os.path.abspath(args.base)):
            print(f"reusing {done}", flush=True)
            return previous, sum(previous["seconds"].values())
    cmd = [sys.executable, "-m", "normguard_jax.main", f"--config=configs/quickstart.py:{method}",
           f"--workdir={workdir}", f"--config.base_workdir={args.base}",
           f"--config.rl.train.iterations={args.iterations}",
           f"--config.rl.train.sample_every={args.iterations}",
           f"--config.guard_weight={args.guard_weight}", f"--config.arms={args.arms}"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)  # main.py sets up the tuned malloc itself
    with open(os.path.join(workdir, "quickstart.json"), encoding="utf-8") as f:
        return json.load(f), time.time() - t0


def evaluate_at(method: str, arm: str, step: int, result: dict, args) -> dict:
    """Evaluates one arm's checkpoint at RL iteration ``step`` exactly as the quickstart
    evaluates its final one (same samples, seeds and metrics); reused when already done."""
    import ml_collections  # noqa: PLC0415  (after the argument checks)

    from experiments import quickstart  # noqa: PLC0415
    from normguard_jax import evaluate  # noqa: PLC0415

    checkpoint = os.path.join(args.workroot, method, f"rl_{arm}")
    config = quickstart.evaluate_config(ml_collections.ConfigDict(result["config"]), checkpoint)
    config.checkpoint_step = step
    out = os.path.join(args.workroot, method, f"eval_{arm}_{step}")
    path = os.path.join(out, "evaluation.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous["config"] == config.to_dict():
            return previous
    return evaluate.run(config, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--guard_weight", type=float, default=0.1)
    parser.add_argument("--arms", default="unguarded,normguard",
                        help="RL arms per method: unguarded, normguard or both")
    parser.add_argument("--base", default="workdir/quickstart/base")
    parser.add_argument("--workroot", default="workdir/rl_methods")
    parser.add_argument("--early_stop_steps", default="",
                        help="also evaluate every arm at these RL iterations (comma-separated; "
                             "multiples of checkpoint_every, 8): the early-stopping control")
    parser.add_argument("--out", default="rl_methods",
                        help="basename of the results files in experiments/results/")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if not checkpointing.steps(os.path.join(REPO, args.base)):
        parser.error(f"no base model in {args.base}: run the quickstart (README command 1) first")

    from experiments import quickstart  # noqa: PLC0415  (after the argument checks)

    rows, record = {}, {}
    for method in methods:
        result, seconds = run_method(method, args)
        record[method] = {**result, "wall_seconds": seconds}
        for name, evaluation in result["results"].items():
            if name != "base" or "base" not in rows:
                rows[name] = evaluation
            for step in [int(x) for x in args.early_stop_steps.split(",") if x]:
                if name != "base":
                    arm = name.split()[-1]
                    rows[f"{name} @ iteration {step}"] = evaluate_at(method, arm, step, result,
                                                                    args)
        for run in args.arms.split(","):
            src = os.path.join(args.workroot, method, f"eval_{run}", "samples_eval.png")
            shutil.copy(src, os.path.join(RESULTS, f"{args.out}_{method}_{run}.png"))
    shutil.copy(os.path.join(args.workroot, methods[0], "eval_base", "samples_eval.png"),
                os.path.join(RESULTS, f"{args.out}_base.png"))

    first = record[methods[0]]["config"]
    lines = [
        f"# RL methods from one base model: {', '.join(methods)}",
        "",
        "Command: `" + " ".join(["python", "experiments/rl_methods.py", *sys.argv[1:]]) + "`",
        "",
        f"Base: `{args.base}` ({first['pretrain']['model']['arch']}/"
        f"{first['pretrain']['model']['size']} on {first['pretrain']['data']['name']}, "
        f"{first['pretrain']['train']['steps']} steps). Each method: the quickstart's RL sizes "
        f"({args.iterations} iterations of {first['rl']['rollout']['prompts_per_iter']} prompts "
        f"× {first['rl']['rollout']['group_size']} samples, reward {first['rl']['rewards']}), "
        f"NormGuard λ = {args.guard_weight} (relative hinge). Evaluation: "
        f"{first['evaluate']['sample']['per_class']} samples per class, fixed seeds, "
        f"{first['evaluate']['sample']['num_steps']}-step ODE.",
        "",
        quickstart.table(rows),
        "",
        "Wall time per method (its arms and their evaluation; longer if other jobs shared the cores): "
        + ", ".join(f"{m} {r['wall_seconds'] / 60:.1f} min" for m, r in record.items()),
        "",
        f"Samples (rows are classes): base `{args.out}_base.png`; per method "
        f"`{args.out}_<method>_{{unguarded,normguard}}.png`.",
        "",
    ]
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, f"{args.out}.json"), "w", encoding="utf-8") as f:
        json.dump({**record, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""NormGuard's variants study: the sweep's cells (configs/sweeps/guard_variants.py) and the
analysis of experiments/guard_variants.py (per-step ρ, gradient share, paired differences, the
early-stopping match and the few-step change) from synthetic finished cells."""

import json
import math
import os

import numpy as np
import pytest

from configs import rl_table
from configs.sweeps import guard_variants as gv
from experiments import guard_variants, sweep, table_sweeps
from normguard_jax import normguard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def cells(monkeypatch):
    monkeypatch.chdir(REPO)  # job configs are named relative to the repository
    return sweep.expand(gv.get_config())


def test_every_arm_is_one_valid_normguard_config_and_cells_are_complete(cells):
    sweep.check(cells)  # every override names a field of its job config, with a fitting type
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    n_arms, n_seeds = len(gv.ARMS), len(gv.SEEDS)
    assert len(cells) == (2 + n_seeds * (2 * n_arms + len(gv.EARLY_STEPS))
                          + n_seeds * len(gv.FEWSTEP_ARMS) + 1 + n_seeds * 2 * len(gv.CFG_ARMS))
    for arm, over in {**gv.ARMS, **gv.CFG_ARMS}.items():   # a valid NormGuard config each
        fields = {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("normguard.")}
        cfg = normguard.NormGuardConfig(**fields)
        assert (cfg.weight > 0) == (arm not in ("plain", "cfg_plain"))
    assert normguard.NormGuardConfig(velocity="guided", guidance_scale=gv.CFG_SCALE).guided
    by_name = {c.name: c for c in cells}
    for seed in gv.SEEDS:
        for arm, over in gv.ARMS.items():
            rl = dict(by_name[f"rl-{arm}-s{seed}"].overrides)
            assert rl["seed"] == seed and rl["normguard.log_grad_norms"] is True
            assert rl["train.iterations"] == gv.ITERATIONS
            assert {k: rl[k] for k in over} == over
            ev = dict(by_name[f"eval-{arm}-s{seed}"].overrides)
            assert ev == {"checkpoint": f"{gv.WORKROOT}/rl-{arm}-s{seed}"}
        for k in gv.EARLY_STEPS:   # the early checkpoints exist: a multiple, and kept
            assert k % rl["train.checkpoint_every"] == 0
            assert dict(by_name[f"eval-plain-s{seed}-it{k}"].overrides)["checkpoint_step"] == k
        assert rl["train.keep_checkpoints"] * gv.CHECKPOINT_EVERY > gv.ITERATIONS
        for arm, over in gv.CFG_ARMS.items():   # CFG in rollouts, sample grids and evaluation
            rl = dict(by_name[f"rl-{arm}-s{seed}"].overrides)
            assert rl["rollout.guidance_scale"] == gv.CFG_SCALE == rl["sample.guidance_scale"]
            assert {k: rl[k] for k in over} == over and rl["seed"] == seed
            ev = dict(by_name[f"eval-{arm}-s{seed}"].overrides)
            assert ev == {"checkpoint": f"{gv.WORKROOT}/rl-{arm}-s{seed}",
                          "sample.guidance_scale": gv.CFG_SCALE}
    assert dict(by_name["eval-base"].overrides) == {"checkpoint": rl_table.BASES["digits"]}
    assert dict(by_name["eval-base-cfg"].overrides)["sample.guidance_scale"] == gv.CFG_SCALE
    assert dict(by_name[f"eval-base-n{gv.FEWSTEP}"].overrides)["sample.num_steps"] == gv.FEWSTEP


def test_seed_major_order_and_every_evaluation_after_its_rl_cell(cells):
    index = {c.workdir: i for i, c in enumerate(cells)}
    for i, c in enumerate(cells):
        ckpt = dict(c.overrides).get("checkpoint", "")
        if ckpt.startswith(gv.WORKROOT):
            assert index[ckpt] < i
    rl = [c.name for c in cells if c.name.startswith("rl-")]
    plain_rl = [n for n in rl if "cfg_" not in n]
    assert rl == plain_rl + [n for n in rl if "cfg_" in n]   # the CFG arms run last
    for names in (plain_rl, rl[len(plain_rl):]):              # each part seed-major
        seeds = [int(n.rsplit("-s", 1)[1]) for n in names]
        assert seeds == sorted(seeds)


# ----------------------------------------------------------------------------------------------
# The analysis, from synthetic cells.
# ----------------------------------------------------------------------------------------------


def _write_eval(root, name, reward, fd, rho_steps, recall=0.3, realism=0.5, oor=0.4):
    d = root / gv.WORKROOT / name
    d.mkdir(parents=True)
    quality = {"fd": fd, "recall": recall, "realism": realism, "precision": 0.5,
               "out_of_range": oor}
    (d / "evaluation.json").write_text(json.dumps({
        "step": 0, "norm_ratio": {"mean": float(np.mean(rho_steps)),
                                  "per_step": list(rho_steps)},
        "generated": {"rewards": {"contrast": reward, "classifier_logprob": -1.0},
                      "quality": quality}}))
    (d / sweep.DONE_MARKER).write_text("{}")


def _write_log(root, name, active, share):
    d = root / gv.WORKROOT / name
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, (a, g) in enumerate(zip(active, share)):
            f.write(json.dumps({"step": i + 1, "train/normguard/ratio": 1.0 + 0.01 * i,
                                "train/normguard/active_frac": a, "reward/mean": 0.5,
                                "train/normguard/grad_norm_base": 2.0,
                                "train/normguard/grad_norm_penalty": 2.0 * g,
                                "train/normguard/grad_norm_ratio": g}) + "\n")
        # a resumed run logs its last iteration again: the later line wins
        f.write(json.dumps({"step": len(active), "train/normguard/ratio": 9.0,
                            "train/normguard/active_frac": active[-1], "reward/mean": 0.5,
                            "train/normguard/grad_norm_ratio": share[-1]}) + "\n")


@pytest.fixture()
def synthetic(tmp_path, monkeypatch):
    """Base, plain (path 0 → 8 → 16 → 24) and sample arms on seeds 0-2; the sample arm is the
    plain run's it-16 checkpoint shifted by a seed-dependent FD offset; batch on seed 0 only."""
    monkeypatch.setattr(table_sweeps, "REPO", str(tmp_path))
    monkeypatch.setattr(guard_variants, "RESULTS", str(tmp_path / "results"))
    steps = np.linspace(1.0, 1.2, 20)
    _write_eval(tmp_path, "eval-base", 0.40, 5.0, np.ones(20))
    _write_eval(tmp_path, "eval-base-n4", 0.38, 7.0, np.ones(4))
    for s in gv.SEEDS:
        _write_eval(tmp_path, f"eval-plain-s{s}-it8", 0.45, 6.0 + s, steps)
        _write_eval(tmp_path, f"eval-plain-s{s}-it16", 0.50, 8.0 + s, steps)
        _write_eval(tmp_path, f"eval-plain-s{s}", 0.60, 12.0 + s, steps, oor=0.6)
        _write_eval(tmp_path, f"eval-sample-s{s}", 0.51, 8.0 + s - (1.0 + 0.1 * s),
                    steps[::-1], oor=0.3)
        _write_eval(tmp_path, f"eval-plain-s{s}-n4", 0.55, 20.0 + s, steps[:4])
        _write_eval(tmp_path, f"eval-sample-s{s}-n4", 0.50, 20.0 + s - 2.0 * (1 + s), steps[:4])
        _write_log(tmp_path, f"rl-plain-s{s}", [0.5, 0.6], [0.0, 0.0])
        _write_log(tmp_path, f"rl-sample-s{s}", [0.0, 0.5, 0.7], [0.0, 0.2, 0.4])
    _write_eval(tmp_path, "eval-batch-s0", 0.55, 9.0, steps)
    for s in (0, 1):   # CFG arms: the guided hinge 0.5 better in FD than the conditional one
        _write_eval(tmp_path, f"eval-cfg_cond-s{s}", 0.5, 10.0 + s, steps)
        _write_eval(tmp_path, f"eval-cfg_guided-s{s}", 0.5, 9.5 + s * 1.1, steps)
    return tmp_path


def test_collect_reads_per_step_rho_logs_and_names_the_missing(synthetic):
    data = guard_variants.collect()
    assert set(data["final"]) == {"plain", "sample", "batch", "cfg_cond", "cfg_guided"}
    assert set(data["final"]["batch"]) == {0}
    row = data["final"]["sample"][1]
    assert row["rho_last"] == pytest.approx(1.0)                 # reversed profile ends at 1
    assert row["rho_late"] == pytest.approx(np.mean(np.linspace(1.0, 1.2, 20)[::-1][-3:]))
    assert row["grad_share"] == pytest.approx(0.3)               # inactive iteration left out
    assert row["hinge_active"] == pytest.approx(np.mean([0.0, 0.5, 0.7]))
    log = data["train"]["sample"][1]
    assert log["iteration"] == [1, 2, 3] and log["ratio"][-1] == 9.0   # resumed line wins
    assert data["final"]["plain"][0]["grad_share"] == 0.0   # λ = 0: no penalty gradient
    assert data["final"]["batch"][0]["grad_share"] is None   # no training log
    assert guard_variants.gradient_share({"active": [0.0, 0.0], "grad_share": [0.1, 0.2]}) is None
    assert "eval-batch-s1" in data["missing"] and "eval-ramp-s2" in data["missing"]
    assert "eval-batch-s1-n4" not in data["missing"]               # batch has no few-step cells


def test_paired_differences_against_the_unguarded_arm(synthetic):
    data = guard_variants.collect()
    diffs = guard_variants.paired_arms(data["final"]["sample"], data["final"]["plain"],
                                       ["fd", "reward"])
    d = [(8.0 + s - (1.0 + 0.1 * s)) - (12.0 + s) for s in gv.SEEDS]
    assert diffs["fd"]["n"] == 3
    assert diffs["fd"]["mean"] == pytest.approx(np.mean(d))
    assert diffs["fd"]["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(3))
    assert diffs["reward"]["mean"] == pytest.approx(-0.09)
    up, down = guard_variants.moved(diffs)
    assert "fd" in down and not up
    only0 = guard_variants.paired_arms(data["final"]["batch"], data["final"]["plain"], ["fd"])
    assert only0["fd"]["n"] == 1   # paired on the common seeds only


def test_early_stopping_matches_the_checkpoint_of_closest_reward(synthetic):
    data = guard_variants.collect()
    es = guard_variants.earlystop(data, "sample")
    assert es["matched"] == {0: 16, 1: 16, 2: 16}                 # reward 0.51 vs 0.50
    fd = es["diffs"]["fd"]
    assert fd["mean"] == pytest.approx(-np.mean([1.0 + 0.1 * s for s in gv.SEEDS]))
    assert fd["t"] < -4.3                                           # better FD than early stop
    assert guard_variants.earlystop(data, "batch")["matched"] == {0: 24}   # 0.55: 0.60 ≈ 0.50


def test_fewstep_change_is_the_difference_of_the_two_gaps(synthetic):
    data = guard_variants.collect()
    fs = guard_variants.fewstep(data)
    assert fs["seeds"] == list(gv.SEEDS)
    gap20 = [(8.0 + s - (1.0 + 0.1 * s)) - (12.0 + s) for s in gv.SEEDS]
    gap4 = [-2.0 * (1 + s) for s in gv.SEEDS]
    assert fs["n20"]["fd"]["mean"] == pytest.approx(np.mean(gap20))
    assert fs["few"]["fd"]["mean"] == pytest.approx(np.mean(gap4))
    assert fs["change"]["fd"]["mean"] == pytest.approx(np.mean(gap4) - np.mean(gap20))


def test_analyse_writes_tables_json_and_plots(synthetic):
    stats = guard_variants.analyse("python experiments/guard_variants.py")
    out = synthetic / "results"
    md = (out / "guard_variants.md").read_text()
    assert "| per-sample hinge (default) | 3 |" in md and "| batch ratio | 1 |" in md
    assert "Not finished:" in md and "eval-ramp-s0" in md and "eval-base-cfg" in md
    assert "| CFG: guided-velocity hinge | 2 |" in md
    cfg = stats["vs_cfg_cond"]["cfg_guided"]["fd"]
    assert cfg["n"] == 2 and cfg["mean"] == pytest.approx(-0.45)
    assert "cfg_cond" not in stats["vs_plain"]      # CFG arms are compared among themselves
    for suffix in ("_profile.png", "_tradeoff.png"):
        assert (out / f"guard_variants{suffix}").stat().st_size > 10_000
    saved = json.loads((out / "guard_variants.json").read_text())
    assert saved["stats"]["vs_plain"]["sample"]["fd"]["mean"] == pytest.approx(
        stats["vs_plain"]["sample"]["fd"]["mean"])

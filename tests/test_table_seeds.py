"""The main table's seeds: the sweep's cells (configs/sweeps/table_seeds.py) and the analysis of
experiments/seed_spread.py (means, s.e., paired t, verdicts, seed spread, re-pretrained bases)
from synthetic finished cells."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from configs import rl_table
from configs.sweeps import table_main as main_sweep
from configs.sweeps import table_seeds as seeds_sweep
from experiments import main_table, seed_spread, sweep, table_sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("reward", "fd", "recall", "realism", "precision", "out_of_range", "rho")


# ----------------------------------------------------------------------------------------------
# The sweep config.
# ----------------------------------------------------------------------------------------------


def _cells(arg, monkeypatch):
    monkeypatch.chdir(REPO)  # job configs are named relative to the repository
    return sweep.expand(seeds_sweep.get_config(arg))


def test_every_cell_has_valid_overrides_and_the_main_tables_names(monkeypatch):
    cells = _cells("", monkeypatch)
    sweep.check(cells)  # every override names a field of its job config, with a fitting type
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    per_seed = len(rl_table.SETTINGS) * len(main_sweep.METHODS) * len(main_sweep.ARMS)
    assert len(cells) == (2 + 2 * per_seed * len(seeds_sweep.SEEDS)
                          + 6 * len(seeds_sweep.REBASE_SEEDS))
    assert 0 in seeds_sweep.SEEDS   # seed 0 reruns here: one half's seeds share one machine
    table = {c.name: c for c in sweep.expand(main_sweep.get_config())}
    by_name = {c.name: c for c in cells}
    for base, workdir in rl_table.BASES.items():   # the bases' evaluations, as in the table
        mine, theirs = by_name[f"eval-base-{base}"], table[f"eval-base-{base}"]
        assert mine.workdir == f"{seeds_sweep.WORKROOT}/eval-base-{base}"
        assert mine.config == theirs.config and dict(mine.overrides) == {"checkpoint": workdir}
    for name, cell in table.items():
        if not name.startswith(("rl-", "eval-")) or name.startswith("eval-base"):
            continue
        for k in seeds_sweep.SEEDS:
            seeded = by_name[f"{name}-s{k}"]
            assert seeded.config == cell.config
            assert seeded.workdir == f"{seeds_sweep.WORKROOT}/{name}-s{k}"
            extra = dict(seeded.overrides)
            if name.startswith("rl-"):   # the table cell's overrides plus the seed
                assert extra.pop("seed") == k and extra == dict(cell.overrides)
                assert seeded.expect == cell.expect
            else:                        # the evaluation reads the seed's own RL workdir
                assert extra == {"checkpoint": f"{seeds_sweep.WORKROOT}/rl-{name[5:]}-s{k}"}
                assert seeded.group == by_name[f"rl-{name[5:]}-s{k}"].group


def test_seed_major_order_and_evaluation_after_its_rl_cell(monkeypatch):
    cells = _cells("digits,shapes", monkeypatch)
    assert [c.name for c in cells[:2]] == ["eval-base-digits", "eval-base-shapes"]
    cells = cells[2:]
    seeds = [int(c.name.rsplit("-s", 1)[1]) for c in cells]
    assert seeds == sorted(seeds)   # every cell of seed 0 before any of seed 1
    index = {c.workdir: i for i, c in enumerate(cells)}
    for i, c in enumerate(cells):
        if c.name.startswith("eval-"):
            assert index[dict(c.overrides)["checkpoint"]] < i


@pytest.mark.parametrize("base", ["digits", "shapes"])
def test_restriction_to_one_base(base, monkeypatch):
    base_eval, *cells = _cells(base, monkeypatch)
    assert base_eval.name == f"eval-base-{base}"
    settings = {s for s, (b, _) in rl_table.SETTINGS.items() if b == base}
    assert len(cells) == len(settings) * 3 * 2 * 2 * len(seeds_sweep.SEEDS)   # 48: 12 × 2 × 2
    assert {c.name.split("-")[1] for c in cells} == settings
    assert all(c.name.endswith(tuple(f"-s{k}" for k in seeds_sweep.SEEDS)) for c in cells)


def test_unknown_part_is_named():
    with pytest.raises(ValueError, match="unknown parts"):
        seeds_sweep.get_config("digit")
    assert seeds_sweep.parse_parts("rebase,digits") == ("digits", "rebase")


def test_rebase_cells_pretrain_then_train_on_their_own_base(monkeypatch):
    cells = _cells("rebase", monkeypatch)
    sweep.check(cells)
    assert [c.name for c in cells[:6]] == [
        "pretrain-digits-b1", "eval-base-digits-b1", "rl-digits_contrast-nft-plain-b1",
        "rl-digits_contrast-nft-guard-b1", "eval-digits_contrast-nft-plain-b1",
        "eval-digits_contrast-nft-guard-b1"]
    for k in seeds_sweep.REBASE_SEEDS:
        mine = [c for c in cells if c.name.endswith(f"-b{k}")]
        assert len(mine) == 6 and {c.group for c in mine} == {f"rebase-b{k}"}
        pre = mine[0]
        assert pre.config == "configs/table_base.py:digits"
        assert pre.workdir == f"workdir/table_base_digits_s{k}"
        assert dict(pre.overrides) == {"seed": k}
        assert pre.expect == ("samples/samples_ema_0000600.png",)
        assert dict(mine[1].overrides) == {"checkpoint": pre.workdir}
        for rl in mine[2:4]:
            o = dict(rl.overrides)
            assert rl.config == "configs/rl_table.py:nft,digits_contrast"
            assert o["seed"] == k and o["base.workdir"] == pre.workdir
        assert {dict(c.overrides)["normguard.weight"] for c in mine[2:4]} == {0.0, 0.1}
        for ev, rl in zip(mine[4:], mine[2:4]):
            assert dict(ev.overrides) == {"checkpoint": rl.workdir}
    assert seeds_sweep.rebase_workdir(0) == rl_table.BASES["digits"]


def test_main_table_seeds_stage_rejects_an_unknown_part(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["main_table.py", "--stages", "seeds:digits|shape"])
    with pytest.raises(SystemExit):
        main_table.main()
    assert "unknown parts" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


def test_t_critical_is_students_two_sided_5_percent():
    assert seed_spread.t_critical(3) == pytest.approx(4.302652729911275)
    assert seed_spread.t_critical(2) == pytest.approx(12.706204736174698)
    assert seed_spread.t_critical(5) == pytest.approx(stats.t.ppf(0.975, 4))
    assert math.isnan(seed_spread.t_critical(1))


def test_paired_difference_numbers():
    d = seed_spread.paired([8.0, 13.0, 9.0], [10.0, 14.0, 12.0])   # differences -2, -1, -3
    assert d["n"] == 3 and d["mean"] == pytest.approx(-2.0)
    assert d["se"] == pytest.approx(1 / math.sqrt(3))
    assert d["t"] == pytest.approx(-2.0 * math.sqrt(3))
    same = seed_spread.paired([1.0, 2.0], [1.0, 2.0])              # bit-identical arms
    assert same["mean"] == 0 and same["se"] == 0 and math.isnan(same["t"])
    shift = seed_spread.paired([2.0, 3.0], [1.0, 2.0])             # a constant shift
    assert shift["t"] == math.inf
    one = seed_spread.paired([5.0], [4.0])
    assert one["n"] == 1 and one["se"] == 0 and math.isnan(one["t"])


def _d(mean, t, n=3):
    return {"n": n, "mean": mean, "se": abs(mean / t), "t": t}


def _quality(fd, recall=None, realism=None, n=3):
    zero = _d(0.0, float("nan"), n)
    return {"fd": fd, "recall": recall or zero, "realism": realism or zero}


def test_verdict_flips_when_t_crosses_the_critical_value():
    crit = seed_spread.t_critical(3)
    assert seed_spread.verdict(_quality(_d(-2.0, -crit * 0.999))) == "no difference detected"
    assert seed_spread.verdict(_quality(_d(-2.0, -crit * 1.001))) == "better (FD)"
    assert seed_spread.verdict(_quality(_d(+2.0, crit * 1.001))) == "worse (FD)"
    assert seed_spread.verdict(_quality(_d(-2.0, -crit * 1.001),
                                        recall=_d(-0.1, -crit * 1.001))) == (
        "mixed (better: FD; worse: recall)")
    assert seed_spread.verdict(_quality(_d(1.0, 5.0), realism=_d(0.1, 5.0))) == (
        "mixed (better: judged real; worse: FD)")
    # With two seeds the same t is not enough (critical value 12.71).
    assert seed_spread.verdict(_quality(_d(-2.0, -5.0, n=2), n=2)) == "no difference detected"
    assert seed_spread.verdict(_quality(_d(-2.0, float("nan"), n=1), n=1)) == (
        "cannot be decided (1 seed)")


def test_spread_and_pooled():
    rows = [{"fd": 10.0}, {"fd": 14.0}, {"fd": 12.0}]
    assert seed_spread.spread(rows, ["fd"])["fd"] == pytest.approx(2.0)
    assert math.isnan(seed_spread.spread(rows[:1], ["fd"])["fd"])
    pooled = seed_spread.pooled([{"fd": 2.0}, {"fd": 4.0}, {"fd": float("nan")}], ["fd"])
    assert pooled["fd"] == pytest.approx(math.sqrt(10.0))


# ----------------------------------------------------------------------------------------------
# Synthetic finished cells.
# ----------------------------------------------------------------------------------------------


def _write_eval(root, name, setting, values, active=None):
    """A finished evaluation cell (and, with ``active``, its RL cell's metrics log)."""
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text(json.dumps({"seconds": 60}))
    rewards = {"classifier_logprob": -5.0, "contrast": 0.5, "shapes_rule": 0.5, "saturation": 0.1,
               table_sweeps.reward_name(setting): values["reward"]}
    quality = {k: values[k] for k, _ in table_sweeps.QUALITY}
    (cell / "evaluation.json").write_text(json.dumps(
        {"generated": {"rewards": rewards, "quality": quality}, "step": 12,
         "norm_ratio": {"mean": values["rho"]}}))
    if active is not None:
        rl = root / ("rl-" + name[len("eval-"):])
        rl.mkdir(parents=True)
        (rl / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": 4 * (i + 1), "train/normguard/active_frac": a})
                      for i, a in enumerate(active)))


def _values(**kw):
    v = dict(reward=0.6, fd=10.0, recall=0.3, realism=0.5, precision=0.8, out_of_range=0.1,
             rho=1.0)
    v.update(kw)
    return v


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.setattr(table_sweeps, "REPO", str(tmp_path))
    monkeypatch.setattr(table_sweeps, "RESULTS", str(tmp_path / "results"))
    return tmp_path


SETTING, METHOD = "digits_contrast", "nft"
PLAIN = {0: _values(fd=10.0, recall=0.30, reward=0.70, rho=1.06),
         1: _values(fd=14.0, recall=0.30, reward=0.74, rho=1.05),
         2: _values(fd=12.0, recall=0.30, reward=0.72, rho=1.04)}
GUARD = {0: _values(fd=8.0, recall=0.40, reward=0.66, rho=0.98),
         1: _values(fd=13.0, recall=0.41, reward=0.70, rho=0.99),
         2: _values(fd=9.0, recall=0.39, reward=0.65, rho=0.97)}


def _write_seeds(repo, seeds, guard=GUARD):
    seeds_root = repo / seeds_sweep.WORKROOT
    key = f"{SETTING}-{METHOD}"
    for k in seeds:
        _write_eval(seeds_root, f"eval-{key}-plain-s{k}", SETTING, PLAIN[k])
        _write_eval(seeds_root, f"eval-{key}-guard-s{k}", SETTING, guard[k],
                    active=[0.1 * (k + 1), 0.3 * (k + 1)])


def test_seeds_are_read_and_paired(repo):
    _write_seeds(repo, (0, 1, 2))
    seeds = seed_spread.collect()
    key = f"{SETTING}-{METHOD}"
    assert sorted(seeds["runs"][f"{key}-plain"]) == [0, 1, 2]
    assert seeds["runs"][f"{key}-guard"][2]["hinge_active"] == pytest.approx(0.6)
    assert seeds["runs"][f"{key}-guard"][0]["hinge_active"] == pytest.approx(0.2)
    assert "hinge_active" not in seeds["runs"][f"{key}-plain"][0]
    assert seed_spread.max_seeds(seeds["runs"]) == 3
    assert f"{seeds_sweep.WORKROOT}/eval-digits_logprob-nft-plain-s1" in seeds["missing"]
    lines, records = seed_spread.delta_md(seeds["runs"])
    (r,) = [r for r in records if r["setting"] == SETTING and r["method"] == METHOD]
    assert r["seeds"] == [0, 1, 2] and len(records) == 1
    fd = r["paired"]["fd"]                       # differences -2, -1, -3
    assert fd["mean"] == pytest.approx(-2.0) and fd["se"] == pytest.approx(1 / math.sqrt(3))
    assert fd["t"] == pytest.approx(-2 * math.sqrt(3))            # |t| 3.46 < 4.30: not enough
    rec = r["paired"]["recall"]                  # differences 0.10, 0.11, 0.09
    assert rec["mean"] == pytest.approx(0.1) and rec["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert rec["t"] == pytest.approx(10 * math.sqrt(3))           # 17.3 > 4.30: better
    assert r["verdict"] == "better (recall)"
    assert r["reward"] == pytest.approx(np.mean([-0.04, -0.04, -0.07]))
    assert r["rho_plain"] == pytest.approx(1.05) and r["rho_guard"] == pytest.approx(0.98)
    assert r["hinge_active"] == pytest.approx(np.mean([0.2, 0.4, 0.6]))
    row = next(line for line in lines if line.startswith(f"| {SETTING} | {METHOD} |"))
    assert "| 3 |" in row and "-2.00 ± 0.58 (t=-3.5)" in row and "better (recall)" in row
    # Mean ± s.e. of each arm, and the seed spread of the unguarded runs.
    table = seed_spread.mean_table_md(seeds["runs"])
    plain_row = next(line for line in table if line.startswith(f"| {SETTING} | nft unguarded"))
    assert "| 3 | 0.720 ± 0.012 | 12.00 ± 1.15 |" in plain_row
    spread_lines, spreads = seed_spread.spread_md(seeds["runs"])
    assert spreads[SETTING]["methods"][METHOD]["fd"] == pytest.approx(2.0)
    assert spreads[SETTING]["pooled"]["fd"] == pytest.approx(2.0)   # the only method with seeds
    assert math.isnan(spreads["shapes_rule"]["pooled"]["fd"])


def test_a_recall_that_flips_sign_is_no_verdict(repo):
    guard = {k: dict(v) for k, v in GUARD.items()}
    guard[2]["recall"] = 0.20                    # differences 0.10, 0.11, -0.10
    _write_seeds(repo, (0, 1, 2), guard)
    seeds = seed_spread.collect()
    _, (r,) = seed_spread.delta_md(seeds["runs"])
    assert r["verdict"] == "no difference detected"


def test_single_seed_falls_back_without_a_verdict(repo):
    _write_seeds(repo, (0,))
    seeds = seed_spread.collect()
    assert seed_spread.max_seeds(seeds["runs"]) == 1
    lines, (r,) = seed_spread.delta_md(seeds["runs"])
    assert r["verdict"] == "cannot be decided (1 seed)" and r["fd"] == pytest.approx(-2.0)
    row = next(line for line in lines if line.startswith(f"| {SETTING} | {METHOD} |"))
    assert "| -2.00 |" in row and "±" not in row
    assert "no verdict" in seed_spread.noise_md(1) and "12.71" in seed_spread.noise_md(1)
    assert "no verdict" not in seed_spread.noise_md(3) and "4.30" in seed_spread.noise_md(3)
    seed_spread.report()
    report = (repo / "results" / "main_table_seeds.md").read_text()
    assert "cannot be decided (1 seed)" in report and "no verdict" in report
    assert not (repo / "results" / "main_table_seeds_paired.png").exists()  # nothing to draw


def test_report_with_three_seeds(repo):
    _write_seeds(repo, (0, 1, 2))
    seed_spread.report()
    report = (repo / "results" / "main_table_seeds.md").read_text()
    assert "| digits_contrast | nft unguarded | 3 | 0.720 ± 0.012 |" in report
    assert "- digits: 6 cells" in report and seed_spread.machine() in report
    assert "- shapes: no cell finished." in report
    assert (repo / "results" / "main_table_seeds_paired.png").stat().st_size > 0
    saved = json.loads((repo / "results" / "main_table_seeds.json").read_text())
    (r,) = saved["deltas"]
    assert r["verdict"] == "better (recall)" and r["seeds"] == [0, 1, 2]
    assert saved["spread"][SETTING]["methods"][METHOD]["fd"] == pytest.approx(2.0)
    assert set(saved["cells"]) == {f"eval-{SETTING}-{METHOD}-{arm}-s{k}"
                                   for arm in ("plain", "guard") for k in (0, 1, 2)}


def test_a_later_session_reads_the_earlier_cells_back_from_the_json(repo):
    """Cells of an earlier session (workdir gone, fresh machine) come from the committed json;
    a cell finished in this session's workdir wins over its archived record."""
    _write_seeds(repo, (0, 1, 2))
    first = seed_spread.report()
    import shutil
    shutil.rmtree(repo / seeds_sweep.WORKROOT)
    again = seed_spread.report()
    for key in ("deltas", "cells", "spread"):   # as text: nan != nan
        assert json.dumps(again[key], sort_keys=True) == json.dumps(first[key], sort_keys=True)
    report = (repo / "results" / "main_table_seeds.md").read_text()
    assert "(6 read from the committed json)" in report
    # This session reruns seed 2's unguarded cell with another result: the workdir wins.
    _write_eval(repo / seeds_sweep.WORKROOT, f"eval-{SETTING}-{METHOD}-plain-s2", SETTING,
                _values(fd=30.0, reward=0.72, rho=1.04))
    third = seed_spread.report()
    assert third["runs"][f"{SETTING}-{METHOD}-plain"][2]["fd"] == 30.0
    assert third["cells"][f"eval-{SETTING}-{METHOD}-plain-s2"]["summary"]["fd"] == 30.0


def test_a_half_run_on_two_machines_is_flagged():
    cell = {"summary": {}, "finished": "2026-12-06", "source": "workdir"}
    lines = seed_spread.provenance_md({
        "eval-digits_logprob-nft-plain-s0": {**cell, "machine": "A"},
        "eval-digits_logprob-nft-plain-s1": {**cell, "machine": "B", "source": "archive"},
        "eval-base-digits-b1": {**cell, "machine": "A"},
        "eval-shapes_rule-awm-guard-s2": {**cell, "machine": "A"}})
    assert lines[0].startswith("- digits: 2 cells") and "More than one machine" in lines[0]
    assert "(1 read from the committed json)" in lines[0]
    assert lines[1].startswith("- shapes: 1 cells") and "More than one" not in lines[1]
    assert lines[2].startswith("- re-pretrained bases: 1 cells")


def test_rebase_spread_against_the_fixed_base(repo):
    _write_seeds(repo, (0, 1, 2))
    seeds_root = repo / seeds_sweep.WORKROOT
    _write_eval(seeds_root, "eval-base-digits", SETTING, _values(fd=2.0, reward=0.5))
    rebased = {1: (20.0, 0.30), 2: (6.0, 0.52)}   # (FD, recall) of the unguarded run on base k
    for k, (fd, recall) in rebased.items():
        _write_eval(seeds_root, f"eval-base-digits-b{k}", SETTING, _values(fd=2.0 + k))
        _write_eval(seeds_root, f"eval-{SETTING}-{METHOD}-plain-b{k}", SETTING,
                    _values(fd=fd, recall=recall))
        _write_eval(seeds_root, f"eval-{SETTING}-{METHOD}-guard-b{k}", SETTING,
                    _values(fd=fd - 1.0, recall=recall))
    seeds = seed_spread.collect()
    assert sorted(seeds["rebase"]["base"]) == [0, 1, 2]
    assert seeds["rebase"]["plain"][0] == seeds["runs"][f"{SETTING}-{METHOD}-plain"][0]
    lines, out = seed_spread.rebase_md(seeds)
    assert out["plain/fixed"]["fd"] == pytest.approx(2.0)                   # 10, 14, 12
    assert out["plain/rebase"]["fd"] == pytest.approx(np.std([10.0, 20.0, 6.0], ddof=1))
    assert out["base"]["fd"] == pytest.approx(1.0)                          # 2, 3, 4
    assert "rho" not in out["base"]
    fd = out["paired"]["fd"]                                                # -2, -1, -1
    assert fd["n"] == 3 and fd["mean"] == pytest.approx(-4 / 3)
    assert fd["se"] == pytest.approx(np.std([-2, -1, -1], ddof=1) / math.sqrt(3))
    assert any(line.startswith("| unguarded, base re-pretrained") and "| 0,1,2 |" in line
               for line in lines)
    assert "base seeds 0, 1, 2" in lines[-1]


def test_rebase_without_cells_says_so(repo):
    seeds = seed_spread.collect()
    lines, out = seed_spread.rebase_md(seeds)
    assert out["paired"] is None and "none finished" in lines[-1]


def test_wall_time_counts_the_seeds_and_the_rebased_pretraining(repo):
    _write_seeds(repo, (0, 1))
    marker = repo / seeds_sweep.rebase_workdir(1) / "sweep_done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"seconds": 510}))
    line = seed_spread.wall_time_line()
    assert "4 cells, 4 min, and 1 re-pretrained bases, 8 min" in line
    assert "table 0 cells" in main_table.wall_time_md()   # the seeds are not the table's


def test_hinge_activity_counts_a_resumed_iteration_once(repo):
    """A run resumed after iteration 4 logs it again: the last line of a step wins."""
    cell = repo / "root" / "rl-x"
    cell.mkdir(parents=True)
    lines = [{"step": 4, "train/normguard/active_frac": 0.9},
             {"step": 4, "train/normguard/active_frac": 0.3},   # the resumed run's line
             {"step": 8, "train/normguard/active_frac": 0.5},
             {"step": 8, "train/loss": 1.0}]
    (cell / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert table_sweeps.hinge_activity("root", "rl-x") == pytest.approx(0.4)
    assert table_sweeps.hinge_activity("root", "missing") is None


def test_holm_step_down():
    """Holm: the i-th smallest p is compared with α/(m − i) and the first failure stops; nan
    p-values are untested (not rejected, not counted in m)."""
    nan = float("nan")
    assert seed_spread.holm([0.01, 0.04, 0.03]) == [True, False, False]      # 0.03 > 0.05/2
    assert seed_spread.holm([0.001, 0.02, 0.5]) == [True, True, False]       # 0.02 ≤ 0.05/2
    assert seed_spread.holm([0.03, 0.03]) == [False, False]                  # 0.03 > 0.05/2
    assert seed_spread.holm([0.02, nan]) == [True, False]                    # m = 1
    assert seed_spread.holm([]) == []


def test_p_value_matches_the_critical_value():
    crit = seed_spread.t_critical(3)
    assert seed_spread.p_value(_d(-1.0, crit)) == pytest.approx(0.05, rel=1e-9)
    assert seed_spread.p_value(_d(-1.0, -math.inf)) == 0.0
    assert math.isnan(seed_spread.p_value(_d(-1.0, float("nan"), n=1)))


def test_holm_verdict_over_the_whole_table():
    """Every pair of the table with PLAIN/GUARD's recall gain (t ≈ 4.9 on 3 seeds, p ≈ 0.003):
    each is "better" on its own, none survives Holm over 3 × 12 tests (p must beat 0.05/36 for
    the smallest); one pair with a near-exact gain (t in the hundreds) survives alone."""
    runs = {}
    pairs = [f"{s}-{m}" for s in rl_table.SETTINGS for m in main_sweep.METHODS]
    for key in pairs:
        runs[f"{key}-plain"], runs[f"{key}-guard"] = dict(PLAIN), dict(GUARD)
    sure = pairs[0]
    runs[f"{sure}-guard"] = {k: dict(PLAIN[k], recall=PLAIN[k]["recall"] + 0.1 + 1e-4 * k)
                             for k in PLAIN}
    _, records = seed_spread.delta_md(runs)
    assert len(records) == len(pairs) == 12
    by_pair = {f"{r['setting']}-{r['method']}": r for r in records}
    assert by_pair[sure]["verdict"] == by_pair[sure]["verdict_holm"] == "better (recall)"
    for key in pairs[1:]:
        r = by_pair[key]
        assert r["paired"]["recall"]["p"] == pytest.approx(0.0033, abs=2e-4)
        assert r["verdict"] == "better (recall)"
        assert r["verdict_holm"] == "no difference detected"
    # FD and recall are tested in every pair but the sure one, whose FD is equal in both arms
    # (no s.e., untested), as judged real is everywhere: 2 × 11 + 1.
    assert {r["holm_tests"] for r in records} == {23}

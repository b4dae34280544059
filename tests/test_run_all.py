"""experiments/run_all.py: stage selection, timing of every attempt, skipping finished stages."""

import json
import sys

import pytest

from experiments import run_all
from normguard_jax.objectives import METHODS


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """Two fake stages: ``ok`` succeeds, ``flaky`` fails until a marker file exists."""
    marker = tmp_path / "fixed"
    monkeypatch.setattr(run_all, "STAGES", {
        "ok": [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'a').write('x')"],
        "flaky": [sys.executable, "-c",
                  f"import os, sys; sys.exit(0 if os.path.exists({str(marker)!r}) else 3)"],
    })
    monkeypatch.setattr(run_all, "CORE", ("ok", "flaky"))
    monkeypatch.setattr(run_all, "TIMINGS", str(tmp_path / "timings.json"))
    monkeypatch.setattr(run_all, "REPORT", str(tmp_path / "compute.md"))
    return tmp_path, marker


def test_parse_stages_orders_and_rejects():
    assert run_all.parse_stages("core") == list(run_all.CORE)
    assert run_all.parse_stages("all") == list(run_all.STAGES)
    assert run_all.parse_stages("validity,main_table_digits") == ["main_table_digits", "validity"]
    with pytest.raises(SystemExit, match="unknown stage"):
        run_all.parse_stages("main_table_digits,mian_table")


def test_seed_stages_are_extended_and_run_one_part_each():
    seeds = [n for n in run_all.STAGES if n.startswith("main_table_seeds_")]
    assert seeds == ["main_table_seeds_digits", "main_table_seeds_shapes",
                     "main_table_seeds_rebase"]
    assert not set(seeds) & set(run_all.CORE)
    assert run_all.parse_stages("main_table_seeds_rebase,main_table_seeds_digits") == [
        "main_table_seeds_digits", "main_table_seeds_rebase"]
    for name in seeds:
        part = name.rsplit("_", 1)[1]
        command = run_all.STAGES[name]
        assert command[1] == "experiments/main_table.py"
        stages = command[command.index("--stages") + 1].split(",")
        # The seeds stage writes its own report; "analyse" would rewrite main_table.md.
        assert stages[-1] == f"seeds:{part}" and "analyse" not in stages
        assert stages[0] == f"bases:{'shapes' if part == 'shapes' else 'digits'}"


def test_study_stages_are_extended_and_run_their_scripts():
    for name in ("inflation_search", "lambda_calibration", "guard_variants"):
        assert name not in run_all.CORE
        assert run_all.STAGES[name][1:] == [f"experiments/{name}.py"]
        assert run_all.parse_stages(name) == [name]
        assert f"``{name}``" in run_all.__doc__


def test_norm_analyses_reads_every_method_both_arms():
    runs = run_all.STAGES["norm_analyses"][run_all.STAGES["norm_analyses"].index("--runs") + 1]
    names = [r.rsplit("/", 1)[1] for r in runs.split(",")]
    assert len(names) == 2 * len(METHODS) and len(set(names)) == len(names)
    for method in METHODS:
        assert {f"rl-digits_logprob-{method}-plain",
                f"rl-digits_logprob-{method}-guard"} <= set(names)


def test_failed_attempt_is_timed_then_resumed_and_finished_stage_skipped(fake):
    tmp, marker = fake
    assert run_all.main([]) == 1                      # ok runs, flaky fails
    t = json.loads((tmp / "timings.json").read_text())
    assert t["ok"]["status"] == "done" and t["flaky"]["status"] == "failed"
    assert [a["status"] for a in t["flaky"]["attempts"]] == ["failed"]
    marker.write_text("")
    assert run_all.main([]) == 0                      # ok is skipped, flaky succeeds
    t = json.loads((tmp / "timings.json").read_text())
    assert (tmp / "ran").read_text() == "x"           # ok ran exactly once
    assert len(t["ok"]["attempts"]) == 1
    assert [a["status"] for a in t["flaky"]["attempts"]] == ["failed", "done"]
    report = (tmp / "compute.md").read_text()
    assert "| flaky | yes | done | 2 |" in report and "all finished" in report
    assert run_all.main(["--redo", "ok"]) == 0        # --redo reruns a finished stage ...
    assert (tmp / "ran").read_text() == "xx"
    ok = json.loads((tmp / "timings.json").read_text())["ok"]
    assert len(ok["attempts"]) == 1 and len(ok["replaced"]) == 1  # ... and only its time counts
    assert ok["attempts"][0]["started"] >= ok["replaced"][0]["started"]
    (tmp / "compute.md").unlink()
    assert run_all.main(["--report"]) == 0            # rewrites the report, runs nothing
    assert (tmp / "ran").read_text() == "xx" and "| ok | yes | done | 1 |" in (
        tmp / "compute.md").read_text()


def test_sigterm_is_passed_on_and_the_attempt_recorded(tmp_path, monkeypatch):
    """A SIGTERM to run_all reaches the stage, which stops; the attempt is kept as interrupted."""
    started = tmp_path / "started"
    stage = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             f"open({str(started)!r}, 'w').close()\n"
             "time.sleep(60)\n")
    script = tmp_path / "driver.py"
    script.write_text(
        "import sys\n"
        "from experiments import run_all as m\n"
        f"m.STAGES = {{'slow': [sys.executable, '-c', {stage!r}]}}\n"
        "m.CORE = ('slow',)\n"
        f"m.TIMINGS = {str(tmp_path / 'timings.json')!r}\n"
        f"m.REPORT = {str(tmp_path / 'compute.md')!r}\n"
        "sys.exit(m.main([]))\n")
    import signal as signal_module
    import subprocess
    import time
    proc = subprocess.Popen([sys.executable, str(script)])
    for _ in range(300):
        if started.exists():
            break
        time.sleep(0.05)
    assert started.exists()
    proc.send_signal(signal_module.SIGTERM)
    assert proc.wait(timeout=30) == 130
    t = json.loads((tmp_path / "timings.json").read_text())
    assert t["slow"]["status"] == "interrupted"
    assert t["slow"]["attempts"][0]["seconds"] < 30


def test_cell_times_group_finished_cells(tmp_path):
    for name, seconds in (("rl-digits_logprob-nft-plain", 120), ("rl-digits_logprob-awm-plain", 60),
                          ("eval-shapes_rule-nft-plain", 30), ("rl-shapes_rule-nft-plain", 240)):
        cell = tmp_path / "main_table" / name
        cell.mkdir(parents=True)
        (cell / "sweep_done.json").write_text(json.dumps({"seconds": seconds}))
    (tmp_path / "main_table" / "rl-digits_contrast-dpo-plain").mkdir()   # unfinished: ignored
    rows = run_all.cell_times(str(tmp_path))
    assert rows == [("main_table", "eval", "shapes", 1, 0.5),
                    ("main_table", "rl", "digits", 2, 3.0),
                    ("main_table", "rl", "shapes", 1, 4.0)]

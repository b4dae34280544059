"""experiments/main_table.py: wall time and missing-cell lines from synthetic finished cells."""

import importlib.util
import json

from conftest import REPO

_spec = importlib.util.spec_from_file_location("main_table", REPO / "experiments" / "main_table.py")
main_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(main_table)


def _done(root, name, seconds):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text(json.dumps({"seconds": seconds}))


def test_wall_time_counts_table_cells_not_the_norm_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(main_table, "REPO", str(tmp_path))
    table = tmp_path / main_table.main_sweep.WORKROOT
    _done(table, "rl-digits_logprob-nft-plain", 120)
    _done(table, "eval-digits_logprob-nft-plain", 60)
    _done(table, "rl-digits_logprob-grpo-plain", 600)        # a run_all norm cell: not the table's
    (table / "rl-digits_logprob-awm-plain").mkdir()           # unfinished
    _done(tmp_path / main_table.table_lambda.WORKROOT, "rl-digits_contrast-nft-lam1", 90)
    line = main_table.wall_time_md()
    assert "table 2 cells, 3 min" in line and "λ 1 cells, 2 min" in line
    assert "early stopping 0 cells, 0 min" in line


def test_missing_line_groups_by_workroot():
    line = main_table.missing_md(["a/b/eval-x", "a/b/eval-y", "c/rl-z"])
    assert "`a/b`: 2 (eval-x, eval-y)" in line and "`c`: 1 (rl-z)" in line
    assert main_table.missing_md([]).startswith("Every cell")

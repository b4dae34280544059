"""experiments/main_table.py and its claim modules: wall time, missing-cell lines, the
early-stopping verdicts and the sample grids, from synthetic finished cells."""

import json

import numpy as np
from PIL import Image

from configs import rl_table
from configs.sweeps import table_earlystop, table_lambda
from configs.sweeps import table_main as main_sweep
from experiments import early_stopping, main_table, sample_grids, table_sweeps


def _done(root, name, seconds):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text(json.dumps({"seconds": seconds}))


def test_wall_time_counts_table_cells_not_the_norm_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(table_sweeps, "REPO", str(tmp_path))
    table = tmp_path / main_sweep.WORKROOT
    _done(table, "rl-digits_logprob-nft-plain", 120)
    _done(table, "eval-digits_logprob-nft-plain", 60)
    _done(table, "rl-digits_logprob-grpo-plain", 600)        # a run_all norm cell: not the table's
    (table / "rl-digits_logprob-awm-plain").mkdir()           # unfinished
    _done(tmp_path / table_lambda.WORKROOT, "rl-digits_contrast-nft-lam1", 90)
    line = main_table.wall_time_md()
    assert "table 2 cells, 3 min" in line and "λ 1 cells, 2 min" in line
    assert "early stopping 0 cells, 0 min" in line


def test_missing_line_groups_by_workroot():
    line = main_table.missing_md(["a/b/eval-x", "a/b/eval-y", "c/rl-z"])
    assert "`a/b`: 2 (eval-x, eval-y)" in line and "`c`: 1 (rl-z)" in line
    assert main_table.missing_md([]).startswith("Every cell")


def _summary(reward, fd):
    return {"reward": reward, "fd": fd, "recall": 0.5}


def test_earlystop_verdicts_use_the_checkpoint_then_the_interpolated_path(monkeypatch):
    monkeypatch.setattr(rl_table, "SETTINGS", {"s": None})
    monkeypatch.setattr(main_sweep, "METHODS", ("a", "b", "c"))
    monkeypatch.setattr(table_earlystop, "STEPS", (4, 8))
    last = rl_table.ITERATIONS
    data = {"base": {"s": _summary(0.5, 2.0)},
            "main": {"s-a-plain": _summary(0.77, 51.0), "s-a-guard": _summary(0.745, 47.0),
                     "s-b-plain": _summary(0.77, 51.0), "s-b-guard": _summary(0.745, 30.0),
                     "s-c-plain": _summary(0.77, 51.0), "s-c-guard": _summary(0.70, 30.0)},
            "earlystop": {"s-a-plain-it4": _summary(0.6, 8.0),
                          "s-a-plain-it8": _summary(0.7, 26.0),
                          "s-b-plain-it4": _summary(0.6, 8.0),
                          "s-b-plain-it8": _summary(0.7, 26.0),
                          "s-c-plain-it4": _summary(0.6, 8.0),
                          "s-c-plain-it8": _summary(0.705, 31.0)}}
    _, records = early_stopping.earlystop_md(data)
    by = {r["method"]: r for r in records}
    # a: nearest checkpoint is the last (0.77, FD 51 vs guarded 47: not explained), but the path
    # between iterations 8 and 12 crosses 0.745 at FD 26 + 0.045/0.07·25 ≈ 42.1, more than the
    # noise below 47.
    assert by["a"]["matched_iteration"] == last
    assert abs(by["a"]["fd_interpolated"] - (26.0 + (0.045 / 0.07) * 25.0)) < 1e-9
    assert by["a"]["verdict"].startswith("yes, between checkpoints")
    assert "or better" in by["a"]["verdict"]
    # b: the guarded FD 30 beats both the checkpoint and the interpolated path (≈ 42.1).
    assert by["b"]["verdict"] == "no: the guarded run beats the matched checkpoint"
    # c: the nearest checkpoint (iteration 8, FD 31) already matches the guarded FD 30.
    assert by["c"]["matched_iteration"] == 8 and by["c"]["verdict"].startswith("yes: the matched")


def test_samples_put_the_largest_judged_real_change_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(table_sweeps, "REPO", str(tmp_path))
    monkeypatch.setattr(table_sweeps, "RESULTS", str(tmp_path / "results"))
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(rl_table, "SETTINGS", {"s": None})
    monkeypatch.setattr(main_sweep, "METHODS", ("a", "b", "c"))
    monkeypatch.setattr(sample_grids, "SAMPLE_PAIRS", 1)
    root = tmp_path / main_sweep.WORKROOT
    left = np.zeros((5, 4, 3), np.uint8)
    right = np.full((7, 3, 3), 100, np.uint8)
    for method in ("a", "b"):
        for arm, img in (("plain", left), ("guard", right)):
            (root / f"eval-s-{method}-{arm}").mkdir(parents=True)
            Image.fromarray(img).save(root / f"eval-s-{method}-{arm}" / "samples_eval.png")
    row = lambda realism: {"realism": realism, "fd": 1.0}
    data = {"main": {"s-a-plain": row(0.5), "s-a-guard": row(0.45),
                     "s-b-plain": row(0.8), "s-b-guard": row(0.1),    # the largest change
                     "s-c-plain": row(0.0), "s-c-guard": None}}
    lines = sample_grids.samples_md(data)
    assert "![s b](main_table_samples_s_b.png)" in lines
    assert not (tmp_path / "results" / "main_table_samples_s_a.png").exists()
    out = np.asarray(Image.open(tmp_path / "results" / "main_table_samples_s_b.png"))
    assert out.shape == (7, 4 + 12 + 3, 3)
    assert (out[:5, :4] == 0).all() and (out[5:, :4] == 255).all()   # left, padded below
    assert (out[:, 4:16] == 255).all() and (out[:, 16:] == 100).all()

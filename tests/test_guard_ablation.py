"""experiments/guard_ablation.py: statistics and matching on synthetic finished cells."""

import dataclasses
import json

import numpy as np
import pytest

from configs.sweeps import guard_ablation as ablation_config
from experiments import guard_ablation as experiment


def _write_eval(root, name, logp, fd, recall=0.5, rho=1.0):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text("{}")
    quality = {"fd": fd, "recall": recall, "realism": 0.3, "precision": 0.6,
               "out_of_range": 0.1}
    (cell / "evaluation.json").write_text(json.dumps({
        "step": 24, "norm_ratio": {"mean": rho},
        "generated": {"rewards": {"classifier_logprob": logp}, "quality": quality}}))


def _write_log(root, name, ratios):
    cell = root / name
    cell.mkdir(parents=True, exist_ok=True)
    with open(cell / "metrics.jsonl", "w") as f:
        for i, r in enumerate(ratios, 1):
            f.write(json.dumps({"step": i, "train/normguard/ratio": r,
                                "train/normguard/active_frac": float(r > 1),
                                "reward/mean": -5.0}) + "\n")


@pytest.fixture
def cells(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ST", dataclasses.replace(
        ablation_config.study(), workroot=str(tmp_path)))
    _write_eval(tmp_path, "eval-base", -6.0, 2.0)
    # Per seed: unguarded (logp, fd) and guarded (logp, fd).
    runs = {0: ((-4.0, 16.0), (-5.0, 7.0)), 1: ((-4.5, 12.0), (-5.5, 6.0)),
            2: ((-4.2, 14.0), (-4.8, 9.0))}
    for s, ((pl, pf), (gl, gf)) in runs.items():
        _write_eval(tmp_path, f"eval-plain-s{s}", pl, pf)
        _write_eval(tmp_path, f"eval-guard-s{s}", gl, gf)
        _write_log(tmp_path, f"rl-plain-s{s}", [1.0, 1.02, 1.04])
        _write_log(tmp_path, f"rl-guard-s{s}", [1.0, 0.99, 0.98])
        # Unguarded path: iteration 8 at log p -5.6 (FD 10), iteration 16 at -4.8 (FD 12).
        _write_eval(tmp_path, f"eval-plain-s{s}-it8", -5.6, 10.0)
        _write_eval(tmp_path, f"eval-plain-s{s}-it16", -4.8, 12.0)
    return runs


def test_seed_statistics_are_paired_means_and_standard_errors(cells):
    data = experiment.collect()
    # The ablation arms were not written: they are listed as missing, the rest is read.
    assert sorted(data["missing"]) == sorted(f"eval-{a}-s0" for a in ablation_config.ABLATION)
    _, stats = experiment.seed_table(data)
    diffs = np.array([g[1] - p[1] for p, g in cells.values()])  # FD guarded − unguarded
    m, se, t = stats["diff/fd"]
    np.testing.assert_allclose(m, diffs.mean())
    np.testing.assert_allclose(se, diffs.std(ddof=1) / np.sqrt(3))
    np.testing.assert_allclose(t, diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3)))
    np.testing.assert_allclose(stats["plain/reward"][0], np.mean([p[0] for p, _ in
                                                                  cells.values()]))
    assert data["final"]["plain-s1"]["hinge_active"] == pytest.approx(2 / 3)
    assert data["final"]["guard-s1"]["train_ratio_last"] == pytest.approx(0.98)


def test_earlystop_matches_the_closest_unguarded_checkpoint(cells):
    data = experiment.collect()
    _, records = experiment.earlystop_table(data)
    by_seed = {r["seed"]: r for r in records}
    # Seed 0: guarded log p -5.0; the path is 0 (-6.0), 8 (-5.6), 16 (-4.8), 24 (-4.0):
    # closest is iteration 16 (|-4.8 + 5.0| = 0.2), and the FD interpolated between 8 and 16
    # at -5.0 is 10 + (12 - 10)·(0.6/0.8) = 11.5.
    assert by_seed[0]["matched_iteration"] == 16
    np.testing.assert_allclose(by_seed[0]["fd_interpolated"], 11.5)
    # Seed 1: guarded -5.5 lies between iteration 8 (-5.6) and 16; closest is 8.
    assert by_seed[1]["matched_iteration"] == 8
    assert by_seed[1]["fd_matched"] == 10.0

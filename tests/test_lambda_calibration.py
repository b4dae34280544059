"""λ calibrated per method: the sweep's cells and λ from synthetic calibration logs
(configs/sweeps/lambda_calibration.py), and the analysis of experiments/lambda_calibration.py
on synthetic finished cells."""

import json
import os

import numpy as np
import pytest

from configs.sweeps import lambda_calibration as cal
from experiments import lambda_calibration as experiment
from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = cal.METRIC
# Calibration logs: (active_frac, ‖∇ base‖, ‖∇ penalty‖) per iteration. NFT: 3 active
# iterations (mean base 4, mean penalty 2; medians 3 and 2); the inactive ones must not count.
NFT = [(0.0, 100.0, 0.0), (0.2, 6.0, 1.0), (0.0, 50.0, 0.0), (0.4, 3.0, 2.0), (0.1, 3.0, 3.0)]
AWM = [(0.5, 1.0, 4.0), (0.5, 1.0, 4.0)]
DPO = [(0.0, 2.0, 0.0), (0.0, 2.0, 0.0)]   # the hinge never active: no λ


def _write_rl(root, name, rows, weight=0.0, ratio=1.0):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / sweep.DONE_MARKER).write_text(json.dumps({"seconds": 60.0}))
    with open(cell / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "uptime": 1.0}) + "\n")  # a row without the norms
        for i, (act, base, pen) in enumerate(rows, 1):
            f.write(json.dumps({"step": i, P + "active_frac": act, P + "grad_norm_base": base,
                                P + "grad_norm_penalty_unweighted": pen,
                                P + "grad_norm_penalty": weight * pen,
                                P + "grad_norm_ratio": weight * pen / base if act else 0.0,
                                P + "ratio": ratio + 0.01 * i, "reward/mean": 0.1 * i}) + "\n")


def _write_eval(root, name, reward, rho, oor=0.1):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / sweep.DONE_MARKER).write_text(json.dumps({"seconds": 30.0}))
    quality = {"fd": 3.0, "recall": 0.5, "realism": 0.3, "precision": 0.6, "out_of_range": oor}
    (cell / "evaluation.json").write_text(json.dumps({
        "step": 12, "norm_ratio": {"mean": rho},
        "generated": {"rewards": {"contrast": reward, "classifier_logprob": -5.0},
                      "quality": quality}}))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A workroot with the calibration cells of NFT, AWM and DPO finished (no fraction cells)."""
    monkeypatch.setattr(cal, "REPO", str(tmp_path))
    monkeypatch.setattr(experiment, "REPO", str(tmp_path))
    monkeypatch.setattr(experiment.table_sweeps, "REPO", str(tmp_path))
    monkeypatch.setattr(experiment, "RESULTS", str(tmp_path / "results"))
    r = tmp_path / cal.WORKROOT
    _write_rl(r, "rl-nft-calib", NFT)
    _write_rl(r, "rl-awm-calib", AWM)
    _write_rl(r, "rl-dpo-calib", DPO)
    return r


# ----------------------------------------------------------------------------------------------
# The sweep config.
# ----------------------------------------------------------------------------------------------


def test_only_active_iterations_count_mean_and_median(root):
    n = cal.calibration_norms("nft")
    assert n["iterations"] == 5 and n["active_iterations"] == 3
    assert n["active_steps"] == [2, 4, 5]
    assert n["mean_base"] == pytest.approx(4.0) and n["mean_penalty"] == pytest.approx(2.0)
    assert n["median_base"] == pytest.approx(3.0) and n["median_penalty"] == pytest.approx(2.0)


def test_lambdas_from_the_calibration_means(root):
    lam = cal.calibrated_lambdas("nft")     # fraction · 4 / 2
    assert lam == {0.03: pytest.approx(0.06), 0.1: pytest.approx(0.2), 0.3: pytest.approx(0.6)}
    assert cal.calibrated_lambdas("awm")[0.1] == pytest.approx(0.025)   # 0.1 · 1 / 4


def test_not_calibrated_when_unfinished_or_never_active(root):
    with pytest.raises(cal.NotCalibrated, match="never active in the 2"):
        cal.calibrated_lambdas("dpo")
    os.remove(root / "rl-awm-calib" / sweep.DONE_MARKER)      # the log alone is not enough
    with pytest.raises(cal.NotCalibrated, match="has not finished"):
        cal.calibrated_lambdas("awm")


def test_cells_names_and_overrides(root, monkeypatch, capsys):
    monkeypatch.chdir(REPO)   # job configs are named relative to the repository
    cells = {c.name: c for c in sweep.expand(cal.get_config())}
    # DPO's hinge was never active: no fraction cells, the reason on stderr.
    assert "never active" in capsys.readouterr().err
    expected = {"eval-base"}
    for m in cal.METHODS:
        arms = ["calib", "lam0.1"] + (["f3", "f10", "f30"] if m != "dpo" else [])
        expected |= {f"{k}-{m}-{a}" for k in ("rl", "eval") for a in arms}
    assert set(cells) == expected
    loaded = {}   # every override is a field of its job config (sweep.check would also read
    for cell in cells.values():   # the done markers under the repository's own workroot)
        if cell.config not in loaded:
            loaded[cell.config] = sweep.load_job_config(cell.config)
        sweep.check_overrides(cell, loaded[cell.config])
    over = dict(cells["rl-nft-f10"].overrides)
    assert over["normguard.weight"] == pytest.approx(0.2)
    assert over["normguard.log_grad_norms"] is True
    assert over["train.iterations"] == cal.ITERATIONS and over["train.log_every"] == 1
    assert over["seed"] == 0
    assert dict(cells["rl-awm-f30"].overrides)["normguard.weight"] == pytest.approx(0.075)
    assert dict(cells["rl-nft-calib"].overrides)["normguard.weight"] == 0.0
    assert dict(cells["rl-dpo-lam0.1"].overrides)["normguard.weight"] == 0.1
    assert cells["rl-nft-f3"].config == "configs/rl_table.py:nft,digits_contrast"
    ev = cells["eval-nft-f3"]
    assert dict(ev.overrides) == {"checkpoint": f"{cal.WORKROOT}/rl-nft-f3"}
    assert ev.group == cells["rl-nft-f3"].group
    order = list(cells)
    assert order.index("eval-nft-f3") == order.index("rl-nft-f3") + 1
    # Every fraction cell before the first λ = 0.1 cell (those are dropped first when short).
    assert max(order.index(n) for n in order if "-f" in n) < order.index("rl-nft-lam0.1")


def test_calibrate_pass_has_only_the_calibration_cells(root, monkeypatch):
    monkeypatch.chdir(REPO)
    names = [c.name for c in sweep.expand(cal.get_config("calibrate"))]
    assert names == ["eval-base"] + [f"{k}-{m}-calib" for m in cal.METHODS for k in ("rl", "eval")]
    with pytest.raises(ValueError, match="calibrate"):
        cal.get_config("fractions")


def test_uncalibrated_sweep_has_no_fraction_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(cal, "REPO", str(tmp_path))   # nothing has run
    names = [c.name for c in sweep.expand(cal.get_config())]
    assert not [n for n in names if "-f" in n]
    assert "rl-awm-lam0.1" in names


# ----------------------------------------------------------------------------------------------
# The analysis.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def finished(root):
    """NFT's f10 and λ = 0.1 cells and every evaluation of NFT, plus the base's."""
    _write_eval(root, "eval-base", 0.50, 1.00, oor=0.05)
    _write_eval(root, "eval-nft-calib", 0.70, 1.05, oor=0.6)
    # f10 (λ 0.2): active in 2 of 3 iterations; ratios 0.2·1/4 = 0.05 and 0.2·2/2 = 0.2.
    _write_rl(root, "rl-nft-f10", [(0.5, 4.0, 1.0), (0.0, 4.0, 0.0), (0.3, 2.0, 2.0)],
              weight=0.2, ratio=0.95)
    _write_eval(root, "eval-nft-f10", 0.65, 0.99, oor=0.4)
    _write_rl(root, "rl-nft-lam0.1", [(0.5, 4.0, 2.0)], weight=0.1)
    return root


def test_analysis_achieved_fraction_and_rows(finished):
    data = experiment.collect()
    nft = data["methods"]["nft"]
    f10 = nft["arms"]["f10"]
    assert f10["lambda"] == pytest.approx(0.2) and f10["target_fraction"] == 0.1
    assert f10["stats"]["achieved_fraction"] == pytest.approx((0.05 + 0.2) / 2)
    assert f10["stats"]["active_iterations"] == 2 and f10["stats"]["iterations"] == 3
    assert f10["stats"]["hinge_active"] == pytest.approx(0.8 / 3)
    assert nft["default_fraction"] == pytest.approx(0.1 * 2 / 4)     # λ = 0.1 as a fraction
    assert nft["arms"]["lam0.1"]["eval"] is None
    assert "eval-nft-lam0.1" in data["missing"] and "rl-nft-f3" in data["missing"]
    assert data["methods"]["dpo"]["calibration"] is None
    lines = experiment.method_md("nft", nft, data["base"])
    row = next(line for line in lines if line.startswith("| f10 |"))
    # Of means: mean λ‖∇ penalty‖ = 0.2 · (1 + 2) / 2 = 0.3 over mean ‖∇ base‖ = (4 + 2) / 2.
    assert f10["stats"]["achieved_of_means"] == pytest.approx(0.3 / 3.0)
    assert row.startswith("| f10 | 0.2 | 10.0 % | 12.5 % (10.0 %) | 2 of 3 | 0.267 |")
    assert row.endswith("| 0.650 | 3.00 | 0.500 | 0.300 | 0.400 | 0.990 |")
    assert any(line.startswith("| unguarded (calib) | 0 | – | – | 3 of 5 |") for line in lines)
    assert any(line.startswith("| base |") and "0.500" in line for line in lines)


def test_analyse_writes_results_and_flags_the_unreliable(finished):
    lines = experiment.analyse("python experiments/lambda_calibration.py")
    assert lines[0] == "Command: `python experiments/lambda_calibration.py`"
    out = experiment.RESULTS
    for name in ("lambda_calibration.md", "lambda_calibration.json", "lambda_calibration.png",
                 "lambda_calibration_training.png"):
        assert os.path.exists(os.path.join(out, name)), name
    text = "\n".join(lines)
    assert "| nft | 3 of 5 | 4.000 (3.000) | 2.000 (2.000) | 0.06 / 0.2 / 0.6 |" in text
    assert "dpo: no λ" in text                     # never active in its calibration
    assert "awm: the hinge was active in only 2 of 2" in text
    assert "nft: the mean-based λ is 1.33×" in text  # (4/2) / (3/2)
    saved = json.load(open(os.path.join(out, "lambda_calibration.json")))
    assert np.isclose(saved["data"]["methods"]["nft"]["lambdas"]["f30"], 0.6)

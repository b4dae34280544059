"""experiments/inflation_search.py: reading finished cells and the per-candidate verdict."""

import json

import numpy as np
import pytest

from configs.sweeps import inflation_search as search_config
from experiments import inflation_search as experiment


def _write_eval(root, name, reward, rho, reward_name="contrast"):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text("{}")
    quality = {"fd": 3.0, "recall": 0.5, "realism": 0.3, "precision": 0.6, "out_of_range": 0.1}
    (cell / "evaluation.json").write_text(json.dumps({
        "step": 24, "norm_ratio": {"mean": rho},
        "generated": {"rewards": {reward_name: reward, "classifier_logprob": -5.0},
                      "quality": quality}}))


def _write_rl(root, name, ratios):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text("{}")
    with open(cell / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/x": 1.0}) + "\n")  # rows without the ratio
        for i, r in enumerate(ratios, 1):
            f.write(json.dumps({"step": i, "train/normguard/ratio": r, "reward/mean": 0.1 * i})
                    + "\n")


@pytest.fixture
def cells(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "REPO", str(tmp_path))
    monkeypatch.setattr(experiment.table_sweeps, "REPO", str(tmp_path))
    root = tmp_path / search_config.WORKROOT
    _write_eval(root, "eval-base-digits_contrast", 0.5, 1.0)
    _write_eval(root, "eval-base-digits_logprob", -6.0, 1.0, "classifier_logprob")
    # nft_contrast: both seeds inflate (sampling ρ 1.06, 1.08); awm_contrast: seed 1 does not.
    for seed, rho in ((0, 1.06), (1, 1.08)):
        _write_rl(root, f"rl-nft_contrast-s{seed}", [1.0, 1.02, 1.04, 1.06, 1.08, 1.10])
        _write_eval(root, f"eval-nft_contrast-s{seed}", 0.7, rho)
    for seed, rho in ((0, 1.07), (1, 1.01)):
        _write_rl(root, f"rl-awm_contrast-s{seed}", [1.0, 0.99])
        _write_eval(root, f"eval-awm_contrast-s{seed}", 0.6, rho)
    _write_rl(root, "rl-grpo_logprob-s0", [1.1])   # RL finished, evaluation not yet
    return root


def test_training_log_keeps_only_rows_with_the_ratio(cells):
    log = experiment.training_log("rl-nft_contrast-s0")
    assert log["iteration"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(log["reward"], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_verdict_needs_every_finished_seed_at_the_target(cells):
    data = experiment.collect()
    ver = experiment.verdicts(data)
    assert ver["nft_contrast"]["qualifies"] is True
    assert ver["nft_contrast"]["min_sampling_rho"] == pytest.approx(1.06)
    # Mean of the last 4 training ratios: (1.04 + 1.06 + 1.08 + 1.10) / 4.
    np.testing.assert_allclose(ver["nft_contrast"]["train_rho_last"], [1.07, 1.07])
    assert ver["awm_contrast"]["qualifies"] is False
    assert ver["grpo_logprob"]["qualifies"] is None          # no evaluation yet
    assert "eval-grpo_logprob-s0" in data["missing"]
    assert "rl-nft_logprob_cfg-s0" in data["missing"]
    lines = experiment.table_md(data, ver)
    assert any(line.startswith("| nft_contrast | 0 | 1.070 | 1.100 | 1.060 | 0.500 → 0.700")
               for line in lines)


def test_sweep_cells_are_unguarded_and_log_every_iteration():
    c = search_config.get_config()
    rl_grids = [g for g in c.grids if g["name"].startswith("rl-")]
    assert len(rl_grids) == len(search_config.CANDIDATES)
    for g in rl_grids:
        assert g["fixed"]["normguard.weight"] == 0.0
        assert g["fixed"]["train.log_every"] == 1
        assert set(g["axes"]["seed"]) == {f"s{s}" for s in search_config.SEEDS}

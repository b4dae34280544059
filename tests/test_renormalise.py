"""experiments/renormalise.py and its sweep: run selection, cells, paired statistics on
synthetic finished cells."""

import json

import numpy as np
import pytest

from configs.sweeps import renormalise as renorm_config
from experiments import renormalise as experiment
from experiments import sweep

RUNS = [
    {"name": "nft_contrast-s0", "candidate": "nft_contrast", "seed": 0,
     "workdir": "workdir/sweeps/inflation_search/rl-nft_contrast-s0",
     "setting": "digits_contrast", "eval": {}},
    {"name": "nft_contrast-s1", "candidate": "nft_contrast", "seed": 1,
     "workdir": "workdir/sweeps/inflation_search/rl-nft_contrast-s1",
     "setting": "digits_contrast", "eval": {}},
    {"name": "nft_logprob_cfg-s0", "candidate": "nft_logprob_cfg", "seed": 0,
     "workdir": "workdir/sweeps/inflation_search/rl-nft_logprob_cfg-s0",
     "setting": "digits_logprob", "eval": {"sample.guidance_scale": 1.5}},
]


def _write_eval(root, name, reward, fd, rho=1.06, applied=None, reward_name="contrast"):
    cell = root / name
    cell.mkdir(parents=True)
    (cell / "sweep_done.json").write_text("{}")
    quality = {"fd": fd, "recall": 0.5, "realism": 0.3, "precision": 0.6, "out_of_range": 0.1}
    norm_ratio = {"mean": rho, **({"applied": {"mean": applied}} if applied else {})}
    (cell / "evaluation.json").write_text(json.dumps({
        "step": 24, "norm_ratio": norm_ratio,
        "generated": {"rewards": {"classifier_logprob": -5.0, reward_name: reward},
                      "quality": quality}}))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for module in (experiment, experiment.table_sweeps, renorm_config):
        monkeypatch.setattr(module, "REPO", str(tmp_path))
    monkeypatch.setattr(experiment, "RESULTS", str(tmp_path / "results"))
    runs_file = tmp_path / renorm_config.RUNS_FILE
    runs_file.parent.mkdir(parents=True)
    runs_file.write_text(json.dumps(RUNS))
    return tmp_path


@pytest.fixture
def cells(repo):
    """nft_contrast, seeds 0 and 1: reward and FD per arm (φ = 1 lowers the contrast reward by
    0.1 and 0.3 and FD by 4 and 2); its φ = 0.7 late cells are missing. The CFG run: plain only."""
    root = repo / renorm_config.WORKROOT
    values = {  # seed -> arm -> (reward, fd)
        0: {"phi0": (0.8, 20.0), "phi1-all": (0.7, 16.0), "phi1-late": (0.75, 18.0),
            "phi0.5-all": (0.76, 19.0), "phi0.5-late": (0.79, 19.5), "phi0.7-all": (0.72, 17.0)},
        1: {"phi0": (0.9, 24.0), "phi1-all": (0.6, 22.0), "phi1-late": (0.8, 23.0),
            "phi0.5-all": (0.8, 23.0), "phi0.5-late": (0.85, 23.5), "phi0.7-all": (0.7, 22.5)},
    }
    for seed, arms in values.items():
        for arm, (reward, fd) in arms.items():
            applied = None if arm == "phi0" else 1.0
            _write_eval(root, f"eval-nft_contrast-s{seed}-{arm}", reward, fd,
                        rho=1.06 + 0.02 * seed, applied=applied)
    _write_eval(root, "eval-nft_logprob_cfg-s0-phi0", -4.0, 10.0, rho=1.03,
                reward_name="classifier_logprob")
    return values


def test_arms_are_plain_and_three_strengths_in_two_windows():
    arms = renorm_config.arms()
    assert list(arms) == ["phi0", "phi0.5-all", "phi0.5-late", "phi0.7-all", "phi0.7-late",
                          "phi1-all", "phi1-late"]
    assert arms["phi0"] == {}
    assert arms["phi0.7-late"] == {"sample.renormalize": True, "sample.renormalize_phi": 0.7,
                                   "sample.renormalize_sigma_max": renorm_config.LATE_SIGMA}
    assert renorm_config.arm_options("phi1-all") == (1.0, 1.0)
    assert renorm_config.arm_options("phi0") == (0.0, 1.0)


def test_sweep_cells_evaluate_each_run_with_its_setting_and_overrides(repo):
    cells = sweep.expand(renorm_config.get_config())
    assert len(cells) == len(RUNS) * len(renorm_config.arms())
    by_name = {c.name: c for c in cells}
    cfg = by_name["eval-nft_logprob_cfg-s0-phi0.5-late"]
    assert cfg.config == "configs/eval_table.py:digits_logprob"
    over = dict(cfg.overrides)
    assert over["checkpoint"] == RUNS[2]["workdir"]
    assert over["sample.guidance_scale"] == 1.5
    assert over["sample.renormalize_sigma_max"] == renorm_config.LATE_SIGMA
    assert cfg.group == "nft_logprob_cfg-s0"
    # Every override names a field of the evaluation config with a compatible type.
    sweep.check(cells)


def test_missing_or_malformed_runs_file(repo):
    (repo / renorm_config.RUNS_FILE).unlink()
    with pytest.raises(ValueError, match="--stages select"):
        renorm_config.get_config()
    (repo / renorm_config.RUNS_FILE).write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="lacks"):
        renorm_config.get_config()


def test_paired_statistics_against_the_plain_sampler(cells):
    runs = renorm_config.read_runs()
    data = experiment.collect(runs)
    assert "eval-nft_contrast-s0-phi0.7-late" in data["missing"]
    assert "eval-nft_logprob_cfg-s0-phi1-all" in data["missing"]
    stats = experiment.statistics(runs, data)
    s = stats["nft_contrast"]
    diffs = np.array([cells[k]["phi1-all"][0] - cells[k]["phi0"][0] for k in (0, 1)])
    m, se, t, n = s["phi1-all"]["diff/reward"]
    np.testing.assert_allclose(m, diffs.mean())
    np.testing.assert_allclose(se, diffs.std(ddof=1) / np.sqrt(2))
    np.testing.assert_allclose(t, m / se)
    assert n == 2
    np.testing.assert_allclose(s["phi1-late"]["diff/fd"][0], -1.5)
    np.testing.assert_allclose(s["phi0"]["rho_applied"][0], 1.07)   # θ's own ρ, plain
    np.testing.assert_allclose(s["phi1-all"]["rho_applied"][0], 1.0)
    np.testing.assert_allclose(s["phi1-all"]["diff/rho_applied"][0], -0.07)
    assert "diff/reward" not in s["phi0"]
    assert s["phi0.7-late"] == {}
    # The CFG run has only its plain cell: values, no differences.
    assert "diff/reward" not in stats["nft_logprob_cfg"]["phi1-all"]
    assert stats["nft_logprob_cfg"]["phi0"]["reward"] == [-4.0, 0.0, 1]


def test_analyse_writes_the_tables(cells, repo):
    out = experiment.analyse("python experiments/renormalise.py")
    md = (repo / "results" / "renormalise.md").read_text()
    assert "### nft_contrast (digits_contrast; seeds and θ's sampling ρ: s0 1.060, s1 1.080)" \
        in md
    # φ = 1 at every step: reward 0.65 ± 0.05 over the two seeds, Δ −0.2 ± 0.1 (t −2.0).
    assert "| φ = 1, every step | 0.650 ± 0.050 |" in md
    assert "| φ = 1, every step | -0.200 ± 0.100 (t -2.0) |" in md
    assert f"| φ = 0.7, σ ≤ {renorm_config.LATE_SIGMA:g} | – |" in md
    saved = json.loads((repo / "results" / "renormalise.json").read_text())
    assert saved["stats"] == json.loads(json.dumps(out["stats"]))


def test_selection_from_the_inflation_search():
    results = {"data": {"cells": {
        "nft_contrast-s0": {"candidate": "nft_contrast", "seed": 0,
                            "setting": "digits_contrast", "eval": {"rho": 1.06}},
        "nft_contrast-s1": {"candidate": "nft_contrast", "seed": 1,
                            "setting": "digits_contrast", "eval": {"rho": 1.01}},
        "nft_logprob_cfg-s2": {"candidate": "nft_logprob_cfg", "seed": 2,
                               "setting": "digits_logprob", "eval": {"rho": 1.02}},
        "grpo_logprob-s0": {"candidate": "grpo_logprob", "seed": 0,
                            "setting": "digits_logprob", "eval": None},
    }}}
    runs = experiment.from_search(results, 1.02)
    assert [r["name"] for r in runs] == ["nft_contrast-s0", "nft_logprob_cfg-s2"]
    assert runs[0]["workdir"] == "workdir/sweeps/inflation_search/rl-nft_contrast-s0"
    assert runs[1]["eval"] == {"sample.guidance_scale": 1.5}
    assert runs[1]["seed"] == 2


def test_runs_from_the_command_line():
    recorded = {
        "a/rl-awm_contrast-s2": {"base": {"workdir": "workdir/quickstart/base"},
                                 "rewards": {"contrast": 1.0},
                                 "rollout": {"guidance_scale": 1.0}},
        "b/my_run": {"base": {"workdir": "workdir/quickstart/base"},
                     "rewards": {"classifier_logprob": 1.0},
                     "rollout": {"guidance_scale": 1.5}},
    }
    runs = experiment.from_command_line("a/rl-awm_contrast-s2, b/my_run=digits_contrast",
                                        read_config=recorded.__getitem__)
    assert runs[0] == {"name": "awm_contrast-s2", "candidate": "awm_contrast", "seed": 2,
                       "workdir": "a/rl-awm_contrast-s2", "setting": "digits_contrast",
                       "eval": {}}
    assert runs[1]["name"] == "my_run-s0"
    assert runs[1]["setting"] == "digits_contrast"          # given: wins over the record
    assert runs[1]["eval"] == {"sample.guidance_scale": 1.5}
    assert experiment.setting_of(recorded["b/my_run"]) == "digits_logprob"
    with pytest.raises(ValueError, match="no configs/rl_table.py setting"):
        experiment.setting_of({"base": {"workdir": "elsewhere"}, "rewards": {"contrast": 1.0}})
    with pytest.raises(ValueError, match="setting must be one of"):
        experiment.from_command_line("b/my_run=nope", read_config=recorded.__getitem__)

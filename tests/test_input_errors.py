"""Bad input (issue 19): the blocks that several jobs share are checked by one function each,
so every job refuses the same bad value with the same message before anything is built; the
command line reports a bad value, a misspelt field or a held workdir in one line; and the
tests leave nothing in the system temp dir.
"""

import os
import subprocess
import sys

import pytest

from normguard_jax import config_checks, evaluate, generators, pretrain, rl

from conftest import REPO, load_config_file
from test_faults import _unreachable
from test_pretrain import tiny_config

# field, bad value, the message every job that has the field gives.
SHARED = [
    ("sample.guidance_scale", -1.0, r"config\.sample\.guidance_scale must be a finite number >= 0"),
    ("sample.num_steps", 0, r"config\.sample\.num_steps must be an integer >= 1, got 0"),
    ("sample.shift", 0.0, r"config\.sample\.shift must be a finite number > 0"),
    ("optim.schedule", "linear",
     r"config\.optim\.schedule must be one of \['constant', 'cosine'\], got 'linear'"),
    ("optim.b1", 5.0, r"config\.optim\.b1 must be a finite number >= 0 < 1, got 5\.0"),
    ("optim.b2", 1.0, r"config\.optim\.b2 must be a finite number >= 0 < 1"),
    ("optim.eps", 0.0, r"config\.optim\.eps must be a finite number > 0"),
    ("optim.warmup_steps", -1, r"config\.optim\.warmup_steps must be an integer >= 0"),
    ("optim.weight_decay", -0.1, r"config\.optim\.weight_decay must be a finite number >= 0"),
    ("optim.final_lr_fraction", 2.0, r"config\.optim\.final_lr_fraction must be a finite number"),
    ("train.log_every", 0, r"config\.train\.log_every must be an integer >= 1"),
    ("train.keep_checkpoints", 0, r"config\.train\.keep_checkpoints must be an integer >= 1"),
    ("mesh.fsdp", 3, r"config\.mesh\.fsdp must be a divisor of the 8 devices, got 3"),
    ("mesh.data", 3, r"config\.mesh\.data must be -1 or 8 .*, got 3"),
]


def _set(config, path, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def _rl_config(tmp_path):
    config = load_config_file("rl_nft.py")
    config.base.workdir = str(tmp_path / "no_base_needed")
    config.rollout.update(prompts_per_iter=8, group_size=4)
    config.train.minibatch_size = 16
    return config


def _eval_config(tmp_path):
    config = load_config_file("evaluate.py")
    config.checkpoint = str(tmp_path / "no_checkpoint_needed")
    return config


@pytest.mark.parametrize("job", ["pretrain", "rl", "evaluate"])
@pytest.mark.parametrize("path, value, message", SHARED, ids=[f"{p}={v}" for p, v, _ in SHARED])
def test_every_job_refuses_a_bad_shared_field_the_same_way_before_building(
        job, path, value, message, data_dir, tmp_path, monkeypatch):
    for loader in ("build_generator", "load_pretrained", "load_generator", "load_policy"):
        monkeypatch.setattr(generators, loader, _unreachable)
    make, run = {"pretrain": (lambda: tiny_config(data_dir), pretrain.run),
                 "rl": (lambda: _rl_config(tmp_path), rl.run),
                 "evaluate": (lambda: _eval_config(tmp_path), evaluate.run)}[job]
    config = make()
    try:
        config_checks.get_field(config, path)
    except config_checks.ConfigError:
        pytest.skip(f"the {job} config has no {path}")
    _set(config, path, value)
    with pytest.raises(config_checks.ConfigError, match=message):
        run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# The command line: one line, no traceback.
# ----------------------------------------------------------------------------------------------


def _main(tmp_path, *overrides, config="configs/pretrain_mnist_dit.py"):
    return subprocess.run(
        [sys.executable, "-m", "normguard_jax.main", f"--config={config}",
         f"--workdir={tmp_path / 'w'}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _one_line_error(out):
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("config, override, line", [
    ("configs/pretrain_mnist_dit.py", "--config.train.steps=0",
     "error: config.train.steps must be an integer >= 1, got 0"),
    ("configs/rl_nft.py", "--config.optim.schedule=linear",
     "error: config.optim.schedule must be one of ['constant', 'cosine'], got 'linear'"),
    ("configs/pretrain_mnist_dit.py", "--config.optim.lrr=1",
     "error: --config.optim.lrr is not a config field; did you mean --config.optim.lr?"),
    ("configs/rl_nft.py", "--config.normgaurd.weight=0.1",
     "error: --config.normgaurd is not a config field; did you mean --config.normguard?"),
    ("configs/pretrain_mnist_dit.py", "--allow_changed=optim.lr",
     "error: --allow_changed: 'optim.lr' may not change when a run resumes"),
])
def test_cli_reports_bad_input_in_one_line(tmp_path, config, override, line):
    got = _one_line_error(_main(tmp_path, override, config=config))
    assert got.startswith(line), got
    assert not (tmp_path / "w" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Tests clean up after themselves.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_test_session_leaves_nothing_in_the_system_temp_dir(tmp_path):
    """A session that builds a dataset (TFDS makes a ``tmp*tfds`` folder in the temp dir at each
    build) leaves the temp dir as it found it, and removes its TFDS data dir."""
    system_tmp, basetemp = tmp_path / "system_tmp", tmp_path / "basetemp"
    system_tmp.mkdir()
    test = ("tests/test_faults.py::test_pretrain_resume_against_another_dataset_fails_before_"
            "building")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--basetemp={basetemp}", "-k", "change1", test],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TMPDIR=str(system_tmp), JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in out.stdout
    assert sorted(os.listdir(system_tmp)) == []
    left = [os.path.join(d, n) for d, dirs, _ in os.walk(basetemp) for n in dirs
            if n.startswith("tensorflow_datasets") or n.endswith("tfds")]
    assert left == []

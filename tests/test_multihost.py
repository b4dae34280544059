"""Multi-process runs: 2 processes × 4 CPU devices (coordinator on 127.0.0.1, Gloo collectives)
train exactly like 1 process × 8 devices; only process 0 writes logs; the ``distributed``
config block is validated before anything starts.
"""

import glob
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from normguard_jax import config_checks, data, distributed, generators, pretrain, reporting

from conftest import REPO, load_config_file
from test_pretrain import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fields, message", [
    ({"coordinator_address": "localhost"}, "must look like 'host:port'"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 0},
     r"config\.distributed\.num_processes must be an integer >= 1"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
     r"config\.distributed\.process_id must be an integer >= 0 <= 1"),
    ({"coordinator_address": "127.0.0.1:1234", "auto": True}, "auto must be False"),
])
def test_bad_distributed_block_is_rejected_before_initialising(fields, message):
    config = load_config_file("pretrain_mnist_dit.py")
    config.distributed.update(fields)
    with pytest.raises(config_checks.ConfigError, match=message):
        distributed.initialize(config)


def test_single_process_defaults_initialise_nothing():
    config = load_config_file("rl_nft.py")
    assert distributed.initialize(config) is False
    assert jax.process_count() == 1
    assert distributed.is_writer()
    assert distributed.any_process(True) and not distributed.any_process(False)


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(data_dir, tmp_path):
    steps = 4
    data.load_split("digits_sklearn", "train", data_dir)   # built once, read by both processes
    workdir = str(tmp_path / "two_hosts")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for pid in range(2):
        args = [sys.executable, "-m", "normguard_jax.main",
                "--config=configs/pretrain_mnist_dit.py", f"--workdir={workdir}",
                "--config.data.name=digits_sklearn", f"--config.data.data_dir={data_dir}",
                "--config.model.size=tiny", f"--config.train.steps={steps}",
                "--config.train.batch_size=16", "--config.train.log_every=1",
                "--config.train.sample_every=1000", "--config.train.checkpoint_every=2",
                "--config.optim.warmup_steps=2", "--config.sample.num_steps=2",
                "--config.sample.per_class=1",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    for pid, err in enumerate(errs):
        assert f"process {pid} of 2, 4 local / 8 global devices" in err

    # The same run in this process, on its 8 devices.
    config = tiny_config(data_dir, steps=steps, checkpoint_every=2)
    single = str(tmp_path / "one_host")
    pretrain.run(config, single)

    def losses(d):
        rows = reporting.read_jsonl(os.path.join(d, "metrics.jsonl"))
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    two, one = losses(workdir), losses(single)
    assert [s for s, _ in two] == list(range(1, steps + 1))   # written once: by process 0 only
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5, atol=1e-5)
    assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
    assert len(glob.glob(os.path.join(workdir, "samples", "*.png"))) == 1
    for use_ema in (False, True):
        a = generators.load_pretrained(workdir, use_ema=use_ema)
        b = generators.load_pretrained(single, use_ema=use_ema)
        assert a.step == b.step == steps
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)

"""benchmarks/gpu_bench.py (what benchmarks/gpu.sh runs on a GPU) at tiny sizes on the fake
CPU devices: it times the update and the sampler and writes every documented field."""

import json

import jax
import numpy as np
import pytest

from benchmarks import gpu_bench


@pytest.mark.slow
def test_tiny_run_writes_the_documented_fields(tmp_path):
    out = tmp_path / "bench.json"
    for models, programs in (("sd35m", "update"), ("flux-dev", "sample")):
        code = gpu_bench.main(["--size", "tiny", "--models", models, "--programs", programs,
                               "--num_steps", "2", "--repeats", "2", "--out", str(out)])
        assert code == 0
        result = json.loads(out.read_text())
        assert result["meta"]["size"] == "tiny"
        (row,) = result["rows"]
        assert "error" not in row, row
        assert row["program"] == programs and row["devices"] == jax.device_count()
        assert row["platform"] == "cpu" and row["runs"] == 2
        for field in ("compile_s", "first_run_s", "run_s", "batch_per_device"):
            assert row[field] > 0, field
        rate = "rows_per_s" if programs == "update" else "images_per_s"
        np.testing.assert_allclose(row[rate], row["batch_per_device"] * row["devices"]
                                   / row["run_s"])


def test_random_arguments_follow_the_abstract_layout():
    devices = jax.devices()
    jitted, args = gpu_bench.tpu_aot.build_update(gpu_bench.TINY["sd35m"], devices,
                                                  min_shard_size=1)
    del jitted
    concrete = gpu_bench.random_arguments(args, params=(0, 2, 3), zeros=(1,))
    for a, c in zip(jax.tree.leaves(args), jax.tree.leaves(concrete)):
        assert c.shape == a.shape and c.dtype == a.dtype and c.sharding == a.sharding
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(concrete[1]))
    sigma = np.asarray(concrete[4]["sigma"])
    assert sigma.min() >= 0.05 and sigma.max() <= 0.95
    weights = np.concatenate([np.ravel(x) for x in jax.tree.leaves(concrete[0])])
    assert 0.015 < weights.std() < 0.025

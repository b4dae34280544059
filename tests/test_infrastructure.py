"""Checkpoint round-trips and fallback, image grids, JSONL metrics, config checks, the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from normguard_jax import checkpointing, config_checks, reporting

from conftest import REPO


def _state(x):
    return {"params": {"w": jnp.full((3, 2), x, jnp.float32)}, "step": jnp.int32(x),
            "rng": jax.random.key_data(jax.random.key(int(x)))}


def test_checkpoint_round_trip_and_fallback_to_previous(tmp_path):
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"), max_to_keep=5)
    for s in (1, 2):
        assert checkpointing.save(manager, s, _state(float(s)), {"step": s, "note": "x"})
    manager.wait_until_finished()
    step, state, meta = checkpointing.restore_latest(manager, _state(0.0))
    assert step == 2 and meta == {"step": 2, "note": "x"}
    np.testing.assert_array_equal(state["params"]["w"], 2.0)
    np.testing.assert_array_equal(state["rng"], jax.random.key_data(jax.random.key(2)))

    # Corrupt every file of the newest checkpoint's state: restore must fall back to step 1.
    for root, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"))
    step, state, meta = checkpointing.restore_latest(manager, _state(0.0))
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(state["params"]["w"], 1.0)


def test_restore_from_empty_directory_is_none(tmp_path):
    assert checkpointing.restore_latest(
        checkpointing.make_manager(str(tmp_path / "none")), _state(0.0)) is None


def test_image_grid_layout_and_values():
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0, 2.0, -3.0)])
    grid = reporting.image_grid(images, ncols=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 3) and grid.dtype == np.uint8
    tile = lambda r, c: grid[1 + 3 * r:1 + 3 * r + 2, 1 + 4 * c:1 + 4 * c + 3]
    assert (tile(0, 0) == 0).all() and (tile(0, 1) == 128).all() and (tile(1, 0) == 255).all()
    assert (tile(1, 1) == 255).all() and (tile(2, 0) == 0).all()     # values clipped to [-1, 1]
    assert (tile(2, 1) == 128).all()                                   # empty slot is padding grey


def test_jsonl_writer_appends_rows(tmp_path):
    w = reporting.JsonlWriter(str(tmp_path / "m.jsonl"))
    w.write_scalars(3, {"loss": np.float32(0.5)})
    w.write_scalars(4, {"loss": jnp.float32(0.25), "lr": 1e-3})
    rows = reporting.read_jsonl(str(tmp_path / "m.jsonl"))
    assert rows == [{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25, "lr": 1e-3}]


def test_jsonl_writer_has_every_method_of_clus_writer_interface(tmp_path):
    from clu.metric_writers import interface
    missing = sorted(m for m in interface.MetricWriter.__abstractmethods__
                     if not callable(getattr(reporting.JsonlWriter, m, None)))
    assert not missing
    writer = reporting.make_writer(str(tmp_path))       # TensorBoard + console + jsonl
    writer.write_scalars(1, {"loss": 2.0})
    writer.flush()
    assert reporting.read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 2.0}]


def test_jobs_that_write_no_metrics_start_without_tensorflow():
    """clu's metric writers import TensorFlow (~10 s); evaluation and the analyses need none."""
    code = ("import sys; import normguard_jax.main; "
            "from normguard_jax import evaluate, rl, pretrain, diagnostics; "
            "from experiments import sweep; "
            "print(sorted(m for m in ('tensorflow', 'clu.metric_writers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(REPO))
    assert out.stdout.strip() == "[]"


def test_config_checks_name_the_field():
    c = ml_collections.ConfigDict({"a": {"n": 0, "x": float("inf"), "k": "foo"}})
    with pytest.raises(config_checks.ConfigError, match=r"config\.a\.n must be an integer >= 1, got 0"):
        config_checks.integer(c, "a.n", 1)
    with pytest.raises(config_checks.ConfigError, match=r"config\.a\.x must be a finite number"):
        config_checks.number(c, "a.x")
    with pytest.raises(config_checks.ConfigError, match=r"config\.a\.k must be one of \['bar'\]"):
        config_checks.one_of(c, "a.k", ["bar"])
    with pytest.raises(config_checks.ConfigError, match=r"config\.a\.missing is missing"):
        config_checks.get_field(c, "a.missing")
    assert config_checks.integer(c, "a.n", 0) == 0


@pytest.mark.slow
def test_cli_rejects_a_bad_override_before_building(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "normguard_jax.main", "--config=configs/pretrain_mnist_dit.py",
         f"--workdir={tmp_path / 'w'}", "--config.train.steps=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    assert "config.train.steps must be an integer >= 1, got 0" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_compiled_and_abstract_initialisation_match_eager():
    """``models.init_module``: the one-program initialisation gives the eager parameters (same
    random draws), and the abstract one their shapes and dtypes without allocating them."""
    from flax import nnx

    from normguard_jax import models

    def make():
        return models.build_generator("unet", image_shape=(8, 8, 1), num_classes=3,
                                      rngs=nnx.Rngs(7), **models.SIZES["unet"]["tiny"])

    _, eager = models.split_generator(make())
    _, jitted = models.split_generator(models.init_module(make))
    _, abstract = models.split_generator(models.init_module(make, abstract=True))
    for e, j, a in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(abstract)):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-6)
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (e.shape, e.dtype)
    assert len(jax.tree.leaves(eager)) == len(jax.tree.leaves(abstract)) > 0


def test_restore_into_a_shape_only_template(tmp_path):
    """A template of ``jax.ShapeDtypeStruct`` leaves (no sharding) restores onto this process's
    first device with the saved values."""
    state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.float32)}
    manager = checkpointing.make_manager(str(tmp_path / "ckpt"), asynchronous=False)
    checkpointing.save(manager, 1, state, {"step": 1})
    manager.wait_until_finished()
    template = jax.eval_shape(lambda: state)
    restored = checkpointing.restore_state(str(tmp_path / "ckpt"), 1, template)
    for name in state:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))
        assert restored[name].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

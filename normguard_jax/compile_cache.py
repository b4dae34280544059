"""The persistent XLA compilation cache shared by every entry point.

Programs that took over a second to compile are stored in ``DEFAULT_DIR`` and reused by later
processes with an identical program: the same sampler on another checkpoint of the same
architecture, the same train step in the next sweep cell. On a 2-core CPU a UNet sampler or
train step takes tens of seconds to compile, so a sweep of many short cells spends much of its
time there without the cache.
"""

from __future__ import annotations

import os

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "normguard_jax", "xla")


def enable(directory: str = DEFAULT_DIR) -> None:
    """Turns the cache on at ``directory`` ('' leaves it off). Starts no backend."""
    if directory:
        import jax  # noqa: PLC0415  (setting a config option does not start a backend)
        jax.config.update("jax_compilation_cache_dir", directory)

"""Multi-process (multi-host) start-up and agreement between processes.

One JAX process runs per host (TPU VM worker, GPU node, or here several CPU processes); every
process runs the same program, reads its own shard of each global batch
(``data.local_batch`` with ``jax.process_index()``) and takes part in every collective.

The ``distributed`` config block:

- ``coordinator_address`` ("host:port" of process 0), ``num_processes`` and ``process_id``:
  explicit initialisation (e.g. several processes on one machine, or a GPU cluster without a
  scheduler JAX knows);
- ``auto=True``: ``jax.distributed.initialize()`` without arguments, which detects the cluster
  itself on Cloud TPU pod slices, SLURM and Open MPI;
- neither: a single process (nothing is initialised).

On CPU, cross-process collectives use Gloo over TCP (the default of
``jax_cpu_collectives_implementation`` since JAX 0.5); this module sets it explicitly so that
an environment that changed the default still works.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from normguard_jax import config_checks


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the ``distributed`` block; raises ConfigError naming the first bad field."""
    c = config_checks
    address = c.get_field(config, "distributed.coordinator_address")
    auto = c.get_field(config, "distributed.auto")
    if not isinstance(address, str):
        raise c.ConfigError(f"config.distributed.coordinator_address must be a string "
                            f"'host:port' or '', got {address!r}")
    if not isinstance(auto, bool):
        raise c.ConfigError(f"config.distributed.auto must be True or False, got {auto!r}")
    if address and auto:
        raise c.ConfigError("config.distributed.auto must be False when "
                            "config.distributed.coordinator_address is set")
    if address:
        if address.rpartition(":")[0] == "" or not address.rpartition(":")[2].isdigit():
            raise c.ConfigError(f"config.distributed.coordinator_address must look like "
                                f"'host:port', got {address!r}")
        n = c.integer(config, "distributed.num_processes", 1)
        c.integer(config, "distributed.process_id", 0, n - 1)


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Initialises ``jax.distributed`` from ``config.distributed``; returns whether it did.

    Must run before anything touches a JAX backend (device lists, arrays, compilation).

    Raises:
      config_checks.ConfigError: an invalid ``distributed`` block.
    """
    validate(config)
    d = config.distributed
    if not d.coordinator_address and not d.auto:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                   num_processes=d.num_processes, process_id=d.process_id)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def is_writer() -> bool:
    """Whether this process writes logs, metrics and images (process 0 only)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on at least one (e.g. a SIGTERM on one host).

    With one process this is just ``flag`` (no communication); otherwise it is a small
    all-gather, so every process must call it at the same point of the program.
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.max(flags))

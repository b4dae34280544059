"""Command-line entry: ``python -m normguard_jax.main --config=configs/X.py --workdir=DIR``.

The config file's ``job`` field picks the run function; any field can be overridden with
``--config.<path>=value``. The config is validated before anything is built or compiled; an
invalid value, a misspelt field (with the closest field name) and a workdir held by another
process are reported in one line on stderr, with exit code 1.

Resuming a run with a changed config is refused, listing the changed fields;
``--allow_changed=train.steps,train.log_every`` lets the fields that may change on resume
(``config_checks.RESUME_ALLOWED``) differ, and records them in the run's history.

A config with a ``distributed`` block starts ``jax.distributed`` first (see
:mod:`normguard_jax.distributed`); every process then runs the same command, e.g. on each of
two processes ``--config.distributed.coordinator_address=10.0.0.2:1234
--config.distributed.num_processes=2 --config.distributed.process_id=<0 or 1>``.
"""

from __future__ import annotations

import os
import sys

# glibc malloc settings for XLA:CPU: no separately mmap'd chunks and a trim threshold so high
# that freed memory stays in the process. XLA:CPU frees its large temporaries after every call;
# with glibc's defaults they go back to the kernel and each train step faults them in again
# (~320-400 MiB of fresh pages per step for the small models; see benchmarks/README.md). One
# arena per core: a single arena (arena_max=1) made the UNet train step 30 % slower than
# glibc's defaults on a 2-core AMD EPYC, through lock contention between XLA's threads.
MALLOC_TUNING = (f"glibc.malloc.arena_max={os.cpu_count() or 1}:glibc.malloc.mmap_max=0:"
                 "glibc.malloc.trim_threshold=68719476736")
# Set this environment variable (to anything non-empty) to keep glibc's default malloc.
DEFAULT_MALLOC_ENV = "NORMGUARD_DEFAULT_MALLOC"


# Device files of accelerators: TPU chips (``/dev/accel0``.. on v2-v4, VFIO groups on v5e and
# later) and NVIDIA GPUs.
ACCELERATOR_DEVICE_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def runs_on_cpu(environ=None, glob_fn=None) -> bool:
    """Whether JAX will run this process on XLA:CPU, decided without importing JAX.

    The rule: when ``JAX_PLATFORMS`` is set and non-empty, its first entry decides (JAX tries the
    platforms in that order, so ``"cpu"`` and ``"cpu,tpu"`` mean CPU, ``"tpu,cpu"`` does not);
    otherwise the process runs on CPU unless the machine has an accelerator's device file
    (:data:`ACCELERATOR_DEVICE_GLOBS`: a TPU VM's chips, an NVIDIA GPU). An installed ``libtpu``
    or CUDA plugin alone does not count: without the device JAX falls back to CPU.

    Args:
      environ: the environment to read (default ``os.environ``).
      glob_fn: ``pattern -> list of paths`` (default ``glob.glob``); tests pass a fake.
    """
    import glob  # noqa: PLC0415 - the module is imported before anything else in __main__
    environ = os.environ if environ is None else environ
    glob_fn = glob.glob if glob_fn is None else glob_fn
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",")
                 if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(glob_fn(pattern) for pattern in ACCELERATOR_DEVICE_GLOBS)


def _reexec_with_tuned_malloc() -> None:
    """Restarts this command with ``GLIBC_TUNABLES=MALLOC_TUNING`` when it is unset, on CPU only.

    glibc reads its tunables only at process start, hence ``os.execve`` (same PID, same
    arguments, same interpreter options). The settings help XLA:CPU's temporaries only; on a
    TPU or GPU host they would just keep freed host memory (input pipelines, checkpoint
    buffers) in the process, so nothing happens when :func:`runs_on_cpu` says an accelerator
    will be used. Nothing happens either off Linux, when ``GLIBC_TUNABLES`` is already set (by
    the user or by the first pass) or when ``NORMGUARD_DEFAULT_MALLOC`` is.
    """
    if (not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ
            or os.environ.get(DEFAULT_MALLOC_ENV) or not runs_on_cpu()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNING))


if __name__ == "__main__":  # before the imports below: ``python -m normguard_jax.main``
    _reexec_with_tuned_malloc()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow is only used by clu's writers.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import difflib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402

# None of these touches a backend.
from normguard_jax import compile_cache, config_checks, distributed, reporting  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", compile_cache.DEFAULT_DIR,
    "Persistent XLA compilation cache ('' = off). Programs that took over a second to compile "
    "are stored there and reused by later runs and stages with identical programs (e.g. the "
    "same sampler on another checkpoint of the same architecture).")
_ALLOW_CHANGED = flags.DEFINE_list(
    "allow_changed", [],
    "Config fields that may differ from the run being resumed, e.g. train.steps to extend it "
    "(only those of normguard_jax.config_checks.RESUME_ALLOWED); recorded in the run's history.")

# config.job -> module whose ``run(config, workdir)`` it calls. The modules are imported only
# after ``jax.distributed`` is initialised: importing them may already touch a JAX backend.
JOBS = {
    "pretrain": "normguard_jax.pretrain",
    "evaluate": "normguard_jax.evaluate",
    "rl": "normguard_jax.rl",
    "embed_prompts": "normguard_jax.text",
    # Experiment jobs (chains of the jobs above) live in experiments/, outside the library.
    "quickstart": "experiments.quickstart",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        if config.job not in JOBS:
            raise config_checks.ConfigError(
                f"config.job must be one of {sorted(JOBS)}, got {config.job!r}")
        compile_cache.enable(_COMPILATION_CACHE.value)
        if "distributed" in config:                   # jobs that support several processes
            distributed.initialize(config)
        job = importlib.import_module(JOBS[config.job])
        options = {}
        if _ALLOW_CHANGED.value:
            if "allow_changed" not in inspect.signature(job.run).parameters:
                raise config_checks.ConfigError(
                    f"--allow_changed applies to runs that resume (pretrain, rl), not to "
                    f"config.job={config.job!r}")
            options["allow_changed"] = tuple(_ALLOW_CHANGED.value)
        reporting.quiet_library_logs()
        logging.info("Config:\n%s", config)
        job.run(config, _WORKDIR.value, **options)
    except config_checks.ConfigError as e:  # a bad value, or a --workdir in use or unwritable
        sys.exit(f"error: {e}")           # one line on stderr, exit code 1
    except KeyboardInterrupt:             # the run loop has checkpointed the last completed unit
        print(f"interrupted: the last completed step is checkpointed in {_WORKDIR.value}; "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _unknown_field(argv) -> str | None:
    """The first ``--config.<path>`` override of ``argv`` that names no field of the config,
    as one line with the closest existing field, or None."""
    config_args = [a for a in argv if re.match(r"^--?config=", a)]
    if not config_args:
        return None
    try:
        config = flags.FLAGS["config"].parser.parse(config_args[-1].split("=", 1)[1])
    except Exception:  # noqa: BLE001 - the config file's own error is reported as it is
        return None
    for arg in argv:
        match = re.match(r"^--?config\.([\w.]+)(=|$)", arg)
        if not match:
            continue
        node, done = config, []
        for part in match.group(1).split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                keys = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
                prefix = ".".join(["--config", *done])
                hint = (f"; did you mean {prefix}.{close[0]}?" if close else
                        f"; the fields of {prefix} are: {', '.join(sorted(keys))}" if keys
                        else f"; {prefix} is a value, not a block")
                return f"error: {prefix}.{part} is not a config field{hint}"
            node = node[part]
            done.append(part)
    return None


def _parse_flags(argv):
    """absl's flag parsing, with an unknown ``--config.<path>`` reported in one line."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:   # ml_collections' error for an unknown field
        line = _unknown_field(argv)
        if line is None:
            raise
        raise SystemExit(line) from e


def entry():
    """Parses the flags and runs :func:`main`; ``python -m normguard_jax.main`` calls it."""
    _reexec_with_tuned_malloc()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()

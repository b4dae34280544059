"""Config validation that runs before anything is built or compiled.

Each check reads a field by its dotted path and raises ``ConfigError`` (a ValueError) whose
message starts with that path, e.g. ``config.train.steps must be an integer >= 1, got 0``.

The blocks that several jobs share are checked by one function each, which every job calls:
:func:`check_optim`, :func:`check_sample`, :func:`check_intervals` (logging, sampling and
checkpoint intervals of a run) and :func:`check_mesh`. :func:`check_resume` decides whether a
config may continue a run recorded in a checkpoint.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import socket
from typing import Any, Iterable, Optional

import ml_collections
from absl import logging

from normguard_jax import optim, paths


class ConfigError(ValueError):
    """An invalid config value; the message names the field."""


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
    """Returns ``config.<path>``; a missing field is itself a ConfigError naming the path."""
    node = config
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"config.{path} is missing") from None
    return node


def suggest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` with the choice closest to ``name``, or "" if none is close
    (``difflib``'s ratio >= 0.6)."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fail(path: str, requirement: str, value: Any):
    raise ConfigError(f"config.{path} must be {requirement}, got {value!r}")


def integer(config, path: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Checks an integer field with optional inclusive bounds."""
    v = get_field(config, path)
    bounds = "".join([f" >= {minimum}" if minimum is not None else "",
                      f" <= {maximum}" if maximum is not None else ""])
    if (isinstance(v, bool) or not isinstance(v, int)
            or (minimum is not None and v < minimum) or (maximum is not None and v > maximum)):
        _fail(path, "an integer" + bounds, v)
    return v


def number(config, path: str, minimum: float | None = None, maximum: float | None = None,
           strict_minimum: bool = False, strict_maximum: bool = False) -> float:
    """Checks a finite real field with optional bounds (``strict_*``: the bound is excluded)."""
    v = get_field(config, path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and minimum is not None:
        ok = v > minimum if strict_minimum else v >= minimum
    if ok and maximum is not None:
        ok = v < maximum if strict_maximum else v <= maximum
    if not ok:
        lo = "" if minimum is None else (f" > {minimum}" if strict_minimum else f" >= {minimum}")
        hi = "" if maximum is None else (f" < {maximum}" if strict_maximum else f" <= {maximum}")
        _fail(path, "a finite number" + lo + hi, v)
    return float(v)


def one_of(config, path: str, choices: Iterable[Any]) -> Any:
    """Checks that a field takes one of ``choices`` (e.g. the keys of a registry)."""
    v = get_field(config, path)
    choices = sorted(choices, key=str)
    if v not in choices:
        _fail(path, f"one of {choices}", v)
    return v


def divisible(config, path: str, divisor: int, why: str) -> None:
    """Checks that an integer field is a multiple of ``divisor``."""
    v = get_field(config, path)
    if v % divisor:
        _fail(path, f"divisible by {divisor} ({why})", v)


def writable_directory(path: str, flag: str = "--workdir") -> None:
    """Creates directory ``path`` (local or a URL such as ``gs://bucket/run``) if needed and
    checks that a file can be written in it.

    Runs before anything is built, so a typo'd or read-only path fails in a second rather than
    after a compiled step, when the first checkpoint is written.

    Raises:
      ConfigError: naming ``flag`` when ``path`` is empty, cannot be created or is not writable.
    """
    if not path:
        raise ConfigError(f"{flag} must be a directory path, got {path!r}")
    try:
        folder = paths.path(path)
    except ValueError as e:
        raise ConfigError(f"{flag}={path!r} is not a usable directory: {e}") from None
    # Unique per host and process: on a pod slice every host probes the same shared folder.
    probe = folder / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except (OSError, ImportError) as e:   # ImportError: the URL's fsspec backend is missing
        detail = getattr(e, "strerror", None) or e
        raise ConfigError(f"{flag}={path!r} is not a writable directory "
                          f"({type(e).__name__}: {detail})") from None


# ----------------------------------------------------------------------------------------------
# Blocks shared by several jobs: one check each, called by every job that has the block.
# ----------------------------------------------------------------------------------------------


def check_optim(config) -> None:
    """The ``optim`` block of :func:`normguard_jax.optim.build_optimizer` (pretraining, RL)."""
    number(config, "optim.lr", 0, strict_minimum=True)
    integer(config, "optim.warmup_steps", 0)
    one_of(config, "optim.schedule", optim.SCHEDULES)
    number(config, "optim.final_lr_fraction", 0, 1)
    number(config, "optim.b1", 0, 1, strict_maximum=True)   # β = 1: the moment never moves
    number(config, "optim.b2", 0, 1, strict_maximum=True)
    number(config, "optim.eps", 0, strict_minimum=True)
    number(config, "optim.weight_decay", 0)
    number(config, "optim.grad_clip", 0)
    integer(config, "optim.accumulate_steps", 1)


def check_sample(config, min_per_class: int = 1) -> None:
    """The sampler fields of a ``sample`` block (sample grids, evaluation sets)."""
    integer(config, "sample.num_steps", 1)
    number(config, "sample.shift", 0, strict_minimum=True)
    number(config, "sample.guidance_scale", 0)
    integer(config, "sample.per_class", min_per_class)


def check_intervals(config) -> None:
    """A run's ``train`` intervals: logs, sample grids, checkpoints kept, non-finite patience."""
    for field in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                  "max_nonfinite"):
        integer(config, f"train.{field}", 1)


def check_mesh(config, num_devices: Optional[int] = None) -> None:
    """The ``mesh`` block; with ``num_devices``, also that the axes fit the devices."""
    fsdp = integer(config, "mesh.fsdp", 1)
    integer(config, "mesh.min_shard_size", 1)
    data = get_field(config, "mesh.data")
    if data != -1:
        integer(config, "mesh.data", 1)
    if num_devices is None:
        return
    if num_devices % fsdp:
        _fail("mesh.fsdp", f"a divisor of the {num_devices} devices", fsdp)
    if data != -1 and data * fsdp != num_devices:
        _fail("mesh.data", f"-1 or {num_devices // fsdp} (mesh.data * mesh.fsdp must equal the "
              f"{num_devices} devices)", data)


# ----------------------------------------------------------------------------------------------
# Resuming: the config must be the run's own.
# ----------------------------------------------------------------------------------------------

# Fields that a resumed run may change when the user names them (``--allow_changed``): how far
# the run goes, what it logs and keeps, where the data files are and how the devices are laid
# out -- never the maths of an update. ``train.steps``/``train.iterations`` also stretch a
# cosine schedule from the resumed step on; that is what extending a run means.
RESUME_ALLOWED = (
    "train.steps", "train.iterations", "train.log_every", "train.sample_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",
    "sample.num_steps", "sample.shift", "sample.guidance_scale", "sample.per_class",
    "data.data_dir", "mesh.data", "mesh.fsdp", "mesh.min_shard_size",
    "normguard.log_grad_norms", "base.attention",
)
# Blocks never compared: how the processes of one launch find each other (the coordinator's
# address changes from launch to launch and process_id from process to process).
RESUME_IGNORED = ("distributed",)
_ABSENT = "(absent)"
# Fields added after runs were recorded, with the value that computes what such a run computed
# before the field existed: a recorded config without the field resumes when the new config
# holds exactly this value (any other value is a change like any other). The quickstart also
# reuses an evaluation recorded before an evaluate field existed (experiments/quickstart.py).
ADDED_FIELDS = {
    "rollout.policy": "current",          # rollouts from θ
    "normguard.velocity": "points",       # the hinge on the objective's own velocities
    "normguard.aggregate": "sample",      # one hinge per sample
    "normguard.sigma_bins": 4,
    "normguard.sigma_ramp": "none",       # no σ-dependent weight
    "normguard.ramp_low": 0.0,
    "normguard.sigma_margin": 0.0,        # σ-independent margin
    "normguard.log_grad_norms": False,    # diagnostic only
    "objective.ties": "drop",             # DPO: tied groups give no pair
    "objective.loss_type": "exp_first",   # AWM: one ratio per (sample, σ) row
    "objective.old_params": "ema",        # AWM: θ_old = ctx.old_params
    "objective.ema_params": "ema",        # AWM: θ_EMA = ctx.old_params
    "extra_rewards": "",                  # no reward added from the command line
    "reward_models.clip_score": "",       # no CLIP model folder
    "reward_models.pickscore": "",        # no PickScore model folder
    "mesh.min_shard_size": 2**16,         # layout only: any value computes the same run
    "optim.accumulate_steps": 1,          # one micro-batch per update
    "precision.compute": "float32",
    "precision.reference": "float32",
    "lora.rank": 0,                       # full fine-tuning
    "lora.alpha": 64.0,
    "lora.targets": "attention",
    "data.captions": "",                  # class labels, no captions
    "rollout.chunks": 1,                  # all samples of an iteration in one sampler call
    "base.diffusers_dir": "",             # the base is a library pretraining workdir
    "base.family": "auto",
    "base.embeddings": "",
    "base.resolution": 512,
    "base.param_dtype": "float32",
    "base.guidance": 3.5,
    "base.remat": "none",
    "base.attention": "xla",              # the same maths by another kernel
    "sample.renormalize_phi": 1.0,        # evaluate: full renormalisation (when renormalising)
    "sample.renormalize_sigma_max": 1.0,  # evaluate: at every step
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, (dict, ml_collections.ConfigDict)):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def changed_fields(recorded: dict, config: ml_collections.ConfigDict) -> dict[str, list]:
    """``{dotted field: [recorded value, new value]}`` of every difference (absent on one side:
    ``"(absent)"``), ignoring :data:`RESUME_IGNORED` and a field of :data:`ADDED_FIELDS`
    absent from the record whose new value is its legacy one. Values are compared as JSON
    stores them."""
    old = _flatten(recorded)
    new = _flatten(json.loads(json.dumps(config.to_dict())))
    old.update({path: value for path, value in ADDED_FIELDS.items()
                if path not in old and new.get(path, _ABSENT) == value})
    ignored = lambda path: path.split(".")[0] in RESUME_IGNORED  # noqa: E731
    return {path: [old.get(path, _ABSENT), new.get(path, _ABSENT)]
            for path in sorted(set(old) | set(new))
            if not ignored(path) and old.get(path, _ABSENT) != new.get(path, _ABSENT)}


def check_allowed(allowed: Iterable[str]) -> tuple[str, ...]:
    """Checks the fields of ``--allow_changed``; returns them (ConfigError for any other)."""
    allowed = tuple(allowed)
    for field in allowed:
        if field not in RESUME_ALLOWED:
            raise ConfigError(f"--allow_changed: {field!r} may not change when a run resumes "
                              f"(the fields that may: {', '.join(RESUME_ALLOWED)})")
    return allowed


def check_resume(recorded: dict, config: ml_collections.ConfigDict, *, workdir: str, step: int,
                 allowed: Iterable[str] = ()) -> dict[str, list]:
    """Refuses to continue the run recorded in a checkpoint with another config.

    Args:
      recorded: the config stored with the checkpoint (a dict).
      config: the config of this invocation.
      workdir: the run directory (for the message).
      step: the checkpoint's step or iteration (for the message).
      allowed: fields the user allows to differ (a subset of :data:`RESUME_ALLOWED`).

    Returns:
      The allowed changes, ``{field: [old, new]}`` (empty when the configs agree); the caller
      records them in the run's history.

    Raises:
      ConfigError: listing every changed field, when any of them is not allowed.
    """
    allowed = check_allowed(allowed)
    changes = changed_fields(recorded, config)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in
                           refused.items())
        safe = [k for k in refused if k in RESUME_ALLOWED]
        hint = ("use a new --workdir" if len(safe) < len(refused) else
                f"use a new --workdir, or pass --allow_changed={','.join(safe)} to continue this "
                "run with them (recorded in its history)")
        raise ConfigError(f"the config differs from the run in {workdir} (checkpoint {step}) in "
                          f"{len(refused)} field(s): {listed}. A resumed run must be the same "
                          f"run: {hint}")
    return changes


def resume_history(meta: dict, step: int, changes: dict[str, list]) -> list[dict]:
    """The ``history`` of the run whose checkpoint record is ``meta``, plus this resume when it
    changed fields (``{"step", "changed": {field: [old, new]}, "time"}``, logged too)."""
    history = list(meta.get("history", []))
    if changes:
        logging.warning("Continuing the run at %d with changed fields (allowed): %s", step,
                        "; ".join(f"{k}: {_show(old)} -> {_show(new)}"
                                  for k, (old, new) in changes.items()))
        history.append({"step": int(step), "changed": changes, "time": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")})
    return history


def _show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)

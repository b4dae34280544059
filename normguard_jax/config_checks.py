"""Config validation that runs before anything is built or compiled.

Each check reads a field by its dotted path and raises ``ConfigError`` (a ValueError) whose
message starts with that path, e.g. ``config.train.steps must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Iterable

import ml_collections


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
           strict_minimum: bool = False) -> float:
    """Checks a finite real field with optional bounds (``strict_minimum``: ``> minimum``)."""
    v = get_field(config, path)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and minimum is not None:
        ok = v > minimum if strict_minimum else v >= minimum
    if ok and maximum is not None:
        ok = v <= maximum
    if not ok:
        lo = "" if minimum is None else (f" > {minimum}" if strict_minimum else f" >= {minimum}")
        hi = "" if maximum is None else f" <= {maximum}"
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
    """Creates directory ``path`` if needed and checks that a file can be written in it.

    Runs before anything is built, so a typo'd or read-only path fails in a second rather than
    after a compiled step, when the first checkpoint is written.

    Raises:
      ConfigError: naming ``flag`` when ``path`` is empty, cannot be created or is not writable.
    """
    if not path:
        raise ConfigError(f"{flag} must be a directory path, got {path!r}")
    # Unique per host and process: on a pod slice every host probes the same shared folder.
    probe = os.path.join(path, f".write_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag}={path!r} is not a writable directory "
                          f"({type(e).__name__}: {e.strerror or e})") from None

"""Markdown tables and paired statistics shared by the experiment scripts.

Pure functions of numbers and strings (no files, no plots), so that every results file spells a
table, a missing value, a mean ± standard error and an early-stopping match the same way.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Sequence

import numpy as np

MISSING = "–"  # a value that was not measured (an en dash)


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------


def fmt(value, spec: str = "{:.3f}", missing: str = MISSING) -> str:
    """``spec.format(value)``, or ``missing`` when ``value`` is None."""
    return missing if value is None else spec.format(value)


def row(cells: Iterable[str]) -> str:
    """One markdown table row: ``| a | b | c |``."""
    return "| " + " | ".join(cells) + " |"


def header(labels: Sequence[str], left: int = 1) -> list[str]:
    """A markdown table's two header lines: the labels, then the alignment row with the first
    ``left`` columns left-aligned (``---``) and the others right-aligned (``---:``)."""
    left = min(left, len(labels))
    return [row(labels), "|" + "---|" * left + "---:|" * (len(labels) - left)]


# ----------------------------------------------------------------------------------------------
# Paired statistics.
# ----------------------------------------------------------------------------------------------


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / √n; 0 for n = 1) of a list of numbers."""
    v = np.asarray(values, dtype=float)
    se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(np.mean(v)), se


def paired_difference(after, before) -> tuple[float, float, float]:
    """Mean and standard error of the paired differences ``after[i] - before[i]`` and their
    t-statistic mean / s.e. (nan when the standard error is 0, e.g. for one pair)."""
    m, se = mean_se([a - b for a, b in zip(after, before, strict=True)])
    return m, se, (m / se if se > 0 else float("nan"))


# ----------------------------------------------------------------------------------------------
# Matching a run against another run's checkpoints (the early-stopping control).
# ----------------------------------------------------------------------------------------------


def closest_on_path(path: Sequence[tuple[int, dict]], reward: float) -> tuple[int, dict]:
    """The (iteration, summary) of ``path`` whose ``summary["reward"]`` is closest to
    ``reward`` (the first one on a tie)."""
    return min(path, key=lambda kr: abs(kr[1]["reward"] - reward))


def interpolate_at_reward(path: Sequence[tuple[int, dict]], reward: float, key: str):
    """``key`` of a checkpoint path (iteration, summary) linearly interpolated at ``reward``
    between the first two consecutive checkpoints whose rewards bracket it; None when no pair
    does."""
    for (_, a), (_, b) in zip(path, path[1:]):
        lo, hi = sorted((a["reward"], b["reward"]))
        if lo <= reward <= hi and hi > lo:
            w = (reward - a["reward"]) / (b["reward"] - a["reward"])
            return a[key] + w * (b[key] - a[key])
    return None


def cpu() -> tuple[str, bool]:
    """This machine's CPU model (``/proc/cpuinfo``, else the platform's name) and whether it has
    AVX-512 (XLA:CPU rounds differently with it, so runs on two kinds of CPU do not agree bit
    for bit)."""
    model, avx512 = platform.processor() or platform.machine(), False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return model, avx512
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 model)
    avx512 = any(ln.startswith("flags") and " avx512f" in ln for ln in lines)
    return model, avx512

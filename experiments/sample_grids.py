"""Sample grids of the main table: what the guard changed, for the pairs where it changed most.

The unguarded and guarded evaluation grids (``samples_eval.png`` of the main table's evaluation
cells) of the ``SAMPLE_PAIRS`` setting-method pairs whose judged-real fraction changed the most,
side by side, written to ``table_sweeps.RESULTS``. Run by experiments/main_table.py (stage
``analyse``).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from configs import rl_table
from configs.sweeps import table_main as main_sweep
from experiments import table_sweeps

SAMPLE_PAIRS = 2  # sample grids shown: the pairs whose judged-real fraction changed the most


def samples_png(setting: str, method: str, path: str) -> bool:
    """The unguarded (left) and guarded (right) evaluation sample grids of one pair, side by
    side with a white gap, written to ``path``; False when either grid is missing."""
    grids = [os.path.join(table_sweeps.REPO, main_sweep.WORKROOT,
                          f"eval-{setting}-{method}-{arm}", "samples_eval.png")
             for arm in ("plain", "guard")]
    if not all(os.path.exists(g) for g in grids):
        return False
    left, right = (np.asarray(Image.open(g).convert("RGB")) for g in grids)
    gap = 12
    canvas = np.full((max(left.shape[0], right.shape[0]), left.shape[1] + gap + right.shape[1],
                      3), 255, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    Image.fromarray(canvas).save(path)
    return True


def samples_md(data: dict) -> list[str]:
    """Side-by-side sample grids (``main_table_samples_<setting>_<method>.png``) of the
    ``SAMPLE_PAIRS`` pairs with the largest change in judged real, and their markdown."""
    changes = []
    for setting in rl_table.SETTINGS:
        for method in main_sweep.METHODS:
            plain = data["main"].get(f"{setting}-{method}-plain")
            guard = data["main"].get(f"{setting}-{method}-guard")
            if plain and guard:
                changes.append((abs(guard["realism"] - plain["realism"]), setting, method,
                                plain, guard))
    lines = []
    for _, setting, method, plain, guard in sorted(changes, key=lambda c: -c[0])[:SAMPLE_PAIRS]:
        name = f"main_table_samples_{setting}_{method}.png"
        if samples_png(setting, method, os.path.join(table_sweeps.RESULTS, name)):
            lines += [f"{setting}, {method}: unguarded on the left (judged real "
                      f"{plain['realism']:.2f}, FD {plain['fd']:.2f}), NormGuard λ="
                      f"{main_sweep.GUARD_WEIGHT:g} on the right ({guard['realism']:.2f}, FD "
                      f"{guard['fd']:.2f}); one row per class, the evaluation's fixed seeds.",
                      "", f"![{setting} {method}]({name})", ""]
    return lines

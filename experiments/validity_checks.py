"""The statistics of the validity study (experiments/validity.py): do the quality metrics rank
degraded sets below real ones, beyond sampling noise?

Sampling noise. ``quality_metrics_and_errors`` returns ``normguard_jax.quality``'s metrics
and a standard error per metric, at the set's size, with the reference held fixed: binomial for
``realism`` (over distinct images, with the Laplace estimate (k + 1) / (n + 2) so that 0 and 1
keep a non-zero error); the standard error of the mean of per-image values for the detector and
range statistics; and half-sampling for the set statistics (fd, recall, precision, density,
coverage, diversity): the standard deviation of the statistic over random class-balanced halves.
Without replacement, a half of n has variance σ²/(n/2)·(1 - 1/2) = σ²/n for a mean, so this
spread estimates the standard error at the full size n (it includes the small-set bias of FD and
k-NN radii only in its spread, not in its level).

``ladder_check`` compares a metric along a degradation ladder with that noise as the
tolerance; ``BLIND_BY_CONSTRUCTION`` lists the families a metric cannot see by construction;
``interleaved_halves`` splits the held-out set into reference and real candidates.
"""

from __future__ import annotations

import numpy as np

from normguard_jax import quality

# Degradation families (degradations.VALIDITY_LADDERS) a metric cannot see by construction:
# the per-image detector cannot see set diversity; a blur is a convex combination of pixels and
# repetition copies them, so neither leaves [-1, 1] (which is why the range statistics are
# diagnostics, not quality metrics).
BLIND_BY_CONSTRUCTION: dict[str, tuple[str, ...]] = {
    "realism": ("diversity",),
    "out_of_range": ("blur", "diversity"),
    "overshoot": ("blur", "diversity"),
}


def _distinct_rows(images) -> np.ndarray:
    """Indices of the first occurrence of each distinct image (sorted)."""
    flat = np.ascontiguousarray(np.asarray(images).reshape(len(images), -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def random_half(labels, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random class-balanced half: floor(n_c / 2) of each class's n_c."""
    labels = np.asarray(labels)
    parts = [rng.permutation(np.flatnonzero(labels == c))[:np.sum(labels == c) // 2]
             for c in np.unique(labels)]
    return np.sort(np.concatenate(parts))


def quality_metrics_and_errors(images, labels, reference: quality.Reference,
                               nets: quality.QualityNets,
                               tol: float = quality.DEFAULT_RANGE_TOLERANCE, *,
                               repeats: int = 20, seed: int = 0
                               ) -> tuple[dict[str, float], dict[str, float]]:
    """``quality.quality_metrics`` and the standard error of each value at this set size.

    The errors (method in the module docstring) describe the draw of the sample set with the
    reference held fixed: binomial for ``realism``, standard error of the mean for the other
    per-image metrics (both over distinct images, so a set of repeated images is as uncertain
    as its distinct members), and half-sampling over ``repeats`` random class-balanced halves
    (``random_half``, seeded by ``seed``) for the set statistics.

    Args:
      images, labels, reference, nets, tol: as in ``quality.quality_metrics``.
      repeats: number of halves (0: no errors, an empty dict is returned; else >= 2).
      seed: seed of the halves.

    Returns:
      ``(metrics, errors)``: two dicts of floats; ``errors`` has the keys of ``metrics`` except
      ``diversity`` (its ratio is given).
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    metrics, features, per_image = quality.measure(images, labels, reference, nets, tol)
    if repeats == 0:
        return metrics, {}
    if repeats < 2:
        raise ValueError(f"repeats must be 0 or >= 2, got {repeats}")
    distinct = _distinct_rows(images)
    n = len(distinct)
    errors = {}
    hits = float(np.sum(per_image["realism"][distinct]))
    p = (hits + 1.0) / (n + 2.0)
    errors["realism"] = float(np.sqrt(p * (1.0 - p) / n))
    for name in ("out_of_range", "overshoot", "detector_p_real", "detector_logit"):
        v = per_image[name][distinct]
        errors[name] = float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    rng = np.random.default_rng(seed)
    halves = [quality.set_statistics(features[i], images[i], labels[i], reference)
              for i in (random_half(labels, rng) for _ in range(repeats))]
    for name in ("fd", "recall", "precision", "density", "coverage", "diversity_ratio"):
        errors[name] = float(np.std([h[name] for h in halves], ddof=1))
    return metrics, {name: errors[name] for name in quality.METRIC_ORDER if name in errors}


def ladder_check(values, errors, sign: int, z: float = 2.0, floor: float = 1e-6
                 ) -> dict[str, bool | float]:
    """Whether a metric worsens, up to sampling noise, along a degradation ladder.

    A change from value a (error e_a) to b (error e_b) counts as an improvement only if
    ``sign·(b - a) > z·sqrt(e_a² + e_b²) + floor``: more than z standard errors of the difference
    of two independent sets (``floor`` absorbs float rounding of metrics whose error is 0).

    Args:
      values: (L,) metric values, ``values[0]`` for the undegraded real set, then increasing
        strength.
      errors: (L,) their standard errors.
      sign: +1 if higher is better, -1 if lower is better.
      z: tolerance in standard errors.
      floor: absolute tolerance added to every comparison.

    Returns:
      ``monotone``: no step improves; ``real_best``: no degraded set improves on the real one;
      ``worse``: the last value is worse than the real one (by more than ``floor``);
      ``significant``: worse by more than the tolerance; ``passed``: monotone, real_best and
      worse; ``closest``: the largest improvement (step or vs real) divided by its tolerance
      (above 1 means a violation; 0 if nothing improves).
    """
    v = sign * np.asarray(values, np.float64)  # higher is better after the sign
    e = np.asarray(errors, np.float64)
    tol_step = z * np.sqrt(e[:-1] ** 2 + e[1:] ** 2) + floor
    tol_real = z * np.sqrt(e[0] ** 2 + e[1:] ** 2) + floor
    gain_step, gain_real = v[1:] - v[:-1], v[1:] - v[0]
    out = {"monotone": bool(np.all(gain_step <= tol_step)),
           "real_best": bool(np.all(gain_real <= tol_real)),
           "worse": bool(v[-1] < v[0] - floor),
           "significant": bool(v[0] - v[-1] > tol_real[-1]),
           "closest": float(max(0.0, np.max(gain_step / tol_step), np.max(gain_real / tol_real)))}
    out["passed"] = out["monotone"] and out["real_best"]
    return out


def interleaved_halves(labels) -> tuple[np.ndarray, np.ndarray]:
    """Splits a labelled set in two class-balanced halves: within each class, the examples at
    even positions (in order) form the first half, those at odd positions the second.

    Returns:
      ``(first, second)``: sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        first.append(idx[0::2])
        second.append(idx[1::2])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))

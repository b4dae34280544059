"""Quality metrics that are not the reward.

None of these uses the reward classifier or any reward: the feature metrics use the
autoencoder of ``auxnets`` (``encoder``), the realism metric uses the patch detector
(``detector``), and the pixel statistics use no network (see ``models/small_nets.py`` for why
the encoder is independent of the classifier). Images are (N, H, W, C) float32, nominally in
[-1, 1]; the networks and the diversity statistic see them clipped to [-1, 1], the range
statistics see the raw values. Generated samples are compared with a ``Reference`` built from
held-out real images (the test split).

What each metric captures, and what it misses:

``fd`` — Fréchet distance between Gaussians fitted to the encoder features of the samples and
  of the reference (the FID formula, in the 32-d autoencoder bottleneck instead of Inception).
  Captures shifts of the mean appearance and of the spread (including lost diversity). Misses
  anything the autoencoder cannot reconstruct (it is a small net: fine texture), and it is
  biased upwards for small sets (compare numbers only at equal set sizes).
``recall`` — k-NN recall (Kynkäänniemi et al. 2019) in the same features, k = 3: the fraction
  of real images inside the samples' manifold (the union of balls around each sample reaching its
  k-th nearest other sample). Captures missing modes and lost diversity. Misses how mass is
  distributed inside the manifold; samples that spread out (outliers) inflate their balls, so
  recall can rise a little under mild contrast inflation or noise. It also drops to 0 as soon as
  every sample has k exact copies, which exaggerates exact repetition.
``precision`` (diagnostic) — k-NN precision, k = 3: the fraction of samples inside the real
  manifold (balls around each real image reaching its k-th real neighbour). Meant to capture
  off-manifold samples, but in this feature space blurred images fall into the dense core of the
  real manifold, so precision *rises* under blur and is not a quality metric here.
``density`` / ``coverage`` (diagnostics) — Naeem et al. 2020, k = 5, balls around real images
  only: density is the mean number of real balls containing a sample divided by k (about 1 for
  real data, above 1 for samples crowded into dense regions: two-sided), coverage the fraction of
  real balls that contain at least one sample. Robust to outlier samples (coverage does not rise
  under contrast inflation, unlike recall) and graded under mode collapse where recall hits 0,
  but both rise under mild blur in this feature space, so neither is a quality metric here.
``realism`` — fraction of samples the forensic detector judges real (logit > 0); also, as
  diagnostics, ``detector_p_real``, the mean predicted probability, and ``detector_logit``, the
  mean logit, which still ranks sets once every sample is judged fake (but a confident detector
  can grow more confident under an artefact too faint to cross its threshold). Captures per-image local artefacts of
  the kinds the detector was trained on (residual noise, blur, inflated contrast, ghosting) and
  resemblances to them. Its 11-pixel receptive field makes it blind to global structure:
  malformed but cleanly drawn blobs can pass as real, as can wrong class content and lost
  diversity. Read it next to ``fd`` and ``recall``, which do see those.
``out_of_range`` / ``overshoot`` (saturation diagnostics) — fraction of values more than
  ``tol`` outside [-1, 1], and mean of ``max(|x| - 1, 0)``. They measure over-saturation before
  clipping (what velocity-norm inflation does to the final state); real data score exactly 0.
  They are blind to everything inside the range: a blur is a convex combination of pixels and
  repetition copies them, so neither leaves [-1, 1]. Because they cannot worsen under blur or
  lost diversity they are not quality metrics; they are reported as the saturation artefact.
``diversity`` (diagnostic) — mean over classes of the mean pairwise RMS pixel distance between samples of
  the same class; ``diversity_ratio`` divides it by the reference's value. Falls under mode
  collapse; but noise raises it, so read it with the other metrics (it is two-sided: the ideal
  ratio is about 1).

Which of these are quality metrics. ``QUALITY_METRICS`` (fd, recall, realism) are the ones
``experiments/validity.py`` validates: held-out real data score best, and none improves, beyond
sampling noise (``experiments/validity_checks.py``: standard errors and the ladder check), as
real images are degraded more (noise, blur, contrast inflation, background noise) or lose
diversity, and each family is caught beyond noise by several of them. The one exception is by
construction: the per-image detector cannot see set diversity, which FD and recall catch. Not
every metric sees every family: recall barely moves under contrast inflation of near-binary
digits (the nets see clipped images), which FD and realism catch. ``DIAGNOSTICS`` are reported
for reading a result but fail that check in this feature space, or are blind to a family (the
saturation statistics; see above).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import auxnets

# Direction of every metric that has one: +1 if higher is better, -1 if lower is better. Both
# validated quality metrics and diagnostics are listed; density and diversity_ratio are
# two-sided (ideal about 1) and are not.
DIRECTION: dict[str, int] = {
    "fd": -1, "recall": +1, "realism": +1, "out_of_range": -1, "overshoot": -1,
    "precision": +1, "coverage": +1, "detector_p_real": +1, "detector_logit": +1,
}

# The quality metrics: validated by experiments/validity.py (see the module docstring).
QUALITY_METRICS: tuple[str, ...] = ("fd", "recall", "realism")

# Reported for diagnosis only; they fail the validity check here (module docstring).
DIAGNOSTICS: tuple[str, ...] = ("out_of_range", "overshoot", "precision", "density", "coverage",
                                "detector_p_real", "detector_logit", "diversity_ratio")

DEFAULT_KNN_K = 3
DEFAULT_DENSITY_COVERAGE_K = 5  # Naeem et al. 2020's recommendation
DEFAULT_RANGE_TOLERANCE = 0.05  # about 6 grey levels beyond the range
# Order of the metrics in every result.
METRIC_ORDER: tuple[str, ...] = (
    "fd", "recall", "realism", "out_of_range", "overshoot", "precision", "density", "coverage",
    "detector_p_real", "detector_logit", "diversity", "diversity_ratio")


# ----------------------------------------------------------------------------------------------
# Fréchet distance.
# ----------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64 (N >= 2)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr((cov1 · cov2)^{1/2})`` for PSD matrices, as ``Σ sqrt(eig(S cov2 S))``, S = cov1^{1/2}.

    ``S cov2 S`` is symmetric PSD and similar to ``cov1 cov2``, so no complex square root is
    needed.
    """
    s = _psd_sqrt(np.asarray(cov1, np.float64))
    m = s @ np.asarray(cov2, np.float64) @ s
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2):
    ``‖mu1 - mu2‖² + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})`` (float, >= 0)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
              - 2.0 * trace_sqrt_product(cov1, cov2))
    return max(d, 0.0)


# ----------------------------------------------------------------------------------------------
# k-NN precision and recall.
# ----------------------------------------------------------------------------------------------


def pairwise_distances(a, b, chunk: int = 1024) -> np.ndarray:
    """Euclidean distances (Na, Nb) float64 between rows of a (Na, D) and b (Nb, D)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    b2 = np.sum(b * b, axis=1)
    out = np.empty((len(a), len(b)))
    for s in range(0, len(a), chunk):
        x = a[s:s + chunk]
        d2 = np.sum(x * x, axis=1)[:, None] + b2[None, :] - 2.0 * x @ b.T
        out[s:s + chunk] = np.sqrt(np.clip(d2, 0.0, None))
    return out


def knn_radii(features, k: int = DEFAULT_KNN_K) -> np.ndarray:
    """Distance of each row to its k-th nearest other row: (N,) float64 (needs N > k)."""
    f = np.asarray(features, np.float64)
    if len(f) <= k:
        raise ValueError(f"need more than k={k} points, got {len(f)}")
    d = pairwise_distances(f, f)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def precision_recall(real, fake, k: int = DEFAULT_KNN_K, *, real_radii=None
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Args:
      real: (N, D) reference features.
      fake: (M, D) sample features.
      k: neighbourhood size of the manifold estimate.
      real_radii: optional precomputed ``knn_radii(real, k)``.

    Returns:
      ``(precision, recall)``: precision = fraction of fake points within the k-NN radius of at
      least one real point; recall = fraction of real points within the k-NN radius (among the
      fakes) of at least one fake point.
    """
    real_radii = knn_radii(real, k) if real_radii is None else np.asarray(real_radii)
    fake_radii = knn_radii(fake, k)
    d = pairwise_distances(fake, real)  # (M, N)
    precision = float(np.mean(np.any(d <= real_radii[None, :], axis=1)))
    recall = float(np.mean(np.any(d <= fake_radii[:, None], axis=0)))
    return precision, recall


def density_coverage(real, fake, k: int = DEFAULT_DENSITY_COVERAGE_K, *, real_radii=None
                     ) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), from balls around the real points only.

    Args:
      real: (N, D) reference features (N > k).
      fake: (M, D) sample features (any M >= 1).
      k: neighbourhood size: each real ball reaches that point's k-th nearest other real point.
      real_radii: optional precomputed ``knn_radii(real, k)``.

    Returns:
      ``(density, coverage)``: density = (1 / (k·M)) Σ_j #{i : fake_j in ball_i} (about 1 when
      samples follow the real distribution; it can exceed 1), coverage = fraction of real
      balls that contain at least one fake point (in [0, 1]).
    """
    real_radii = knn_radii(real, k) if real_radii is None else np.asarray(real_radii)
    inside = pairwise_distances(fake, real) <= real_radii[None, :]  # (M, N)
    return float(np.sum(inside) / (k * len(inside))), float(np.mean(np.any(inside, axis=0)))


# ----------------------------------------------------------------------------------------------
# Pixel statistics.
# ----------------------------------------------------------------------------------------------


def out_of_range(images, tol: float = DEFAULT_RANGE_TOLERANCE) -> float:
    """Fraction of values with ``|x| > 1 + tol``."""
    return float(np.mean(np.abs(np.asarray(images, np.float32)) > 1.0 + tol))


def overshoot(images) -> float:
    """Mean of ``max(|x| - 1, 0)`` over all values."""
    return float(np.mean(np.maximum(np.abs(np.asarray(images, np.float64)) - 1.0, 0.0)))


def class_diversity(images, labels) -> float:
    """Mean over classes (with >= 2 images) of the mean pairwise RMS distance
    ``‖x_i - x_j‖ / sqrt(H·W·C)`` between distinct images of that class (clipped to [-1, 1])."""
    x = np.clip(np.asarray(images, np.float64), -1.0, 1.0).reshape(len(images), -1)
    labels = np.asarray(labels)
    per_class = []
    for c in np.unique(labels):
        xc = x[labels == c]
        n = len(xc)
        if n < 2:
            continue
        d = pairwise_distances(xc, xc) / np.sqrt(x.shape[1])
        per_class.append(np.sum(np.triu(d, 1)) / (n * (n - 1) / 2))
    if not per_class:
        raise ValueError("class_diversity needs a class with at least two images")
    return float(np.mean(per_class))


# ----------------------------------------------------------------------------------------------
# Networks and reference.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QualityNets:
    """The metric networks as jitted batch functions on (B, H, W, C) float32 images.

    Attributes:
      encode: images -> (B, D) features (images clipped to [-1, 1] inside).
      detect: images -> (B,) real-vs-generated logits, > 0 means judged real (clipped inside).
      batch_size: chunk size used on large sets.
    """

    encode: Callable[[jax.Array], jax.Array]
    detect: Callable[[jax.Array], jax.Array]
    batch_size: int = 250

    def features(self, images) -> np.ndarray:
        return auxnets.batched_apply(self.encode, images, self.batch_size)

    def logits(self, images) -> np.ndarray:
        return auxnets.batched_apply(self.detect, images, self.batch_size)


def quality_nets(nets: Callable[[str], auxnets.AuxNet], batch_size: int = 250) -> QualityNets:
    """``QualityNets`` from a net provider such as ``auxnets.AuxNetCache`` (encoder, detector)."""
    enc, det = nets("encoder"), nets("detector")
    return QualityNets(
        encode=jax.jit(lambda x: enc.apply(enc.params, jnp.clip(x, -1.0, 1.0))),
        detect=jax.jit(lambda x: det.apply(det.params, jnp.clip(x, -1.0, 1.0))),
        batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Statistics of the held-out real images that samples are compared with.

    Attributes:
      features: (N, D) float64 encoder features.
      mu, cov: their mean and covariance.
      radii: (N,) k-NN radii (``k``) for precision.
      diversity: ``class_diversity`` of the reference images.
      k: neighbourhood size of precision/recall.
      size: N.
      dc_k: neighbourhood size of density/coverage.
      dc_radii: (N,) k-NN radii (``dc_k``) for density/coverage.
    """

    features: np.ndarray
    mu: np.ndarray
    cov: np.ndarray
    radii: np.ndarray
    diversity: float
    k: int
    size: int
    dc_k: int
    dc_radii: np.ndarray


def make_reference(images, labels, nets: QualityNets, k: int = DEFAULT_KNN_K,
                   dc_k: int = DEFAULT_DENSITY_COVERAGE_K) -> Reference:
    """Reference statistics of real images (N, H, W, C) float32 in [-1, 1] (or uint8)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = (images.astype(np.float32) / 127.5 - 1.0)
    f = nets.features(images).astype(np.float64)
    mu, cov = feature_statistics(f)
    return Reference(features=f, mu=mu, cov=cov, radii=knn_radii(f, k),
                     diversity=class_diversity(images, labels), k=k, size=len(f),
                     dc_k=dc_k, dc_radii=knn_radii(f, dc_k))


def set_statistics(features, images, labels, reference: Reference) -> dict[str, float]:
    """The metrics that are functions of the whole set (not means of per-image values): fd,
    precision, recall, density, coverage, diversity and diversity_ratio, from (M, D) features,
    (M, H, W, C) images and (M,) labels."""
    mu, cov = feature_statistics(features)
    precision, recall = precision_recall(reference.features, features, reference.k,
                                         real_radii=reference.radii)
    density, coverage = density_coverage(reference.features, features, reference.dc_k,
                                         real_radii=reference.dc_radii)
    diversity = class_diversity(images, labels)
    return {"fd": frechet_distance(mu, cov, reference.mu, reference.cov),
            "precision": precision, "recall": recall, "density": density, "coverage": coverage,
            "diversity": diversity, "diversity_ratio": diversity / reference.diversity}


def per_image_values(logits, images, tol: float) -> dict[str, np.ndarray]:
    """(M,) per-image values whose means are the detector and range metrics."""
    x = np.abs(np.asarray(images, np.float64)).reshape(len(images), -1)
    logits = np.asarray(logits, np.float64)
    return {"realism": (logits > 0).astype(np.float64),
            "detector_p_real": 1.0 / (1.0 + np.exp(-logits)),
            "detector_logit": logits,
            "out_of_range": np.mean(x > 1.0 + tol, axis=1),
            "overshoot": np.mean(np.maximum(x - 1.0, 0.0), axis=1)}


class Measurement(NamedTuple):
    """A sample set's metrics and what they were computed from.

    Attributes:
      metrics: every metric (``METRIC_ORDER``) as a float.
      features: (M, D) float64 encoder features of the set.
      per_image: (M,) float64 per-image values whose means are the detector and range metrics
        (``per_image_values``).
    """

    metrics: dict[str, float]
    features: np.ndarray
    per_image: dict[str, np.ndarray]


def measure(images, labels, reference: Reference, nets: QualityNets,
            tol: float = DEFAULT_RANGE_TOLERANCE) -> Measurement:
    """``quality_metrics`` with the features and per-image values they were computed from (for
    statistics over subsets, e.g. the standard errors of ``experiments/validity_checks.py``)."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    features = nets.features(images).astype(np.float64)
    per_image = per_image_values(nets.logits(images), images, tol)
    metrics = set_statistics(features, images, labels, reference)
    metrics.update({name: float(np.mean(v)) for name, v in per_image.items()})
    return Measurement({name: metrics[name] for name in METRIC_ORDER}, features, per_image)


def quality_metrics(images, labels, reference: Reference, nets: QualityNets,
                    tol: float = DEFAULT_RANGE_TOLERANCE) -> dict[str, float]:
    """Every quality metric and diagnostic of a sample set (see the module docstring).

    Args:
      images: (M, H, W, C) float32 samples (raw, not clipped).
      labels: (M,) int32 the classes they were generated for.
      reference: held-out real statistics (``make_reference``).
      nets: the metric networks.
      tol: tolerance of ``out_of_range``.

    Returns:
      ``fd``, ``recall``, ``realism`` (``QUALITY_METRICS``) and ``out_of_range``,
      ``overshoot``, ``precision``, ``density``, ``coverage``, ``detector_p_real``,
      ``detector_logit``, ``diversity``, ``diversity_ratio`` (diagnostics) as floats.
    """
    return measure(images, labels, reference, nets, tol).metrics

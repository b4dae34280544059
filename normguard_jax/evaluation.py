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
``precision`` / ``recall`` — k-NN precision and recall (Kynkäänniemi et al. 2019) in the same
  features, k = 3: the fraction of samples inside the real manifold (union of balls reaching each
  real point's k-th neighbour) and the fraction of real images inside the samples' manifold.
  Precision captures off-manifold (unrealistic) samples, recall captures missing modes. Both
  are blind to how mass is distributed inside the manifold, and outliers inflate the balls.
``realism`` — fraction of samples the forensic detector judges real (logit > 0); also
  ``detector_p_real``, the mean predicted probability, and ``detector_logit``, the mean logit,
  which still ranks sets once every sample is judged fake. Captures per-image local artefacts of
  the kinds the detector was trained on (residual noise, blur, inflated contrast, ghosting) and
  resemblances to them. Its 11-pixel receptive field makes it blind to global structure:
  malformed but cleanly drawn blobs can pass as real, as can wrong class content and lost
  diversity. Read it next to ``fd`` and ``recall``, which do see those.
``out_of_range`` — fraction of values more than ``tol`` outside [-1, 1]; ``overshoot`` — mean
  of ``max(|x| - 1, 0)``. Capture over-saturation before clipping (what velocity-norm inflation
  does to the final state). Real data score exactly 0; blind to everything inside the range.
``diversity`` — mean over classes of the mean pairwise RMS pixel distance between samples of
  the same class; ``diversity_ratio`` divides it by the reference's value. Falls under mode
  collapse; but noise raises it, so read it with the other metrics (it is two-sided: the ideal
  ratio is about 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import auxnets

# For each metric: +1 if higher is better, -1 if lower is better (diversity_ratio is
# two-sided and not listed).
DIRECTION: dict[str, int] = {
    "fd": -1, "precision": +1, "recall": +1, "realism": +1, "detector_p_real": +1,
    "detector_logit": +1, "out_of_range": -1, "overshoot": -1,
}

DEFAULT_KNN_K = 3
DEFAULT_RANGE_TOLERANCE = 0.05  # about 6 grey levels beyond the range


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
      radii: (N,) k-NN radii for precision.
      diversity: ``class_diversity`` of the reference images.
      k: neighbourhood size used for ``radii``.
      size: N.
    """

    features: np.ndarray
    mu: np.ndarray
    cov: np.ndarray
    radii: np.ndarray
    diversity: float
    k: int
    size: int


def make_reference(images, labels, nets: QualityNets, k: int = DEFAULT_KNN_K) -> Reference:
    """Reference statistics of real images (N, H, W, C) float32 in [-1, 1] (or uint8)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = (images.astype(np.float32) / 127.5 - 1.0)
    f = nets.features(images).astype(np.float64)
    mu, cov = feature_statistics(f)
    return Reference(features=f, mu=mu, cov=cov, radii=knn_radii(f, k),
                     diversity=class_diversity(images, labels), k=k, size=len(f))


def quality_metrics(images, labels, reference: Reference, nets: QualityNets,
                    tol: float = DEFAULT_RANGE_TOLERANCE) -> dict[str, float]:
    """Every quality metric of a sample set (see the module docstring).

    Args:
      images: (M, H, W, C) float32 samples (raw, not clipped).
      labels: (M,) int32 the classes they were generated for.
      reference: held-out real statistics (``make_reference``).
      nets: the metric networks.
      tol: tolerance of ``out_of_range``.

    Returns:
      ``fd``, ``precision``, ``recall``, ``realism``, ``detector_p_real``, ``detector_logit``,
      ``out_of_range``, ``overshoot``, ``diversity``, ``diversity_ratio`` as floats.
    """
    images = np.asarray(images, np.float32)
    f = nets.features(images).astype(np.float64)
    mu, cov = feature_statistics(f)
    precision, recall = precision_recall(reference.features, f, reference.k,
                                         real_radii=reference.radii)
    logits = nets.logits(images)
    diversity = class_diversity(images, labels)
    return {
        "fd": frechet_distance(mu, cov, reference.mu, reference.cov),
        "precision": precision,
        "recall": recall,
        "realism": float(np.mean(logits > 0)),
        "detector_p_real": float(np.mean(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))),
        "detector_logit": float(np.mean(logits)),
        "out_of_range": out_of_range(images, tol),
        "overshoot": overshoot(images),
        "diversity": diversity,
        "diversity_ratio": diversity / reference.diversity,
    }


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

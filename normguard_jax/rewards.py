"""Reward registry: pure, jit-able ``reward(images, cond) -> (B,)`` functions.

Conventions: images (B, H, W, C) float32 NHWC, data range [-1, 1]; every reward first clips
to [-1, 1] (it scores the image as it would be displayed or saved; how far a sample leaves the
range is a saturation diagnostic, ``quality.overshoot``). cond (B,) int32 labels in
[0, num_classes) (the null class is not a valid request). Output (B,) float32, higher is
better.

``REWARDS`` maps a name to a ``RewardEntry``: a builder taking a ``RewardContext`` (the
dataset, and lazy access to the cached reward classifier), a truthful ``differentiable`` flag
(differentiable rewards have finite, generally non-zero gradients with respect to the
images; the others are piecewise constant and have zero gradient almost everywhere), and an
applicability rule (e.g. ``saturation`` needs RGB, the ``shapes_*`` rules need the ``shapes``
dataset).

Families:

- Alignment. ``classifier_logprob`` = log p(cond | image) under the cached classifier (≤ 0,
  saturates near 0 as soon as samples are recognisable); ``classifier_correct`` = 1 when the
  classifier's top class is cond. For ``shapes``: ``shapes_colour``, ``shapes_shape``,
  ``shapes_rule`` (their product) and ``shapes_correct``, computed exactly from the rendering
  rules of ``normguard_jax.data.shapes`` with no learned component (see ``shapes_scores``).
- Preference-like proxies, cheap to over-optimise on purpose: ``contrast`` (pixel std; ends in
  binarised, over-thick strokes), ``stroke_weight`` (ink/brightness coverage), ``saturation``
  (chroma, RGB only), ``compressibility`` (minus the mean quantised-DCT magnitude of 8×8
  blocks, a smooth stand-in for JPEG size; ends in flat images) and ``jpeg_zeros`` (the exact,
  non-differentiable fraction of quantised DCT coefficients that are zero).
- Combinations: ``build_combined({"classifier_logprob": 1.0, "contrast": 1.0}, ctx)`` returns
  the weighted sum and every component for logging. ``DEFAULT_WEIGHTS`` pairs a saturating
  alignment term with a proxy that keeps rising, so RL has headroom.

The classifier is the only network any reward uses; the quality metrics
(``normguard_jax.quality``) use other networks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config_checks
from normguard_jax.data import shapes

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What reward builders may use.

    Attributes:
      dataset: dataset name (``"digits_mnist"``, ``"shapes"``, ``"shapes/small"``, ...).
      image_shape: (H, W, C).
      num_classes: number of real classes.
      nets: ``nets("classifier") -> auxnets.AuxNet``, e.g. an ``auxnets.AuxNetCache``; called
        only by rewards that need the classifier, and only when they are built.
    """

    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int
    nets: Callable[[str], object]

    @property
    def base_dataset(self) -> str:
        return self.dataset.partition("/")[0]


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """A registry entry.

    Attributes:
      build: ``build(ctx) -> reward_fn``.
      differentiable: whether gradients with respect to the images are informative.
      applies: ``applies(ctx) -> bool``, whether the reward is defined for this dataset.
      description: one line for tables and error messages.
    """

    build: Callable[[RewardContext], RewardFn]
    differentiable: bool
    applies: Callable[[RewardContext], bool]
    description: str


@dataclasses.dataclass(frozen=True)
class Reward:
    """A built reward: ``reward(images, cond) -> (B,)`` float32."""

    name: str
    fn: RewardFn
    differentiable: bool

    def __call__(self, images: jax.Array, cond: jax.Array) -> jax.Array:
        return self.fn(images, cond)


def displayed(images: jax.Array) -> jax.Array:
    """Clips to [-1, 1]: the image as saved or shown."""
    return jnp.clip(images, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Preference-like proxies (no network, cond ignored).
# ----------------------------------------------------------------------------------------------


def contrast(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Standard deviation of the clipped pixel values over (H, W, C): in [0, 1], 1 for an image
    that is half -1 and half +1. Real MNIST digits score about 0.6."""
    del cond
    return jnp.std(displayed(images), axis=(1, 2, 3))


def stroke_weight(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Mean brightness ``(x + 1) / 2`` of the clipped image, in [0, 1]: for white-on-black
    digits, the ink coverage (stroke thickness)."""
    del cond
    return jnp.mean((displayed(images) + 1.0) * 0.5, axis=(1, 2, 3))


def saturation(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Mean chroma ``(max_c x - min_c x) / 2`` of the clipped RGB image, in [0, 1]."""
    del cond
    x = displayed(images)
    return jnp.mean((jnp.max(x, axis=-1) - jnp.min(x, axis=-1)) * 0.5, axis=(1, 2))


# JPEG's example luminance quantisation table (ITU-T T.81, Annex K, "quality 50").
JPEG_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=np.float32)

# RGB -> luma weights (ITU-R BT.601, as in JFIF).
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix D (n, n): ``coeffs = D @ block @ D.T``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def quantised_dct(images: jax.Array) -> jax.Array:
    """JPEG-style block transform of the luma channel, divided by the quantisation table.

    Args:
      images: (B, H, W, C), C in {1, 3}, H and W multiples of 8.

    Returns:
      (B, H/8, W/8, 8, 8) float32 ``DCT(Y - 128) / Q`` with Y the clipped luma in 0..255.
      Rounding this gives the integers JPEG entropy-codes.
    """
    x = displayed(images)
    levels = (x + 1.0) * 127.5
    luma = levels[..., 0] if x.shape[-1] == 1 else levels @ jnp.asarray(_LUMA_WEIGHTS)
    b, h, w = luma.shape
    blocks = (luma - 128.0).reshape(b, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)
    d = jnp.asarray(dct_matrix(8))
    coeffs = jnp.einsum("ij,bxyjk,lk->bxyil", d, blocks, d)
    return coeffs / jnp.asarray(JPEG_LUMA_TABLE)


_AC_MASK = np.ones((8, 8), np.float32)
_AC_MASK[0, 0] = 0.0  # JPEG codes the DC term differentially; score the 63 AC terms.


def compressibility(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Minus the mean absolute quantised AC coefficient of the 8×8 luma blocks (≤ 0; 0 for a
    flat image). A smooth proxy for JPEG file size: it falls as edges and texture are added."""
    del cond
    q = jnp.abs(quantised_dct(images)) * jnp.asarray(_AC_MASK)
    return -jnp.sum(q, axis=(-1, -2)).mean(axis=(1, 2)) / 63.0


def jpeg_zeros(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Fraction of the 63 AC coefficients per block that JPEG (quality 50) quantises to zero,
    averaged over blocks, in [0, 1]. Piecewise constant: not differentiable."""
    del cond
    zero = (jnp.round(quantised_dct(images)) == 0).astype(jnp.float32) * jnp.asarray(_AC_MASK)
    return jnp.sum(zero, axis=(-1, -2)).mean(axis=(1, 2)) / 63.0


# ----------------------------------------------------------------------------------------------
# Classifier alignment.
# ----------------------------------------------------------------------------------------------


def _classifier_logits(ctx: RewardContext) -> Callable[[jax.Array], jax.Array]:
    net = ctx.nets("classifier")
    apply, params = net.apply, net.params
    return lambda images: apply(params, displayed(images))


def _build_classifier_logprob(ctx: RewardContext) -> RewardFn:
    logits_fn = _classifier_logits(ctx)

    def classifier_logprob(images, cond):
        """log p(cond | image) under the reward classifier, ≤ 0."""
        log_p = jax.nn.log_softmax(logits_fn(images), axis=-1)
        return jnp.take_along_axis(log_p, cond[:, None].astype(jnp.int32), axis=-1)[:, 0]

    return classifier_logprob


def _build_classifier_prob(ctx: RewardContext) -> RewardFn:
    log_prob = _build_classifier_logprob(ctx)

    def classifier_prob(images, cond):
        """p(cond | image) under the reward classifier, in [0, 1] (bounded: no heavy tail)."""
        return jnp.exp(log_prob(images, cond))

    return classifier_prob


def _build_classifier_correct(ctx: RewardContext) -> RewardFn:
    logits_fn = _classifier_logits(ctx)

    def classifier_correct(images, cond):
        """1.0 where the classifier's top class is cond, else 0.0."""
        return (jnp.argmax(logits_fn(images), axis=-1) == cond).astype(jnp.float32)

    return classifier_correct


# ----------------------------------------------------------------------------------------------
# Exact alignment for the `shapes` dataset, from its rendering rules.
# ----------------------------------------------------------------------------------------------

# Chroma (max - min over RGB, in grey levels) at which a pixel counts as half foreground, and
# the width of the soft threshold. Backgrounds are grey (chroma 0 exactly); class colours have
# chroma >= 106 even after jitter, so anti-aliased edge pixels cross it at ~50 % coverage.
FOREGROUND_CHROMA = 60.0
FOREGROUND_SOFTNESS = 8.0
# Scale (grey levels) of the colour likelihood; palette colours are >= 156 levels apart.
COLOUR_SCALE = 25.0
# Temperature of the shape softmax over IoUs.
SHAPE_TEMPERATURE = 0.05
# Rotations searched; the data's rotations are uniform in ±15°.
SHAPE_ANGLES = np.deg2rad(np.linspace(-15.0, 15.0, 7)).astype(np.float32)
_SUPERSAMPLE = 2

# Area of each shape at circumradius 1, in the order of shapes.SHAPES, from the inside tests of
# normguard_jax.data.shapes: circle π; square of half side 0.75; equilateral triangle of
# circumradius 1; cross = two 2 × 0.56 bars overlapping in a 0.56 × 0.56 square.
_CROSS_HALF_WIDTH = shapes._CROSS_HALF_WIDTH  # pylint: disable=protected-access
_SQUARE_HALF_SIDE = shapes._SQUARE_HALF_SIDE  # pylint: disable=protected-access
_TRIANGLE_INRADIUS = shapes._TRIANGLE_INRADIUS  # pylint: disable=protected-access
SHAPE_AREAS = np.array([
    math.pi,
    (2 * _SQUARE_HALF_SIDE) ** 2,
    3.0 * math.sqrt(3.0) / 4.0,
    2 * (2 * _CROSS_HALF_WIDTH * 2.0) - (2 * _CROSS_HALF_WIDTH) ** 2,
], np.float32)


def _in_circle(u: jax.Array, v: jax.Array) -> jax.Array:
    return u * u + v * v <= 1.0


def _in_square(u: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.abs(u), jnp.abs(v)) <= _SQUARE_HALF_SIDE


def _in_triangle(u: jax.Array, v: jax.Array) -> jax.Array:
    r3 = math.sqrt(3.0) / 2.0
    return ((v <= _TRIANGLE_INRADIUS) & (r3 * u - 0.5 * v <= _TRIANGLE_INRADIUS)
            & (-r3 * u - 0.5 * v <= _TRIANGLE_INRADIUS))


def _in_cross(u: jax.Array, v: jax.Array) -> jax.Array:
    au, av = jnp.abs(u), jnp.abs(v)
    return (((au <= _CROSS_HALF_WIDTH) & (av <= 1.0))
            | ((av <= _CROSS_HALF_WIDTH) & (au <= 1.0)))


# jnp twins of the inside tests of normguard_jax.data.shapes (same constants), in the order of
# shapes.SHAPES; (u, v) in units of the circumradius, "up" is -v.
_INSIDE_TESTS = (_in_circle, _in_square, _in_triangle, _in_cross)


def shape_templates(centre: jax.Array, size: jax.Array, height: int, width: int) -> jax.Array:
    """Coverage of every shape at every searched angle, as in ``shapes.shape_coverage``.

    Args:
      centre: (B, 2) (row, col) in pixels.
      size: (B, NUM_SHAPES) circumradius of each shape in pixels.
      height, width: image size.

    Returns:
      (B, NUM_SHAPES, len(SHAPE_ANGLES), H, W) float32 coverage in [0, 1]
      (2×2 supersampling).
    """
    offsets = (jnp.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
    rows = (jnp.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    cols = (jnp.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    dy = rows[None, :, None] - centre[:, 0, None, None]  # (B, Hs, 1)
    dx = cols[None, None, :] - centre[:, 1, None, None]  # (B, 1, Ws)
    angles = jnp.asarray(SHAPE_ANGLES)
    cos = jnp.cos(angles)[None, :, None, None]
    sin = jnp.sin(angles)[None, :, None, None]
    dy, dx = dy[:, None], dx[:, None]                     # (B, A, Hs|1, 1|Ws)
    out = []
    for k in range(shapes.NUM_SHAPES):
        r = size[:, k, None, None, None]
        u = (cos * dx - sin * dy) / r
        v = (sin * dx + cos * dy) / r
        inside = _INSIDE_TESTS[k](u, v).astype(jnp.float32)
        b, a = inside.shape[:2]
        blocks = inside.reshape(b, a, height, _SUPERSAMPLE, width, _SUPERSAMPLE)
        out.append(blocks.mean(axis=(3, 5)))
    return jnp.stack(out, axis=1)


def shapes_scores(images: jax.Array) -> dict[str, jax.Array]:
    """Rule-based reading of a `shapes` image.

    1. Foreground weight per pixel: ``sigmoid((chroma - 60) / 8)`` with chroma = max - min of
       RGB in grey levels (backgrounds are grey, class colours are saturated).
    2. Colour: the foreground-weighted mean RGB is compared with the four palette colours;
       ``colour_logits_j = -‖mean - COLOURS_j‖² / (2·25²)``.
    3. Shape: the foreground's area A and centroid fix, for each shape k, the circumradius
       ``sqrt(A / area_k)`` at which it would have that area; the shape is rasterised there at
       rotations -15°..15° (step 5°) and compared with the foreground by soft IoU
       ``Σ min(w, T) / Σ max(w, T)``; ``shape_iou_k`` is the best over rotations. Template
       position and size carry no gradient; the IoU and colour do.

    Args:
      images: (B, H, W, 3) float32 in [-1, 1] (clipped here).

    Returns:
      ``colour_logits`` (B, 4), ``shape_iou`` (B, 4), ``foreground`` (B, H, W).
    """
    levels = (displayed(images) + 1.0) * 127.5
    chroma = jnp.max(levels, axis=-1) - jnp.min(levels, axis=-1)
    w = jax.nn.sigmoid((chroma - FOREGROUND_CHROMA) / FOREGROUND_SOFTNESS)  # (B, H, W)
    area = jnp.sum(w, axis=(1, 2))
    mean_rgb = jnp.einsum("bhw,bhwc->bc", w, levels) / (area[:, None] + 1e-6)
    palette = jnp.asarray(shapes.COLOURS, jnp.float32)
    d2 = jnp.sum((mean_rgb[:, None, :] - palette[None]) ** 2, axis=-1)
    colour_logits = -d2 / (2.0 * COLOUR_SCALE**2)

    _, h, wd = w.shape
    rows = jnp.arange(h, dtype=jnp.float32)
    cols = jnp.arange(wd, dtype=jnp.float32)
    ws = jax.lax.stop_gradient(w)
    a_sg = jnp.sum(ws, axis=(1, 2)) + 1e-6
    centre = jnp.stack([jnp.einsum("bhw,h->b", ws, rows) / a_sg,
                        jnp.einsum("bhw,w->b", ws, cols) / a_sg], axis=-1)
    size = jnp.sqrt(jnp.maximum(a_sg, 1.0)[:, None] / jnp.asarray(SHAPE_AREAS)[None])
    templates = shape_templates(centre, size, h, wd)          # (B, K, A, H, W)
    wb = w[:, None, None]
    iou = (jnp.sum(jnp.minimum(wb, templates), axis=(-1, -2))
           / (jnp.sum(jnp.maximum(wb, templates), axis=(-1, -2)) + 1e-6))
    return {"colour_logits": colour_logits, "shape_iou": jnp.max(iou, axis=-1),
            "foreground": w}


def _shape_and_colour(cond: jax.Array):
    shape_index, colour_index = shapes.decompose_label(cond.astype(jnp.int32))
    return shape_index[:, None], colour_index[:, None]


def shapes_colour(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Probability, in [0, 1], that the foreground's colour is the requested class colour
    (softmax of ``shapes_scores``' colour logits)."""
    s = shapes_scores(images)
    _, c = _shape_and_colour(cond)
    return jnp.take_along_axis(jax.nn.softmax(s["colour_logits"], -1), c, -1)[:, 0]


def shapes_shape(images: jax.Array, cond: jax.Array) -> jax.Array:
    """Probability, in [0, 1], that the foreground is the requested shape
    (softmax of the shape IoUs at temperature ``SHAPE_TEMPERATURE``)."""
    s = shapes_scores(images)
    k, _ = _shape_and_colour(cond)
    p = jax.nn.softmax(s["shape_iou"] / SHAPE_TEMPERATURE, -1)
    return jnp.take_along_axis(p, k, -1)[:, 0]


def shapes_rule(images: jax.Array, cond: jax.Array) -> jax.Array:
    """``shapes_colour · shapes_shape`` in [0, 1]: exact, network-free class alignment."""
    s = shapes_scores(images)
    k, c = _shape_and_colour(cond)
    p_colour = jnp.take_along_axis(jax.nn.softmax(s["colour_logits"], -1), c, -1)[:, 0]
    p_shape = jnp.take_along_axis(
        jax.nn.softmax(s["shape_iou"] / SHAPE_TEMPERATURE, -1), k, -1)[:, 0]
    return p_colour * p_shape


def shapes_correct(images: jax.Array, cond: jax.Array) -> jax.Array:
    """1.0 where both the best-matching colour and the best-matching shape are the requested
    ones, else 0.0 (the rule's accuracy; not differentiable)."""
    s = shapes_scores(images)
    k, c = _shape_and_colour(cond)
    ok = ((jnp.argmax(s["colour_logits"], -1) == c[:, 0])
          & (jnp.argmax(s["shape_iou"], -1) == k[:, 0]))
    return ok.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------


def _always(ctx: RewardContext) -> bool:
    del ctx
    return True


def _rgb(ctx: RewardContext) -> bool:
    return ctx.image_shape[-1] == 3


def _blocks_of_8(ctx: RewardContext) -> bool:
    return ctx.image_shape[0] % 8 == 0 and ctx.image_shape[1] % 8 == 0


def _shapes_dataset(ctx: RewardContext) -> bool:
    return (ctx.base_dataset == "shapes" and ctx.image_shape[-1] == 3
            and ctx.num_classes == shapes.NUM_CLASSES)


def _static(fn: RewardFn) -> Callable[[RewardContext], RewardFn]:
    return lambda ctx: fn


REWARDS: dict[str, RewardEntry] = {
    "classifier_logprob": RewardEntry(_build_classifier_logprob, True, _always,
                                      "log p(class | image) under the reward classifier"),
    "classifier_prob": RewardEntry(_build_classifier_prob, True, _always,
                                   "p(class | image) under the reward classifier"),
    "classifier_correct": RewardEntry(_build_classifier_correct, False, _always,
                                      "classifier's top class == requested class"),
    "contrast": RewardEntry(_static(contrast), True, _always, "pixel standard deviation"),
    "stroke_weight": RewardEntry(_static(stroke_weight), True, _always,
                                 "mean brightness (ink coverage)"),
    "saturation": RewardEntry(_static(saturation), True, _rgb, "mean RGB chroma"),
    "compressibility": RewardEntry(_static(compressibility), True, _blocks_of_8,
                                   "minus mean |quantised 8x8 DCT AC coefficient|"),
    "jpeg_zeros": RewardEntry(_static(jpeg_zeros), False, _blocks_of_8,
                              "fraction of JPEG AC coefficients quantised to zero"),
    "shapes_colour": RewardEntry(_static(shapes_colour), True, _shapes_dataset,
                                 "rule: p(requested colour)"),
    "shapes_shape": RewardEntry(_static(shapes_shape), True, _shapes_dataset,
                                "rule: p(requested shape) from template IoU"),
    "shapes_rule": RewardEntry(_static(shapes_rule), True, _shapes_dataset,
                               "rule: p(colour) * p(shape)"),
    "shapes_correct": RewardEntry(_static(shapes_correct), False, _shapes_dataset,
                                  "rule: colour and shape both correct"),
}

# Default combined rewards for RL: a saturating alignment term plus a proxy with headroom.
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "digits": {"classifier_logprob": 1.0, "contrast": 1.0},
    "digits_logprob": {"classifier_logprob": 1.0},
    "digits_prob": {"classifier_prob": 1.0},
    "digits_contrast": {"contrast": 1.0},
    "shapes": {"shapes_rule": 1.0, "saturation": 1.0},
}


def applicable(ctx: RewardContext) -> list[str]:
    """Names of the rewards defined for ``ctx``'s dataset, in registry order."""
    return [name for name, entry in REWARDS.items() if entry.applies(ctx)]


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """Builds one registry reward for ``ctx`` (loading the classifier if it needs it).

    Raises:
      ValueError: unknown name, or a reward that is not defined for this dataset.
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    entry = REWARDS[name]
    if not entry.applies(ctx):
        raise ValueError(f"reward {name!r} ({entry.description}) is not defined for dataset "
                         f"{ctx.dataset!r} with images {tuple(ctx.image_shape)}; "
                         f"available: {applicable(ctx)}")
    return Reward(name=name, fn=entry.build(ctx), differentiable=entry.differentiable)


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """``Σ_k w_k · reward_k``; calling it returns ``(total (B,), {name: (B,)})``.

    Attributes:
      weights: (name, weight) pairs, in the order given.
      rewards: the built components, same order.
    """

    weights: tuple[tuple[str, float], ...]
    rewards: tuple[Reward, ...]

    @property
    def differentiable(self) -> bool:
        """True when every component with a non-zero weight is differentiable."""
        return all(r.differentiable for r, (_, w) in zip(self.rewards, self.weights) if w != 0)

    def __call__(self, images: jax.Array, cond: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        components = {r.name: r.fn(images, cond) for r in self.rewards}
        total = jnp.zeros(images.shape[:1], jnp.float32)
        for name, weight in self.weights:
            total = total + jnp.float32(weight) * components[name]
        return total, components


def check_weights(weights: Mapping[str, float], ctx: RewardContext, path: str = "rewards"
                  ) -> None:
    """Validates a ``rewards`` config block before anything is built.

    Raises:
      config_checks.ConfigError: naming ``config.<path>.<name>`` for an unknown or inapplicable
        reward or a non-finite weight, or ``config.<path>`` when it is empty or all zero.
    """
    if not weights or not any(w != 0 for w in weights.values()):
        raise config_checks.ConfigError(
            f"config.{path} must give at least one reward a non-zero weight, got "
            f"{dict(weights)!r}; choose from {applicable(ctx)}")
    for name, weight in weights.items():
        if name not in REWARDS:
            raise config_checks.ConfigError(
                f"config.{path}.{name} is not a reward; choose from {sorted(REWARDS)}")
        if not REWARDS[name].applies(ctx):
            raise config_checks.ConfigError(
                f"config.{path}.{name} is not defined for dataset {ctx.dataset!r}; "
                f"choose from {applicable(ctx)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(
                weight):
            raise config_checks.ConfigError(
                f"config.{path}.{name} must be a finite number, got {weight!r}")


def build_combined(weights: Mapping[str, float], ctx: RewardContext) -> CombinedReward:
    """Builds the weighted sum of registry rewards (validated with ``check_weights``)."""
    check_weights(weights, ctx)
    items = tuple((name, float(w)) for name, w in weights.items())
    return CombinedReward(weights=items, rewards=tuple(build_reward(n, ctx) for n, _ in items))


def score_images(rewards: Mapping[str, Reward], images, labels, batch_size: int = 250
                 ) -> dict[str, np.ndarray]:
    """Every reward on a whole set, in jitted batches.

    Args:
      rewards: name -> built reward.
      images: (N, H, W, C) float32.
      labels: (N,) int32.
      batch_size: images per call (the last batch is padded so each reward compiles once).

    Returns:
      name -> (N,) float32 NumPy array.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n = len(images)
    fns = {name: jax.jit(r.fn) for name, r in rewards.items()}
    out = {name: [] for name in rewards}
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(x) if n > batch_size else 0
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            y = np.concatenate([y, np.repeat(y[-1:], pad, axis=0)])
        for name, fn in fns.items():
            out[name].append(np.asarray(fn(jnp.asarray(x), jnp.asarray(y)))[:len(x) - pad])
    return {name: np.concatenate(v) for name, v in out.items()}

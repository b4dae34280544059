"""Reward registry: pure, jit-able ``reward(images, request) -> (B,)`` functions.

Conventions: images (B, H, W, C) float32 NHWC, data range [-1, 1]; every reward first clips
to [-1, 1] (it scores the image as it would be displayed or saved; how far a sample leaves the
range is a saturation diagnostic, ``quality.overshoot``). Output (B,) float32, higher is
better.

The request (the reward's second argument) says what each sample was asked to show:

- class-conditional runs: (B,) int32 labels in [0, num_classes) (the null class is not a
  valid request);
- prompt-set (text) runs: a dict of (B,) int32 arrays, the fields ``REQUEST_FIELDS``:
  ``label`` (the ``shapes`` class id ``shape * 4 + colour`` of a single-object prompt, -1 for
  any other prompt), ``index`` (the prompt's index in the run's prompt split, the row of
  ``RewardContext.prompts``) and the ``data.prompts.Prompt.metadata()`` fields (``kind``,
  ``count``, ``colour``, ``shape``, ``position``, ``count_2``, ``colour_2``, ``shape_2``; -1 =
  absent or unknown).

Every reward accepts both: :func:`request_labels` gives the labels of either form,
:func:`request_index` the prompt index (a class-conditional run has one prompt per class, so
there it is the label) and :func:`request_dict` the dict form. Rewards that score a class
(classifier, ``shapes_*``) give 0 to rows whose label is -1 (no single class was asked for).

A built reward (:class:`Reward`) is a pure ``apply(params, images, request)`` and its
``params`` pytree (the classifier's or CLIP's weights; None for rewards without any): the RL
rollout and the evaluation pass ``params`` as arguments of their jitted programs, so the
weights are not baked into the compiled programs as constants. ``reward(images, request)``
calls ``apply(reward.params, ...)``.

``REWARDS`` maps a name to a ``RewardEntry``: a builder taking a ``RewardContext`` (the
dataset, lazy access to the cached reward classifier, the run's prompt texts and the folders
of reward models), a truthful ``differentiable`` flag
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
- Prompt alignment: ``clip_score`` and ``pickscore``, the scaled cosine similarity of a
  CLIP-architecture image embedding and the embedding of the sample's prompt
  (:mod:`normguard_jax.clip_score`; the model folders come from ``config.reward_models``).
- Combinations: ``build_combined({"classifier_logprob": 1.0, "contrast": 1.0}, ctx)`` returns
  the weighted sum and every component for logging. ``DEFAULT_WEIGHTS`` pairs a saturating
  alignment term with a proxy that keeps rising, so RL has headroom.
- Rewards from outside the library: a name ``module:function`` (e.g. ``my_pkg.rewards:
  aesthetic``) anywhere a reward name is accepted imports ``function`` from ``module``: a
  ``RewardEntry``, a host reward (:func:`normguard_jax.host_rewards.host_reward`, any NumPy
  callable, run through ``jax.pure_callback``) or a plain jit-able ``fn(images, request) ->
  (B,)`` (flagged non-differentiable unless ``fn.differentiable`` is True).
  ``config.extra_rewards`` (:func:`config_weights`) adds or re-weights any reward from the
  command line.

The classifier and the CLIP-family models are the only networks rewards use; the quality
metrics (``normguard_jax.quality``) use other networks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config_checks
from normguard_jax.data import shapes

Request = Union[jax.Array, Mapping[str, jax.Array]]
RewardFn = Callable[[jax.Array, Request], jax.Array]
ApplyFn = Callable[[Any, jax.Array, Request], jax.Array]

# Fields of a prompt-set request (the last eight are data.prompts.METADATA_FIELDS).
REQUEST_FIELDS = ("label", "index", "kind", "count", "colour", "shape", "position", "count_2",
                  "colour_2", "shape_2")


def request_labels(request: Request) -> jax.Array:
    """(B,) int32 class labels of a request: the array itself, or ``request["label"]`` (-1
    where a prompt does not ask for one class)."""
    if isinstance(request, Mapping):
        if "label" not in request:
            raise KeyError(f"a prompt request needs a 'label' field, got {sorted(request)}")
        request = request["label"]
    return jnp.asarray(request).astype(jnp.int32)


def request_index(request: Request) -> jax.Array:
    """(B,) int32 prompt index of a request: ``request["index"]``, or the label of a
    class-conditional request (one prompt per class)."""
    if isinstance(request, Mapping):
        if "index" not in request:
            raise KeyError(f"a prompt request needs an 'index' field, got {sorted(request)}")
        return jnp.asarray(request["index"]).astype(jnp.int32)
    return request_labels(request)


def request_dict(request: Request) -> dict[str, jax.Array]:
    """The dict form of a request: a prompt request as it is, a label array as
    ``{"label": labels, "index": labels}``."""
    if isinstance(request, Mapping):
        return dict(request)
    labels = request_labels(request)
    return {"label": labels, "index": labels}


def _only_labelled(value: jax.Array, labels: jax.Array) -> jax.Array:
    """``value`` where a class was asked for (label >= 0), else 0."""
    return jnp.where(labels >= 0, value, 0.0)


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What reward builders may use.

    Attributes:
      dataset: dataset name (``"digits_mnist"``, ``"shapes"``, ``"shapes/small"``, ...).
      image_shape: (H, W, C).
      num_classes: number of real classes.
      nets: ``nets("classifier") -> auxnets.AuxNet``, e.g. an ``auxnets.AuxNetCache``; called
        only by rewards that need the classifier, and only when they are built. None: no
        classifier exists (a diffusers pipeline's prompts), the classifier rewards do not
        apply.
      prompts: the run's prompt texts in index order (``request["index"]`` rows); for a
        class-conditional run, one text per class (or None: rewards that read prompt texts
        then refuse to build).
      model_dirs: reward name -> model folder (``config.reward_models``), for rewards that
        load a model (``clip_score``, ``pickscore``).
    """

    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int
    nets: Callable[[str], object] | None
    prompts: tuple[str, ...] | None = None
    model_dirs: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def base_dataset(self) -> str:
        return self.dataset.partition("/")[0]


class Built(NamedTuple):
    """What a builder returns: the pure ``apply(params, images, request) -> (B,)`` and its
    ``params`` pytree (None when the reward has no parameters)."""

    apply: ApplyFn
    params: Any = None


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """A registry entry.

    Attributes:
      build: ``build(ctx) -> Built`` (or a plain ``fn(images, request)`` without
        parameters).
      differentiable: whether gradients with respect to the images are informative.
      applies: ``applies(ctx) -> bool``, whether the reward is defined for this dataset.
      description: one line for tables and error messages.
      requires: what ``applies`` asks of the context, for the message when it says no.
    """

    build: Callable[[RewardContext], Built]
    differentiable: bool
    applies: Callable[[RewardContext], bool]
    description: str
    requires: str = ""


@dataclasses.dataclass(frozen=True)
class Reward:
    """A built reward: ``apply(params, images, request) -> (B,)`` float32 and its ``params``.

    ``reward(images, request)`` applies it with its own parameters (closing over them: inside
    a jitted program, pass ``params`` as an argument and call ``apply`` instead). ``params``
    takes no part in equality and hashing, so a reward can be a static argument.
    """

    name: str
    apply: ApplyFn
    differentiable: bool
    params: Any = dataclasses.field(default=None, compare=False)

    def __call__(self, images: jax.Array, request: Request) -> jax.Array:
        return self.apply(self.params, images, request)

    @property
    def fn(self) -> RewardFn:
        """``fn(images, request)``: ``apply`` with the parameters closed over."""
        return functools.partial(self.apply, self.params)


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


def _build_classifier(score: Callable[[jax.Array, jax.Array], jax.Array]
                      ) -> Callable[[RewardContext], Built]:
    """A builder of ``score(logits (B, K), labels (B,) >= 0) -> (B,)`` on the classifier's
    logits; the classifier's parameters are the reward's ``params``."""

    def build(ctx: RewardContext) -> Built:
        net = ctx.nets("classifier")
        net_apply = net.apply

        @functools.wraps(score)
        def apply(params, images, request):
            labels = request_labels(request)
            logits = net_apply(params, displayed(images))
            return _only_labelled(score(logits, jnp.maximum(labels, 0)), labels)

        return Built(apply, net.params)

    return build


def classifier_logprob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(label | image) under the reward classifier, ≤ 0."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def classifier_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """p(label | image) under the reward classifier, in [0, 1] (bounded: no heavy tail)."""
    return jnp.exp(classifier_logprob(logits, labels))


def classifier_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the classifier's top class is the label, else 0.0."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


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


def _shape_and_colour(request: Request):
    """(labels (B,), shape index (B, 1), colour index (B, 1)); label -1 rows read class 0."""
    labels = request_labels(request)
    shape_index, colour_index = shapes.decompose_label(jnp.maximum(labels, 0))
    return labels, shape_index[:, None], colour_index[:, None]


def shapes_colour(images: jax.Array, cond: Request) -> jax.Array:
    """Probability, in [0, 1], that the foreground's colour is the requested class colour
    (softmax of ``shapes_scores``' colour logits)."""
    s = shapes_scores(images)
    labels, _, c = _shape_and_colour(cond)
    p = jnp.take_along_axis(jax.nn.softmax(s["colour_logits"], -1), c, -1)[:, 0]
    return _only_labelled(p, labels)


def shapes_shape(images: jax.Array, cond: Request) -> jax.Array:
    """Probability, in [0, 1], that the foreground is the requested shape
    (softmax of the shape IoUs at temperature ``SHAPE_TEMPERATURE``)."""
    s = shapes_scores(images)
    labels, k, _ = _shape_and_colour(cond)
    p = jax.nn.softmax(s["shape_iou"] / SHAPE_TEMPERATURE, -1)
    return _only_labelled(jnp.take_along_axis(p, k, -1)[:, 0], labels)


def shapes_rule(images: jax.Array, cond: Request) -> jax.Array:
    """``shapes_colour · shapes_shape`` in [0, 1]: exact, network-free class alignment."""
    s = shapes_scores(images)
    labels, k, c = _shape_and_colour(cond)
    p_colour = jnp.take_along_axis(jax.nn.softmax(s["colour_logits"], -1), c, -1)[:, 0]
    p_shape = jnp.take_along_axis(
        jax.nn.softmax(s["shape_iou"] / SHAPE_TEMPERATURE, -1), k, -1)[:, 0]
    return _only_labelled(p_colour * p_shape, labels)


def shapes_correct(images: jax.Array, cond: Request) -> jax.Array:
    """1.0 where both the best-matching colour and the best-matching shape are the requested
    ones, else 0.0 (the rule's accuracy; not differentiable)."""
    s = shapes_scores(images)
    labels, k, c = _shape_and_colour(cond)
    ok = ((jnp.argmax(s["colour_logits"], -1) == c[:, 0])
          & (jnp.argmax(s["shape_iou"], -1) == k[:, 0]))
    return _only_labelled(ok.astype(jnp.float32), labels)


# ----------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------


def _always(ctx: RewardContext) -> bool:
    del ctx
    return True


def _has_classifier(ctx: RewardContext) -> bool:
    return ctx.nets is not None


def _rgb(ctx: RewardContext) -> bool:
    return ctx.image_shape[-1] == 3


def _blocks_of_8(ctx: RewardContext) -> bool:
    return ctx.image_shape[0] % 8 == 0 and ctx.image_shape[1] % 8 == 0


def _shapes_dataset(ctx: RewardContext) -> bool:
    return (ctx.base_dataset == "shapes" and ctx.image_shape[-1] == 3
            and ctx.num_classes == shapes.NUM_CLASSES)


def _without_params(fn: RewardFn) -> ApplyFn:
    """``apply(params, images, request)`` of a reward without parameters."""

    @functools.wraps(fn)
    def apply(params, images, request):
        del params
        return fn(images, request)

    return apply


def _static(fn: RewardFn) -> Callable[[RewardContext], Built]:
    """The builder of a reward without parameters."""
    built = Built(_without_params(fn))
    return lambda ctx: built


def _clip_model(name: str) -> Callable[[RewardContext], bool]:
    return lambda ctx: _rgb(ctx) and bool(ctx.model_dirs.get(name))


def _build_clip(name: str) -> Callable[[RewardContext], Built]:
    def build(ctx: RewardContext) -> Built:
        from normguard_jax import clip_score  # pylint: disable=import-outside-toplevel
        return clip_score.build(name, ctx)
    return build


_CLASSIFIER_REQUIRES = ("a dataset with a reward classifier (a library base model's; a "
                        "diffusers pipeline has none)")

REWARDS: dict[str, RewardEntry] = {
    "classifier_logprob": RewardEntry(_build_classifier(classifier_logprob), True,
                                      _has_classifier,
                                      "log p(class | image) under the reward classifier",
                                      _CLASSIFIER_REQUIRES),
    "classifier_prob": RewardEntry(_build_classifier(classifier_prob), True, _has_classifier,
                                   "p(class | image) under the reward classifier",
                                   _CLASSIFIER_REQUIRES),
    "classifier_correct": RewardEntry(_build_classifier(classifier_correct), False,
                                      _has_classifier,
                                      "classifier's top class == requested class",
                                      _CLASSIFIER_REQUIRES),
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
    "clip_score": RewardEntry(_build_clip("clip_score"), True, _clip_model("clip_score"),
                              "CLIP: logit scale x cos(image, prompt) embeddings",
                              "RGB images and a model folder in config.reward_models.clip_score"),
    "pickscore": RewardEntry(_build_clip("pickscore"), True, _clip_model("pickscore"),
                             "PickScore (CLIP architecture): logit scale x cos(image, prompt)",
                             "RGB images and a model folder in config.reward_models.pickscore"),
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
    """Names of the registry rewards defined for ``ctx``, in registry order."""
    return [name for name, entry in REWARDS.items() if entry.applies(ctx)]


class UnknownRewardError(ValueError):
    """A reward name that is neither registered nor an importable ``module:function``."""


def lookup(name: str) -> RewardEntry:
    """The entry of a reward name: a key of ``REWARDS``, or ``module:function`` naming (after
    importing ``module``) a ``RewardEntry``, or a plain jit-able ``fn(images, request) ->
    (B,)`` (differentiable only if ``fn.differentiable`` is True); a host reward is a
    ``RewardEntry`` (``host_rewards.host_reward``).

    Raises:
      UnknownRewardError: an unknown name (with the closest registered names), a module that
        does not import, or an attribute that is missing or not a reward.
    """
    if name in REWARDS:
        return REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise UnknownRewardError(
            f"is not a reward{config_checks.suggest(name, REWARDS)}; registered rewards: "
            f"{sorted(REWARDS)}, or name one outside the library as module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownRewardError(f"names module {module_name!r}, which does not import: {e}"
                                 ) from None
    obj = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise UnknownRewardError(f"names {attr!r}, which module {module_name!r} does not "
                                     "define") from None
        obj = getattr(obj, part)
    if isinstance(obj, RewardEntry):
        return obj
    if callable(obj):
        return RewardEntry(_static(obj), bool(getattr(obj, "differentiable", False)), _always,
                           f"{name} (from outside the library)")
    raise UnknownRewardError(f"names a {type(obj).__name__}, not a reward function or "
                             "RewardEntry")


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """Builds one reward (a registry name or ``module:function``, see :func:`lookup`) for
    ``ctx``, loading the network it needs, if any.

    Raises:
      ValueError: unknown name, or a reward that is not defined for this dataset.
    """
    try:
        entry = lookup(name)
    except UnknownRewardError as e:
        raise UnknownRewardError(f"unknown reward {name!r}: it {e}") from None
    if not entry.applies(ctx):
        raise ValueError(f"reward {name!r} ({entry.description}) is not defined for dataset "
                         f"{ctx.dataset!r} with images {tuple(ctx.image_shape)}"
                         f"{_requirement(entry)}; available: {applicable(ctx)}")
    built = entry.build(ctx)
    if not isinstance(built, Built):      # a plain reward function: no parameters
        built = Built(_without_params(built))
    return Reward(name=name, apply=built.apply, differentiable=entry.differentiable,
                  params=built.params)


def _requirement(entry: RewardEntry) -> str:
    return f" (it needs {entry.requires})" if entry.requires else ""


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """``Σ_k w_k · reward_k``; calling it returns ``(total (B,), {name: (B,)})``.

    ``apply(params, images, request)`` is the pure form, ``params`` the tuple of the
    components' parameters (pass it as an argument of a jitted program).

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

    @property
    def params(self) -> tuple:
        """The components' parameters, in order (None for a reward without any)."""
        return tuple(r.params for r in self.rewards)

    def apply(self, params: tuple, images: jax.Array, request: Request
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(total (B,), {name: (B,)})`` with the components' ``params``."""
        components = {r.name: r.apply(p, images, request) for r, p in zip(self.rewards, params)}
        total = jnp.zeros(images.shape[:1], jnp.float32)
        for name, weight in self.weights:
            total = total + jnp.float32(weight) * components[name]
        return total, components

    def __call__(self, images: jax.Array, request: Request
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self.apply(self.params, images, request)


@dataclasses.dataclass(frozen=True)
class DecodedReward:
    """A combined reward of a latent generator's samples: the latents are decoded to images
    (by the pipeline's VAE) inside the same program, then scored.

    ``params`` is ``(reward params, decoder params)``, so the VAE's weights are an argument of
    the jitted rollout like the reward's, never a constant of it; ``apply(params, latents,
    request)`` returns what ``reward.apply`` returns on the decoded images. The decode is
    differentiable, so a differentiable reward stays one with respect to the latents (Adjoint
    Matching's reward gradient).

    Attributes:
      reward: the combined reward of the images.
      decode: pure ``decode(decoder_params, latents) -> images`` (B, H, W, 3) in about [-1, 1].
      decoder_params: the decoder's parameters.
    """

    reward: CombinedReward
    decode: Callable
    decoder_params: Any = dataclasses.field(default=None, compare=False)

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return self.reward.weights

    @property
    def rewards(self) -> tuple[Reward, ...]:
        return self.reward.rewards

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable

    @property
    def params(self) -> tuple:
        return (self.reward.params, self.decoder_params)

    def apply(self, params: tuple, latents: jax.Array, request: Request
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
        reward_params, decoder_params = params
        return self.reward.apply(reward_params, self.decode(decoder_params, latents), request)

    def __call__(self, latents: jax.Array, request: Request
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self.apply(self.params, latents, request)


def parse_weights(spec: str, path: str = "extra_rewards") -> dict[str, float]:
    """``"name=weight,name=weight"`` -> ``{name: weight}`` (names: registry names or
    ``module:function``; spaces around items are ignored; "" -> {}).

    Raises:
      config_checks.ConfigError: naming ``config.<path>`` for an item that is not
        ``name=number``.
    """
    weights = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name.strip() or weight is None:
            raise config_checks.ConfigError(
                f"config.{path} must be comma-separated name=weight items (e.g. "
                f"'shapes_rule=1,my_pkg.rewards:aesthetic=0.5'), got item {item!r}")
        weights[name.strip()] = weight
    return weights


def config_weights(config) -> tuple[dict[str, float], dict[str, str]]:
    """The reward weights of a job config: ``config.rewards`` (name -> weight, from the config
    file or ``--config.rewards.<name>=w`` for a name the file sets) updated by
    ``config.extra_rewards`` (``"name=w,..."``: any registry name or ``module:function``, so
    any reward can be added from the command line).

    Returns:
      ``(weights, fields)``: name -> weight, and name -> the config field it came from (for
      error messages).
    """
    weights = {name: w for name, w in config.rewards.items()}
    fields = {name: f"config.rewards.{name}" for name in weights}
    for name, w in parse_weights(config.extra_rewards).items():
        weights[name] = w
        fields[name] = f"config.extra_rewards ({name})"
    return weights, fields


def check_names(config) -> None:
    """Checks, before any model is loaded, that every reward of a job config
    (:func:`config_weights`) is a registered name or an importable ``module:function``.

    Raises:
      config_checks.ConfigError: naming the field, with the closest registered name.
    """
    weights, fields = config_weights(config)
    for name in weights:
        try:
            lookup(name)
        except UnknownRewardError as e:
            raise config_checks.ConfigError(f"{fields[name]} {e}") from None


def check_weights(weights: Mapping[str, float], ctx: RewardContext, path: str = "rewards",
                  fields: Mapping[str, str] | None = None) -> None:
    """Validates reward weights before anything is built.

    Args:
      weights: name -> weight.
      ctx: what the rewards would be built for.
      path: the config block, for messages.
      fields: name -> config field it came from (:func:`config_weights`); default
        ``config.<path>.<name>``.

    Raises:
      config_checks.ConfigError: naming the field of an unknown (with the closest names) or
        inapplicable reward or of a non-finite weight, or ``config.<path>`` when all weights
        are zero.
    """
    fields = dict(fields or {})
    if not weights or not any(w != 0 for w in weights.values()):
        raise config_checks.ConfigError(
            f"config.{path} must give at least one reward a non-zero weight, got "
            f"{dict(weights)!r}; choose from {applicable(ctx)}")
    for name, weight in weights.items():
        field = fields.get(name, f"config.{path}.{name}")
        try:
            entry = lookup(name)
        except UnknownRewardError as e:
            raise config_checks.ConfigError(f"{field} {e}") from None
        if not entry.applies(ctx):
            raise config_checks.ConfigError(
                f"{field} is not defined for dataset {ctx.dataset!r} with images "
                f"{tuple(ctx.image_shape)}{_requirement(entry)}; choose from {applicable(ctx)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(
                weight):
            raise config_checks.ConfigError(f"{field} must be a finite number, got {weight!r}")


def build_combined(weights: Mapping[str, float], ctx: RewardContext,
                   fields: Mapping[str, str] | None = None) -> CombinedReward:
    """Builds the weighted sum of rewards (validated with ``check_weights``)."""
    check_weights(weights, ctx, fields=fields)
    items = tuple((name, float(w)) for name, w in weights.items())
    return CombinedReward(weights=items, rewards=tuple(build_reward(n, ctx) for n, _ in items))


def score_images(rewards: Mapping[str, Reward], images, labels, batch_size: int = 250
                 ) -> dict[str, np.ndarray]:
    """Every reward on a whole set, in jitted batches (each reward's parameters are an
    argument of its program, not a constant of it).

    Args:
      rewards: name -> built reward.
      images: (N, H, W, C) float32.
      labels: (N,) int32 labels, or a prompt request: a dict of (N,) int32 arrays.
      batch_size: images per call (the last batch is padded so each reward compiles once).

    Returns:
      name -> (N,) float32 NumPy array.
    """
    images = np.asarray(images, np.float32)
    request = (jax.tree.map(lambda a: np.asarray(a, np.int32), dict(labels))
               if isinstance(labels, Mapping) else np.asarray(labels, np.int32))
    n = len(images)
    fns = {name: jax.jit(r.apply) for name, r in rewards.items()}
    out = {name: [] for name in rewards}
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size]
        y = jax.tree.map(lambda a, s=start: a[s:s + batch_size], request)
        pad = batch_size - len(x) if n > batch_size else 0
        if pad:
            x, y = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]),
                                (x, y))
        for name, fn in fns.items():
            value = fn(rewards[name].params, jnp.asarray(x), jax.tree.map(jnp.asarray, y))
            out[name].append(np.asarray(value)[:len(x) - pad])
    return {name: np.concatenate(v) for name, v in out.items()}

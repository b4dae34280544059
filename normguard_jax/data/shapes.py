"""`shapes`: a procedurally generated RGB dataset with compositional labels (shape x colour).

Every image shows one filled shape from `SHAPES` in one colour from `COLOURS` on a dark grey
background, so the label has two parts that a rule-based reward can check exactly:

    class_id = shape_index * NUM_COLOURS + colour_index        # 4 x 4 = 16 classes

Per image, drawn from a per-example random stream (`np.random.default_rng([seed, split_index,
class_id, i])`): size (circumradius 22-36 % of the side), centre (the whole shape stays
inside), rotation (+-15 degrees), fill colour (the class colour +-12 per channel), background
grey level (20..60), and, for half of the images, light grey Gaussian noise (std 4) on the
background. Rendering is a pure function of a `ShapeSpec` and anti-aliases edges by 4x4
supersampling.

The class colours are saturated hues (HSV saturation about 0.8) that stay at least 28 grey
levels away from 0 and 255 even after jitter: a generator that over-saturates (pushes
channels to the clip limits) produces colours that never occur in the data and are visible.

Coordinates: pixel (row, col) has its centre at (row, col); rows grow downwards.
The data are generated here, so there is no download and no licence beyond this project's.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from normguard_jax.data import encoding

SHAPES = ("circle", "square", "triangle", "cross")
COLOUR_NAMES = ("red", "green", "blue", "yellow")
# Fill colours, uint8 RGB, row k is colour k.
COLOURS = np.array(
    [[200, 40, 40], [40, 170, 60], [50, 80, 210], [215, 195, 45]], dtype=np.uint8
)
COLOURS.flags.writeable = False
NUM_SHAPES = len(SHAPES)
NUM_COLOURS = len(COLOUR_NAMES)
NUM_CLASSES = NUM_SHAPES * NUM_COLOURS
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES)
RESOLUTION = 32

# Sampling ranges (documented in the module docstring).
SIZE_RANGE = (0.22, 0.36)  # circumradius as a fraction of the image side
MAX_ANGLE = np.deg2rad(15.0)
COLOUR_JITTER = 12  # per channel, uniform integer in [-12, 12]
BACKGROUND_RANGE = (20, 60)  # grey level, inclusive
NOISE_STD = 4.0  # grey levels, on the noisy half of the backgrounds
NOISY_FRACTION = 0.5

_SUPERSAMPLE = 4
_SQUARE_HALF_SIDE = 0.75  # in units of the circumradius
_CROSS_HALF_WIDTH = 0.28
_TRIANGLE_INRADIUS = 0.5  # equilateral with circumradius 1


def compose_label(shape_index, colour_index):
    """Class id `shape_index * NUM_COLOURS + colour_index` (ints or integer arrays)."""
    return shape_index * NUM_COLOURS + colour_index


def decompose_label(class_id):
    """Inverse of `compose_label`: `(shape_index, colour_index)` (ints or integer arrays)."""
    return class_id // NUM_COLOURS, class_id % NUM_COLOURS


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one image; `render(spec)` is a pure function of it.

    Attributes:
      shape_index: index into `SHAPES`.
      colour_index: index into `COLOURS`.
      centre: (row, col) of the shape's centre (the centroid for the triangle) in pixels.
      size: circumradius in pixels.
      angle: rotation in radians (counter-clockwise as displayed).
      fill: the jittered RGB fill colour, 3 ints in 0..255.
      background: grey level of the background, 0..255.
      noise_std: std of the grey Gaussian noise added to the background (0 = plain).
      noise_seed: seed of that noise.
    """

    shape_index: int
    colour_index: int
    centre: tuple[float, float]
    size: float
    angle: float
    fill: tuple[int, int, int]
    background: int
    noise_std: float
    noise_seed: int

    @property
    def class_id(self) -> int:
        return compose_label(self.shape_index, self.colour_index)


def _in_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _in_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF_SIDE


def _in_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral, apex up (-v); the three edge normals point at 90, 210 and 330 degrees."""
    half_root3 = np.sqrt(3.0) / 2.0
    return (
        (v <= _TRIANGLE_INRADIUS)
        & (half_root3 * u - 0.5 * v <= _TRIANGLE_INRADIUS)
        & (-half_root3 * u - 0.5 * v <= _TRIANGLE_INRADIUS)
    )


def _in_cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= _CROSS_HALF_WIDTH) & (av <= 1.0)) | ((av <= _CROSS_HALF_WIDTH) & (au <= 1.0))


# Inside tests of the unrotated shapes, for points (u, v) in units of the circumradius,
# in the order of SHAPES.
_INSIDE_TESTS = (_in_circle, _in_square, _in_triangle, _in_cross)


def shape_coverage(
    shape_index: int,
    centre: tuple[float, float],
    size: float,
    angle: float,
    resolution: int = RESOLUTION,
) -> np.ndarray:
    """Fraction of each pixel covered by the shape (4x4 supersampling).

    Args:
      shape_index: index into `SHAPES`.
      centre: (row, col) in pixels; pixel (r, c) has its centre at (r, c).
      size: circumradius in pixels.
      angle: rotation in radians.
      resolution: side of the square image in pixels.

    Returns:
      float32 (resolution, resolution) with values in {0, 1/16, ..., 1}.
    """
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
    fine = (np.arange(resolution)[:, None] + offsets[None, :]).reshape(-1)
    dy = fine[:, None] - centre[0]
    dx = fine[None, :] - centre[1]
    # Rotate the sample points by -angle into the shape's own frame ("up" is -v).
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx - sin * dy) / size
    v = (sin * dx + cos * dy) / size
    if not 0 <= shape_index < NUM_SHAPES:
        raise ValueError(f"shape_index must be in [0, {NUM_SHAPES}), got {shape_index}")
    inside = _INSIDE_TESTS[shape_index](u, v).astype(np.float32)
    blocks = inside.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE)
    return blocks.mean(axis=(1, 3))


def render(spec: ShapeSpec, resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """Renders one image from its spec.

    Returns:
      `(image, mask)`: uint8 (resolution, resolution, 3) RGB, and bool (resolution, resolution)
      marking pixels at least half covered by the shape.
    """
    coverage = shape_coverage(spec.shape_index, spec.centre, spec.size, spec.angle, resolution)
    background = np.full((resolution, resolution), float(spec.background))
    if spec.noise_std > 0:
        noise_rng = np.random.default_rng(spec.noise_seed)
        background = background + spec.noise_std * noise_rng.standard_normal(background.shape)
    fill = np.asarray(spec.fill, dtype=np.float64)
    cov = coverage[..., None]
    image = cov * fill + (1.0 - cov) * background[..., None]
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, coverage >= 0.5


def sample_spec(
    rng: np.random.Generator, shape_index: int, colour_index: int, resolution: int = RESOLUTION
) -> ShapeSpec:
    """Draws the nuisance parameters of one image of the given shape and colour."""
    size = rng.uniform(*SIZE_RANGE) * resolution
    low, high = size + 1.0, resolution - 2.0 - size
    centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill = np.clip(COLOURS[colour_index].astype(np.int64) + jitter, 0, 255)
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    noise_std = NOISE_STD if rng.random() < NOISY_FRACTION else 0.0
    return ShapeSpec(
        shape_index=int(shape_index),
        colour_index=int(colour_index),
        centre=centre,
        size=float(size),
        angle=angle,
        fill=tuple(int(c) for c in fill),
        background=background,
        noise_std=noise_std,
        noise_seed=int(rng.integers(2**31)),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ShapesArrays:
    """A generated split with its metadata.

    Attributes:
      images: uint8 (N, R, R, 3).
      labels: int32 (N,), class-major order (all of class 0 first).
      masks: bool (N, R, R), the shape's pixels.
      specs: the N `ShapeSpec`s the images were rendered from.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    specs: tuple[ShapeSpec, ...]


def generate_split(
    num_per_class: int, seed: int, split_index: int, resolution: int = RESOLUTION
) -> ShapesArrays:
    """Generates `num_per_class` images of each of the `NUM_CLASSES` classes.

    Example i of class k is drawn from `np.random.default_rng([seed, split_index, k, i])`, so
    any example can be regenerated alone and different `split_index` values give independent
    splits.
    """
    specs = []
    for class_id in range(NUM_CLASSES):
        shape_index, colour_index = decompose_label(class_id)
        for i in range(num_per_class):
            rng = np.random.default_rng([seed, split_index, class_id, i])
            specs.append(sample_spec(rng, shape_index, colour_index, resolution))
    rendered = [render(spec, resolution) for spec in specs]
    shape = (0, resolution, resolution)
    return ShapesArrays(
        images=np.stack([r[0] for r in rendered]) if rendered else np.zeros(shape + (3,), np.uint8),
        labels=np.array([s.class_id for s in specs], dtype=np.int32),
        masks=np.stack([r[1] for r in rendered]) if rendered else np.zeros(shape, bool),
        specs=tuple(specs),
    )


SHAPES_SEED = 1_618
SPLIT_INDEX = {"train": 0, "test": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Size of a `shapes` build: images per class in each split."""

    train_per_class: int = 600
    test_per_class: int = 100


class Shapes(tfds.core.GeneratorBasedBuilder):
    """16-class shape x colour RGB 32x32 dataset; config `small` is a 24/6-per-class variant."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "4 shapes x 4 colours, 32x32 RGB."}
    BUILDER_CONFIGS = [
        ShapesConfig(
            name="default",
            description="600 train and 100 test images per class (9,600 / 1,600).",
            train_per_class=600,
            test_per_class=100,
        ),
        ShapesConfig(
            name="small",
            description="24 train and 6 test images per class (384 / 96), for tests.",
            train_per_class=24,
            test_per_class=6,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(RESOLUTION, RESOLUTION, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated procedurally.
        per_class = {"train": self.builder_config.train_per_class,
                     "test": self.builder_config.test_per_class}
        return {split: self._generate_examples(n, SPLIT_INDEX[split])
                for split, n in per_class.items()}

    def _generate_examples(self, num_per_class: int, split_index: int):
        arrays = generate_split(num_per_class, SHAPES_SEED, split_index)
        for key, (image, label) in enumerate(zip(arrays.images, arrays.labels)):
            yield key, {"image": encoding.encode_png(image), "label": int(label)}

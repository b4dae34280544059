"""Prompt sets for text-to-image RL: our own compositional set, text files, and a TFDS builder.

`compositional_prompts()` is a deterministic set of 440 prompts made from word lists (no
randomness beyond a fixed hash), with a fixed train/test split (352 / 88) and structured
metadata that a rule-based reward can check:

    "three blue triangles"                          kind=count     count=3 colour=2 shape=2
    "a red circle and a yellow cross"               kind=pair      colour_2=3 shape_2=3
    "a blue square to the left of a green triangle" kind=relation  position=0 ("to the left of")

Colour and shape indices are those of the `shapes` dataset (`shapes.COLOUR_NAMES`,
`shapes.SHAPES`), so its renderer and rule reward speak the same language. Every metadata field
is a small int; -1 means "absent" (e.g. `position` of a count prompt) or, for prompts read from
a text file, "unknown".

The set: all 4 counts x 4 colours x 4 shapes (64 count prompts); every unordered pair of two
different (colour, shape) objects (120 pair prompts); 256 of the 960 relation prompts
(ordered pair x 4 positions), chosen by the smallest SHA-256 of `"<seed>|<text>"`. Within each
kind, the 20 % of prompts with the smallest hash `"<seed>|split|<text>"` are the test split.
Hashes (not a NumPy generator) make the set independent of library versions.

`read_prompt_file(path, test_fraction)` reads a user's list (one prompt per line) and splits it
the same way (the `round(test_fraction * n)` prompts of smallest hash are the test split).

`Prompts` is the TFDS builder of both (configs `compositional`, or `file_config(path, ...)`),
built offline as ArrayRecord and read with `builder.as_data_source` like the image datasets:

    builder = prepare_prompts(data_dir)                     # or config=file_config("my.txt")
    prompts = load_prompts(builder, "train")                # tuple of Prompt, stored order
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from normguard_jax import file_lock
from normguard_jax.data import shapes

COLOURS = shapes.COLOUR_NAMES       # ("red", "green", "blue", "yellow"); index = metadata colour
SHAPES = shapes.SHAPES              # ("circle", "square", "triangle", "cross"); index = shape
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNT_WORDS = ("a", "two", "three", "four")   # COUNT_WORDS[count - 1]; counts 1..4
# "<first object> <position> <second object>": where the first object is relative to the second.
POSITIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("count", "pair", "relation")
METADATA_FIELDS = ("kind", "count", "colour", "shape", "position", "count_2", "colour_2",
                   "shape_2")

SEED = 2_718
NUM_RELATION_PROMPTS = 256
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt and what it asks for (ints; -1 = absent or unknown).

    Attributes:
      text: the prompt.
      kind: index into `KINDS`.
      count: number of objects of the first kind (1..4).
      colour, shape: the first object's indices into `COLOURS`, `SHAPES`.
      position: index into `POSITIONS` (where the first object is relative to the second).
      count_2: number of objects of the second kind (0 for count prompts, else 1).
      colour_2, shape_2: the second object's indices.
    """

    text: str
    kind: int = -1
    count: int = -1
    colour: int = -1
    shape: int = -1
    position: int = -1
    count_2: int = -1
    colour_2: int = -1
    shape_2: int = -1

    def metadata(self) -> dict[str, int]:
        """The `METADATA_FIELDS` as a dict of ints."""
        return {name: int(getattr(self, name)) for name in METADATA_FIELDS}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A named prompt list with disjoint `train` and `test` splits (tuples of `Prompt`)."""

    name: str
    train: tuple[Prompt, ...]
    test: tuple[Prompt, ...]

    def split(self, split: str) -> tuple[Prompt, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)


def _object(count: int, colour: int, shape: int) -> str:
    noun = SHAPES[shape] if count == 1 else PLURALS[SHAPES[shape]]
    return f"{COUNT_WORDS[count - 1]} {COLOURS[colour]} {noun}"


def describe(prompt: Prompt) -> str:
    """The text of a compositional prompt, from its metadata (the generator's only grammar)."""
    first = _object(prompt.count, prompt.colour, prompt.shape)
    if KINDS[prompt.kind] == "count":
        return first
    second = _object(prompt.count_2, prompt.colour_2, prompt.shape_2)
    if KINDS[prompt.kind] == "pair":
        return f"{first} and {second}"
    return f"{first} {POSITIONS[prompt.position]} {second}"


def _make(kind: str, count: int, colour: int, shape: int, position: int = -1,
          count_2: int = 0, colour_2: int = -1, shape_2: int = -1) -> Prompt:
    prompt = Prompt(text="", kind=KINDS.index(kind), count=count, colour=colour, shape=shape,
                    position=position, count_2=count_2, colour_2=colour_2, shape_2=shape_2)
    return dataclasses.replace(prompt, text=describe(prompt))


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _split_by_hash(prompts: list[Prompt], test_fraction: float, seed) -> tuple[tuple, tuple]:
    """(train, test): the round(test_fraction * n) prompts of smallest hash are the test split;
    both keep the input order."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ranked = sorted(range(len(prompts)), key=lambda i: _hash(seed, "split", prompts[i].text))
    test_ids = set(ranked[:round(test_fraction * len(prompts))])
    train = tuple(p for i, p in enumerate(prompts) if i not in test_ids)
    test = tuple(p for i, p in enumerate(prompts) if i in test_ids)
    return train, test


def compositional_prompts(seed: int = SEED) -> PromptSet:
    """The deterministic compositional prompt set (440 prompts: 352 train, 88 test)."""
    objects = [(c, s) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    counts = [_make("count", n, c, s) for n in range(1, len(COUNT_WORDS) + 1) for c, s in objects]
    pairs = [_make("pair", 1, *a, count_2=1, colour_2=b[0], shape_2=b[1])
             for i, a in enumerate(objects) for b in objects[i + 1:]]
    relations = [_make("relation", 1, *a, position=p, count_2=1, colour_2=b[0], shape_2=b[1])
                 for a in objects for b in objects if a != b for p in range(len(POSITIONS))]
    relations = sorted(relations, key=lambda p: _hash(seed, p.text))[:NUM_RELATION_PROMPTS]
    train, test = [], []
    for group in (counts, pairs, relations):
        group_train, group_test = _split_by_hash(group, TEST_FRACTION, seed)
        train += group_train
        test += group_test
    return PromptSet(name="compositional", train=tuple(train), test=tuple(test))


# Captions of the `shapes` images (one object): templates over (colour, shape). Per class,
# `SHAPES_TEST_PER_CLASS` of them (smallest hash) are held out as the test split.
CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "one {colour} {shape}",
    "{colour} {shape}",
    "a single {colour} {shape}",
    "a {shape} in {colour}",
    "a {colour} {shape} on a grey background",
    "a picture of a {colour} {shape}",
    "the {shape} is {colour}",
)
SHAPES_TEST_PER_CLASS = 2


def shapes_captions(seed: int = SEED) -> PromptSet:
    """Captions of the 16 `shapes` classes (8 templates each: 96 train, 32 test).

    Every caption is a count prompt for one object (kind "count", count 1, count_2 0), so its
    class is `shapes.compose_label(shape, colour)`; each class has 6 train and 2 test
    captions (the test ones: smallest SHA-256 of `"<seed>|caption|<text>"`).
    """
    train, test = [], []
    for s in range(len(SHAPES)):
        for c in range(len(COLOURS)):
            group = [Prompt(text=t.format(colour=COLOURS[c], shape=SHAPES[s]),
                            kind=KINDS.index("count"), count=1, colour=c, shape=s, count_2=0)
                     for t in CAPTION_TEMPLATES]
            ranked = sorted(range(len(group)), key=lambda i: _hash(seed, "caption", group[i].text))
            held = set(ranked[:SHAPES_TEST_PER_CLASS])
            train += [p for i, p in enumerate(group) if i not in held]
            test += [p for i, p in enumerate(group) if i in held]
    return PromptSet(name="shapes_captions", train=tuple(train), test=tuple(test))


def read_prompt_file(path: str | os.PathLike, test_fraction: float = 0.1,
                     seed: int = 0) -> PromptSet:
    """A user's prompt list: one prompt per line (stripped; blank lines and repeats dropped).

    The round(test_fraction * n) prompts of smallest SHA-256 of `"<seed>|split|<text>"` form
    the test split; both splits keep the file order. Metadata fields are -1 (unknown).

    Raises:
      FileNotFoundError: `path` is not a file.  ValueError: it holds no prompt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    texts = list(dict.fromkeys(line for line in lines if line))
    if not texts:
        raise ValueError(f"prompt file {path!r} holds no prompt")
    train, test = _split_by_hash([Prompt(text=t) for t in texts], test_fraction, seed)
    name = os.path.splitext(os.path.basename(path))[0]
    return PromptSet(name=name, train=train, test=test)


def load_prompt_set(spec: str, test_fraction: float = 0.1, seed: int = 0) -> PromptSet:
    """`"compositional"` or the path of a text file (see `read_prompt_file`)."""
    if spec == "compositional":
        return compositional_prompts()
    if os.path.isfile(spec):
        return read_prompt_file(spec, test_fraction, seed)
    raise FileNotFoundError(
        f"prompt set {spec!r} is neither 'compositional' nor an existing text file")


# --------------------------------------------------------------------------- TFDS builder.


@dataclasses.dataclass
class PromptsConfig(tfds.core.BuilderConfig):
    """`path` = "" means the compositional set; otherwise a text file split by `test_fraction`."""

    path: str = ""
    test_fraction: float = 0.1
    seed: int = 0


def file_config(path: str | os.PathLike, test_fraction: float = 0.1,
                seed: int = 0) -> PromptsConfig:
    """A builder config for a text file, named after the file and a hash of its content and
    split, so an edited file or another split builds a new dataset."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    digest = _hash(digest, test_fraction, seed)[:12]
    stem = "".join(ch if ch.isalnum() else "_" for ch in os.path.splitext(
        os.path.basename(path))[0])
    return PromptsConfig(name=f"file_{stem}_{digest}", description=f"Prompts of {path}.",
                         path=path, test_fraction=test_fraction, seed=seed)


class Prompts(tfds.core.GeneratorBasedBuilder):
    """Prompt lists with train/test splits: `text` plus the int metadata of `Prompt`.

    Records keep the prompt set's order (no shuffling) and carry their `index` in the split.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Compositional prompts (counts, colours, shapes, positions)."}
    BUILDER_CONFIGS = [
        PromptsConfig(name="compositional",
                      description="440 compositional prompts (352 train / 88 test).")]
    DEFAULT_CONFIG_NAME = "compositional"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text(), "index": tfds.features.Scalar(np.int32)}
        features.update({name: tfds.features.Scalar(np.int32) for name in METADATA_FIELDS})
        return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                     features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)

    def prompt_set(self) -> PromptSet:
        config = self.builder_config
        if not config.path:
            return compositional_prompts()
        return read_prompt_file(config.path, config.test_fraction, config.seed)

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated procedurally or read from a local file.
        prompt_set = self.prompt_set()  # TFDS refuses empty splits: they are left out
        return {split: self._generate_examples(prompt_set.split(split)) for split in SPLITS
                if prompt_set.split(split)}

    def _generate_examples(self, prompts):
        for index, prompt in enumerate(prompts):
            yield index, {"text": prompt.text, "index": index, **prompt.metadata()}


def prepare_prompts(data_dir: str | os.PathLike,
                    config: str | PromptsConfig | None = None) -> tfds.core.DatasetBuilder:
    """Builds the `prompts` dataset into `data_dir` unless it is there (file-locked, offline).

    Args:
      data_dir: the TFDS data dir.
      config: None or "compositional" for our set, or `file_config(path, ...)` for a text file.
    """
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    name = config.name if isinstance(config, PromptsConfig) else (config or "compositional")
    with file_lock.exclusive(os.path.join(data_dir, f".prompts__{name}.lock")):
        builder = Prompts(data_dir=data_dir, config=config, file_format="array_record")
        builder.download_and_prepare(file_format="array_record")
    return builder


def load_prompts(builder: tfds.core.DatasetBuilder, split: str) -> tuple[Prompt, ...]:
    """Reads a built split back as `Prompt`s, in the stored order (a split left out because it
    had no prompt reads as empty)."""
    if split not in builder.info.splits:
        return ()
    source = builder.as_data_source(split=split)
    records = sorted(source.__getitems__(range(len(source))), key=lambda r: int(r["index"]))
    return tuple(Prompt(text=_as_str(r["text"]), **{name: int(r[name]) for name in METADATA_FIELDS})
                 for r in records)


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

"""What a generator is conditioned on: class labels or prompts, as one table per split.

A :class:`PromptTable` is the list of prompts a run draws from (RL rollouts, pretraining
captions, evaluation), held as arrays:

- a **class** table (class-conditional models): prompt ``i`` is class ``i``; its conditioning
  is the label itself, ``(B,) int32``, and the null (unconditional) conditioning of CFG is the
  label ``num_classes``;
- a **text** table: prompt ``i`` is a text with cached embeddings; its conditioning is
  ``{"text": (B, L, D), "pooled": (B, P)}`` and the null conditioning is the empty prompt's
  embeddings with a leading axis of 1 (``sampling.null_condition`` broadcasts it).

Both carry, per prompt, what rewards may check: ``labels`` (the class a prompt asks for, -1
when it asks for none, e.g. "two red squares") and the int metadata of
``data.prompts.Prompt`` (``rewards.REQUEST_FIELDS``). A class table's reward request is the
label array itself, so class-conditional runs see exactly what they saw before prompts
existed; a text table's request is the dict ``{"label", "index", <metadata>}``.

Where tables come from (:func:`table`): a base model's record says (``"class"``, captions
encoded with the built-in word encoder, or an ``embed_prompts`` dataset), see
:func:`spec_of` and :func:`table`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import word_encoder
from normguard_jax.data import prompts as prompts_lib
from normguard_jax.data import shapes

KINDS = ("class", "text")
CAPTION_SETS = ("shapes",)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTable:
    """One split of prompts as arrays (see the module docstring).

    Attributes:
      kind: "class" or "text".
      texts: the N prompt texts (a class table: the class names).
      labels: (N,) int32, the class each prompt asks for (-1: none).
      metadata: ``data.prompts.METADATA_FIELDS`` -> (N,) int32 (-1: absent or unknown).
      embeddings: text tables: ``{"text": (N, L, D), "pooled": (N, P)}`` float32; None for a
        class table.
      null: the unconditional conditioning: the null label ``num_classes`` (int) of a class
        table, or ``{"text": (1, L, D), "pooled": (1, P)}`` (the empty prompt).
      num_classes: classes of the labels (the class rewards' classes).
    """

    kind: str
    texts: tuple[str, ...]
    labels: np.ndarray
    metadata: Mapping[str, np.ndarray]
    embeddings: Mapping[str, np.ndarray] | None
    null: Any
    num_classes: int

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_class(self) -> bool:
        return self.kind == "class"

    def cond(self, index):
        """The conditioning of prompts ``index`` ((B,) int, NumPy or JAX): (B,) int32 labels
        of a class table, ``{"text": (B, L, D), "pooled": (B, P)}`` of a text table (NumPy in,
        NumPy out; a traced index gathers from device copies of the embeddings)."""
        if self.is_class:
            return index.astype(np.int32) if isinstance(index, np.ndarray) else \
                jnp.asarray(index, jnp.int32)
        if isinstance(index, np.ndarray):
            return {k: v[index] for k, v in self.embeddings.items()}
        return {k: jnp.asarray(v)[index] for k, v in self.embeddings.items()}

    def request(self, index):
        """The reward request of prompts ``index``: the (B,) int32 labels of a class table, or
        ``{"label", "index", <metadata>}`` of (B,) int32 arrays (``rewards.REQUEST_FIELDS``)."""
        xp = np if isinstance(index, np.ndarray) else jnp
        index = xp.asarray(index).astype(xp.int32)
        if self.is_class:
            return index
        out = {"label": xp.asarray(self.labels)[index], "index": index}
        out.update({k: xp.asarray(v)[index] for k, v in self.metadata.items()})
        return out

    def cond_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Per-prompt shapes of a text table's conditioning (``{"text": (L, D), "pooled":
        (P,)}``), None for a class table: what a text-conditioned generator is built for."""
        if self.is_class:
            return None
        return {k: tuple(v.shape[1:]) for k, v in self.embeddings.items()}

    def prompts_of_class(self, label: int) -> np.ndarray:
        """Indices (ascending) of the prompts that ask for class ``label``."""
        return np.flatnonzero(self.labels == label)

    def for_classes(self, classes) -> np.ndarray:
        """(B,) int32: for each class of ``classes``, the ``j``-th prompt of that class where
        ``j`` counts its earlier occurrences in ``classes`` (cycling through the class's
        prompts): fixed, varied prompts for per-class grids and evaluations.

        Raises:
          ValueError: a class has no prompt in this table.
        """
        classes = np.asarray(classes)
        out = np.empty(classes.shape, np.int32)
        seen: dict[int, int] = {}
        for i, c in enumerate(classes.tolist()):
            options = self.prompts_of_class(c)
            if not len(options):
                raise ValueError(f"no prompt of class {c} in this {self.kind} table")
            out[i] = options[seen.get(c, 0) % len(options)]
            seen[c] = seen.get(c, 0) + 1
        return out

    def draw_for_classes(self, rng: np.random.Generator, classes) -> np.ndarray:
        """(B,) int32: for each class of ``classes``, a uniformly drawn prompt of that class
        (pretraining on captions: each image gets one of its class's captions)."""
        classes = np.asarray(classes)
        if not hasattr(self, "_by_class"):
            offsets = np.zeros(self.num_classes + 1, np.int64)
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)
            if (counts == 0).any():
                raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no "
                                 "caption")
            offsets[1:] = np.cumsum(counts)
            first = len(self.labels) - int(counts.sum())     # the -1 labels sort first
            object.__setattr__(self, "_by_class", (order[first:], offsets, counts))
        order, offsets, counts = self._by_class
        pick = offsets[classes] + (rng.random(classes.shape) * counts[classes]).astype(np.int64)
        return order[pick].astype(np.int32)

    def labelled(self) -> bool:
        """Whether every class has at least one prompt (class rewards and per-class metrics
        apply)."""
        return bool(np.all(np.bincount(self.labels[self.labels >= 0],
                                       minlength=self.num_classes) > 0))

    def device_null(self):
        """The null conditioning as the samplers take it: an int (class table) or the empty
        prompt's arrays (text table) as JAX arrays."""
        if self.is_class:
            return self.null
        return jax.tree.map(jnp.asarray, self.null)


GRID_PROMPTS = 8   # rows of a sample grid of a table without classes (one per prompt)


def grid_condition(table: PromptTable, per_class: int):
    """``(cond, null_condition)`` of the fixed-seed sample grids: one row per class with
    ``per_class`` columns (class labels, or each class's prompts in turn); a text table
    without class labels (e.g. a user's prompt file): its first ``GRID_PROMPTS`` prompts.
    ``null_condition`` is the empty prompt (None for class labels)."""
    if table.is_class or table.labelled():
        rows = np.repeat(np.arange(table.num_classes, dtype=np.int32), per_class)
        index = rows if table.is_class else table.for_classes(rows)
    else:
        index = np.repeat(np.arange(min(GRID_PROMPTS, len(table)), dtype=np.int32), per_class)
    if table.is_class:
        return jnp.asarray(index), None
    return jax.tree.map(jnp.asarray, table.cond(index)), table.device_null()


def class_table(num_classes: int, class_names=None) -> PromptTable:
    """The table of a class-conditional model: prompt ``i`` is class ``i``."""
    names = tuple(class_names) if class_names is not None else tuple(
        str(i) for i in range(num_classes))
    labels = np.arange(num_classes, dtype=np.int32)
    minus = np.full(num_classes, -1, np.int32)
    metadata = {name: minus for name in prompts_lib.METADATA_FIELDS}
    return PromptTable(kind="class", texts=names, labels=labels, metadata=metadata,
                       embeddings=None, null=int(num_classes), num_classes=int(num_classes))


def prompt_label(prompt: prompts_lib.Prompt) -> int:
    """The ``shapes`` class a prompt asks for: one object of one colour and shape
    (``shapes.compose_label``), else -1."""
    single = (prompt.count == 1 and prompt.count_2 in (0, -1) and prompt.colour >= 0
              and prompt.shape >= 0 and prompt.kind == prompts_lib.KINDS.index("count"))
    return int(shapes.compose_label(prompt.shape, prompt.colour)) if single else -1


def text_table(prompts, text: np.ndarray, pooled: np.ndarray, null: Mapping[str, np.ndarray],
               num_classes: int = shapes.NUM_CLASSES) -> PromptTable:
    """A text table from prompts (``data.prompts.Prompt``) and their embeddings.

    Args:
      prompts: N prompts (texts and metadata; labels from :func:`prompt_label`).
      text: (N, L, D) and pooled: (N, P) embeddings, as ``text.load_embeddings`` reads them.
      null: the empty prompt's ``{"text": (L, D), "pooled": (P,)}``.
      num_classes: classes of the labels.
    """
    prompts = tuple(prompts)
    if len(prompts) != len(text) or len(prompts) != len(pooled):
        raise ValueError(f"{len(prompts)} prompts but {len(text)} text and {len(pooled)} "
                         "pooled embeddings")
    labels = np.asarray([prompt_label(p) for p in prompts], np.int32).reshape(-1)
    metadata = {name: np.asarray([getattr(p, name) for p in prompts], np.int32).reshape(-1)
                for name in prompts_lib.METADATA_FIELDS}
    embeddings = {"text": np.asarray(text, np.float32), "pooled": np.asarray(pooled, np.float32)}
    null = {k: np.asarray(v, np.float32)[None] for k, v in null.items()}
    return PromptTable(kind="text", texts=tuple(p.text for p in prompts), labels=labels,
                       metadata=metadata, embeddings=embeddings, null=null,
                       num_classes=int(num_classes))


def caption_set(name: str) -> prompts_lib.PromptSet:
    """A built-in caption set by name (``CAPTION_SETS``)."""
    if name == "shapes":
        return prompts_lib.shapes_captions()
    raise ValueError(f"unknown caption set {name!r}; known: {CAPTION_SETS}")


def caption_spec(captions: str) -> dict:
    """The record of a captioned base model (stored in its checkpoints' metadata): the
    caption set and the word encoder's settings."""
    return {"kind": "text", "source": "captions", "captions": captions,
            **word_encoder.settings()}


def class_spec() -> dict:
    """The record of a class-conditional base model."""
    return {"kind": "class"}


def embeddings_spec(path: str) -> dict:
    """The record of a model conditioned on an ``embed_prompts`` dataset in ``path``."""
    return {"kind": "text", "source": "embeddings", "path": str(path)}


def table(spec: Mapping[str, Any] | None, split: str, *, num_classes: int,
          class_names=None) -> PromptTable:
    """The prompt table of one split (``"train"`` or ``"test"``) for a model's record.

    Args:
      spec: :func:`class_spec`, :func:`caption_spec` or :func:`embeddings_spec` (None: a
        class-conditional model recorded before tables existed).
      split: "train" or "test" (a class table is the same for both).
      num_classes, class_names: the model's classes.
    """
    if spec is None or spec["kind"] == "class":
        return class_table(num_classes, class_names)
    if spec["source"] == "captions":
        prompt_set = caption_set(spec["captions"])
        chosen = prompt_set.split(split)
        settings = {k: spec[k] for k in word_encoder.settings()}
        text, pooled = word_encoder.encode([p.text for p in chosen], **settings)
        null_text, null_pooled = word_encoder.encode([""], **settings)
        return text_table(chosen, text, pooled, {"text": null_text[0], "pooled": null_pooled[0]},
                          num_classes=num_classes)
    if spec["source"] == "embeddings":
        from normguard_jax import text as text_lib   # the reader needs no torch
        loaded = text_lib.load_embeddings(spec["path"], split)
        return text_table(loaded.prompts, loaded.text, loaded.pooled,
                          text_lib.null_condition(spec["path"]), num_classes=num_classes)
    raise ValueError(f"unknown conditioning record {dict(spec)!r}")

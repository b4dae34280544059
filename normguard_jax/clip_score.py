"""The ``clip_score`` and ``pickscore`` rewards: how well an image matches its prompt under a
CLIP-architecture model.

Per sample: ``exp(logit_scale) · cos(image embedding, prompt embedding)`` — the model's own
``logits_per_image`` entry for the pair (OpenAI CLIP: 100·cos; PickScore is trained so that
this logit is its preference score). PickScore is a ``CLIPModel`` with other weights, so both
names run this code; they differ only in the folder (``config.reward_models.clip_score`` /
``config.reward_models.pickscore``), which must hold a transformers ``CLIPModel``
(``config.json``, safetensors) and its tokenizer (for PickScore, copy the tokenizer and
``preprocessor_config.json`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` next to its
weights).

The prompt embeddings are computed once, on the host, when the reward is built: the
``RewardContext.prompts`` texts (the run's prompt split, in index order) are tokenized by the
folder's tokenizer (padded/truncated to the text tower's ``max_position_embeddings``) and
embedded by the text tower into a normalised (P, E) table; a sample's row is
``rewards.request_index(request)`` (a class-conditional run: its label). A class-conditional
``shapes`` run without prompt texts uses one text per class, ``"a <colour> <shape>"``.

The reward's parameters (an argument of the jitted rollout, not a constant) are the vision
tower, its projection, the logit scale and the prompt table; the text tower is dropped after
the table is made. Images go through :func:`models.clip.preprocess` (differentiable, so the
reward is too). Building needs the ``hf`` extra (``transformers``, for the tokenizer only);
scoring needs only JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from normguard_jax import config_checks, rewards
from normguard_jax.data import shapes
from normguard_jax.models import clip

TEXT_BATCH = 64  # prompts per text-tower call when the table is built


def class_prompts(ctx: rewards.RewardContext) -> tuple[str, ...] | None:
    """One text per class for class-conditional datasets that have names (``shapes``: label
    ``shape * 4 + colour`` -> "a <colour> <shape>"), else None."""
    if ctx.base_dataset != "shapes" or ctx.num_classes != shapes.NUM_CLASSES:
        return None
    out = []
    for label in range(shapes.NUM_CLASSES):
        shape, colour = (int(v) for v in shapes.decompose_label(np.asarray(label)))
        out.append(f"a {shapes.COLOUR_NAMES[colour]} {shapes.SHAPES[shape]}")
    return tuple(out)


def tokenize(folder: str, texts, max_length: int) -> np.ndarray:
    """(P, max_length) int32 ids from the folder's tokenizer (padded and truncated; a warning
    names the prompts that are cut)."""
    import transformers  # pylint: disable=import-outside-toplevel  (the hf extra)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cut = [t for t, ids in zip(texts, tokenizer(list(texts))["input_ids"]) if len(ids) > max_length]
    if cut:
        logging.warning("%d of %d prompts are longer than the CLIP text tower's %d tokens and are "
                        "truncated, e.g. %r", len(cut), len(texts), max_length, cut[0])
    ids = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


def text_table(loaded: clip.LoadedCLIP, ids: np.ndarray) -> jax.Array:
    """(P, E) float32 normalised text embeddings of (P, T) token ids, in batches."""
    graphdef, state = nnx.split(loaded.model(), nnx.Param)

    @jax.jit
    def embed(state, ids):
        return clip.normalise(nnx.merge(graphdef, state).text_features(ids))

    rows = [embed(state, jnp.asarray(ids[i:i + TEXT_BATCH]))
            for i in range(0, len(ids), TEXT_BATCH)]
    return jnp.concatenate(rows)


def build(name: str, ctx: rewards.RewardContext) -> rewards.Built:
    """The ``clip_score`` / ``pickscore`` reward for ``ctx`` (loads the model, embeds the
    prompts).

    Raises:
      config_checks.ConfigError: no folder in ``config.reward_models.<name>``, or no prompt
        texts for the run.
    """
    folder = ctx.model_dirs.get(name, "")
    if not folder:
        raise config_checks.ConfigError(
            f"config.reward_models.{name} must name a transformers CLIPModel folder (weights "
            f"and tokenizer) for the {name} reward")
    texts = ctx.prompts if ctx.prompts is not None else class_prompts(ctx)
    if not texts:
        raise config_checks.ConfigError(
            f"the {name} reward needs the run's prompt texts (a prompt-set run), or a "
            f"class-conditional dataset with class names; {ctx.dataset!r} has neither")
    loaded = clip.load_clip(folder)
    table = text_table(loaded, tokenize(folder, texts, loaded.config.text.max_position_embeddings))
    model = loaded.model()
    vision_def, vision = nnx.split(model.vision_model, nnx.Param)
    proj_def, proj = nnx.split(model.visual_projection, nnx.Param)
    prep = loaded.preprocessing
    params = {"vision": vision, "projection": proj, "logit_scale": model.logit_scale[...],
              "text": table}

    def apply(params, images, request):
        pixels = clip.preprocess(images, prep)
        features = nnx.merge(proj_def, params["projection"])(
            nnx.merge(vision_def, params["vision"])(pixels))
        text = params["text"][rewards.request_index(request)]
        cos = jnp.sum(clip.normalise(features) * text, axis=-1)
        return jnp.exp(params["logit_scale"]) * cos

    apply.__name__ = apply.__qualname__ = name
    return rewards.Built(apply, params)

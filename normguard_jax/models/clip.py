"""CLIP (vision tower + projection, text tower + projection, logit scale) in Flax NNX, loaded
from a ``transformers`` ``CLIPModel`` folder without torch.

The architecture is ``transformers.CLIPModel``'s, module for module and named as it names
them, so the one name table (:func:`clip_name_table`) only changes leaf names and transposes
torch ``Linear``/``Conv2d`` weights:

  vision  patch embedding (Conv, no bias, stride = patch) ++ class token, + learnt positions,
          ``pre_layrnorm``, L pre-norm encoder layers, ``post_layernorm`` of the class token,
          ``visual_projection`` (no bias).
  text    token + position embeddings, L pre-norm encoder layers with a causal mask,
          ``final_layer_norm``, the state at the end-of-text token (the first ``eos_token_id``;
          the highest id when ``eos_token_id == 2``, as transformers does for old configs),
          ``text_projection`` (no bias).
  layer   ``x + attn(LN1(x))``, then ``x + fc2(act(fc1(LN2(x))))``; attention with q/k/v/out
          biases and scale 1/sqrt(head_dim); ``act`` from ``hidden_act`` (quick_gelu for
          OpenAI's CLIP, gelu for the LAION / PickScore models).
  logits  ``exp(logit_scale) · cos(image_embeds, text_embeds)``.

The text tower reads no attention mask: with the causal mask, padding after the end-of-text
token cannot change the pooled state (the same holds in transformers). PickScore
(``yuvalkirstain/PickScore_v1``) is a ``CLIPModel`` with other weights (a fine-tuned
CLIP-ViT-H/14): it loads through the same code.

Images are NHWC float32 here (transformers takes NCHW ``pixel_values``); :func:`preprocess`
turns [-1, 1] images into the processor's normalised pixels in JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from normguard_jax.models import hf_weights

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# CLIPImageProcessor's defaults (OpenAI's normalisation, 224 pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower (transformers' ``CLIPVisionConfig`` / ``CLIPTextConfig`` fields
    this implementation reads; defaults are transformers' CLIP-B/32 ones)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # vision only
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # text only
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    def validate(self, what: str) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{what}.hidden_act={self.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{what}.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")


_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12)
_TEXT_DEFAULTS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A ``CLIPModel``'s ``config.json``: both towers, the projection width and the initial
    logit scale (the loaded ``logit_scale`` parameter replaces it)."""

    vision: TowerConfig
    text: TowerConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPConfig":
        """From a transformers ``config.json`` dict (unknown keys are ignored: transformers
        serialises every generic ``PretrainedConfig`` field)."""
        fields = {f.name for f in dataclasses.fields(TowerConfig)}

        def tower(d, defaults):
            return TowerConfig(**{**defaults, **{k: v for k, v in (d or {}).items()
                                                 if k in fields}})

        out = cls(vision=tower(config.get("vision_config"), _VISION_DEFAULTS),
                  text=tower(config.get("text_config"), _TEXT_DEFAULTS),
                  projection_dim=config.get("projection_dim", 512),
                  logit_scale_init_value=config.get("logit_scale_init_value", 2.6592))
        out.vision.validate("vision_config")
        out.text.validate("text_config")
        return out


class Attention(nnx.Module):
    """Multi-head self-attention with q/k/v/out projections (all with biases)."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)), is_causal=causal)
        return self.out_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer layer (transformers' ``CLIPEncoderLayer``)."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(cfg, rngs)
        self.layer_norm1 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs)
        self.layer_norm2 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * d**-0.5)
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p),
                                        padding="VALID", use_bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed((cfg.image_size // p) ** 2 + 1, d, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels)                      # (B, g, g, D)
        b, _, _, d = patches.shape
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, d))
        x = jnp.concatenate([cls, patches.reshape(b, -1, d)], axis=1)
        return x + self.position_embedding.embedding[...][None]


class VisionTransformer(nnx.Module):
    """transformers' ``CLIPVisionTransformer``: (B, S, S, C) pixels -> (B, D) pooled state."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.embeddings = VisionEmbeddings(cfg, rngs)
        self.pre_layrnorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                                          rngs=rngs)
        self.encoder = Encoder(cfg, rngs)
        self.post_layernorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                                            rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"the vision tower takes {self.image_size}x{self.image_size} "
                             f"pixels, got {pixels.shape[1:3]} (see clip.preprocess)")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        positions = self.position_embedding.embedding[...][:ids.shape[1]]
        return self.token_embedding(ids) + positions[None]


class TextTransformer(nnx.Module):
    """transformers' ``CLIPTextTransformer``: (B, T) int ids -> (B, D) end-of-text state."""

    def __init__(self, cfg: TowerConfig, rngs: nnx.Rngs):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg, rngs)
        self.encoder = Encoder(cfg, rngs)
        self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                                              rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))
        if self.eos_token_id == 2:      # legacy configs: the end token has the highest id
            end = jnp.argmax(ids, axis=-1)
        else:
            end = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]


class CLIP(nnx.Module):
    """Both towers, their projections and the logit scale (transformers' ``CLIPModel``)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = VisionTransformer(config.vision, rngs)
        self.text_model = TextTransformer(config.text, rngs)
        self.visual_projection = nnx.Linear(config.vision.hidden_size, config.projection_dim,
                                            use_bias=False, rngs=rngs)
        self.text_projection = nnx.Linear(config.text.hidden_size, config.projection_dim,
                                          use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """(B, S, S, C) normalised NHWC pixels -> (B, E) projected, not normalised."""
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, ids: jax.Array) -> jax.Array:
        """(B, T) int32 token ids -> (B, E) projected, not normalised."""
        return self.text_projection(self.text_model(ids))

    def logits(self, pixels: jax.Array, ids: jax.Array) -> jax.Array:
        """(B_img, B_text) ``exp(logit_scale) · cos`` (transformers' ``logits_per_image``)."""
        return scaled_cosine(self.image_features(pixels), self.text_features(ids),
                             self.logit_scale[...])


def normalise(x: jax.Array) -> jax.Array:
    """Rows divided by their L2 norm (float32)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def scaled_cosine(image_features: jax.Array, text_features: jax.Array,
                  logit_scale: jax.Array) -> jax.Array:
    """(N, E), (M, E), scalar -> (N, M) ``exp(logit_scale) · cos``."""
    return jnp.exp(logit_scale) * normalise(image_features) @ normalise(text_features).T


# ----------------------------------------------------------------------------------------------
# Image preprocessing (CLIPImageProcessor) in JAX.
# ----------------------------------------------------------------------------------------------


class Preprocessing(NamedTuple):
    """CLIPImageProcessor's settings: resize the shortest edge to ``shortest_edge`` (bicubic),
    centre-crop ``crop`` × ``crop``, then ``(x - mean) / std`` on [0, 1] values."""

    shortest_edge: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: str, image_size: int) -> "Preprocessing":
        """From the folder's ``preprocessor_config.json`` (absent: CLIP's defaults at the vision
        tower's ``image_size``)."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls(image_size, image_size)
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        size, crop = c.get("size", image_size), c.get("crop_size", image_size)
        size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        return cls(int(size), int(crop), tuple(c.get("image_mean", CLIP_MEAN)),
                   tuple(c.get("image_std", CLIP_STD)))


def preprocess(images: jax.Array, prep: Preprocessing = Preprocessing()) -> jax.Array:
    """[-1, 1] NHWC RGB images -> the CLIP vision tower's normalised NHWC pixels.

    Clips to [-1, 1], maps to [0, 1], resizes so the shortest edge is ``prep.shortest_edge``
    (``jax.image.resize`` bicubic, Keys a = -0.5 like PIL's; antialiased when shrinking;
    width then height, clamped to [0, 1] after each pass as PIL's 8-bit passes are),
    centre-crops ``prep.crop`` ×
    ``prep.crop`` and normalises with ``prep.mean``/``prep.std``. Differentiable. Unlike the
    processor it does not round to uint8 before and after the resize (tests/test_clip.py
    bounds the difference).

    Args:
      images: (B, H, W, 3) float32 in [-1, 1].
      prep: the processor's settings.

    Returns:
      (B, crop, crop, 3) float32.
    """
    x = (jnp.clip(images, -1.0, 1.0) + 1.0) * 0.5
    b, h, w, c = x.shape
    scale = prep.shortest_edge / min(h, w)
    nh, nw = max(prep.crop, round(h * scale)), max(prep.crop, round(w * scale))
    if (nh, nw) != (h, w):
        # Separable, width first, clamped after each pass: as PIL resizes a uint8 image
        # (bicubic overshoots; each pass writes a clamped 8-bit image).
        x = jnp.clip(jax.image.resize(x, (b, h, nw, c), method="bicubic"), 0.0, 1.0)
        x = jnp.clip(jax.image.resize(x, (b, nh, nw, c), method="bicubic"), 0.0, 1.0)
    top, left = (nh - prep.crop) // 2, (nw - prep.crop) // 2
    x = x[:, top:top + prep.crop, left:left + prep.crop]
    return (x - jnp.asarray(prep.mean, jnp.float32)) / jnp.asarray(prep.std, jnp.float32)


# ----------------------------------------------------------------------------------------------
# transformers state dict -> NNX parameters.
# ----------------------------------------------------------------------------------------------

# Buffers older transformers versions saved; CLIP recomputes them.
CLIP_BUFFERS = re.compile(r"(text|vision)_model\.embeddings\.position_ids")
# (key pattern, leaf name here, transform); the first full match wins.
_LEAVES = tuple((re.compile(p), leaf, t) for p, leaf, t in (
    (r"logit_scale", None, hf_weights.identity),
    (r"vision_model\.embeddings\.class_embedding", None, hf_weights.identity),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "kernel", hf_weights.conv_kernel),
    (r".*_embedding\.weight", "embedding", hf_weights.identity),
    (r".*(layer_norm\d?|layrnorm|layernorm)\.weight", "scale", hf_weights.identity),
    (r".*\.weight", "kernel", hf_weights.linear_kernel),
    (r".*\.bias", "bias", hf_weights.identity),
))


def clip_name_table(key: str):
    """The one name table of this model (``hf_weights.NameTable``): a transformers
    ``CLIPModel`` state-dict key -> (path in the ``nnx.Param`` state of ``CLIP``, transform).

    Examples:
      ``vision_model.encoder.layers.0.self_attn.q_proj.weight`` -> ((``vision_model``,
        ``encoder``, ``layers``, 0, ``self_attn``, ``q_proj``, ``kernel``), linear_kernel)
      ``text_model.embeddings.token_embedding.weight`` -> ((…, ``token_embedding``,
        ``embedding``), identity)
      ``vision_model.pre_layrnorm.weight`` -> ((…, ``pre_layrnorm``, ``scale``), identity)
      ``vision_model.embeddings.patch_embedding.weight`` -> ((…, ``kernel``), conv_kernel)
      ``logit_scale`` -> ((``logit_scale``,), identity)
      ``text_model.embeddings.position_ids`` -> ``hf_weights.IGNORE``
    Any other key (no ``.weight``/``.bias`` ending) gives None: unmapped, a loud error.
    """
    if CLIP_BUFFERS.fullmatch(key):
        return hf_weights.IGNORE
    for pattern, leaf, transform in _LEAVES:
        if pattern.fullmatch(key):
            parts = key.split(".")
            parts = parts if leaf is None else parts[:-1] + [leaf]
            return tuple(int(s) if s.isdigit() else s for s in parts), transform
    return None


class LoadedCLIP(NamedTuple):
    """A CLIP from a folder: the module's graphdef, its parameters, config and preprocessing."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: CLIPConfig
    preprocessing: Preprocessing

    def model(self) -> CLIP:
        """The module with the loaded parameters."""
        return nnx.merge(self.graphdef, self.params)


def load_clip(folder: str) -> LoadedCLIP:
    """Loads a transformers ``CLIPModel`` folder (``config.json`` + safetensors, e.g.
    ``openai/clip-vit-large-patch14`` or PickScore's) torch-free, float32.

    Raises:
      hf_weights.WeightsError: checkpoint keys the name table does not map, or parameters no
        key fills, listed by name.
      FileNotFoundError: no config.json or no safetensors weights.
      ValueError: a config this implementation does not cover.
    """
    config = CLIPConfig.from_dict(hf_weights.read_config(folder))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    params = hf_weights.load_params(abstract, folder, clip_name_table)
    prep = Preprocessing.from_folder(folder, config.vision.image_size)
    return LoadedCLIP(graphdef, params, config, prep)

"""CLIP (models/clip.py) against transformers' own ``CLIPModel``, its preprocessing against
``CLIPImageProcessor``, and the ``clip_score`` / ``pickscore`` rewards.

Tiny random CLIPModels (every parameter drawn at random, norm scales and biases too) are
saved with ``save_pretrained`` next to a byte-level CLIP tokenizer and loaded by
``clip.load_clip`` (the name table and ``hf_weights.load_params``, no torch).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import config_checks, rewards
from normguard_jax.models import clip, hf_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from diffusers_reference import randomise, relative_error  # noqa: E402

IMAGE_SIZE, TEXT_LENGTH = 30, 16
PROMPTS = ("a red circle", "two blue squares", "a green cross above a yellow triangle",
           "a yellow triangle")


def byte_level_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols, with and without the
    end-of-word mark, and the two special tokens (no merges): 514 ids."""
    chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(folder, hidden_act="quick_gelu", seed=0):
    """Saves a tiny random CLIPModel, its tokenizer and image processor in ``folder``."""
    tokenizer = byte_level_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, hidden_act=hidden_act)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=TEXT_LENGTH,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(tower, image_size=IMAGE_SIZE, patch_size=6), projection_dim=24,
        logit_scale_init_value=2.0)
    torch.manual_seed(seed)
    model = randomise(transformers.CLIPModel(config), seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(folder)
    return model, tokenizer, processor


_FOLDERS = {}


def _folder(hidden_act, tmp_path_factory):
    if hidden_act not in _FOLDERS:
        path = tmp_path_factory.mktemp(f"clip_{hidden_act}")
        _FOLDERS[hidden_act] = (str(path), *tiny_clip(str(path), hidden_act))
    return _FOLDERS[hidden_act]


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def any_folder(request, tmp_path_factory):
    """Both activations (OpenAI CLIP's and PickScore's): for the model parity tests."""
    return _folder(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One tiny model: for what does not depend on the activation."""
    return _folder("quick_gelu", tmp_path_factory)


def quantised_images(shape, seed):
    """[-1, 1] images whose uint8 form ``round((x + 1) · 127.5)`` is exact."""
    levels = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    return levels.astype(np.float32) / 127.5 - 1.0, levels


def test_parity_with_transformers(any_folder):
    path, model, tokenizer, _ = any_folder
    loaded = clip.load_clip(path)
    ours = loaded.model()
    ids = tokenizer(list(PROMPTS), padding="max_length", max_length=TEXT_LENGTH,
                    truncation=True, return_tensors="np")["input_ids"].astype(np.int32)
    pixels = np.random.default_rng(1).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2)))
    image = ours.image_features(jnp.asarray(pixels))
    text = ours.text_features(jnp.asarray(ids))
    assert relative_error(image / jnp.linalg.norm(image, axis=-1, keepdims=True),
                          out.image_embeds.numpy()) < 1e-5
    assert relative_error(text / jnp.linalg.norm(text, axis=-1, keepdims=True),
                          out.text_embeds.numpy()) < 1e-5
    assert relative_error(ours.logits(jnp.asarray(pixels), jnp.asarray(ids)),
                          out.logits_per_image.numpy()) < 1e-5
    # Unnormalised projections too (the processor-independent features).
    with torch.no_grad():
        ref_text = model.get_text_features(input_ids=torch.as_tensor(ids, dtype=torch.long))
    ref_text = getattr(ref_text, "pooler_output", ref_text)
    assert relative_error(text, ref_text.numpy()) < 1e-5


def test_missing_and_unmapped_keys_fail_loudly(folder, tmp_path):
    import safetensors.numpy
    path = folder[0]
    weights = safetensors.numpy.load_file(f"{path}/model.safetensors")
    weights["vision_model.extra_head.scale_factor"] = np.ones(3, np.float32)
    del weights["text_projection.weight"]
    safetensors.numpy.save_file(weights, str(tmp_path / "model.safetensors"))
    with open(f"{path}/config.json", encoding="utf-8") as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(hf_weights.WeightsError) as e:
        clip.load_clip(str(tmp_path))
    assert "vision_model.extra_head.scale_factor" in str(e.value)
    assert "text_projection/kernel" in str(e.value)


# Tolerance: two uint8 levels after normalisation, 2 / 255 / min(std) = 0.030. The processor
# (PIL) resizes a uint8 image in two 8-bit passes, so it rounds twice (ours stays float32);
# the kernels, the pass order and the clamping agree. Measured max |difference| 0.0149
# (about one level) on random-pixel and on smooth images, upsampling 12 -> 30, shrinking
# 64 -> 30 and 40x52 -> 30x39 -> crop; the same images resized bilinearly differ by > 0.3.
PREPROCESS_ATOL = 2 / 255 / min(clip.CLIP_STD)


@pytest.mark.parametrize("hw", [(12, 12), (64, 64), (40, 52)])
def test_preprocessing_matches_the_clip_image_processor(folder, hw):
    path, _, _, processor = folder
    x, levels = quantised_images((3, *hw, 3), seed=hw[0])
    want = processor(images=list(levels), return_tensors="np")["pixel_values"]
    prep = clip.Preprocessing.from_folder(path, IMAGE_SIZE)
    got = np.asarray(clip.preprocess(jnp.asarray(x), prep)).transpose(0, 3, 1, 2)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < PREPROCESS_ATOL
    bilinear = np.asarray(jax.image.resize(jnp.asarray((x + 1) / 2),
                                           (3, IMAGE_SIZE, IMAGE_SIZE, 3), "linear"))
    if hw != (40, 52):     # the check can fail: another kernel is far off
        mean, std = np.asarray(clip.CLIP_MEAN), np.asarray(clip.CLIP_STD)
        other = ((bilinear - mean) / std).transpose(0, 3, 1, 2)
        assert np.abs(other - want).max() > 3 * PREPROCESS_ATOL


def reward_context(path, prompts=PROMPTS, name="clip_score"):
    return rewards.RewardContext("shapes", (IMAGE_SIZE, IMAGE_SIZE, 3), 16, no_nets,
                                 prompts=prompts, model_dirs={name: path})


def no_nets(name):
    raise AssertionError(f"the CLIP rewards use no cached net, asked for {name!r}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_score_reward_is_the_models_logit_for_each_samples_prompt(folder, name):
    path, model, tokenizer, processor = folder
    reward = rewards.build_reward(name, reward_context(path, name=name))
    assert reward.differentiable
    x, levels = quantised_images((4, IMAGE_SIZE, IMAGE_SIZE, 3), seed=5)
    request = {"label": jnp.full(4, -1, jnp.int32), "index": jnp.asarray([2, 0, 3, 2])}
    got = np.asarray(jax.jit(reward.apply)(reward.params, jnp.asarray(x), request))
    ids = tokenizer(list(PROMPTS), padding="max_length", max_length=TEXT_LENGTH,
                    truncation=True, return_tensors="pt")["input_ids"]
    pixels = processor(images=list(levels), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image.numpy()
    want = logits[np.arange(4), [2, 0, 3, 2]]
    # Same size: no resize, so only the float32 paths differ.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The parameters are arguments: no text tower, the table is (P, E).
    assert reward.params["text"].shape == (len(PROMPTS), 24)
    assert "text_model" not in json.dumps(jax.tree_util.keystr(
        jax.tree.leaves_with_path(reward.params)))
    g = jax.grad(lambda u: jnp.sum(reward(u, request)))(jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


def test_class_conditional_shapes_runs_use_class_names(folder):
    path, model, tokenizer, processor = folder
    ctx = reward_context(path, prompts=None)
    reward = rewards.build_reward("clip_score", ctx)
    assert reward.params["text"].shape[0] == 16
    x, _ = quantised_images((2, IMAGE_SIZE, IMAGE_SIZE, 3), seed=6)
    labels = jnp.asarray([6, 9], jnp.int32)   # shape 1 (square) colour 2 (blue); 2, 1
    with_names = rewards.build_reward("clip_score", reward_context(
        path, prompts=tuple(f"p{i}" for i in range(6)) + ("a blue square", "x", "y",
                                                          "a green triangle")))
    np.testing.assert_allclose(reward(jnp.asarray(x), labels),
                               with_names(jnp.asarray(x), labels), rtol=1e-5)


def test_long_prompts_are_truncated_with_a_warning(folder, caplog):
    from normguard_jax import clip_score
    long = "a red circle " * 5
    ids = clip_score.tokenize(folder[0], ["a red circle", long], TEXT_LENGTH)
    assert ids.shape == (2, TEXT_LENGTH)
    assert any("1 of 2 prompts are longer" in r.getMessage() for r in caplog.records)


def test_clip_score_needs_a_folder_and_prompts(folder):
    ctx = reward_context("", name="clip_score")
    assert "clip_score" not in rewards.applicable(ctx)
    with pytest.raises(config_checks.ConfigError,
                       match=r"config.rewards.clip_score is not defined .* \(it needs RGB images "
                             r"and a model folder in config.reward_models.clip_score"):
        rewards.check_weights({"clip_score": 1.0}, ctx)
    from normguard_jax import clip_score
    digits = rewards.RewardContext("digits_mnist", (32, 32, 3), 10, None,
                                   model_dirs={"clip_score": folder[0]})
    with pytest.raises(config_checks.ConfigError, match="needs the run's prompt texts"):
        clip_score.build("clip_score", digits)

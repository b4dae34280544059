"""Text conditioning: the word encoder, the shapes captions, prompt tables, and a captioned
MMDiT base through pretraining, RL (with CFG's empty-prompt branch) and evaluation."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import (conditioning, config_checks, evaluate, generators, pretrain, rl,
                           sampling, word_encoder)
from normguard_jax.data import prompts, shapes

from conftest import load_config_file


# ---------------------------------------------------------------------------------------------
# The word encoder and the captions.
# ---------------------------------------------------------------------------------------------


def test_word_encoder_is_a_fixed_bag_of_words_with_positions():
    text, pooled = word_encoder.encode(["a red circle", "circle red a", "", "A RED circle!"])
    assert text.shape == (4, word_encoder.MAX_WORDS, word_encoder.DIM)
    assert pooled.shape == (4, word_encoder.DIM)
    # Case and punctuation do not matter; the empty prompt is all zeros (CFG's null).
    np.testing.assert_array_equal(text[0], text[3])
    assert not text[2].any() and not pooled[2].any()
    # The pooled vector is a bag of words; the token sequence sees the order.
    np.testing.assert_allclose(pooled[0], pooled[1], atol=1e-7)
    assert np.abs(text[0] - text[1]).max() > 0.1
    # Rows after the last word are padding (zeros); a word's row is its vector + position code.
    assert not text[0, 3:].any()
    pos = word_encoder.position_code(word_encoder.MAX_WORDS, word_encoder.DIM)
    np.testing.assert_allclose(
        text[0, 1], word_encoder.word_vector("red", word_encoder.DIM)
        + word_encoder.POSITION_SCALE * pos[1], rtol=1e-6)
    np.testing.assert_allclose(
        pooled[0], np.mean([word_encoder.word_vector(w, word_encoder.DIM)
                            for w in ("a", "red", "circle")], axis=0), rtol=1e-6)
    # Words are nearly orthogonal: distinct words' vectors have small cosine.
    vr, vb = (word_encoder.word_vector(w, 64) for w in ("red", "blue"))
    assert abs(vr @ vb) / (np.linalg.norm(vr) * np.linalg.norm(vb)) < 0.5


def test_shapes_captions_cover_every_class_with_held_out_templates():
    captions = prompts.shapes_captions()
    assert len(captions.train) == 96 and len(captions.test) == 32
    assert not {p.text for p in captions.train} & {p.text for p in captions.test}
    for split, per_class in ((captions.train, 6), (captions.test, 2)):
        labels = [conditioning.prompt_label(p) for p in split]
        np.testing.assert_array_equal(np.bincount(labels, minlength=16), per_class)
    for p in captions.train + captions.test:
        # The caption names its class's colour and shape and nothing else.
        assert shapes.COLOUR_NAMES[p.colour] in p.text and shapes.SHAPES[p.shape] in p.text
        others = [w for w in shapes.COLOUR_NAMES + shapes.SHAPES
                  if w not in (shapes.COLOUR_NAMES[p.colour], shapes.SHAPES[p.shape])]
        assert not any(w in p.text.split() for w in others), p.text
    assert prompts.shapes_captions() == captions          # deterministic


# ---------------------------------------------------------------------------------------------
# Prompt tables.
# ---------------------------------------------------------------------------------------------


def _caption_table(split="train"):
    return conditioning.table(conditioning.caption_spec("shapes"), split, num_classes=16)


def test_class_table_is_the_labels_themselves():
    t = conditioning.class_table(5)
    idx = np.array([4, 0, 2], np.int32)
    np.testing.assert_array_equal(t.cond(idx), idx)
    np.testing.assert_array_equal(t.request(idx), idx)
    assert t.null == 5 and t.cond_shapes() is None and t.labelled()
    # The RL draw of a class table equals the class-label draw it replaced (same key).
    key = jax.random.key(3)
    cond, requests = rl.draw_prompts(key, t, None, 4, 3)
    legacy, _ = rl.draw_prompts(key, None, 5, 4, 3)
    np.testing.assert_array_equal(cond, legacy)
    assert requests is None


def test_text_table_gathers_embeddings_requests_and_draws_within_a_class():
    t = _caption_table()
    assert t.kind == "text" and len(t) == 96
    assert t.cond_shapes() == {"text": (word_encoder.MAX_WORDS, word_encoder.DIM),
                               "pooled": (word_encoder.DIM,)}
    idx = np.array([5, 0, 95], np.int32)
    cond = t.cond(idx)
    text, pooled = word_encoder.encode([t.texts[i] for i in idx])
    np.testing.assert_array_equal(cond["text"], text)
    np.testing.assert_array_equal(cond["pooled"], pooled)
    req = t.request(idx)
    np.testing.assert_array_equal(req["index"], idx)
    np.testing.assert_array_equal(req["label"], t.labels[idx])
    assert set(req) == {"label", "index", *prompts.METADATA_FIELDS}
    assert not t.null["text"].any() and t.null["text"].shape == (1, 8, 32)
    # A traced index gathers the same rows as the host one.
    traced = jax.jit(t.cond)(jnp.asarray(idx))
    np.testing.assert_array_equal(traced["text"], cond["text"])
    # Drawn captions belong to the asked class and cover all of its captions.
    classes = np.repeat(np.arange(16), 200)
    drawn = t.draw_for_classes(np.random.default_rng(0), classes)
    np.testing.assert_array_equal(t.labels[drawn], classes)
    for c in range(16):
        assert set(drawn[classes == c]) == set(t.prompts_of_class(c))
    # Fixed per-class prompts cycle through the class's prompts.
    cyc = t.for_classes(np.array([3, 3, 3, 3, 3, 3, 3]))
    np.testing.assert_array_equal(cyc[:6], t.prompts_of_class(3))
    assert cyc[6] == cyc[0]


def test_text_rollout_conditions_each_group_on_one_prompt():
    t = _caption_table()
    cond, requests = rl.draw_prompts(jax.random.key(0), t, None, 5, 4)
    assert cond["text"].shape == (20, 8, 32) and requests["index"].shape == (20,)
    groups = requests["index"].reshape(5, 4)
    assert (groups == groups[:, :1]).all()
    np.testing.assert_array_equal(cond["pooled"], t.cond(requests["index"])["pooled"])


def test_guided_velocity_uses_the_empty_prompt_as_null():
    t = _caption_table()
    seen = []

    def velocity(params, x, sigma, cond):
        seen.append(cond)
        return x * 0 + cond["pooled"].sum(-1)[:, None, None, None]

    cond = t.cond(np.array([0, 7]))
    x = jnp.ones((2, 4, 4, 3))
    v = sampling.guided_velocity(velocity, None, x, 0.5, cond, guidance_scale=3.0,
                                 null_class=t.device_null())
    both = seen[0]
    np.testing.assert_array_equal(both["pooled"][2:], 0.0)   # the null half: empty prompt
    expected = 3.0 * cond["pooled"].sum(-1)                   # v_u = 0
    np.testing.assert_allclose(v[:, 0, 0, 0], expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# A captioned MMDiT base: pretraining, RL, evaluation.
# ---------------------------------------------------------------------------------------------


def tiny_text_config(data_dir, steps=4):
    config = load_config_file("pretrain_shapes_mmdit.py")
    config.data.update(name="shapes/small", data_dir=data_dir)
    config.model.size = "tiny"
    config.train.update(batch_size=16, steps=steps, log_every=2, sample_every=1000,
                        checkpoint_every=steps)
    config.optim.warmup_steps = 2
    config.sample.update(num_steps=2, per_class=1)
    return config


@pytest.fixture(scope="module")
def text_base(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("text_base"))
    pretrain.run(tiny_text_config(data_dir), workdir)
    return workdir


def test_caption_pretraining_records_and_restores_its_prompt_tables(text_base):
    base = generators.load_pretrained(text_base)
    assert base.conditioning["kind"] == "text"
    assert base.conditioning["cond_shapes"] == {"text": [8, 32], "pooled": [32]}
    train, test = generators.prompt_table(base, "train"), generators.prompt_table(base, "test")
    assert (len(train), len(test)) == (96, 32)
    assert not set(train.texts) & set(test.texts)
    # The restored velocity reads the caption: different captions, different velocities.
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    cond = train.cond(np.array([0, 90]))
    same = jax.tree.map(lambda a: np.repeat(a[:1], 2, axis=0), cond)
    v = base.velocity(base.params, x, jnp.full((2,), 0.5), cond)
    v_same = base.velocity(base.params, x, jnp.full((2,), 0.5), same)
    assert float(jnp.abs(v[1] - v_same[1]).max()) > 0
    np.testing.assert_allclose(v[0], v_same[0], rtol=1e-5, atol=1e-6)


def test_caption_batches_are_deterministic_and_of_the_image_class(data_dir):
    config = tiny_text_config(data_dir)
    from normguard_jax import data
    split = data.load_split(config.data.name, "train", data_dir)
    table, spec = pretrain.conditioning_of(config, split)
    labels = np.array([0, 5, 5, 15])
    a = pretrain.caption_batch(table, labels, 0, 3, 0)
    b = pretrain.caption_batch(table, labels, 0, 3, 0)
    c = pretrain.caption_batch(table, np.repeat(labels, 50), 0, 4, 0)
    np.testing.assert_array_equal(a["text"], b["text"])
    assert spec["cond_shapes"] == {"text": [8, 32], "pooled": [32]}
    # Every drawn caption's pooled vector is one of its class's captions'.
    for row, label in zip(c["pooled"], np.repeat(labels, 50)):
        options = table.cond(table.prompts_of_class(label))["pooled"]
        assert np.abs(options - row).max(axis=1).min() == 0


def test_text_model_needs_captions_and_class_model_refuses_them(data_dir):
    config = tiny_text_config(data_dir)
    config.data.captions = ""
    with pytest.raises(config_checks.ConfigError, match="config.data.captions"):
        pretrain.validate(config)
    config = load_config_file("pretrain_shapes_dit.py")
    config.data.captions = "shapes"
    with pytest.raises(config_checks.ConfigError, match="text-conditioned"):
        pretrain.validate(config)
    config.data.captions = "nonsense"
    with pytest.raises(config_checks.ConfigError, match="config.data.captions"):
        pretrain.validate(config)


def _tiny_rl(method, text_base, tmp_path, guidance=1.0):
    config = load_config_file(f"rl_{method}.py")
    config.base.workdir = text_base
    config.aux_dir = str(tmp_path / "aux")
    config.rewards = {"shapes_rule": 1.0}
    config.rollout.update(prompts_per_iter=8, group_size=2, num_steps=3,
                          guidance_scale=guidance)
    if method == "nft":
        config.rollout.sampler = "ode"
    if method == "grpo":
        config.rollout.sde_window_end = 2
        config.objective.guidance_scale = guidance
    config.train.update(iterations=2, log_every=1, sample_every=2, checkpoint_every=1)
    config.train.minibatch_size = 8
    config.sample.update(num_steps=2, per_class=1, guidance_scale=guidance)
    config.normguard.weight = 0.1
    return config


@pytest.mark.slow
@pytest.mark.parametrize("method, guidance", [("nft", 1.0), ("grpo", 2.0)])
def test_rl_on_the_captioned_base_trains_and_evaluates(method, guidance, text_base, tmp_path,
                                                        data_dir):
    config = _tiny_rl(method, text_base, tmp_path, guidance)
    config.optim.lr = 1e-3
    seen = []
    state = rl.run(config, str(tmp_path / "rl"), hooks=[lambda i, s, m: seen.append(m)])
    assert int(state.iteration) == 2
    m = jax.device_get(seen[-1])
    for name in ("train/loss", "train/normguard/ratio", "reward/shapes_rule"):
        assert np.isfinite(m[name]), name
    assert 0.0 <= m["reward/shapes_rule"] <= 1.0
    base = generators.load_pretrained(text_base)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(base.params)))
    assert moved > 0
    # The evaluation asks for every class with its held-out captions.
    ev = load_config_file("evaluate.py", "shapes")
    ev.checkpoint = str(tmp_path / "rl")
    ev.data_dir = data_dir
    ev.aux.dir = str(tmp_path / "aux")
    ev.aux.preset = "tiny"
    ev.rewards = {"shapes_rule": 1.0}
    ev.sample.update(per_class=2, num_steps=2, batch_size=32, guidance_scale=guidance)
    ev.metrics.knn_k = 1
    result = evaluate.run(ev, str(tmp_path / "eval"))
    assert result["prompts"] == "held-out prompts of each class"
    assert result["num_samples"] == 32
    assert 0.0 <= result["generated"]["rewards"]["shapes_rule"] <= 1.0
    assert np.isfinite(result["norm_ratio"]["mean"])


def test_rl_rollout_of_a_text_table_scores_the_drawn_prompts(text_base, tmp_path):
    config = _tiny_rl("nft", text_base, tmp_path, guidance=2.0)
    base = generators.load_pretrained(text_base)
    table = generators.prompt_table(base, "train")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    from normguard_jax import rewards
    weights, fields = rewards.config_weights(config)
    reward_fn = rewards.build_combined(weights, rl._reward_context(config, base, table),
                                       fields=fields)
    optimizer, _ = rl.build_optimizer(config)
    programs = rl.build_programs(config, base, mesh, reward_fn, optimizer,
                                 null=table.device_null())
    cond, requests = rl.draw_prompts(jax.random.key(1), table, None, 8, 2)
    ro, parts = programs.rollout(base.params, cond, jax.random.key(2), requests, programs.null)
    # The reward was asked about the drawn prompts' classes: recompute it from the images.
    expected = rewards.build_reward("shapes_rule", rl._reward_context(config, base, table))
    np.testing.assert_allclose(parts["shapes_rule"],
                               expected(ro.images, requests), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ro.requests["index"], requests["index"])
    # Against the same rollout with CFG's null taken as a class label (wrong for a text model):
    # the empty prompt is what the guided sampler used.
    x = sampling.initial_noise(jax.random.fold_in(jax.random.key(2), 0), 16, base.image_shape)
    assert x.shape == ro.images.shape
    imgs = sampling.generate_images(base.velocity, base.params, cond, jax.random.key(2),
                                    image_shape=base.image_shape, num_steps=3,
                                    shift=config.rollout.shift, guidance_scale=2.0,
                                    null_class=16, null_condition=table.device_null())
    np.testing.assert_allclose(np.asarray(imgs), np.asarray(ro.images), rtol=1e-5, atol=1e-5)

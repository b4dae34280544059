"""RL on a diffusers pipeline folder (generators.load_diffusers): the real-model path, at toy size.

A tiny random SD3.5-layout pipeline (``SD3Transformer2DModel`` + ``AutoencoderKL``, diffusers'
own classes, saved with ``save_pretrained`` into ``transformer/`` and ``vae/``) and a tiny
``embed_prompts`` dataset (the job run with a fake encoder of the right widths) go through the
same ``rl.run`` and ``evaluate.run`` as the small models, with the configs/rl_sd35m.py settings
(LoRA, bfloat16) shrunk to a few samples.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config_file
from normguard_jax import (checkpointing, config_checks, evaluate, generators, lora, rewards, rl,
                           sharding)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers_reference import randomise  # noqa: E402

TRANSFORMER = dict(  # SD3.5-M's layout in miniature (dual attention, RMS q/k norm)
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
    pooled_projection_dim=10, out_channels=16, pos_embed_max_size=8,
    dual_attention_layers=(0,), qk_norm="rms_norm")
VAE = dict(  # the SD3 VAE's layout (16 latent channels, shift and scale), downsampling 4
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16],
    layers_per_block=1, latent_channels=16, norm_num_groups=4, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
RESOLUTION = 32          # latents 8 × 8 × 16 (VAE factor 4 × patch 2 divides 32)
TEXT_TOKENS = 7          # as tests/test_flux.py (its reference call builds txt_ids of 7)
PROMPTS = ("a red circle", "two blue squares", "a green cross", "a yellow triangle",
           "three red crosses", "a blue circle left of a green square", "a photo of a cat",
           "an astronaut riding a horse", "a bowl of fruit", "a city at night")


FLUX_TRANSFORMER = dict(  # FLUX.1-dev's layout in miniature (guidance embedding)
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
    axes_dims_rope=(4, 6, 6), guidance_embeds=True)


def _pipeline(folder, seed, family="sd3"):
    torch.manual_seed(seed)
    transformer = (diffusers.SD3Transformer2DModel(**TRANSFORMER) if family == "sd3"
                   else diffusers.FluxTransformer2DModel(**FLUX_TRANSFORMER))
    transformer = randomise(transformer.float(), seed)
    vae = randomise(diffusers.AutoencoderKL(**VAE), seed + 1)
    transformer.save_pretrained(os.path.join(folder, "transformer"), safe_serialization=True)
    vae.save_pretrained(os.path.join(folder, "vae"))
    return transformer, vae


def fake_encode(encoders, family, texts, max_sequence_length):
    """Deterministic stand-in embeddings of the transformer's widths (text 12, pooled 10)."""
    del encoders, family, max_sequence_length
    text, pooled = [], []
    for t in texts:
        rng = np.random.default_rng(sum(map(ord, t)) + 7 * len(t))
        text.append(rng.standard_normal((TEXT_TOKENS, TRANSFORMER["joint_attention_dim"])))
        pooled.append(rng.standard_normal(TRANSFORMER["pooled_projection_dim"]))
    return np.asarray(text, np.float32), np.asarray(pooled, np.float32)


def make_embeddings(root, family="sd3"):
    """An embed_prompts workdir of PROMPTS (8 train, 2 test) made with the fake encoder."""
    from normguard_jax import text as text_lib  # noqa: PLC0415
    config = load_config_file("embed_prompts.py", family)
    for name in text_lib.ENCODERS[family]:
        os.makedirs(root / "enc" / name, exist_ok=True)
        for file in ("config.json", "tokenizer_config.json"):
            (root / "enc" / name / file).write_text("{}")
        config[name] = str(root / "enc" / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config.prompts = str(root / "prompts.txt")
    config.test_fraction = 0.2
    saved = text_lib.encode, text_lib.load_encoders
    text_lib.encode, text_lib.load_encoders = fake_encode, lambda request: None
    try:
        text_lib.run(config, str(root / "embeddings"))
    finally:
        text_lib.encode, text_lib.load_encoders = saved
    return str(root / "embeddings")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(folder, other folder, embeddings, torch transformer, torch VAE)."""
    root = tmp_path_factory.mktemp("diffusers_base")
    transformer, vae = _pipeline(str(root / "sd35"), seed=0)
    _pipeline(str(root / "sd35_other"), seed=5)
    embeddings = make_embeddings(root)
    yield str(root / "sd35"), str(root / "sd35_other"), embeddings, transformer, vae
    shutil.rmtree(root, ignore_errors=True)


def base_config(*folders, **overrides):
    """configs/rl_sd35m.py:nft on (pipeline folder, embeddings), ``config.base`` overridden."""
    config = load_config_file("rl_sd35m.py", "nft")
    fields = {"diffusers_dir": folders[0], "embeddings": folders[1], "resolution": RESOLUTION}
    config.base.update({**fields, **overrides})
    config.reward_models.pickscore = "not-read-by-the-checks"
    return config


def torch_decode(vae, latents):
    """The SD3 pipeline's decode, in torch: latents / scale + shift through AutoencoderKL."""
    z = np.asarray(latents) / VAE["scaling_factor"] + VAE["shift_factor"]
    with torch.no_grad():
        out = vae.decode(torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_load_diffusers_gives_the_pipelines_velocity_and_latent_shape(pipeline):
    folder, other, embeddings, transformer, _ = pipeline
    config = base_config(folder, embeddings, param_dtype="float32")
    base = generators.load_diffusers(config.base)
    assert base.image_shape == (8, 8, 16) and base.vae.pixel_shape == (32, 32, 3)
    assert base.conditioning["kind"] == "text" and base.conditioning["source"] == "embeddings"
    assert generators.cond_shapes(base.conditioning) == {"text": (TEXT_TOKENS, 12),
                                                         "pooled": (10,)}
    table = generators.prompt_table(base, "train")
    assert len(table) == 8 and len(generators.prompt_table(base, "test")) == 2
    # The velocity is diffusers' transformer on the table's embeddings (timestep 1000·σ).
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
    sigma = np.array([0.3, 0.8], np.float32)
    cond = table.cond(np.array([0, 3]))
    ours = jax.jit(base.velocity)(base.params, jnp.asarray(x), jnp.asarray(sigma),
                                  jax.tree.map(jnp.asarray, cond))
    with torch.no_grad():
        theirs = transformer(
            hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            encoder_hidden_states=torch.from_numpy(cond["text"]),
            pooled_projections=torch.from_numpy(cond["pooled"]),
            timestep=torch.from_numpy(sigma * 1000)).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    # bfloat16 parameters on request; the fingerprint reads headers, not 2.5B numbers.
    bf16 = generators.load_diffusers(base_config(folder, embeddings).base)
    assert {a.dtype for a in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    print_ = generators.diffusers_fingerprint(folder)
    assert print_ == generators.diffusers_fingerprint(folder)
    assert print_ != generators.diffusers_fingerprint(other)


def test_config_errors_name_the_field(pipeline, tmp_path):
    folder, _, embeddings, _, _ = pipeline
    check = lambda **kw: rl.validate(base_config(folder, embeddings, **kw), 8)  # noqa: E731
    check()
    with pytest.raises(config_checks.ConfigError, match="diffusers_dir=.*does not exist"):
        check(diffusers_dir=str(tmp_path / "nowhere"))
    with pytest.raises(config_checks.ConfigError, match="no transformer/config.json"):
        check(diffusers_dir=str(tmp_path))
    with pytest.raises(config_checks.ConfigError, match="family='flux' but the transformer"):
        check(family="flux")
    with pytest.raises(config_checks.ConfigError, match=r"resolution=36 must be divisible by 8"):
        check(resolution=36)
    with pytest.raises(config_checks.ConfigError, match="config.base.embeddings: no finished"):
        check(embeddings=str(tmp_path))
    # Embeddings of the other family's encoders are refused.
    flux = tmp_path / "flux_embeddings"
    shutil.copytree(embeddings, flux)
    meta_path = flux / "embeddings" / "normguard_embeddings.json"
    meta = json.loads(meta_path.read_text())
    meta["family"] = "flux"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(config_checks.ConfigError, match="holds 'flux' text embeddings"):
        check(embeddings=str(flux))
    config = base_config(folder, embeddings)
    config.reward_models.pickscore = ""
    with pytest.raises(config_checks.ConfigError, match="reward_models.pickscore"):
        rl.validate(config, 8)
    # Every method of both real-model configs passes the checks that need no folder.
    from normguard_jax.objectives import METHODS  # noqa: PLC0415
    for name in ("rl_sd35m.py", "rl_flux.py"):
        for method in METHODS:
            config = load_config_file(name, method)
            assert config.lora.rank == 32 and config.precision.compute == "bfloat16"
            config.base.workdir = "unused"        # skip the folder checks
            config.reward_models.pickscore = "unused"
            rl.validate(config, 8)


def tiny_run_config(method, folder, embeddings, workdir_tmp):
    config = load_config_file("rl_sd35m.py", method)
    config.base.update(diffusers_dir=folder, embeddings=embeddings, resolution=RESOLUTION)
    config.rewards = {"contrast": 1.0, "saturation": 0.5}
    config.rollout.update(prompts_per_iter=4, group_size=2, num_steps=2, chunks=1)
    if method == "grpo":
        config.rollout.sde_window_end = 2
    config.train.update(iterations=2, log_every=1, sample_every=2, checkpoint_every=1,
                        minibatch_size=8)
    config.optim.accumulate_steps = 1
    config.optim.lr = 1e-2
    config.sample.update(num_steps=2, per_class=1)
    config.aux_dir = str(workdir_tmp / "aux")
    return config


def test_rollout_scores_the_vae_decode_and_takes_every_weight_as_an_argument(pipeline, tmp_path):
    folder, _, embeddings, _, vae = pipeline
    config = tiny_run_config("nft", folder, embeddings, tmp_path)
    config.base.param_dtype = "float32"
    base, _ = generators.load_base(config)
    base = base._replace(velocity=rl.run_velocity(config, base))   # LoRA, bfloat16 compute
    table = generators.prompt_table(base, "train")
    reward_fn = rl.build_reward(config, base, table)
    assert isinstance(reward_fn, rewards.DecodedReward)
    optimizer, _ = rl.build_optimizer(config)
    mesh = sharding.make_mesh(-1, 1)
    programs = rl.build_programs(config, base, mesh, reward_fn, optimizer,
                                 null=table.device_null())
    cond, requests = rl.draw_prompts(jax.random.key(3), table, None, 4, 2)
    policy = programs.policy(base.params, rl.trainable_init(config, base.params))
    args = (policy, programs.place(cond), jax.random.key(4), programs.place(requests),
            programs.null)
    ro, parts = programs.rollout(*args)
    # Rollout images are the final latents (the objectives' x0); the rewards saw their decode.
    assert ro.images.shape == (8, 8, 8, 16)
    pixels = torch_decode(vae, ro.images)
    for name, fn in (("contrast", rewards.contrast), ("saturation", rewards.saturation)):
        np.testing.assert_allclose(np.asarray(parts[name]),
                                   np.asarray(fn(jnp.asarray(pixels), requests)),
                                   rtol=2e-4, atol=2e-5)
    # In chunks (rollout.chunks): chunk c is the rollout of its groups with fold_in(key, c),
    # the advantages are those of all the rewards together (batch-wide std here).
    assert config.advantages.global_std
    cond16, requests16 = rl.draw_prompts(jax.random.key(5), table, None, 8, 2)
    chunked = programs._replace(rollout_chunks=2)
    key = jax.random.key(6)
    ro2, parts2 = rl.sample_rollout(chunked, policy, cond16, key, requests16)
    assert ro2.images.shape == (16, 8, 8, 16) and parts2["contrast"].shape == (16,)
    for c in range(2):
        take = lambda tree, c=c: jax.tree.map(lambda a: a[8 * c:8 * (c + 1)], tree)  # noqa: E731
        one, _ = rl.sample_rollout(programs, policy, take(cond16), jax.random.fold_in(key, c),
                                   take(requests16))
        np.testing.assert_array_equal(np.asarray(ro2.images[8 * c:8 * (c + 1)]),
                                      np.asarray(one.images))
        np.testing.assert_array_equal(np.asarray(ro2.rewards[8 * c:8 * (c + 1)]),
                                      np.asarray(one.rewards))
    from normguard_jax import advantages  # noqa: PLC0415
    want = advantages.group_advantages(ro2.rewards.reshape(8, 2), global_std=True, clip=5.0)
    np.testing.assert_allclose(np.asarray(ro2.advantages), np.asarray(want).reshape(-1),
                               rtol=1e-6)
    # Neither the transformer, nor the VAE, nor the text embeddings are compiled in: the
    # largest constant is the sinusoidal embedding's 128 frequencies (512 bytes) or the
    # position table of 16 tokens × 16 (1 KiB), far below the smallest weight matrix that a
    # closed-over parameter tree would bake in (the VAE's 3×3×16×16 convolutions, 9 KiB).
    text = programs.rollout.lower(*args).as_text()
    from test_reward_api import largest_constant  # noqa: PLC0415
    assert largest_constant(text) <= 2 * 1024, largest_constant(text)   # hex digits


@pytest.mark.parametrize("method", ["nft", pytest.param("grpo", marks=pytest.mark.slow)])
def test_rl_run_on_a_pipeline_trains_a_lora_resumes_only_on_it_and_evaluates(
        method, pipeline, tmp_path):
    folder, other, embeddings, _, _ = pipeline
    config = tiny_run_config(method, folder, embeddings, tmp_path)
    workdir = str(tmp_path / "rl")
    seen = []
    state = rl.run(config, workdir, hooks=[lambda i, s, m: seen.append(jax.device_get(m))])
    assert int(state.iteration) == 2
    assert np.isfinite(seen[-1]["train/loss"]) and np.isfinite(seen[-1]["reward/contrast"])
    # θ is a LoRA adapter that moved; θ_ref (the policy's frozen base) is the loaded pipeline.
    assert set(jax.tree.leaves(jax.tree.map(lambda a: a.ndim, state.params))) == {2}
    assert max(float(jnp.abs(e["b"]).max()) for e in state.params.values()) > 0
    _, meta = checkpointing.read_meta(os.path.join(workdir))
    assert meta["base_workdir"] == os.path.abspath(folder)
    assert meta["base_fingerprint"] == generators.diffusers_fingerprint(folder)
    policy, base = generators.load_policy(workdir)
    loaded = generators.load_diffusers(config.base)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    merged = lora.merge(loaded.params, state.params, lora.from_config(config))
    for a, b in zip(jax.tree.leaves(policy.params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.isfile(os.path.join(workdir, "samples", "samples_0000002.png"))
    # Resuming with another pipeline folder is refused before anything is loaded.
    config.base.diffusers_dir = other
    config.train.iterations = 3
    with pytest.raises(config_checks.ConfigError, match="diffusers_dir"):
        rl.run(config, workdir, allow_changed=["train.iterations"])
    # The evaluation samples each test prompt and writes its numbers.
    ev = load_config_file("evaluate.py", "sd35m")
    ev.checkpoint = workdir
    ev.rewards = {"contrast": 1.0}
    ev.sample.update(num_steps=2, per_class=2, batch_size=4)
    result = evaluate.run(ev, str(tmp_path / "eval"))
    assert result["prompts"] == "test prompts" and result["num_prompts"] == 2
    assert result["num_samples"] == 4 and result["image_shape"] == [32, 32, 3]
    assert {"contrast", "saturation", "compressibility"} <= set(result["generated"]["rewards"])
    assert not any(name.startswith("classifier") for name in result["generated"]["rewards"])
    assert np.isfinite(result["norm_ratio"]["mean"])
    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert written["generated"] == result["generated"]
    assert [p["prompt"] for p in written["per_prompt_rewards"]] == list(
        generators.prompt_table(base, "test").texts)
    assert (tmp_path / "eval" / "samples_eval.png").is_file()
    # The pipeline itself (the base before RL) is evaluated the same way, ρ = 1.
    ev.checkpoint = folder
    ev.base.update(embeddings=embeddings, resolution=RESOLUTION)
    base_result = evaluate.run(ev, str(tmp_path / "eval_base"))
    assert base_result["num_samples"] == 4 and base_result["norm_ratio"]["mean"] == 1.0
    assert base_result["generated"]["rewards"].keys() == result["generated"]["rewards"].keys()


@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory):
    """(folder, embeddings, torch transformer) of a tiny FLUX.1-dev-layout pipeline."""
    root = tmp_path_factory.mktemp("diffusers_flux")
    transformer, _ = _pipeline(str(root / "flux"), seed=2, family="flux")
    embeddings = make_embeddings(root, family="flux")
    yield str(root / "flux"), embeddings, transformer
    shutil.rmtree(root, ignore_errors=True)


def test_flux_pipeline_velocity_embeds_the_configured_guidance(flux_pipeline, pipeline):
    folder, embeddings, transformer = flux_pipeline
    config = load_config_file("rl_flux.py", "grpo")
    config.base.update(diffusers_dir=folder, embeddings=embeddings, resolution=RESOLUTION,
                       param_dtype="float32", family="auto", guidance=2.5)
    base = generators.load_diffusers(config.base)
    assert base.config.model.arch == "flux" and base.image_shape == (8, 8, 16)
    table = generators.prompt_table(base, "train")
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 16)).astype(np.float32)
    sigma = np.array([0.7, 0.2], np.float32)
    cond = table.cond(np.array([1, 5]))
    ours = np.asarray(jax.jit(base.velocity)(base.params, jnp.asarray(x), jnp.asarray(sigma),
                                             jax.tree.map(jnp.asarray, cond)))
    from test_flux import _diffusers_velocity  # noqa: PLC0415
    theirs = _diffusers_velocity(transformer, x, sigma,
                                 {**cond, "guidance": np.full(2, 2.5, np.float32)})
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    # SD3 embeddings are refused for a FLUX transformer (and the other way round).
    config.base.embeddings = pipeline[2]
    with pytest.raises(config_checks.ConfigError, match="holds 'sd3' text embeddings"):
        generators.diffusers_settings(config.base)


@pytest.mark.slow
def test_rl_run_on_a_flux_pipeline(flux_pipeline, tmp_path):
    folder, embeddings, _ = flux_pipeline
    config = load_config_file("rl_flux.py", "grpo")
    config.base.update(diffusers_dir=folder, embeddings=embeddings, resolution=RESOLUTION)
    config.rewards = {"contrast": 1.0}
    config.rollout.update(prompts_per_iter=8, group_size=2, num_steps=2, sde_window_end=2,
                          chunks=2)       # 2 sequential sampler calls of 8 images
    config.train.update(iterations=2, log_every=1, sample_every=2, checkpoint_every=1,
                        minibatch_size=8)
    config.optim.accumulate_steps = 1
    config.sample.update(num_steps=2, per_class=1)
    state = rl.run(config, str(tmp_path / "rl"))
    assert int(state.iteration) == 2
    # A resume on the same pipeline passes the fingerprint check and continues the run.
    config.train.iterations = 3
    state = rl.run(config, str(tmp_path / "rl"), allow_changed=["train.iterations"])
    assert int(state.iteration) == 3
    ev = load_config_file("evaluate.py", "flux")
    ev.checkpoint = str(tmp_path / "rl")
    ev.rewards = {"contrast": 1.0}
    ev.sample.update(num_steps=2, per_class=2, batch_size=4)
    result = evaluate.run(ev, str(tmp_path / "eval"))
    assert result["num_samples"] == 4 and np.isfinite(result["generated"]["combined_reward"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awm", "dpo", "ram", "am"])
def test_every_other_method_runs_on_a_pipeline(method, pipeline, tmp_path):
    """One iteration of each remaining method with configs/rl_sd35m.py's settings (LoRA,
    bfloat16; Adjoint Matching differentiates the reward through the VAE decode)."""
    folder, _, embeddings, _, _ = pipeline
    config = tiny_run_config(method, folder, embeddings, tmp_path)
    config.train.update(iterations=1, sample_every=1)
    if method == "dpo":
        config.train.minibatch_size = 8
        config.rollout.prompts_per_iter = 8        # 8 pairs: one per prompt
    seen = []
    state = rl.run(config, str(tmp_path / "rl"),
                   hooks=[lambda i, s, m: seen.append(jax.device_get(m))])
    assert int(state.iteration) == 1
    assert np.isfinite(seen[-1]["train/loss"]) and np.isfinite(seen[-1]["reward/mean"])


def test_prompt_rewards_read_the_tables_texts(pipeline, tmp_path):
    """PickScore on a pipeline run: its prompt table is the run's train prompts, and a
    sample's score is the CLIP logit of its own prompt on the torch decode of its latents."""
    pytest.importorskip("transformers")
    from test_clip import tiny_clip  # noqa: PLC0415
    folder, _, embeddings, _, vae = pipeline
    clip_dir = str(tmp_path / "pickscore")
    model, tokenizer, processor = tiny_clip(clip_dir)
    config = tiny_run_config("nft", folder, embeddings, tmp_path)
    config.rewards = {"pickscore": 1.0}
    config.reward_models.pickscore = clip_dir
    config.base.param_dtype = "float32"
    base, _ = generators.load_base(config)
    table = generators.prompt_table(base, "train")
    reward_fn = rl.build_reward(config, base, table)
    assert reward_fn.rewards[0].params["text"].shape[0] == len(table) == 8
    latents = jax.random.normal(jax.random.key(0), (3, 8, 8, 16))
    index = np.array([5, 0, 7], np.int32)
    total, parts = jax.jit(reward_fn.apply)(reward_fn.params, latents, table.request(index))
    pixels = np.clip(torch_decode(vae, latents), -1, 1)
    levels = np.round((pixels + 1) * 127.5).astype(np.uint8)
    ids = tokenizer([table.texts[i] for i in index], padding="max_length", truncation=True,
                    max_length=model.config.text_config.max_position_embeddings,
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=processor(
            images=list(levels), return_tensors="pt")["pixel_values"]).logits_per_image.numpy()
    # uint8 rounding and the processor's resize differ from the differentiable path a little.
    # (measured: within 0.006; the other prompts' logits are at least 0.14 away).
    ours = np.asarray(parts["pickscore"])
    np.testing.assert_allclose(ours, np.diag(logits), rtol=0, atol=0.03)
    off_diagonal = logits[~np.eye(3, dtype=bool)].reshape(3, 2)
    assert (np.abs(off_diagonal - ours[:, None]) > 0.1).all()
    np.testing.assert_allclose(np.asarray(total), np.asarray(parts["pickscore"]))


@pytest.mark.parametrize("method,updates", [("grpo", 2), ("nft", 1), ("awm", 1), ("am", 1)])
def test_flux_micro_steps_are_four_rows_per_chip(method, updates):
    """rl_flux.py trains on 4 rows per chip per micro-step on 8 chips (the size whose LoRA
    update was compiled to fit a v5e), accumulated to the references' optimizer updates."""
    config = load_config_file("rl_flux.py", method)
    assert config.train.minibatch_size == 32
    micro = rl.updates_per_iteration(config)
    assert micro * config.train.minibatch_size == (config.train.inner_epochs
                                                   * rl.rows_per_iteration(config))
    assert micro == updates * config.optim.accumulate_steps

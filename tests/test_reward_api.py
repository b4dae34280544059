"""The reward API around the registry: both request forms, reward parameters as program
arguments, rewards added from the command line and from outside the library."""

import re
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from normguard_jax import config_checks, flow, generators, rewards, rl, sharding
from normguard_jax.data import prompts, shapes

from conftest import REPO, load_config_file
from test_methods import tiny_config
from test_objectives import NULL, P_THETA, SHAPE, jx, toy_velocity
from test_rewards import context


def prompt_request(labels, seed=0):
    """A prompt-set request with the given labels and random other fields."""
    rng = np.random.default_rng(seed)
    b = len(labels)
    req = {name: jnp.asarray(rng.integers(-1, 4, b), jnp.int32) for name in
           rewards.REQUEST_FIELDS}
    req["label"] = jnp.asarray(labels, jnp.int32)
    req["index"] = jnp.arange(b, dtype=jnp.int32) + 100
    return req


def test_request_fields_are_label_index_and_the_prompt_metadata():
    assert rewards.REQUEST_FIELDS == ("label", "index", *prompts.METADATA_FIELDS)


def test_every_reward_reads_labels_and_prompt_requests_alike():
    """Every shapes-dataset reward gives the same values for a label array and for a prompt
    request with those labels; the class rewards give 0 where the label is -1 and the others
    ignore it."""
    ctx = context("shapes", (32, 32, 3), shapes.NUM_CLASSES)
    x = jax.random.uniform(jax.random.key(0), (6, 32, 32, 3), minval=-0.9, maxval=0.9)
    labels = jnp.asarray([0, 5, 15, 3, 7, 9], jnp.int32)
    unlabelled = labels.at[jnp.asarray([1, 4])].set(-1)
    class_rewards = {"classifier_logprob", "classifier_prob", "classifier_correct",
                     "shapes_colour", "shapes_shape", "shapes_rule", "shapes_correct"}
    names = rewards.applicable(ctx)
    assert class_rewards <= set(names)
    for name in names:
        reward = rewards.build_reward(name, ctx)
        by_label = np.asarray(reward(x, labels))
        np.testing.assert_array_equal(np.asarray(reward(x, prompt_request(labels))), by_label,
                                      err_msg=name)
        partial = np.asarray(reward(x, prompt_request(unlabelled)))
        keep = np.asarray(unlabelled) >= 0
        np.testing.assert_array_equal(partial[keep], by_label[keep], err_msg=name)
        if name in class_rewards:
            np.testing.assert_array_equal(partial[~keep], 0.0, err_msg=name)
        else:
            np.testing.assert_array_equal(partial[~keep], by_label[~keep], err_msg=name)


def test_request_helpers():
    labels = jnp.asarray([3, -1, 2], jnp.int32)
    req = prompt_request(labels)
    np.testing.assert_array_equal(rewards.request_labels(req), labels)
    np.testing.assert_array_equal(rewards.request_index(req), [100, 101, 102])
    np.testing.assert_array_equal(rewards.request_index(labels), labels)
    assert set(rewards.request_dict(labels)) == {"label", "index"}
    with pytest.raises(KeyError, match="'index'"):
        rewards.request_index({"label": labels})


# ----------------------------------------------------------------------------------------------
# Reward parameters are arguments of the compiled programs.
# ----------------------------------------------------------------------------------------------

WIDTH = 2048   # a (16, 2048) float32 weight: 128 KiB, far above anything else in the program.


def linear_reward():
    """A reward with parameters: ``sum(tanh(flatten(x) @ W))``."""
    w = jax.random.normal(jax.random.key(3), (int(np.prod(SHAPE)), WIDTH)) / 4.0

    def apply(params, images, request):
        del request
        return jnp.mean(jnp.tanh(images.reshape(images.shape[0], -1) @ params["w"]), axis=-1)

    reward = rewards.Reward("linear", apply, differentiable=True, params={"w": w})
    return rewards.CombinedReward(weights=(("linear", 2.0),), rewards=(reward,))


def largest_constant(text: str) -> int:
    """Length of the longest hex literal (``dense<"0x...">``) in a StableHLO text."""
    return max((len(m) for m in re.findall(r'dense<"0x([0-9A-Fa-f]*)">', text)), default=0)


def test_rollout_takes_the_reward_parameters_as_arguments():
    config = tiny_config("nft")
    base = generators.Pretrained(velocity=toy_velocity, params=jx(P_THETA), config=None,
                                 image_shape=SHAPE, num_classes=NULL, step=0)
    mesh = sharding.make_mesh(-1, 1)
    optimizer, _ = rl.build_optimizer(config)
    combined = linear_reward()
    programs = rl.build_programs(config, base, mesh, combined, optimizer)
    n = config.rollout.prompts_per_iter * config.rollout.group_size
    labels = programs.place(jnp.arange(n, dtype=jnp.int32) % NULL)
    key = jax.random.key(1)
    text = programs.rollout.lower(jx(P_THETA), labels, key).as_text()
    assert largest_constant(text) < 1000, largest_constant(text)

    # The same rollout with the reward closed over bakes the weight in (the check can fail).
    window = rl.trained_steps(config)
    closed = jax.jit(lambda p, y, k: rl.rollout(
        p, y, k, velocity=toy_velocity, image_shape=SHAPE, sigmas=_sigmas(config),
        method=config.rollout.sampler, noise_level=None, sde_window=(window[0], window[-1] + 1),
        guidance_scale=1.0, null_class=NULL, reward_fn=lambda _, im, r: combined(im, r),
        group_size=config.rollout.group_size, adv_clip=config.advantages.clip,
        global_std=False, keep_trajectory=False))
    assert largest_constant(closed.lower(jx(P_THETA), labels, key).as_text()) >= (
        2 * int(np.prod(SHAPE)) * WIDTH * 4)
    ours, _ = programs.rollout(jx(P_THETA), labels, key)
    theirs, _ = closed(jx(P_THETA), labels, key)
    np.testing.assert_allclose(ours.rewards, theirs.rewards, rtol=1e-6)
    np.testing.assert_allclose(ours.rewards, combined(ours.images, labels)[0], rtol=1e-5,
                               atol=1e-7)


def _sigmas(config):
    return jnp.asarray(flow.inference_sigmas(config.rollout.num_steps, config.rollout.shift))


def test_score_images_passes_parameters_and_matches_direct_calls():
    combined = linear_reward()
    (reward,) = combined.rewards
    x = np.asarray(jax.random.uniform(jax.random.key(0), (7, *SHAPE), minval=-1, maxval=1))
    y = np.arange(7, dtype=np.int32)
    out = rewards.score_images({"linear": reward}, x, y, batch_size=3)   # padded last batch
    np.testing.assert_allclose(out["linear"], reward(jnp.asarray(x), y), rtol=1e-6)
    by_prompt = rewards.score_images({"linear": reward}, x,
                                     {"label": y, "index": y}, batch_size=3)
    np.testing.assert_array_equal(by_prompt["linear"], out["linear"])


# ----------------------------------------------------------------------------------------------
# Every reward from the command line; rewards from outside the library.
# ----------------------------------------------------------------------------------------------


def parse_cli(monkeypatch, *overrides, config="configs/rl_nft.py"):
    """The config ``--config=<config> <overrides>`` gives, with main.py's locked config flag
    (ml_collections reads the override names from sys.argv)."""
    argv = ["prog", f"--config={REPO / config}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    values(argv)
    return values.config


EXTERNAL = '''
import jax.numpy as jnp

def brightness(images, request):
    """Mean pixel value."""
    return jnp.mean(images, axis=(1, 2, 3))

def sharp(images, request):
    return jnp.std(images, axis=(1, 2, 3))
sharp.differentiable = True

NOT_A_REWARD = 3
'''


@pytest.fixture()
def external_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "scores.py").write_text(textwrap.dedent(EXTERNAL))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_pkg.scores"
    for name in [m for m in sys.modules if m.startswith("my_rewards_pkg")]:
        del sys.modules[name]


def test_a_new_reward_name_is_not_a_field_but_extra_rewards_adds_any(external_module,
                                                                     monkeypatch):
    # ml_collections refuses a field the file does not define: hence config.extra_rewards.
    with pytest.raises((KeyError, AttributeError, flags.Error)):
        parse_cli(monkeypatch, "--config.rewards.shapes_rule=1")
    config = parse_cli(monkeypatch, "--config.rewards.contrast=0.25", "--config.extra_rewards="
                       f"stroke_weight=2, {external_module}:brightness=0.5,contrast=3")
    rl.validate(config, num_devices=1)
    weights, fields = rewards.config_weights(config)
    assert weights == {"classifier_logprob": 1.0, "contrast": 3.0, "stroke_weight": 2.0,
                       f"{external_module}:brightness": 0.5}
    assert fields["contrast"] == "config.extra_rewards (contrast)"
    assert fields["classifier_logprob"] == "config.rewards.classifier_logprob"

    ctx = context("digits_sklearn", (8, 8, 1), 10)
    combined = rewards.build_combined(weights, ctx, fields)
    x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1), minval=-1, maxval=1)
    y = jnp.arange(5, dtype=jnp.int32)
    total, parts = combined(x, y)
    np.testing.assert_allclose(parts[f"{external_module}:brightness"], jnp.mean(x, (1, 2, 3)),
                               rtol=1e-6)
    direct = (parts["classifier_logprob"] + 3.0 * rewards.contrast(x, y)
              + 2.0 * rewards.stroke_weight(x, y) + 0.5 * jnp.mean(x, (1, 2, 3)))
    np.testing.assert_allclose(total, direct, rtol=1e-5, atol=1e-6)
    # Plain functions are non-differentiable unless they say otherwise.
    assert not rewards.lookup(f"{external_module}:brightness").differentiable
    assert rewards.lookup(f"{external_module}:sharp").differentiable


@pytest.mark.parametrize("spec, message", [
    ("shapes_rul=1", r"config.extra_rewards \(shapes_rul\) is not a reward; did you mean "
                     r"'shapes_rule'\?"),
    ("contrast", r"config.extra_rewards must be comma-separated name=weight items .* got item "
                 r"'contrast'"),
    ("contrast=high", r"got item 'contrast=high'"),
    ("no_such_module_xyz:f=1", r"config.extra_rewards \(no_such_module_xyz:f\) names module "
                               r"'no_such_module_xyz', which does not import"),
    ("{mod}:missing=1", r"names 'missing', which module '.*' does not define"),
    ("{mod}:NOT_A_REWARD=1", r"names a int, not a reward function or RewardEntry"),
    ("saturation=1", r"config.extra_rewards \(saturation\) is not defined for dataset "
                     r"'digits_sklearn'"),
    ("clip_score=1", r"it needs RGB images and a model folder in config.reward_models."
                     r"clip_score"),
])
def test_bad_extra_rewards_name_the_field(external_module, spec, message):
    config = load_config_file("rl_nft.py")
    config.extra_rewards = spec.format(mod=external_module)
    ctx = context("digits_sklearn", (8, 8, 1), 10)
    with pytest.raises(config_checks.ConfigError, match=message):
        weights, fields = rewards.config_weights(config)
        rewards.check_weights(weights, ctx, fields=fields)


def test_unknown_names_fail_in_validate_before_any_model_is_loaded():
    config = load_config_file("rl_nft.py")
    config.extra_rewards = "stroke_wieght=1"
    with pytest.raises(config_checks.ConfigError,
                       match=r"config.extra_rewards \(stroke_wieght\) is not a reward; did you "
                             r"mean 'stroke_weight'\?"):
        rl.validate(config, num_devices=1)
    evaluate_config = load_config_file("evaluate.py")
    evaluate_config.checkpoint = "somewhere"
    evaluate_config.rewards.contrst = 1.0
    from normguard_jax import evaluate
    with pytest.raises(config_checks.ConfigError, match=r"config.rewards.contrst is not a "):
        evaluate.validate(evaluate_config)


def test_unknown_rewards_in_the_file_block_suggest_the_closest_name():
    ctx = context("digits_sklearn", (8, 8, 1), 10)
    with pytest.raises(config_checks.ConfigError,
                       match=r"config.rewards.constrast is not a reward; did you mean "
                             r"'contrast'\?"):
        rewards.check_weights({"constrast": 1.0}, ctx)


def test_adjoint_matching_refuses_a_non_differentiable_extra_reward(external_module):
    config = load_config_file("rl_am.py")
    rl.validate(config, num_devices=1)
    config.extra_rewards = f"{external_module}:sharp=1"
    rl.validate(config, num_devices=1)
    config.extra_rewards = f"{external_module}:brightness=1"
    with pytest.raises(config_checks.ConfigError,
                       match=rf"config.extra_rewards \({external_module}:brightness\) is not "
                             "differentiable"):
        rl.validate(config, num_devices=1)


def test_runs_recorded_before_the_new_reward_fields_resume():
    config = load_config_file("rl_nft.py")
    recorded = config.to_dict()
    del recorded["extra_rewards"], recorded["reward_models"]
    assert config_checks.changed_fields(recorded, config) == {}
    config.extra_rewards = "stroke_weight=1"
    assert config_checks.changed_fields(recorded, config) == {
        "extra_rewards": ["(absent)", "stroke_weight=1"]}

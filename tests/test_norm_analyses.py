"""experiments/norm_analyses.py: the batch-level adjoint signal on a toy generator, and its table."""

import argparse
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import norm_analyses
from normguard_jax import diagnostics

SHAPE = (4, 4, 2)


class ToyGenerator(NamedTuple):
    """The fields of a loaded generator that the analyses read."""
    velocity: Callable
    params: Any
    image_shape: tuple
    num_classes: int


def tanh_velocity(params, x, sigma, cond):
    return jnp.tanh(params["a"] * x + params["b"] * sigma[:, None, None, None]
                    * (cond[:, None, None, None] + 1.0))


def square_reward(images, labels):
    return -jnp.mean(jnp.square(images - 0.3), axis=(1, 2, 3))


def test_signals_are_the_diagnostics_per_seed():
    base = ToyGenerator(tanh_velocity, {"a": jnp.float32(1.1), "b": jnp.float32(0.5)}, SHAPE, 3)
    policy = base._replace(params={"a": jnp.float32(1.2), "b": jnp.float32(0.5)})
    labels = np.array([0, 1, 2, 0], np.int32)
    seeds, steps, shift, w = [3, 4, 5], 4, 3.0, 1.5
    kw = dict(reward_fn=square_reward, image_shape=SHAPE, num_steps=steps, shift=shift,
              guidance_scale=w, null_class=3)
    per_step, batch_level, g = norm_analyses.base_signal(base, labels, seeds, square_reward,
                                                          steps, shift, w)
    first = diagnostics.adjoint_sensitivity(tanh_velocity, base.params, jnp.asarray(labels),
                                            jax.random.key(3), **kw)
    assert per_step == diagnostics.sensitivity_summary(first)
    assert g.shape == (3, steps, 4)
    np.testing.assert_allclose(batch_level["global_derivative"]["batch_means"],
                               g.sum(axis=1).mean(axis=1), rtol=1e-6)

    per_step, p = norm_analyses.policy_signal(policy, base, labels, seeds, square_reward,
                                              steps, shift, w)
    outs = [diagnostics.renormalisation_first_order(
        tanh_velocity, policy.params, base.params, jnp.asarray(labels), jax.random.key(s), **kw)
        for s in seeds]
    np.testing.assert_allclose(per_step["t_stat"],
                               diagnostics.sensitivity_summary(outs[0]["g"])["t_stat"], rtol=1e-5)
    for name in ("global_derivative", "predicted", "measured", "renormalised"):
        np.testing.assert_allclose(p[name]["batch_means"],
                                   [float(jnp.mean(o[name])) for o in outs], rtol=1e-5)
        assert np.shape(p["per_sample"][name]) == (3, 4)
    assert p["eps_mean"] < 0  # θ's slope is larger: renormalisation shrinks its velocity
    assert p["agreement"]["slope"] > 0.5 and p["agreement"]["sign_agreement"] >= 0.75


def _summary(means, per_batch=2):
    return diagnostics.batch_level_summary(np.repeat(np.asarray(means)[:, None], per_batch, 1))


def test_batch_level_section_of_the_table(tmp_path):
    evaluation = {"plain": {"combined_reward": 0.5, "quality": {"fd": 1.0, "recall": 0.5}}}
    zero = _summary([0.0, 0.0, 0.0])
    policy = {"global_derivative": _summary([1.0, 2.0, 3.0]), "predicted": _summary([-0.01] * 3),
              "measured": _summary([-0.02, -0.02, -0.02]), "renormalised": zero,
              "agreement": diagnostics.first_order_agreement([-0.01, -0.01], [-0.02, -0.02]),
              "reward_mean": 0.5, "reward_std": 0.1, "eps_mean": -0.04,
              "per_sample": {k: [[0.0, 0.0]] * 3 for k in ("global_derivative", "predicted",
                                                           "measured", "renormalised")}}
    record = {"u": {"method": "awm", "normguard_weight": 0.0, "ratio_per_step": [1.1, 1.0],
                    "ratio_over_training": {"1": 1.05}, "evaluation": evaluation,
                    "sensitivity": {},
                    "batch_level": {"contrast": {"base": {"global_derivative": _summary(
                        [-1.0, 1.0, -2.0])}, "policy": policy}}}}
    args = argparse.Namespace(out=str(tmp_path / "na"), per_class=2, seed=7, num_steps=2,
                              renormalise_all=False)
    norm_analyses.write(args, record)
    text = (tmp_path / "na.md").read_text()
    assert "## Batch-level adjoint signal" in text and "seeds 7…9" in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| `u` | contrast")]
    base, pol, renorm = rows
    assert base[2:] == ["base", "-1 +1 -2", "-0.667 ± 0.88", "-0.8", "0.67", "0.67"]
    assert pol[2:] == ["policy", "+1 +2 +3", "+2 ± 0.58", "+3.5", "1.00", "1.00"]
    assert renorm[2:] == ["-0.0400", "0.500 (0.100)", "-0.01 ± 0", "-0.02 ± 0", "+0 ± 0",
                          "2.00", "0.00", "1.00"]
    assert (tmp_path / "na_batch_level.png").exists()

"""Partial and late-steps-only renormalisation of the sampler's velocity to ‖v_ref‖.

Toy velocities are linear, ``v = a_b·x`` per sample b, so the norm ratio to a reference
``v_ref = c·x`` is ``c / a_b`` on every state and a renormalised Euler step has a closed form.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from normguard_jax import config_checks, diagnostics, evaluate, flow, generators, sampling

SHAPE = (3, 4, 4, 1)
A = jnp.array([2.0, 0.5, 1.5])   # per-sample scale of the policy's toy velocity
REF = 1.0                        # the reference's scale


def policy(x, sigma):
    del sigma
    return A.reshape(-1, 1, 1, 1) * x


def reference(x, sigma):
    del sigma
    return REF * x + 0.0 * jnp.sin(x)   # same norm as REF·x, not the same function object


def _x0():
    return jax.random.normal(jax.random.key(0), SHAPE)


def _sample(method="ode", **kw):
    return sampling.sample(policy, _x0(), flow.inference_sigmas(6, shift=3.0),
                           jax.random.key(1), method=method, ref_velocity_fn=reference,
                           return_velocities=True, **kw)


def _norms(v):
    return np.linalg.norm(np.asarray(v).reshape(v.shape[0], -1), axis=1)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_phi_zero_is_the_plain_sampler_exactly(method):
    plain = _sample(method)
    zero = _sample(method, renormalize=True, renormalize_phi=0.0)
    np.testing.assert_array_equal(zero.states, plain.states)
    np.testing.assert_array_equal(zero.log_probs, plain.log_probs)


def test_phi_one_is_the_full_renormalisation_exactly():
    """φ = 1 on every step computes what the sampler computed before φ existed: Euler with
    ``v·‖v_ref‖/max(‖v‖, eps)`` (written out here as a scan of its own)."""
    sigmas = jnp.asarray(flow.inference_sigmas(6, shift=3.0))

    def body(x, s):
        sigma, sigma_next = s
        sb = jnp.full((x.shape[0],), sigma)
        v, v_ref = policy(x, sb), reference(x, sb)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2, 3), keepdims=True))
        ref_norm = jnp.sqrt(jnp.sum(jnp.square(v_ref), axis=(1, 2, 3), keepdims=True))
        x_next = x + (sigma_next - sigma) * (v * (ref_norm / jnp.maximum(norm, 1e-12)))
        return x_next, x_next

    _, expected = jax.jit(lambda x: jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:])))(_x0())
    full = jax.jit(lambda: _sample(renormalize=True).states)()
    explicit = jax.jit(lambda: _sample(renormalize=True, renormalize_phi=1.0,
                                       renormalize_sigma_max=1.0).states)()
    np.testing.assert_array_equal(explicit, full)
    np.testing.assert_allclose(full[1:], expected, rtol=1e-6, atol=1e-6)
    # Every applied velocity has the reference's norm.
    traj = _sample(renormalize=True)
    for k in range(6):
        np.testing.assert_allclose(_norms(traj.velocities[k]),
                                   REF * _norms(traj.states[k]), rtol=1e-5)


@pytest.mark.parametrize("phi", [0.5, 0.7])
def test_partial_strength_closed_form_one_step(phi):
    """v = a·x, v_ref = x: the applied velocity is ((1-φ)·a + φ)·x, so one Euler step from
    σ = 1 to 0.6 gives x·(1 - 0.4·((1-φ)·a + φ)) per sample."""
    x = _x0()
    traj = sampling.sample(policy, x, jnp.array([1.0, 0.6]), jax.random.key(1),
                           ref_velocity_fn=reference, renormalize=True, renormalize_phi=phi)
    coef = (1.0 - phi) * A + phi * REF
    expected = x * (1.0 - 0.4 * coef).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(traj.states[1], expected, rtol=1e-5, atol=1e-6)
    # The norm moved linearly from ‖v‖ towards ‖v_ref‖.
    v = sampling.renormalize_velocity(policy(x, None), reference(x, None), phi)
    np.testing.assert_allclose(_norms(v), (1 - phi) * _norms(policy(x, None))
                               + phi * _norms(reference(x, None)), rtol=1e-5)


def test_late_steps_only_leaves_the_early_steps_alone():
    sigmas = np.asarray(flow.inference_sigmas(6, shift=3.0))
    threshold = 0.5
    late = sigmas[:-1] <= threshold
    first = int(np.argmax(late))
    assert 0 < first < 5, sigmas          # the test needs early and late steps
    plain = _sample()
    traj = _sample(renormalize=True, renormalize_sigma_max=threshold)
    # States up to and including the first late step's input are the plain sampler's.
    np.testing.assert_array_equal(traj.states[:first + 1], plain.states[:first + 1])
    np.testing.assert_array_equal(traj.velocities[:first], plain.velocities[:first])
    for k in range(first + 1, 7):
        assert not np.allclose(traj.states[k], plain.states[k])
    for k in range(first, 6):
        np.testing.assert_allclose(_norms(traj.velocities[k]),
                                   REF * _norms(traj.states[k]), rtol=1e-5)
    # Late steps only at φ = 1 equals renormalising every step when the threshold covers all.
    np.testing.assert_array_equal(
        _sample(renormalize=True, renormalize_sigma_max=1.0).states,
        _sample(renormalize=True).states)


def test_options_trace_under_jit_without_recompiling():
    sigmas = flow.inference_sigmas(6, shift=3.0)
    traces = []

    @jax.jit
    def run(phi, sigma_max):
        traces.append(1)
        return sampling.sample(policy, _x0(), sigmas, jax.random.key(1),
                               ref_velocity_fn=reference, renormalize=True,
                               renormalize_phi=phi, renormalize_sigma_max=sigma_max).states

    for phi, sigma_max in ((0.5, 0.5), (0.7, 1.0), (1.0, 0.3)):
        np.testing.assert_allclose(
            run(jnp.float32(phi), jnp.float32(sigma_max)),
            _sample(renormalize=True, renormalize_phi=phi,
                    renormalize_sigma_max=sigma_max).states, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1
    # Traced φ = 0 is the plain sampler up to rounding.
    np.testing.assert_allclose(run(jnp.float32(0.0), jnp.float32(1.0)), _sample().states,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw, match", [
    ({"renormalize_phi": 1.5}, "renormalize_phi must be in"),
    ({"renormalize_phi": -0.1}, "renormalize_phi must be in"),
    ({"renormalize_sigma_max": -0.1}, "renormalize_sigma_max must be"),
])
def test_sampler_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        _sample(renormalize=True, **kw)


def _toy_velocity(params, x, sigma, cond):
    del sigma, cond
    return params["a"] * x


def test_generate_images_and_applied_ratio():
    """generate_images passes the options on; the applied ρ of diagnostics is 1 at the
    renormalised steps and a (the plain ρ) elsewhere, interpolated at φ < 1."""
    labels = jnp.array([0, 1], jnp.int32)
    kw = dict(image_shape=(4, 4, 1), num_steps=6, shift=3.0, guidance_scale=1.0, null_class=2)
    theta, ref = {"a": jnp.float32(1.5)}, {"a": jnp.float32(1.0)}
    key = jax.random.key(3)
    images = sampling.generate_images(_toy_velocity, theta, labels, key, renormalize_to=ref,
                                      renormalize_phi=0.5, renormalize_sigma_max=0.5, **kw)
    x = sampling.initial_noise(jax.random.fold_in(key, 0), 2, (4, 4, 1))
    direct = sampling.sample(
        functools.partial(_toy_velocity, theta, cond=None),
        x, jnp.asarray(flow.inference_sigmas(6, 3.0)), jax.random.fold_in(key, 1),
        ref_velocity_fn=functools.partial(_toy_velocity, ref, cond=None), renormalize=True,
        renormalize_phi=0.5, renormalize_sigma_max=0.5)
    np.testing.assert_allclose(images, direct.states[-1], rtol=1e-6, atol=1e-6)
    plain = sampling.generate_images(_toy_velocity, theta, labels, key, **kw)
    np.testing.assert_array_equal(
        sampling.generate_images(_toy_velocity, theta, labels, key, renormalize_to=ref,
                                 renormalize_phi=0.0, **kw), plain)

    sigmas = np.asarray(flow.inference_sigmas(6, 3.0))[:-1]
    rho = diagnostics.velocity_norm_ratios(_toy_velocity, theta, ref, labels, key, **kw)
    np.testing.assert_allclose(rho, 1.5, rtol=1e-5)
    applied = diagnostics.velocity_norm_ratios(_toy_velocity, theta, ref, labels, key,
                                               renormalize_phi=0.5,
                                               renormalize_sigma_max=0.5, **kw)
    expected = np.where(sigmas <= 0.5, 0.5 * 1.5 + 0.5, 1.5)[:, None]
    np.testing.assert_allclose(applied, np.broadcast_to(expected, applied.shape), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The evaluate config.
# ----------------------------------------------------------------------------------------------


def _eval_config(**sample):
    c = evaluate_config.get_config()
    c.checkpoint = "workdir/some_run"
    c.sample.update(sample)
    return c


def test_evaluate_defaults_are_full_renormalisation_at_every_step():
    c = evaluate_config.get_config()
    assert (c.sample.renormalize, c.sample.renormalize_phi,
            c.sample.renormalize_sigma_max) == (False, 1.0, 1.0)
    evaluate.validate(_eval_config())
    evaluate.validate(_eval_config(renormalize=True, renormalize_phi=0.5,
                                   renormalize_sigma_max=0.6))
    assert evaluate.renormalize_options(c.sample) == {"renormalize_phi": 1.0,
                                                      "renormalize_sigma_max": 1.0}


@pytest.mark.parametrize("sample, match", [
    ({"renormalize": True, "renormalize_phi": 1.5}, r"config\.sample\.renormalize_phi must be"),
    ({"renormalize": True, "renormalize_phi": float("nan")}, r"renormalize_phi must be a finite"),
    ({"renormalize": True, "renormalize_sigma_max": -0.2},
     r"config\.sample\.renormalize_sigma_max must be"),
    ({"renormalize": True, "renormalize_sigma_max": 2.0},
     r"config\.sample\.renormalize_sigma_max must be"),
    ({"renormalize_phi": 0.5}, r"config\.sample\.renormalize_phi=0\.5 needs "
                               r"config\.sample\.renormalize=True"),
    ({"renormalize_sigma_max": 0.5}, r"renormalize_sigma_max=0\.5 needs"),
])
def test_evaluate_rejects_bad_renormalisation_fields(sample, match):
    c = evaluate_config.get_config()
    c.checkpoint = "workdir/some_run"
    with c.unlocked():
        for k, v in sample.items():
            c.sample[k] = v
    with pytest.raises(config_checks.ConfigError, match=match):
        evaluate.validate(c)


def test_an_evaluation_recorded_before_the_fields_matches_the_defaults():
    new = evaluate_config.get_config()
    old = new.to_dict()
    del old["sample"]["renormalize_phi"], old["sample"]["renormalize_sigma_max"]
    assert config_checks.changed_fields(old, new) == {}
    new.sample.renormalize_phi = 0.5
    assert config_checks.changed_fields(old, new) == {
        "sample.renormalize_phi": ["(absent)", 0.5]}


def test_evaluate_samples_and_reports_the_applied_ratio_with_the_fields():
    """The evaluate job's sampling and ρ summary on toy generators (v = a·x): the fields reach
    the sampler, and ``norm_ratio.applied`` is the ratio the renormalised sampler used."""
    theta = generators.Pretrained(_toy_velocity, {"a": jnp.float32(1.5)},
                                  ml_collections.ConfigDict(), (4, 4, 1), 2, 0)
    ref = theta._replace(params={"a": jnp.float32(1.0)})
    c = _eval_config(renormalize=True, renormalize_phi=0.5, renormalize_sigma_max=0.5,
                     num_steps=6, batch_size=4, per_class=2, guidance_scale=1.0)
    labels = np.array([0, 0, 1, 1], np.int32)
    images = evaluate.generate_set(theta, labels, c.sample, 0, renormalize_to=ref.params)
    expected = sampling.generate_images(
        _toy_velocity, theta.params, jnp.asarray(labels),
        jax.random.fold_in(jax.random.key(0), 0), image_shape=(4, 4, 1), num_steps=6, shift=3.0,
        guidance_scale=1.0, null_class=2, renormalize_to=ref.params, renormalize_phi=0.5,
        renormalize_sigma_max=0.5)
    np.testing.assert_array_equal(images, expected)
    summary = evaluate.norm_ratio_summary(theta, ref, labels, c.sample, 0)
    np.testing.assert_allclose(summary["mean"], 1.5, rtol=1e-5)
    sigmas = np.asarray(flow.inference_sigmas(6, 3.0))[:-1]
    np.testing.assert_allclose(summary["applied"]["per_step"],
                               np.where(sigmas <= 0.5, 1.25, 1.5), rtol=1e-5)
    plain = _eval_config(num_steps=6, batch_size=4, per_class=2, guidance_scale=1.0)
    assert "applied" not in evaluate.norm_ratio_summary(theta, ref, labels, plain.sample, 0)

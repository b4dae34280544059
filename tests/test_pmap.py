"""Every registered objective, wrapped by NormGuard, gives the same loss and gradients under
``jax.pmap`` over 8 devices (per-device loss and gradients ``pmean``-ed over the axis) as under
``jax.jit`` with the batch sharded over a ``Mesh``.

Objectives are per-example terms followed by a batch mean, and the batch splits into equal
per-device shards, so the mean of per-device means is the global mean. The tiny inputs and the
linear toy generator come from ``test_objectives``.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from normguard_jax import normguard
from normguard_jax.objectives import METHODS

from test_objectives import CASES, P_THETA, build, ctx_for, jx

NUM_DEVICES = 8
PER_DEVICE = 2


def test_every_registered_objective_has_a_case():
    assert set(METHODS) <= set(CASES)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("guard", [
    normguard.NormGuardConfig(weight=0.3, power=2),
    normguard.NormGuardConfig(weight=0.5, form="absolute", margin=0.01),
], ids=["relative_squared", "absolute_hinge"])
def test_pmap_matches_sharded_jit(method, guard):
    assert jax.device_count() == NUM_DEVICES
    objective, batch = build(method, NUM_DEVICES * PER_DEVICE)
    wrapped = normguard.with_normguard(objective, guard)
    ctx = ctx_for()
    params = jx(P_THETA)

    def loss_and_aux(p, bt):
        loss, aux = wrapped(p, bt, ctx)
        return loss, aux.metrics

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    (l_jit, m_jit), g_jit = jax.jit(grad_fn)(params, sharded)

    def per_device(p, bt):
        (loss, metrics), grads = grad_fn(p, bt)
        return jax.lax.pmean((loss, metrics, grads), "devices")

    stacked = jax.tree.map(lambda a: a.reshape((NUM_DEVICES, PER_DEVICE) + a.shape[1:]), batch)
    l_pm, m_pm, g_pm = jax.pmap(per_device, axis_name="devices", in_axes=(None, 0))(
        params, stacked)

    assert np.isfinite(float(l_jit))
    np.testing.assert_allclose(np.asarray(l_pm), float(l_jit), rtol=1e-5, atol=1e-7)
    assert float(m_jit["normguard/penalty"]) > 0      # the hinge is active: the guard is tested
    for name in ("normguard/ratio", "normguard/active_frac", "normguard/penalty"):
        # per-sample means over equal shards: their mean is the global mean
        np.testing.assert_allclose(np.asarray(m_pm[name]), float(m_jit[name]), rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    for name in ("a", "b", "c"):
        pm = np.asarray(g_pm[name])
        np.testing.assert_array_equal(pm, np.broadcast_to(pm[0], pm.shape))  # replicas agree
        np.testing.assert_allclose(pm[0], np.asarray(g_jit[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"gradient w.r.t. {name}")
        assert np.any(np.asarray(g_jit[name]) != 0), name

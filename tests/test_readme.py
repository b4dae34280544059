"""The README's objective example runs, and NormGuard wraps it as documented."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import normguard
from normguard_jax.objectives.base import Context

from conftest import REPO


def _readme_example():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace["reward_weighted_matching"]


def test_readme_objective_example_runs_and_wraps():
    objective = _readme_example()
    velocity = lambda p, x, s, c: p["a"] * x + p["b"] * s[:, None, None, None]
    params, ref = {"a": 1.5, "b": 0.1}, {"a": 1.0, "b": 0.1}
    k = jax.random.split(jax.random.key(0), 3)
    batch = {"x0": jax.random.uniform(k[0], (4, 4, 4, 1), minval=-1, maxval=1),
             "noise": jax.random.normal(k[1], (4, 4, 4, 1)),
             "sigma": jax.random.uniform(k[2], (4,)), "cond": jnp.zeros(4, jnp.int32),
             "advantage": jnp.array([1.0, -1.0, 0.5, 0.0])}
    ctx = Context(velocity=velocity, ref_params=ref)
    base_loss, _ = objective(params, batch, ctx)
    guarded = normguard.with_normguard(objective, normguard.NormGuardConfig(weight=0.1))
    loss, aux = jax.jit(guarded)(params, batch, ctx)
    assert float(aux.metrics["normguard/ratio"]) > 1.0           # |1.5x| > |1.0x| on the same points
    np.testing.assert_allclose(loss, base_loss + 0.1 * aux.metrics["normguard/penalty"], rtol=1e-6)

"""Training objectives, one module per RL method, and ``METHODS``: the registry of method names.

Every objective follows :mod:`normguard_jax.objectives.base`: ``objective(params, batch, ctx) ->
(loss, Aux)``, per-example terms followed by a batch mean. Each method module exports one
:class:`~normguard_jax.objectives.base.Method` record, ``METHOD``: its frozen config class
(validated on construction, errors name ``config.objective.<field>``), its objective factory,
the builder of its training batch from a rollout, its rows per iteration, whether it needs the
sampling trajectory and its own config checks:

    method = METHODS["nft"]
    objective = method.make_objective(method.config_cls(beta=0.1))

This dict is the only list of method names in the repository: the RL loop, the configs, the
experiments and the tests derive theirs from it. Adding a method is one module exporting
``METHOD`` plus one entry here, a ``configs/rl_<name>.py`` and a case in the tests'
``METHOD_CASES`` (``tests/test_methods.py`` checks that all four exist).
"""

from normguard_jax.objectives import am, awm, dpo, grpo, nft, ram
from normguard_jax.objectives.base import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (grpo, nft, awm, dpo, ram, am)}

__all__ = ["METHODS", "Method", "am", "awm", "dpo", "grpo", "nft", "ram"]

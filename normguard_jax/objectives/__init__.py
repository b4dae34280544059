"""Training objectives, one module per method, and the registry that maps config names to them.

Every objective follows :mod:`normguard_jax.objectives.base`: ``objective(params, batch, ctx) ->
(loss, Aux)``, per-example terms followed by a batch mean. RL objectives are built from a frozen
config dataclass (validated on construction, errors name ``config.objective.<field>``):

    config_cls, make = OBJECTIVES["nft"]
    objective = make(config_cls(beta=0.1))

Adding a method is one module with a ``<Name>Config`` and ``make_objective(config)``, plus one
line here. The batch layout each objective reads is documented on its ``make_objective``.
"""

from normguard_jax.objectives import awm, dpo, grpo, nft, ram

OBJECTIVES = {
    "grpo": (grpo.GRPOConfig, grpo.make_objective),
    "nft": (nft.NFTConfig, nft.make_objective),
    "awm": (awm.AWMConfig, awm.make_objective),
    "dpo": (dpo.DPOConfig, dpo.make_objective),
    "ram": (ram.RAMConfig, ram.make_objective),
}

__all__ = ["OBJECTIVES", "awm", "dpo", "grpo", "nft", "ram"]

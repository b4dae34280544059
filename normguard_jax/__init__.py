"""normguard_jax: RL post-training of flow-matching image generators, built around NormGuard."""

__version__ = "0.1.0"

"""Conditional flow-matching regression: the pretraining loss (and a supervised fine-tuning loss).

With ``x_σ = (1-σ)·x0 + σ·ε`` the target velocity is ``ε - x0``. The per-sample loss is the mean
over pixels of ``(v_θ(x_σ, σ, c) - (ε - x0))²``; the objective returns its batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from normguard_jax import sampling
from normguard_jax.objectives.base import Aux, Context, VelocityPoints


def per_sample_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over non-batch axes of ``(a - b)²``: (B, ...) x (B, ...) -> (B,) float32."""
    d = (a - b).astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def flow_matching_loss(params, batch: dict, ctx: Context):
    """Flow-matching regression.

    Args:
      params: generator parameters.
      batch: ``x0`` (B, H, W, C) data in [-1, 1]; ``noise`` (B, H, W, C) standard normal;
        ``sigma`` (B,) in [0, 1]; ``cond`` (B,) int32 labels (may already contain the null class
        from label dropout).
      ctx: provides ``ctx.velocity``.

    Returns:
      ``(loss, aux)``: the batch mean of the per-sample pixel-mean squared error, and
      ``aux.points`` at ``(x_σ, σ, cond)`` (``v_ref`` is not computed here).
    """
    x0, noise, sigma, cond = batch["x0"], batch["noise"], batch["sigma"], batch["cond"]
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    x = (1.0 - s) * x0 + s * noise
    v = ctx.velocity(params, x, sigma, cond)
    loss = jnp.mean(per_sample_mse(v, noise - x0))
    return loss, Aux(metrics={"loss/flow_matching": loss},
                     points=VelocityPoints(v_theta=v, x=x, sigma=sigma, cond=cond))


def make_flow_matching_batch(key, images, labels, *, sigma_sampler, null_class: int,
                             label_dropout: float):
    """Draws the noise, σ and label dropout of one flow-matching batch.

    Args:
      key: typed PRNG key.
      images: (B, H, W, C) float32 in [-1, 1].
      labels: (B,) int32 class labels, or a conditioning pytree (leading axis B).
      sigma_sampler: ``(key, batch_size) -> (B,)`` σ sampler (see ``flow.TIMESTEP_SAMPLERS``).
      null_class: the unconditional conditioning of classifier-free guidance: the null label,
        or for a pytree the empty-prompt conditioning (``sampling.null_condition``).
      label_dropout: probability of replacing a sample's conditioning by the unconditional one.

    Returns:
      The batch dict consumed by :func:`flow_matching_loss`.
    """
    k_noise, k_sigma, k_drop = jax.random.split(key, 3)
    b = images.shape[0]
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    sigma = sigma_sampler(k_sigma, b)
    drop = jax.random.bernoulli(k_drop, label_dropout, (b,))
    labels = jax.tree.map(  # class labels as int32 (the data may store narrower integers)
        lambda c: c.astype(jnp.int32) if jnp.issubdtype(c.dtype, jnp.integer) else c, labels)
    null = sampling.null_condition(labels, null_class)
    cond = jax.tree.map(
        lambda c, n: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), n, c), labels, null)
    return {"x0": images, "noise": noise, "sigma": sigma, "cond": cond}

"""Host-side rewards: any Python callable on NumPy arrays, called from jitted programs.

A host reward is ``fn(images, request) -> (B,)`` on the host, e.g. an OCR model, a scorer in
another framework or a client of a reward server:

    images   (B, H, W, C) NumPy, float32 in [-1, 1] (clipped, as every reward sees them) or,
             with ``images="uint8"``, uint8 in 0..255 (``round((x + 1) * 127.5)``);
    request  dict of (B,) int32 NumPy arrays (``rewards.request_dict``: the prompt fields of a
             text run, or ``label`` and ``index`` = the class labels of a class-conditional run);
    returns  (B,) real numbers (any float or int dtype; cast to float32).

``host_reward(fn, timeout=...)`` wraps it as a ``rewards.RewardEntry``; name that object as
``module:function`` in ``config.rewards``/``config.extra_rewards`` to use it. Inside the jitted
rollout it runs through ``jax.pure_callback``, so the rollout stays one compiled program (the
sampler's output goes to the host once, the (B,) scores come back). Under a mesh the
callback sees the whole batch. It is not differentiable: its inputs are wrapped in
``stop_gradient``, so its gradient is zero (Adjoint Matching refuses it).

Failures stop the program with :class:`HostRewardError` naming the reward: the call takes
longer than ``timeout`` seconds (the call runs in a daemon thread, which is abandoned, not
killed, so a hung server does not block the run's exit), raises, or returns the wrong shape, a
non-numeric dtype or a non-finite value. Inside ``jax.jit`` the error reaches the caller as
a ``jax.errors.JaxRuntimeError`` whose message contains this one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import rewards

HostFn = Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray]
IMAGE_FORMATS = ("float32", "uint8")


class HostRewardError(RuntimeError):
    """A host reward that timed out, raised, or returned a bad result."""


def host_images(images: np.ndarray, image_format: str) -> np.ndarray:
    """(B, H, W, C) float [-1, 1] -> the host reward's view: clipped float32, or uint8
    ``round((clip(x) + 1) * 127.5)``."""
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    if image_format == "uint8":
        return np.round((x + 1.0) * 127.5).astype(np.uint8)
    return x


def call_with_timeout(name: str, fn: Callable[[], np.ndarray], timeout: float) -> np.ndarray:
    """``fn()`` in a daemon thread; its result, or HostRewardError naming ``name`` if it takes
    longer than ``timeout`` seconds or raises (the original exception is chained)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"host reward {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HostRewardError(f"host reward {name!r} did not return within its timeout of "
                              f"{timeout:g} s")
    if "error" in box:
        e = box["error"]
        raise HostRewardError(f"host reward {name!r} raised {type(e).__name__}: {e}") from e
    return box["value"]


def check_scores(name: str, scores, batch: int) -> np.ndarray:
    """The host reward's result as (B,) float32, or HostRewardError naming ``name`` for another
    shape, a non-numeric dtype (bool, complex, object, str) or a non-finite value."""
    scores = np.asarray(scores)
    if scores.shape != (batch,):
        raise HostRewardError(f"host reward {name!r} returned shape {scores.shape}; it must "
                              f"return ({batch},), one score per image")
    if scores.dtype == np.bool_ or not (np.issubdtype(scores.dtype, np.floating)
                                        or np.issubdtype(scores.dtype, np.integer)):
        raise HostRewardError(f"host reward {name!r} returned dtype {scores.dtype}; it must "
                              "return real numbers (a float or int array)")
    scores = scores.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise HostRewardError(f"host reward {name!r} returned non-finite values at rows "
                              f"{bad[:8].tolist()}: {scores[bad[:8]].tolist()}")
    return scores


@dataclasses.dataclass(frozen=True)
class HostReward:
    """``fn`` made jit-callable: ``reward(images, request) -> (B,)`` float32.

    Attributes:
      fn: the host callable (see the module docstring).
      name: for error messages.
      timeout: seconds one call may take.
      images: "float32" ([-1, 1]) or "uint8" (0..255), what ``fn`` receives.
    """

    fn: HostFn
    name: str
    timeout: float = 60.0
    images: str = "float32"

    def __post_init__(self):
        if self.images not in IMAGE_FORMATS:
            raise ValueError(f"host reward {self.name!r}: images must be one of "
                             f"{IMAGE_FORMATS}, got {self.images!r}")
        if not self.timeout > 0:
            raise ValueError(f"host reward {self.name!r}: timeout must be > 0 seconds, got "
                             f"{self.timeout!r}")

    def on_host(self, images, request: Mapping[str, np.ndarray]) -> np.ndarray:
        """The checked (B,) float32 scores of one NumPy batch."""
        x = host_images(images, self.images)
        req = {k: np.asarray(v) for k, v in request.items()}
        scores = call_with_timeout(self.name, lambda: self.fn(x, req), self.timeout)
        return check_scores(self.name, scores, x.shape[0])

    def __call__(self, images: jax.Array, request: rewards.Request) -> jax.Array:
        images = jax.lax.stop_gradient(images)
        req = jax.lax.stop_gradient(rewards.request_dict(request))
        out = jax.ShapeDtypeStruct(images.shape[:1], jnp.float32)
        return jax.pure_callback(self.on_host, out, images, req, vmap_method="sequential")


def host_reward(fn: HostFn, *, name: str | None = None, timeout: float = 60.0,
                images: str = "float32", description: str = "") -> rewards.RewardEntry:
    """A ``rewards.RewardEntry`` calling the host function ``fn`` (not differentiable;
    defined for every dataset). Name the result as ``module:attribute`` in a reward config.

    Args:
      fn: ``fn(images, request) -> (B,)`` on NumPy arrays (module docstring).
      name: for error messages (default ``module:qualname`` of ``fn``).
      timeout: seconds one call may take before the run stops with HostRewardError.
      images: "float32" ([-1, 1], clipped) or "uint8" (0..255) images for ``fn``.
      description: one line for tables and messages.
    """
    name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    reward = HostReward(fn=fn, name=name, timeout=float(timeout), images=images)
    built = rewards.Built(rewards._without_params(reward))  # pylint: disable=protected-access
    return rewards.RewardEntry(build=lambda ctx: built, differentiable=False,
                               applies=lambda ctx: True,
                               description=description or f"host reward {name}")

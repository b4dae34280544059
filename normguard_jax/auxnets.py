"""Offline training and Orbax caching of the reward classifier and the metric networks.

    nets = AuxNetCache("digits_mnist", aux_dir="workdir/aux_nets", data_dir=None)
    classifier = nets("classifier")        # trains (about a minute on 2 CPU cores) or loads
    logits = classifier.apply(classifier.params, images)

Three nets (architectures and the reasons they are independent: ``models/small_nets.py``):

============  =====================  ===================================  =====================
name          module                 objective (train split only)         ``apply`` returns
============  =====================  ===================================  =====================
classifier    ``Classifier``         cross-entropy on labels; random      logits (B, K)
                                     shifts and light noise
encoder       ``Autoencoder``        reconstruction MSE, no labels        features (B, D)
detector      ``PatchDetector``      real vs ``degradations`` artefacts   logit (B,), > 0: real
============  =====================  ===================================  =====================

Cache layout: ``<aux_dir>/<dataset>/<net>/params`` (Orbax ``StandardCheckpointer``) and
``<aux_dir>/<dataset>/<net>/meta.json`` (training spec, held-out scores, training time), with
``/`` in dataset names replaced by ``__``. ``meta.json`` is written last, so its presence marks
a complete entry. A cached entry is reused only if its stored spec equals the requested one;
otherwise loading fails with a message rather than silently mixing nets (metrics computed
with different nets are not comparable). Concurrent processes are serialised by a file lock.

Everything is deterministic given the spec's seed: batches come from
``data.global_batch_indices`` and augmentation keys from ``fold_in(key(seed), step)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from normguard_jax import file_lock, paths
from normguard_jax import checkpointing, data, degradations, models
from normguard_jax.models import small_nets


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How one auxiliary net is built and trained.

    Attributes:
      steps: optimizer steps.
      batch_size: examples per step.
      learning_rate: peak Adam learning rate (warm-up then cosine decay to 5 %).
      seed: initialisation, batch order and augmentation seed.
      arch: keyword arguments of the module (widths, feature size, ...), as sorted pairs.
    """

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    arch: tuple[tuple[str, Any], ...]

    def to_json(self) -> dict:
        return {"steps": self.steps, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "seed": self.seed,
                "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch}}


def _spec(steps, batch_size, learning_rate, seed, **arch) -> TrainSpec:
    return TrainSpec(steps, batch_size, learning_rate, seed, tuple(sorted(arch.items())))


# Presets: "default" for experiments (each net trains in about a minute on 2 CPU cores);
# "tiny" for tests (seconds).
PRESETS: dict[str, dict[str, TrainSpec]] = {
    "default": {
        "classifier": _spec(600, 128, 3e-3, 101, widths=(16, 32, 64), hidden=64),
        "encoder": _spec(1000, 128, 3e-3, 202, widths=(16, 32), feature_dim=32),
        "detector": _spec(600, 128, 2e-3, 303, widths=(16, 32)),
    },
    "tiny": {
        "classifier": _spec(150, 32, 3e-3, 101, widths=(8, 16, 16), hidden=16),
        "encoder": _spec(150, 32, 3e-3, 202, widths=(8, 16), feature_dim=8),
        "detector": _spec(150, 32, 3e-3, 303, widths=(8, 8)),
    },
}

# Artefact families the detector learns to reject (strengths from degradations.STRENGTH_RANGES).
DETECTOR_FAKES = ("noise", "blur", "contrast", "background_noise", "ghosting")


class AuxNet(NamedTuple):
    """A trained auxiliary net used as a pure function.

    Attributes:
      name: "classifier", "encoder" or "detector".
      apply: ``apply(params, images) -> output`` (see the module table); images (B, H, W, C)
        float32 in [-1, 1].
      params: ``nnx.State`` of the net's parameters.
      meta: the cache's JSON record (spec, held-out scores, training time).
    """

    name: str
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    meta: dict


# ----------------------------------------------------------------------------------------------
# Objectives. Each is loss(params, apply, x, labels, key) -> scalar, x float32 in [-1, 1].
# ----------------------------------------------------------------------------------------------


def _random_shift(x: jax.Array, key: jax.Array) -> jax.Array:
    """Rolls each image by up to max(1, H//16) pixels in each direction."""
    limit = max(1, x.shape[1] // 16)
    shifts = jax.random.randint(key, (x.shape[0], 2), -limit, limit + 1)
    return jax.vmap(lambda img, s: jnp.roll(img, (s[0], s[1]), axis=(0, 1)))(x, shifts)


def _classifier_loss(params, apply, x, labels, key):
    k_shift, k_std, k_noise = jax.random.split(key, 3)
    x = _random_shift(x, k_shift)
    std = 0.1 * jax.random.uniform(k_std, (x.shape[0], 1, 1, 1))
    x = jnp.clip(x + std * jax.random.normal(k_noise, x.shape), -1.0, 1.0)
    logits = apply(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _encoder_loss(params, apply, x, labels, key):
    del labels, key
    return jnp.mean((apply(params, x) - x) ** 2)


def make_fakes(x: jax.Array, key: jax.Array, families=DETECTOR_FAKES) -> jax.Array:
    """One artefact per image: a random family of ``families`` at a random strength.

    Strengths are log-uniform in ``degradations.STRENGTH_RANGES[family]``. Output clipped to
    [-1, 1] (the detector judges displayable images). (B, H, W, C) float32.
    """
    k_family, k_strength, k_apply = jax.random.split(key, 3)
    b = x.shape[0]
    choice = jax.random.randint(k_family, (b,), 0, len(families))
    u = jax.random.uniform(k_strength, (b,))
    out = jnp.zeros_like(x)
    for i, name in enumerate(families):
        lo, hi = degradations.STRENGTH_RANGES[name]
        strength = jnp.exp(jnp.log(lo) + u * (jnp.log(hi) - jnp.log(lo)))
        degraded = degradations.DEGRADATIONS[name](x, strength, jax.random.fold_in(k_apply, i))
        out = jnp.where((choice == i).reshape(-1, 1, 1, 1), degraded, out)
    return jnp.clip(out, -1.0, 1.0)


def _detector_loss(params, apply, x, labels, key):
    """Real images (first half of the batch) vs artefacts of the second half."""
    del labels
    half = x.shape[0] // 2
    k_shift, k_fake = jax.random.split(key)
    x = _random_shift(x, k_shift)
    inputs = jnp.concatenate([x[:half], make_fakes(x[half:], k_fake)])
    targets = jnp.concatenate([jnp.ones(half), jnp.zeros(x.shape[0] - half)])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(apply(params, inputs), targets))


# ----------------------------------------------------------------------------------------------
# Held-out scores, computed once after training and stored in meta.json.
# ----------------------------------------------------------------------------------------------


def batched_apply(fn: Callable[[jax.Array], jax.Array], images, batch_size: int = 256
                  ) -> np.ndarray:
    """``fn`` over ``images`` (N, ...) in chunks of ``batch_size``; concatenated NumPy output.

    ``fn`` is called on float32 [-1, 1] arrays; uint8 input is converted first. The last chunk is
    padded to the full size so that ``fn`` compiles once.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = data.to_model_range(images)
    n = len(images)
    outs = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk) if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(np.asarray(fn(jnp.asarray(chunk, jnp.float32)))[:len(chunk) - pad])
    return np.concatenate(outs) if outs else np.zeros((0,))


def _classifier_scores(graphdef, params, test: data.ImageSplit) -> dict:
    apply = small_nets.make_apply(graphdef)
    logits = batched_apply(jax.jit(lambda x: apply(params, x)), test.images)
    log_p = jax.nn.log_softmax(logits)
    return {"heldout_accuracy": float(np.mean(np.argmax(logits, -1) == test.labels)),
            "heldout_cross_entropy": float(-np.mean(log_p[np.arange(len(log_p)), test.labels]))}


def _encoder_scores(graphdef, params, test: data.ImageSplit) -> dict:
    reconstruct = small_nets.make_apply(graphdef)
    x = data.to_model_range(test.images)
    recon = batched_apply(jax.jit(lambda v: reconstruct(params, v)), x)
    mse = float(np.mean((recon - x) ** 2))
    return {"heldout_mse": mse, "heldout_psnr_db": float(10 * np.log10(4.0 / mse))}


def _detector_scores(graphdef, params, test: data.ImageSplit) -> dict:
    apply = small_nets.make_apply(graphdef)
    x = jnp.asarray(data.to_model_range(test.images))
    fn = jax.jit(lambda v: apply(params, v))
    real = batched_apply(fn, x)
    scores = {"heldout_real_judged_real": float(np.mean(real > 0))}
    caught = []
    for i, name in enumerate(DETECTOR_FAKES):
        fakes = make_fakes(x, jax.random.key(10_000 + i), families=(name,))
        rate = float(np.mean(batched_apply(fn, fakes) <= 0))
        scores[f"heldout_{name}_caught"] = rate
        caught.append(rate)
    # Balanced accuracy: real images and artefacts count equally.
    scores["heldout_accuracy"] = float(0.5 * scores["heldout_real_judged_real"]
                                       + 0.5 * np.mean(caught))
    return scores


@dataclasses.dataclass(frozen=True)
class NetDef:
    """How a net is built, trained and used.

    Attributes:
      build: ``build(image_shape, num_classes, rngs, **arch) -> nnx.Module``.
      train_method: module method the objective calls.
      apply_method: module method ``AuxNet.apply`` calls.
      loss: the objective ``loss(params, apply, x, labels, key)``.
      scores: ``scores(graphdef, params, test_split) -> dict`` of held-out numbers.
    """

    build: Callable[..., nnx.Module]
    train_method: str
    apply_method: str
    loss: Callable[..., jax.Array]
    scores: Callable[..., dict]


NETS: dict[str, NetDef] = {
    "classifier": NetDef(
        build=lambda shape, k, rngs, **a: small_nets.Classifier(shape, k, rngs=rngs, **a),
        train_method="__call__", apply_method="__call__", loss=_classifier_loss,
        scores=_classifier_scores),
    "encoder": NetDef(
        build=lambda shape, k, rngs, **a: small_nets.Autoencoder(shape, rngs=rngs, **a),
        train_method="__call__", apply_method="encode", loss=_encoder_loss,
        scores=_encoder_scores),
    "detector": NetDef(
        build=lambda shape, k, rngs, **a: small_nets.PatchDetector(shape, rngs=rngs, **a),
        train_method="__call__", apply_method="__call__", loss=_detector_loss,
        scores=_detector_scores),
}


def _build(netdef: NetDef, spec: TrainSpec, image_shape, num_classes: int, *,
           abstract: bool = False):
    module = models.init_module(
        lambda: netdef.build(tuple(image_shape), num_classes, nnx.Rngs(spec.seed),
                             **dict(spec.arch)), abstract=abstract)
    return nnx.split(module, nnx.Param)


def train(net: str, spec: TrainSpec, train_split: data.ImageSplit, test_split: data.ImageSplit
          ) -> tuple[nnx.GraphDef, Any, dict]:
    """Trains one net from scratch.

    Args:
      net: a key of ``NETS``.
      spec: its training spec.
      train_split, test_split: in-memory dataset splits (uint8 images, int32 labels).

    Returns:
      ``(graphdef, params, record)``; record holds the final training loss, the held-out scores
      (``NETS[net].scores``) and ``train_seconds``.
    """
    netdef = NETS[net]
    graphdef, params = _build(netdef, spec, train_split.image_shape, train_split.num_classes)
    train_apply = small_nets.make_apply(graphdef, netdef.train_method)
    warmup = max(1, min(100, spec.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, warmup, max(spec.steps, warmup + 1), spec.learning_rate * 0.05)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    base_key = jax.random.key(spec.seed)

    @jax.jit
    def step(params, opt_state, images_u8, labels, key):
        x = data.to_model_range(images_u8)
        loss, grads = jax.value_and_grad(netdef.loss)(params, train_apply, x, labels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.time()
    losses = []
    for i in range(spec.steps):
        idx = data.global_batch_indices(len(train_split), i, spec.batch_size, spec.seed)
        params, opt_state, loss = step(params, opt_state, train_split.images[idx],
                                       train_split.labels[idx], jax.random.fold_in(base_key, i))
        if i >= spec.steps - 20:
            losses.append(float(loss))
    seconds = time.time() - t0
    record = {"final_train_loss": float(np.mean(losses)), "train_seconds": round(seconds, 1)}
    record.update(netdef.scores(graphdef, params, test_split))
    return graphdef, params, record


def cache_dir(aux_dir: str, dataset: str, net: str) -> str:
    """``<aux_dir>/<dataset with '/' -> '__'>/<net>``."""
    return os.path.join(os.fspath(aux_dir), dataset.replace("/", "__"), net)


def load_or_train(net: str, dataset: str, *, aux_dir: str, data_dir: str | None,
                  preset: str = "default") -> AuxNet:
    """Returns the cached net, training and caching it first if needed.

    Args:
      net: a key of ``NETS``.
      dataset: dataset name (``normguard_jax.data.load_split``); the train split is trained on
        and the test split is held out for the scores in ``meta``.
      aux_dir: cache root.
      data_dir: TFDS data dir (None: TFDS default).
      preset: a key of ``PRESETS``.

    Raises:
      ValueError: unknown net/preset, or a cached entry trained with a different spec.
    """
    if net not in NETS:
        raise ValueError(f"unknown auxiliary net {net!r}; choose one of {sorted(NETS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset][net]
    directory = cache_dir(aux_dir, dataset, net)
    meta_path = paths.path(directory) / "meta.json"
    params_path = paths.path(directory) / "params"
    netdef = NETS[net]
    with file_lock.exclusive(directory + ".lock"):
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["spec"] != spec.to_json():
                raise ValueError(
                    f"{directory} holds a {net} trained with spec {meta['spec']}, not the "
                    f"requested {preset!r} spec {spec.to_json()}; use another aux_dir or delete it")
            graphdef, abstract = _build(netdef, spec, meta["image_shape"], meta["num_classes"],
                                        abstract=True)
            params = checkpointing.load_tree(params_path, abstract)
            logging.info("Loaded %s for %s from %s: %s", net, dataset, directory,
                         {k: v for k, v in meta.items() if k.startswith("heldout")})
        else:
            if params_path.exists():  # an interrupted earlier write
                params_path.rmtree()
            train_split = data.load_split(dataset, "train", data_dir)
            test_split = data.load_split(dataset, "test", data_dir)
            graphdef, params, record = train(net, spec, train_split, test_split)
            meta = {"net": net, "dataset": dataset, "preset": preset, "spec": spec.to_json(),
                    "image_shape": list(train_split.image_shape),
                    "num_classes": int(train_split.num_classes), **record}
            meta = json.loads(json.dumps(meta, sort_keys=True))  # exactly what a reload gives
            checkpointing.save_tree(params_path, params)
            tmp = meta_path.with_name(meta_path.name + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
            tmp.replace(meta_path)
            logging.info("Trained %s for %s in %.1f s: %s", net, dataset, record["train_seconds"],
                         {k: v for k, v in record.items() if k.startswith("heldout")})
    apply = small_nets.make_apply(graphdef, netdef.apply_method)
    return AuxNet(name=net, apply=apply, params=params, meta=meta)


class AuxNetCache:
    """Lazy, memoised access to the nets of one dataset: ``cache("classifier") -> AuxNet``.

    A net is loaded or trained (``load_or_train``) the first time it is asked for.
    """

    def __init__(self, dataset: str, *, aux_dir: str, data_dir: str | None,
                 preset: str = "default"):
        self.dataset, self.aux_dir, self.data_dir, self.preset = dataset, aux_dir, data_dir, preset
        self._nets: dict[str, AuxNet] = {}

    def __call__(self, net: str) -> AuxNet:
        if net not in self._nets:
            self._nets[net] = load_or_train(net, self.dataset, aux_dir=self.aux_dir,
                                            data_dir=self.data_dir, preset=self.preset)
        return self._nets[net]

    def loaded(self) -> Mapping[str, AuxNet]:
        """The nets obtained so far, by name."""
        return dict(self._nets)

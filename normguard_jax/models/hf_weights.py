"""Loading diffusers / transformers checkpoint folders into NNX parameter states, without torch.

A model folder holds ``config.json`` and its weights as ``*.safetensors`` — one file, or shards
listed by a ``*.safetensors.index.json``. Each model module supplies ONE name table: a function
``table(key) -> (path, transform) | IGNORE | None`` from a checkpoint key (e.g.
``transformer_blocks.0.attn.to_q.weight``) to the path of its parameter in the module's NNX state
(e.g. ``("blocks", 0, "attn", "q", "kernel")``) and the array transform (e.g. a transposed
torch ``Linear`` weight). ``None`` means "not mapped" and is an error; :data:`IGNORE` marks keys
the module deliberately does not keep (e.g. a buffer it recomputes).

:func:`load_params` checks the whole mapping from the files' headers before reading any
tensor, then streams one tensor at a time from a memory map: transformed, cast to the
parameter's dtype and put on its device(s) with ``jax.device_put`` — so a model sharded over a
mesh never exists whole in one host's memory, let alone twice.

The safetensors format (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data) is read directly
with ``numpy.memmap``: that reads bfloat16 and float8 tensors (through ``ml_dtypes``, which
JAX ships) and needs neither torch nor a copy of the file in memory.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Iterator, Optional, Union

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

Path = tuple
Transform = Callable[[np.ndarray], np.ndarray]


class _Ignore:
    def __repr__(self):
        return "IGNORE"


IGNORE = _Ignore()
"""Name-table result for a checkpoint key the module deliberately does not load."""

NameTable = Callable[[str], Union[tuple[Path, Transform], _Ignore, None]]

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightsError(ValueError):
    """A checkpoint that does not fit the model: the message lists every offending key."""


def identity(a: np.ndarray) -> np.ndarray:
    """The transform of a tensor stored as the model keeps it (biases, norms, embeddings)."""
    return a


def linear_kernel(a: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` (out, in) -> NNX ``Linear.kernel`` (in, out)."""
    return np.transpose(a)


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight`` (O, I, kh, kw) -> NNX ``Conv.kernel`` (kh, kw, I, O)."""
    return np.transpose(a, (2, 3, 1, 0))


def read_config(folder: str) -> dict:
    """The folder's ``config.json`` as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json (not a diffusers/transformers "
                                "model folder)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_files(folder: str) -> list[str]:
    """The folder's safetensors files: those named by an index json, else every ``*.safetensors``.

    Raises:
      FileNotFoundError: the folder holds no safetensors weights.
      WeightsError: more than one index file.
    """
    indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
    if len(indexes) > 1:
        raise WeightsError(f"{folder} holds several index files: {indexes}")
    if indexes:
        with open(indexes[0], encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards named by {indexes[0]} are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    return files


def read_header(path: str) -> tuple[int, dict]:
    """``(data_start, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def iter_tensors(path: str, names: Optional[set] = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of every tensor of one safetensors file (or of ``names`` only).

    The arrays are read-only views of a memory map: a tensor is read from disk when used.
    """
    start, header = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        if info["dtype"] not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = data[start + begin:start + end]
        yield name, raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _flat(state: nnx.State) -> dict[Path, Any]:
    return traverse_util.flatten_dict(state.to_pure_dict())


def load_params(abstract: nnx.State, folder: str, table: NameTable, *,
                shardings: Optional[Callable[[Path], Any]] = None) -> nnx.State:
    """Fills a model's parameter state from a checkpoint folder.

    Args:
      abstract: the module's parameters, e.g. ``nnx.split(nnx.eval_shape(make), nnx.Param)[1]``
        (``jax.ShapeDtypeStruct`` leaves; arrays work too). Every leaf must be loaded.
      folder: a diffusers/transformers model folder (or a folder of safetensors files).
      table: the model's name table (see the module docstring).
      shardings: ``path -> jax.sharding.Sharding`` for each parameter, or None for the default
        device. Each tensor is placed as soon as it is read.

    Returns:
      The state with every leaf a ``jax.Array`` of the abstract leaf's shape and dtype.

    Raises:
      WeightsError: listing, before any tensor is read, every checkpoint key the table does
        not map, every parameter no key maps to, keys mapped to the same parameter, and
        shapes that do not match after the transform.
    """
    leaves = _flat(abstract)
    files = checkpoint_files(folder)
    plan: dict[str, dict[str, tuple[Path, Transform]]] = {}
    unmapped, unknown_paths, seen = [], [], {}
    for path in files:
        _, header = read_header(path)
        for name in header:
            target = table(name)
            if target is IGNORE:
                continue
            if target is None:
                unmapped.append(name)
                continue
            param_path, transform = target
            param_path = tuple(param_path)
            if param_path not in leaves:
                unknown_paths.append(f"{name} -> {param_path}")
                continue
            if param_path in seen:
                unknown_paths.append(f"{name} and {seen[param_path]} -> {param_path}")
                continue
            seen[param_path] = name
            plan.setdefault(path, {})[name] = (param_path, transform)
    missing = sorted("/".join(map(str, p)) for p in leaves if p not in seen)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint keys are not mapped: {sorted(unmapped)}")
    if unknown_paths:
        problems.append("keys mapped to no parameter of the model, or to one parameter "
                        f"twice: {unknown_paths}")
    if missing:
        problems.append(f"{len(missing)} model parameters have no checkpoint key: {missing}")
    if problems:
        raise WeightsError(f"{folder} does not fit the model:\n  " + "\n  ".join(problems))

    loaded: dict[Path, jax.Array] = {}
    for path, names in plan.items():
        for name, array in iter_tensors(path, set(names)):
            param_path, transform = names[name]
            leaf = leaves[param_path]
            value = np.asarray(transform(array))
            if tuple(value.shape) != tuple(leaf.shape):
                raise WeightsError(
                    f"{name}: shape {tuple(array.shape)} becomes {tuple(value.shape)} after "
                    f"the transform, but parameter {'/'.join(map(str, param_path))} has shape "
                    f"{tuple(leaf.shape)}")
            value = value.astype(leaf.dtype)
            sharding = shardings(param_path) if shardings is not None else None
            loaded[param_path] = (jax.device_put(value, sharding) if sharding is not None
                                  else jax.device_put(value))
    pure = traverse_util.unflatten_dict(loaded)
    state = jax.tree.map(lambda x: x, abstract)
    state.replace_by_pure_dict(pure)
    return state

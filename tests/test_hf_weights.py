"""The safetensors loader: mapping checks before reading, sharded folders, dtypes, placement.

Checkpoints are written with ``safetensors.numpy`` (an independent writer of the format) in the
torch layout; the loader must give the NNX module exactly the transposed arrays.
"""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from normguard_jax.models import hf_weights

safetensors_numpy = pytest.importorskip("safetensors.numpy")


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(3, 8, rngs=rngs)
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.LayerNorm(8, rngs=rngs) for _ in range(2)])


def table(key):
    parts = key.split(".")
    if key == "buffer.pos":
        return hf_weights.IGNORE
    if parts[0] == "proj":
        return (("proj", "kernel"), hf_weights.linear_kernel) if parts[1] == "weight" else (
            ("proj", "bias"), hf_weights.identity)
    if parts[0] == "conv":
        return (("conv", "kernel"), hf_weights.conv_kernel) if parts[1] == "weight" else (
            ("conv", "bias"), hf_weights.identity)
    if parts[0] == "blocks":
        return ("blocks", int(parts[1]), {"weight": "scale", "bias": "bias"}[parts[2]]), (
            hf_weights.identity)
    return None


def torch_layout(rng, dtype=np.float32):
    t = {"proj.weight": rng.normal(size=(8, 3)), "proj.bias": rng.normal(size=8),
         "conv.weight": rng.normal(size=(4, 2, 3, 3)), "conv.bias": rng.normal(size=4),
         "buffer.pos": rng.normal(size=(5,))}
    for i in range(2):
        t[f"blocks.{i}.weight"] = rng.normal(size=8)
        t[f"blocks.{i}.bias"] = rng.normal(size=8)
    return {k: v.astype(dtype) for k, v in t.items()}


def abstract():
    return nnx.split(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), nnx.Param)[1]


def check(state, tensors):
    np.testing.assert_array_equal(state["proj"]["kernel"][...], tensors["proj.weight"].T)
    np.testing.assert_array_equal(state["conv"]["kernel"][...],
                                  tensors["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(state["blocks"][1]["scale"][...], tensors["blocks.1.weight"])


def test_single_file_loads_every_parameter_transposed(tmp_path):
    tensors = torch_layout(np.random.default_rng(0))
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    state = hf_weights.load_params(abstract(), str(tmp_path), table)
    check(state, tensors)
    # the loaded state drives the module
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))), state)
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(model.proj(x), x @ tensors["proj.weight"].T + tensors["proj.bias"],
                               rtol=1e-6)


def test_sharded_folder_bfloat16_and_placement(tmp_path):
    tensors = torch_layout(np.random.default_rng(1), dtype=ml_dtypes.bfloat16)
    names = sorted(tensors)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    for file, keys in shards.items():
        safetensors_numpy.save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    assert hf_weights.read_header(str(tmp_path / "a.safetensors"))[1][names[0]]["dtype"] == "BF16"
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("fsdp",))
    sharded = NamedSharding(mesh, P(None, "fsdp"))
    state = hf_weights.load_params(
        abstract(), str(tmp_path), table,
        shardings=lambda path: sharded if path == ("proj", "kernel") else None)
    check(state, {k: v.astype(np.float32) for k, v in tensors.items()})
    kernel = state["proj"]["kernel"][...]
    assert kernel.dtype == np.float32 and kernel.sharding == sharded
    assert kernel.addressable_shards[0].data.shape == (3, 1)   # 1/8 of the columns per device


def test_mapping_errors_list_every_key_before_reading(tmp_path):
    tensors = torch_layout(np.random.default_rng(2))
    tensors["extra.weight"] = np.zeros(2, np.float32)
    del tensors["blocks.0.bias"]
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_weights.WeightsError) as e:
        hf_weights.load_params(abstract(), str(tmp_path), table)
    message = str(e.value)
    assert "extra.weight" in message and "blocks/0/bias" in message


def test_shape_mismatch_names_the_key(tmp_path):
    tensors = torch_layout(np.random.default_rng(3))
    tensors["proj.weight"] = tensors["proj.weight"].T.copy()  # stored in the wrong layout
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_weights.WeightsError, match="proj.weight"):
        hf_weights.load_params(abstract(), str(tmp_path), table)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_weights.checkpoint_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_weights.read_config(str(tmp_path))
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump({"a": 1}, f)
    assert hf_weights.read_config(str(tmp_path / "m")) == {"a": 1}

"""benchmarks/tpu_aot.py's pieces on the 8 fake CPU devices at tiny sizes (no libtpu needed):
the update and sampler programs compile with sharded abstract arguments, the figures have
every field, each device's argument bytes are the sharded share of the whole, and remat
trades FLOPs for memory."""

import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from benchmarks import tpu_aot
from normguard_jax import lora
from normguard_jax.models import count_params
from normguard_jax.objectives.base import Context

# SD3.5-M's layout in miniature (RMS q/k norm, dual attention, 16 latent channels).
TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
            pooled_projection_dim=16, out_channels=16, pos_embed_max_size=10,
            dual_attention_layers=(0, 1), qk_norm="rms_norm")
SPEC = tpu_aot.ModelSpec("tiny", tpu_aot._mmdit(TINY), (8, 8, 16), (5, 16), 16, False, 4.5,
                         update_batch=2, sample_batch=2)
FIELDS = ("compile_s", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
          "total_bytes", "flops", "bytes_accessed", "intensity")


def _per_device_bytes(args):
    """Bytes of one device's shards of the abstract arguments, from their shardings."""
    total = 0
    for leaf in jax.tree.leaves(args):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


@pytest.mark.slow
def test_update_figures_on_eight_cpu_devices():
    devices = jax.devices()
    assert len(devices) == 8
    chip = tpu_aot.CHIPS["v5e-8"]
    rows = {}
    for remat in ("none", "full"):
        jitted, args = tpu_aot.build_update(SPEC, devices, remat=remat, min_shard_size=1)
        rows[remat] = tpu_aot.measure(jitted, args, chip=chip)
    row = rows["none"]
    for field in FIELDS + ("hbm_fraction", "compute_s", "memory_s", "roofline_util"):
        assert field in row and row[field] >= 0, field
    assert row["total_bytes"] == (row["argument_bytes"] + row["output_bytes"]
                                  + row["temp_bytes"] - row["alias_bytes"])
    # θ, the AdamW moments, θ_old, θ_ref and the batch: each device holds its shard only.
    whole = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(args))
    assert row["argument_bytes"] == pytest.approx(_per_device_bytes(args), rel=0.02)
    assert row["argument_bytes"] < 0.15 * whole        # ≈ 1/8 (+ a few replicated scalars)
    # Parameters and optimizer state are donated: their outputs alias the inputs.
    assert row["alias_bytes"] > 0.5 * row["argument_bytes"]
    # Rematerialisation recomputes the forward pass in the backward: more FLOPs.
    assert rows["full"]["flops"] > 1.1 * row["flops"]
    assert 0 < row["roofline_util"] <= 1
    # The README table's line of this cell.
    cell = dict(row, model="tiny", chip="v5e-8", program="update remat=none", batch_per_device=2)
    line = tpu_aot.markdown([cell]).splitlines()[-1]
    assert line.startswith("| tiny | full | v5e-8 | update remat=none | 2 |")
    assert f"{100 * row['roofline_util']:.0f} %" in line


@pytest.mark.slow
def test_sampler_figures_count_every_step():
    jitted, args = tpu_aot.build_sample(SPEC, jax.devices(), num_steps=2, min_shard_size=1)
    row = tpu_aot.measure(jitted, args, loop_steps=2)
    assert set(FIELDS) <= set(row) and row["flops"] > 0
    assert "roofline_util" not in row                  # no chip: no fractions
    assert row["argument_bytes"] == pytest.approx(_per_device_bytes(args), rel=0.02)
    # XLA counts the scan's body once: one step's FLOPs are at least those of the two
    # guided-batch (2B rows) forward passes' largest matmuls, the feed-forward ones.
    b, tokens = 2 * SPEC.sample_batch, (8 // 2) * (8 // 2)
    width = TINY["attention_head_dim"] * TINY["num_attention_heads"]
    ff_flops = 2 * b * tokens * width * 4 * width * 2 * TINY["num_layers"]
    assert row["flops"] >= 2 * ff_flops


@pytest.mark.slow
def test_lora_update_trains_only_the_adapter():
    """The LoRA cell: ``rl.update`` with ``policy=lora.LoRAParams``. The trainable tree (and
    θ_old, and the AdamW moments) holds only the adapters of the targeted layers, θ_ref is the
    bfloat16 base, and each device's arguments shrink by θ's float32 copies (θ, two moments,
    θ_old: 16 bytes per base parameter, sharded) less the adapter's."""
    devices, chip = jax.devices(), tpu_aot.CHIPS["v5e-8"]
    cfg = lora.LoRAConfig(rank=2, alpha=4.0, targets="attention")
    full_jit, full_args = tpu_aot.build_update(SPEC, devices, min_shard_size=1)
    lora_jit, lora_args = tpu_aot.build_update(SPEC, devices, min_shard_size=1, lora_cfg=cfg)
    adapter, _, old, base = lora_args[:4]
    # Trainable leaves: exactly the targeted layers' (in, r) and (r, out) float32 factors.
    paths = lora.target_paths(base, cfg)
    assert paths and all(".attn." in p for p in paths)
    assert sorted(adapter) == paths and jax.tree.structure(old) == jax.tree.structure(adapter)
    kernels = lora._kernels(base)   # noqa: SLF001
    for path in paths:
        n_in, n_out = kernels[path].shape
        assert adapter[path]["a"].shape == (n_in, 2) and adapter[path]["b"].shape == (2, n_out)
        assert adapter[path]["a"].dtype == jnp.float32
    # θ_ref is the whole base, stored in bfloat16, the same tree as full fine-tuning's θ_ref.
    assert jax.tree.structure(base) == jax.tree.structure(full_args[3])
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(full_args[0])} == {jnp.dtype(jnp.float32)}

    full = tpu_aot.measure(full_jit, full_args, chip=chip)
    low = tpu_aot.measure(lora_jit, lora_args, chip=chip)
    assert low["argument_bytes"] == pytest.approx(_per_device_bytes(lora_args), rel=0.02)
    # The saving is θ, its AdamW moments and θ_old (float32) less the adapter's four copies.
    saving = _per_device_bytes(full_args[:3]) - _per_device_bytes(lora_args[:3])
    theta = _per_device_bytes(full_args[0])
    assert saving > 3 * theta                            # 4 float32 copies minus the adapter's
    assert full["argument_bytes"] - low["argument_bytes"] == pytest.approx(saving, rel=0.05)
    # The outputs are the new adapter and its optimizer state (donated), not θ.
    assert low["output_bytes"] < 0.5 * full["output_bytes"]
    assert 0 < low["alias_bytes"] <= low["output_bytes"]
    # No gradient of the base kernels is formed: fewer FLOPs than full fine-tuning.
    assert low["flops"] < full["flops"]


@pytest.mark.slow
def test_lora_sampler_runs_the_adapted_policy():
    cfg = lora.LoRAConfig(rank=2, alpha=4.0, targets="attention")
    jitted, args = tpu_aot.build_sample(SPEC, jax.devices(), num_steps=2, min_shard_size=1,
                                        lora_cfg=cfg)
    assert isinstance(args[0], lora.LoRAParams)
    row = tpu_aot.measure(jitted, args, loop_steps=2)
    assert row["argument_bytes"] == pytest.approx(_per_device_bytes(args), rel=0.02)
    assert row["flops"] > 0


def _saved_shapes(capsys, spec, remat, lora_cfg, batch=2):
    """Shapes of what the update's backward keeps from its forward pass (JAX's residuals of the
    loss ``rl.update`` differentiates, arguments left out), as ``(dtype, shape)`` pairs."""
    velocity, policy, trainable, reference = tpu_aot._policy_trees(  # noqa: SLF001
        spec, remat, lora_cfg)
    objective = tpu_aot.update_objective()
    s = jax.ShapeDtypeStruct
    data = {"x0": s((batch, *spec.latent), jnp.float32),
            "noise": s((batch, *spec.latent), jnp.float32), "sigma": s((batch,), jnp.float32),
            "cond": {"text": s((batch, *spec.text), jnp.bfloat16),
                     "pooled": s((batch, spec.pooled), jnp.bfloat16)},
            "advantage": s((batch,), jnp.float32)}

    def loss(params, old, ref, data):
        ctx = Context(velocity=velocity, ref_params=ref, old_params=policy(ref, old),
                      rollout_params=None, null_condition=None)
        return objective(policy(ref, params), data, ctx)[0]

    capsys.readouterr()
    print_saved_residuals(loss, trainable, trainable, reference, data)
    shapes = []
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"(\w+)\[([0-9,]*)\]", line)
        if m and "argument" not in line:
            shapes.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
    return shapes, reference


@pytest.mark.parametrize("rank", [0, 2])
def test_remat_keeps_no_attention_map_and_no_kernel_copy(capsys, rank):
    """What the update keeps for its backward pass, at the JAX level. With remat full, for full
    fine-tuning and for LoRA alike, no attention map (an array ending in S × S axes) is kept:
    the blocks run again in the backward; without remat the maps are kept (so the check can see
    them). On the
    LoRA path no kernel-shaped array is kept in either case: the adapted layers never form the
    merged ``W + (α/r)·A@B`` nor a float32 copy of a bfloat16 base kernel. (Why the compiled LoRA
    temporaries at 2-4 blocks still rise faster than full fine-tuning's: benchmarks/README.md.)"""
    cfg = lora.LoRAConfig(rank=rank, alpha=4.0, targets="attention") if rank else None
    tokens = (SPEC.latent[0] // TINY["patch_size"]) * (SPEC.latent[1] // TINY["patch_size"])
    lengths = {tokens, tokens + SPEC.text[0]}          # dual (image only) and joint attention

    def maps(shapes):
        return [sh for _, sh in shapes   # (..., S, S): the attention's logits or weights
                if len(sh) >= 4 and sh[-1] == sh[-2] and sh[-1] in lengths]

    kept = {remat: _saved_shapes(capsys, SPEC, remat, cfg) for remat in ("none", "full")}
    assert maps(kept["none"][0]), "without remat the attention maps are residuals"
    assert not maps(kept["full"][0])
    if rank:
        kernels = {tuple(k.shape) for k in lora._kernels(kept["full"][1]).values()}  # noqa: SLF001
        for remat in ("none", "full"):
            assert not [sh for _, sh in kept[remat][0] if sh in kernels], remat


def test_failed_cells_and_markdown(tmp_path, capsys):
    """``--failed`` records cells without compiling; ``--append`` keeps other cells; the
    markdown table lists full fine-tuning before LoRA and the updates before the sampler."""
    out = str(tmp_path / "aot.json")
    tpu_aot.main(["--models", "sd35m", "--chips", "v5e-8", "--lora", "32", "--remat", "full",
                  "--programs", "update", "--failed", "compile did not fit", "--out", out])
    tpu_aot.main(["--models", "sd35m", "--chips", "v5e-8", "--lora", "0", "--remat", "full",
                  "--programs", "update,sample", "--failed", "x", "--out", out, "--append"])
    with open(out, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    assert {(r["tuning"], r["program"]) for r in rows} == {
        ("lora r32 α64 attention", "update remat=full"), ("full", "update remat=full"),
        ("full", "sample 10 steps")}
    capsys.readouterr()
    tpu_aot.main(["--out", out, "--markdown"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[1:4:2] for line in table[2:]] == [
        ["full", "update remat=full"], ["full", "sample 10 steps"],
        ["lora r32 α64 attention", "update remat=full"]]
    assert "compile did not fit" in table[-1]


@pytest.mark.parametrize("model,depths", [("sd35m", [(2, 1), (4, 1), (2, 3)]),
                                          ("flux-dev", [(1, 2), (2, 4)])])
def test_extrapolation_from_reduced_depths_recovers_the_parameter_count(model, depths):
    """Parameter counts are exactly linear in the block counts, so figures equal to them,
    extrapolated from reduced-depth models (``with_blocks``; SD3.5-M: three depths, any two
    block counts; FLUX.1-dev: proportional depths 1:2 as in its 19 + 38 blocks), must give the
    full model's count."""
    spec = tpu_aot.MODELS[model]
    full = count_params(spec.build("none", jnp.bfloat16, jnp.float32)[1])
    rows = []
    for blocks in depths:
        reduced = tpu_aot.with_blocks(spec, blocks)
        assert tpu_aot.blocks_of(reduced) == blocks
        n = count_params(reduced.build("none", jnp.bfloat16, jnp.float32)[1])
        rows.append(dict({f: n for f in tpu_aot.EXTENSIVE}, model=model, tuning="full",
                         trainable_params=n,
                         chip="v5e-8", program="update remat=full", batch_per_device=8,
                         blocks=list(blocks), alias_bytes=0, total_bytes=2 * n, intensity=1.0,
                         hbm_fraction=0.1, roofline_util=1.0))
    (row,) = tpu_aot.extrapolate(rows)
    assert row["blocks"] == list(tpu_aot.blocks_of(spec))
    assert row["flops"] == pytest.approx(full, rel=1e-9) and row["trainable_params"] == full
    assert row["argument_bytes"] == pytest.approx(full, abs=1)
    assert row["total_bytes"] == row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
    assert row["fit_residual"] < 1e-9 and row["extrapolated_from"] == sorted(map(list, depths))
    # The table marks the extrapolated cell and lists the compiles it came from.
    table = tpu_aot.markdown(rows)
    assert "update remat=full ≈" in table and "Reduced-depth compiles" in table


def test_update_batch_is_part_of_the_cell(tmp_path):
    """Rows per device are part of a cell: ``--update_batch`` cells are appended beside the
    model's own batch, not over it, and each batch is extrapolated from its own depths (a
    fit across both batches would mix two programs)."""
    out = str(tmp_path / "aot.json")
    for batch in ("0", "4"):
        tpu_aot.main(["--models", "flux-dev", "--chips", "v5e-8", "--lora", "32", "--remat",
                      "full", "--programs", "update", "--failed", f"b{batch}", "--out", out,
                      "--append", "--update_batch", batch])
    with open(out, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    assert sorted((r["batch_per_device"], r["error"]) for r in rows) == [(4, "b4"), (8, "b0")]
    with pytest.raises(SystemExit):
        tpu_aot.main(["--update_batch", "-1", "--out", out])

    spec = tpu_aot.MODELS["flux-dev"]
    rows = []
    for batch, scale in ((8, 1.0), (4, 0.5)):
        for blocks in ((1, 2), (2, 4)):
            n = count_params(tpu_aot.with_blocks(spec, blocks).build(
                "none", jnp.bfloat16, jnp.float32)[1])
            rows.append(dict({f: scale * n for f in tpu_aot.EXTENSIVE}, model="flux-dev",
                             tuning="lora", chip="v5e-8", program="update remat=full",
                             batch_per_device=batch, blocks=list(blocks), alias_bytes=0))
    full = count_params(spec.build("none", jnp.bfloat16, jnp.float32)[1])
    fits = {r["batch_per_device"]: r for r in tpu_aot.extrapolate(rows)}
    assert set(fits) == {8, 4}
    assert fits[8]["flops"] == pytest.approx(full, rel=1e-9)
    assert fits[4]["flops"] == pytest.approx(full / 2, rel=1e-9)
    assert fits[4]["fit_residual"] < 1e-9

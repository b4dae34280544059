"""Do the quality metrics rank what they should? Real vs degraded vs less diverse vs base models.

For each dataset, the held-out (test) split is cut into two class-balanced halves: the first is
the reference every metric compares against, the second is the "real" candidate set. The
candidate set is then degraded at four increasing strengths per family (Gaussian noise, blur,
contrast inflation, residual background noise) or made less diverse (each class's images
replaced by fewer and fewer distinct ones, repeated), and optionally replaced by samples of
pretrained base models (``--base``, one pretraining workdir per flag; datasets are matched
automatically). Each set gets every quality metric of ``normguard_jax.quality`` plus a few
rewards, so the table also shows which rewards a degradation would *raise*. The table and a
monotonicity summary go to ``experiments/results/validity.md`` (the exact command on top).

Run (from the repository root):
  python experiments/validity.py --datasets=digits_mnist,shapes --aux_dir=workdir/aux_nets \
      [--base=workdir/pretrain_mnist_dit --base=workdir/pretrain_shapes_dit]
(or ``python -m experiments.validity`` with the same flags). The statistics (standard errors,
the ladder check) are in experiments/validity_checks.py.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags

from experiments import tables, validity_checks
from normguard_jax import (auxnets, checkpointing, data, degradations, evaluate, generators,
                           quality, reporting, rewards)

_DATASETS = flags.DEFINE_list("datasets", ["digits_mnist", "shapes"], "Datasets to check.")
_AUX_DIR = flags.DEFINE_string("aux_dir", "workdir/aux_nets", "Cache of the reward/metric nets.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = TFDS default).")
_PRESET = flags.DEFINE_string("preset", "default", "Training preset of the auxiliary nets.")
_BASE = flags.DEFINE_multi_string("base", [], "Pretraining workdirs whose samples to score.")
_STEPS = flags.DEFINE_integer("sample_steps", 20, "ODE steps for base-model samples.")
_CFG = flags.DEFINE_float("guidance_scale", 1.5, "CFG scale for base-model samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of degradations and samples.")
_OUT = flags.DEFINE_string("out", "experiments/results/validity.md", "Markdown output.")

_REPEATS = flags.DEFINE_integer("repeats", 20, "Random halves per set for the standard errors.")
_Z = flags.DEFINE_float("z", 2.0, "Tolerance of the checks, in standard errors of a difference.")
_FROM_JSON = flags.DEFINE_string(
    "from_json", "", "Re-grade and re-render the rows of an earlier run's JSON (no sampling or "
    "training); the checks and the split into quality metrics and diagnostics are redone.")

QUALITY = quality.QUALITY_METRICS
DIAGNOSTICS = quality.DIAGNOSTICS
REWARD_COLUMNS = ("classifier_logprob", "classifier_correct", "contrast", "compressibility",
                  "saturation", "shapes_rule")


def _rows_for_dataset(dataset: str, data_dir) -> tuple[list[dict], dict]:
    nets = auxnets.AuxNetCache(dataset, aux_dir=_AUX_DIR.value, data_dir=data_dir,
                               preset=_PRESET.value)
    test = data.load_split(dataset, "test", data_dir)
    ref_idx, cand_idx = validity_checks.interleaved_halves(test.labels)
    qnets = quality.quality_nets(nets)
    reference = quality.make_reference(test.images[ref_idx], test.labels[ref_idx], qnets)
    images = data.to_model_range(test.images[cand_idx])
    labels = test.labels[cand_idx].astype("int32")
    ctx = rewards.RewardContext(dataset, tuple(test.image_shape), test.num_classes, nets)
    names = [n for n in REWARD_COLUMNS if n in rewards.applicable(ctx)]
    reward_fns = {n: rewards.build_reward(n, ctx) for n in names}

    sets = [("real (held-out)", 0.0, images)]
    sets += degradations.validity_sets(images, labels, _SEED.value)
    for base in _BASE.value:
        _, meta = checkpointing.read_meta(base)
        if meta["config"]["data"]["name"] != dataset:
            continue
        pre = generators.load_pretrained(base)
        sample_cfg = ml_collections.ConfigDict(dict(
            method="ode", num_steps=_STEPS.value, shift=3.0, guidance_scale=_CFG.value,
            noise_level=-1.0, batch_size=125))
        t0 = time.time()
        samples = evaluate.generate_set(pre, labels, sample_cfg, _SEED.value)
        grid_path = os.path.join(os.path.dirname(_OUT.value),
                                 f"validity_{os.path.basename(base.rstrip('/'))}.png")
        per = min(8, int(np.bincount(labels).min()))
        shown = np.concatenate([np.flatnonzero(labels == c)[:per]
                                for c in range(test.num_classes)])
        reporting.save_png(grid_path, reporting.image_grid(samples[shown], per), upscale=2)
        sets.append((f"base: {base} (step {pre.step}, {_STEPS.value} ODE steps, CFG "
                     f"{_CFG.value}; {time.time() - t0:.0f} s)", 0.0, samples))

    rows = []
    for family, strength, x in sets:
        q, se = validity_checks.quality_metrics_and_errors(
            x, labels, reference, qnets, repeats=_REPEATS.value, seed=_SEED.value)
        r = {k: float(v.mean()) for k, v in rewards.score_images(reward_fns, x, labels).items()}
        rows.append({"family": family, "strength": strength, **q, **r,
                     "se": se})
    aux = {name: {k: v for k, v in net.meta.items() if k.startswith("heldout")
                  or k == "train_seconds"} for name, net in sorted(nets.loaded().items())}
    info = {"reference_size": int(len(ref_idx)), "candidate_size": int(len(cand_idx)),
            "aux_nets": aux, "rewards": names}
    return rows, info


def checks(rows: list[dict], metrics) -> dict[str, dict[str, dict]]:
    """family -> metric -> ``validity_checks.ladder_check`` of [real, strength 1, ..., strength 4]
    (diversity_ratio, two-sided, is checked as higher-is-better on the ``diversity`` family
    only)."""
    real = rows[0]
    out = {}
    for family in degradations.VALIDITY_LADDERS:
        seq = [real] + [r for r in rows if r["family"] == family]
        out[family] = {}
        for metric in metrics:
            sign = quality.DIRECTION.get(metric)
            if sign is None and not (metric == "diversity_ratio" and family == "diversity"):
                continue
            out[family][metric] = validity_checks.ladder_check(
                [r[metric] for r in seq], [r["se"][metric] for r in seq], sign or +1, _Z.value)
    return out


def _cell(check: dict | None, blind: bool) -> str:
    if check is None:
        return ""
    if blind:
        return "blind" + ("" if check["passed"] else " ✗")
    if not check["passed"]:
        return "✗" + ("" if check["monotone"] else " step") + ("" if check["real_best"] else
                                                                " real")
    return "✓" if check["significant"] else ("(✓)" if check["worse"] else "~")


def _check_table(result: dict, metrics) -> list[str]:
    lines = tables.header(["family", *metrics], left=len(metrics) + 1)
    for family, per in result.items():
        cells = [_cell(per.get(m), family in validity_checks.BLIND_BY_CONSTRUCTION.get(m, ()))
                 for m in metrics]
        lines.append(tables.row([family, *cells]))
    return lines


def _between(rows: list[dict]) -> list[str]:
    """Per base model and quality metric: real better than base, base better than the worst
    degraded set (✓ when both hold)."""
    bases = [r for r in rows if r["family"].startswith("base")]
    if not bases:
        return []
    real, degraded = rows[0], [r for r in rows if r["family"] in degradations.VALIDITY_LADDERS]
    lines = tables.header(["base", *QUALITY], left=len(QUALITY) + 1)
    for b in bases:
        cells = []
        for m in QUALITY:
            sign = quality.DIRECTION[m]
            worst = min(sign * r[m] for r in degraded)
            cells.append("✓" if sign * real[m] > sign * b[m] > worst else
                         ("= real" if b[m] == real[m] else "✗"))
        lines.append(tables.row([b["family"].split(" (")[0], *cells]))
    return lines


def _fmt(value: float, error: float | None) -> str:
    if error is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({error:.3f})"


def _table(rows: list[dict], reward_names: list[str]) -> list[str]:
    cols = list(QUALITY) + list(DIAGNOSTICS) + reward_names
    arrows = {m: {1: "↑", -1: "↓"}.get(quality.DIRECTION.get(m), "") for m in cols}
    lines = tables.header(["set", "strength", *(f"{c} {arrows[c]}".strip() for c in cols)],
                          left=1)
    for r in rows:
        strength = "" if r["family"] not in degradations.VALIDITY_LADDERS else f"{r['strength']:g}"
        lines.append(tables.row([r["family"], strength,
                                 *(_fmt(r[c], r["se"].get(c) if c in QUALITY else None)
                                   for c in cols)]))
    return lines


def main(argv):
    del argv
    reporting.quiet_library_logs()
    data_dir = _DATA_DIR.value or None
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Validity of the quality metrics",
        "",
        "```",
        command,
        "```",
        "",
        "Reference: the first class-balanced half of each dataset's test split. Rows: the other "
        "half (real, held out), that half degraded (strength = noise std, blur std in pixels, "
        "contrast gain - 1, background-noise std, or for `diversity` the fraction of distinct "
        "images kept per class, 0 meaning one image per class), and base-model samples with the "
        "same labels. ↑/↓: direction of better. Metric nets: autoencoder features (FD, "
        "recall and precision with k = 3, density and coverage with k = 5) and the patch "
        "detector (realism); rewards use the separate classifier. See "
        "`normguard_jax/quality.py` for what each metric captures and misses.",
        "",
        f"**Quality metrics** (validated): {', '.join(f'`{m}`' for m in QUALITY)}; the value "
        "is followed by its standard error at this set size, reference held fixed (binomial "
        f"for `realism`, standard deviation over {_REPEATS.value} random class-balanced "
        "halves for the set statistics `fd` and `recall`: for a mean, a half has variance "
        "σ²/(n/2)·(1 − 1/2) = σ²/n, the full set's). **Diagnostics** (reported, not counted as "
        "quality metrics): "
        f"{', '.join(f'`{m}`' for m in DIAGNOSTICS)}. `out_of_range` and `overshoot` measure "
        "saturation beyond [-1, 1] and cannot see blur or lost diversity (neither leaves the "
        "range); the others fail the check in this feature space. `density` and "
        "`diversity_ratio` are two-sided (ideal ≈ 1).",
        "",
        f"**Tolerance.** A change from a (standard error e_a) to b (e_b) counts as an "
        f"improvement only if it exceeds {_Z.value:g}·sqrt(e_a² + e_b²), i.e. {_Z.value:g} "
        "standard errors of the difference of two independently drawn sets. A metric passes "
        "a family if, along [real, strength 1..4], no step improves (else ✗ `step`) and no "
        "degraded set improves on real (else ✗ `real`). ✓: passes and the strongest "
        "degradation is worse than real beyond the tolerance; (✓): passes, the strongest is "
        "worse but within the tolerance; ~: passes but flat (the strongest is not worse: the "
        "metric does not see this family at this set size); `blind`: blind by construction "
        "(`validity_checks.BLIND_BY_CONSTRUCTION`: the per-image detector cannot see set "
        "diversity, range statistics cannot see blur or repetition), not counted as a "
        "failure (a ✗ after it means it even improved). Lost diversity must worsen FD and "
        "recall; realism is blind to it.",
        "",
    ]
    earlier = {}
    if _FROM_JSON.value:
        with open(_FROM_JSON.value, encoding="utf-8") as f:
            earlier = json.load(f)
        lines[3:4] = [earlier.get("command", "(the command of the earlier run was not recorded; "
                                  "see git history)"), command]
    results = {"command": earlier.get("command", command)}
    for dataset in _DATASETS.value:
        t0 = time.time()
        if earlier:
            rows, info = earlier[dataset]["rows"], {
                k: v for k, v in earlier[dataset].items()
                if k not in ("rows", "quality_checks", "diagnostic_checks", "failed")}
        else:
            rows, info = _rows_for_dataset(dataset, data_dir)
            info["seconds"] = time.time() - t0
        quality = checks(rows, QUALITY)
        diagnostic = checks(rows, DIAGNOSTICS)
        failed = sorted({f"{m} ({fam})" for fam, per in quality.items() for m, c in per.items()
                         if not c["passed"]
                         and fam not in validity_checks.BLIND_BY_CONSTRUCTION.get(m, ())})
        results[dataset] = {"rows": rows, "quality_checks": quality,
                            "diagnostic_checks": diagnostic, "failed": failed, **info}
        lines += [f"## {dataset}", "",
                  f"Reference {info['reference_size']} images, every set "
                  f"{info['candidate_size']} images"
                  + (f" ({info['seconds']:.0f} s)" if "seconds" in info else "")
                  + ". Auxiliary nets: "
                  + "; ".join(f"{n} " + ", ".join(f"{k} {v:.3g}" for k, v in m.items())
                              for n, m in info["aux_nets"].items()) + ".", ""]
        lines += _table(rows, info["rewards"])
        lines += ["", "Quality metrics, per degradation family:", ""]
        lines += _check_table(quality, QUALITY)
        lines += ["", "**All quality metrics pass**" if not failed else
                  "**Failing:** " + ", ".join(failed), ""]
        near = sorted(((c["closest"], m, fam) for fam, per in quality.items()
                       for m, c in per.items()
                       if fam not in validity_checks.BLIND_BY_CONSTRUCTION.get(m, ())
                       and c["closest"] > 0.5), reverse=True)
        lines += ["Closest calls (largest improvement along a ladder / its tolerance, above "
                  "0.5): " + (", ".join(f"{m} under {fam} {r:.2f}" for r, m, fam in near)
                              or "none") + ".", ""]
        between = _between(rows)
        if between:
            lines += ["Base models between real and the worst degraded set (✓: real better than "
                      "the base, the base better than the worst degraded row):", ""]
            lines += between + [""]
        else:
            lines += ["No base model of this dataset was given (`--base`).", ""]
        lines += ["Diagnostics, same checks (for information):", ""]
        lines += _check_table(diagnostic, DIAGNOSTICS)
        lines.append("")
        print("\n".join(lines), flush=True)
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

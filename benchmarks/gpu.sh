#!/usr/bin/env bash
# Wall-clock figures of the RL update and the rollout sampler at real sizes on a CUDA machine,
# with random weights (no checkpoint download): SD3.5-Medium (update with remat, 10-step CFG
# sampler) and FLUX.1-dev (10-step sampler) at 512×512. Writes benchmarks/gpu_bench.json.
#
#   bash benchmarks/gpu.sh                # from the repository root
#   VENV=/path/to/venv bash benchmarks/gpu.sh
#
# Steps: a venv with the `gpu` extra (jax[cuda12], pinned by constraints.txt), then
# benchmarks/gpu_bench.py --size real. Sized to finish in under 8 minutes on one 80 GB GPU
# (install ~2 min, three compiles of ~1 min each, 3 timed runs per cell; an estimate, not run); a cell that does not
# fit the GPU's memory is recorded with its error and the others still run. The update of
# FLUX.1-dev (11.9B parameters, full fine-tuning) needs about 190 GB for θ, AdamW and the
# frozen copies and is left out; pass --programs/--models to change the cells.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv_gpu}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -c constraints.txt -e ".[gpu]"
"$VENV/bin/python" -c "import jax; d = jax.devices(); print(len(d), d[0].device_kind); \
assert d[0].platform == 'gpu', 'no GPU visible to JAX'"
OUT="${OUT:-benchmarks/gpu_bench.json}"
"$VENV/bin/python" -m benchmarks.gpu_bench --size real --models sd35m --programs update,sample \
  --update_batch 4 --sample_batch 8 --remat full --repeats 3 --out "$OUT.sd35m"
"$VENV/bin/python" -m benchmarks.gpu_bench --size real --models flux-dev --programs sample \
  --sample_batch 4 --repeats 3 --out "$OUT.flux"
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
parts = [json.load(open(f"{out}.{m}")) for m in ("sd35m", "flux")]
json.dump({"meta": [p["meta"] for p in parts], "rows": [r for p in parts for r in p["rows"]]},
          open(out, "w"), indent=1)
for row in json.load(open(out))["rows"]:
    print(row)
PY
rm -f "$OUT.sd35m" "$OUT.flux"
echo "wrote $OUT"

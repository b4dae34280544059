#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs normguard_jax with its test, experiments and hf
# extras into it (hf: torch, diffusers and transformers for the parity tests of the real models), at the exact versions locked in constraints.txt (`pip install -c constraints.txt`).
# Idempotent: a second run only checks that everything is installed.
# Exits non-zero when pip fails.
# Options: --bench also installs the `bench` extra (for benchmarks/run.py; torch is in hf too).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,experiments,hf"
for arg in "$@"; do
  case "$arg" in
    --bench) EXTRAS="test,experiments,hf,bench" ;;
    *) echo "usage: scripts/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Runs pip without its noisy "WARNING: Location" lines. With pipefail the pipeline's status is
# pip's: grep -v exits 1 when it has nothing left to print, which is not an error (2 still is).
pip_quiet() {
  .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || [ $? -eq 1 ]; }
}
pip_quiet install -q --upgrade pip
pip_quiet install -q -c constraints.txt -e ".[$EXTRAS]"
.venv/bin/python -c "import normguard_jax, jax, flax, optax, orbax.checkpoint, clu, tensorflow_datasets; print('normguard_jax ready: jax', jax.__version__, 'flax', flax.__version__)"

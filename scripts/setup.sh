#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs normguard_jax with its test extras into it.
# Idempotent: a second run only checks that everything is installed.
# Options: --bench also installs the `bench` extra (PyTorch, for benchmarks/run.py).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test"
for arg in "$@"; do
  case "$arg" in
    --bench) EXTRAS="test,bench" ;;
    *) echo "usage: scripts/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import normguard_jax, jax, flax, optax, orbax.checkpoint, clu, tensorflow_datasets; print('normguard_jax ready: jax', jax.__version__, 'flax', flax.__version__)"

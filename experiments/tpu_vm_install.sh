#!/usr/bin/env bash
# Installs normguard_jax with the TPU build of JAX into <checkout>/.venv on one TPU VM worker.
#
# `experiments/tpu_vm.sh tpu-setup` runs it on every worker of a slice; it also runs by hand:
#   bash experiments/tpu_vm_install.sh
#
# - Python: the first of $PYTHON, python3.13, python3.12, python3.11, python3 that is >= 3.11
#   (JAX 0.10 needs 3.11). Ubuntu 22.04 TPU images ship 3.10: the script then stops and says
#   how to add 3.11.
# - Versions: `pip install -c constraints.txt -e ".[tpu]"`, so jax/jaxlib are the pinned
#   0.10.2 and libtpu is the release that jax pins (0.0.42.*). Nothing is upgraded beyond the
#   constraints, pip included.
# - Idempotent: an existing .venv of a suitable Python is reused, and pip then only checks.
#   A .venv of an older Python is refused (remove it and rerun).
# - Last, it checks that JAX sees TPU devices (skip with NORMGUARD_SKIP_TPU_CHECK=1, e.g. when
#   the TPU is held by another process).
# Every failure ends with one "error: ..." line on stderr and a non-zero exit code.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f setup.py && -f constraints.txt ]] \
  || fail "$(pwd) is not a normguard_jax checkout (setup.py and constraints.txt are missing)"

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

python=""
for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
  if [[ -n "${candidate}" ]] && command -v "${candidate}" >/dev/null && new_enough "${candidate}"; then
    python="${candidate}"
    break
  fi
done
[[ -n "${python}" ]] || fail "no Python >= 3.11 found (JAX 0.10 needs it). On an Ubuntu 22.04 \
TPU VM: sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 \
python3.11-venv, then rerun (or set PYTHON=/path/to/python3.11)"

if [[ -x .venv/bin/python ]]; then
  new_enough .venv/bin/python || fail "$(pwd)/.venv has $(.venv/bin/python -V 2>&1); \
normguard_jax needs >= 3.11: remove .venv and rerun"
else
  "${python}" -m venv .venv \
    || fail "'${python} -m venv' failed (on Ubuntu: sudo apt-get install -y $(basename "${python}")-venv)"
fi

.venv/bin/python -m pip install -q -c constraints.txt -e ".[tpu]" \
  || fail "pip could not install normguard_jax[tpu] with constraints.txt (see pip's message above)"

if [[ -z "${NORMGUARD_SKIP_TPU_CHECK:-}" ]]; then
  .venv/bin/python -c '
import jax
devices = jax.devices()
assert devices[0].platform == "tpu", devices
print("normguard_jax ready: jax", jax.__version__, "on", jax.local_device_count(), "local TPU devices")
' || fail "JAX installed but sees no TPU (is another process holding it? NORMGUARD_SKIP_TPU_CHECK=1 skips this check)"
fi

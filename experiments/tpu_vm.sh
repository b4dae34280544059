#!/usr/bin/env bash
# Run normguard_jax on more than one device or host.
#
# Every mode runs the SAME command on every host (one JAX process per host). Each process
# reads its own shard of every global batch, only process 0 writes logs, metrics and images,
# and every process takes part in the Orbax checkpoints. Batch sizes in the configs are GLOBAL
# and must be divisible by the total number of devices.
#
# Modes
#   tpu-setup <tpu-name> <zone>
#       Copy this checkout (git HEAD) to ~/normguard_jax on every worker of a TPU VM pod slice
#       (v4-8 ... v4-32, v5e-8 ... v5e-16, ...) and run experiments/tpu_vm_install.sh there:
#       a Python >= 3.11 venv (~/normguard_jax/.venv) with `pip install -c constraints.txt
#       -e ".[tpu]"` (the pinned jax, and the libtpu it pins). Safe to rerun.
#   tpu <tpu-name> <zone> <config.py> <workdir> [--config.x=y ...]
#       Start the run on all workers at once (gcloud ... ssh --worker=all) with that venv. JAX
#       detects the pod slice itself: --config.distributed.auto=True.
#   gpu <config.py> <workdir> [--config.x=y ...]
#       One multi-GPU node: one process sees every GPU of the node; nothing to initialise.
#   gpu-node <coordinator host:port> <num nodes> <node index> <config.py> <workdir> [...]
#       Several GPU nodes without a scheduler JAX knows: run this on each node with its index.
#       (Under SLURM, use `srun ... python -m normguard_jax.main ... --config.distributed.auto=True`.)
#   cpu-local <num processes> <devices per process> <config.py> <workdir> [...]
#       Simulate several hosts on one machine: N CPU processes with a coordinator on
#       127.0.0.1 (collectives over Gloo). This is what tests/test_multihost.py checks.
#
# The workdir must be one folder that every host sees at the same path: a bucket URL
# (gs://bucket/runs/nft; not locked against a second run), an NFS/Filestore mount or a gcsfuse
# mount. Checkpoints are written by all hosts into it, logs by process 0, and a restarted job
# resumes from the newest checkpoint.
#
# Preemption: a TPU preemption or maintenance notice (Orbax's reached_preemption) makes every
# process checkpoint the same step and exit 0; so does a SIGTERM to any process (all stop at the
# next log or checkpoint step). Rerunning the same command resumes. Spot / preemptible TPUs:
# wrap `tpu` in a retry loop.
#
# Examples
#   experiments/tpu_vm.sh tpu-setup my-v4-32 us-central2-b
#   experiments/tpu_vm.sh tpu my-v4-32 us-central2-b configs/pretrain_mnist_unet.py \
#       gs://my-bucket/pretrain_mnist_unet --config.model.dtype=bfloat16
#   experiments/tpu_vm.sh gpu configs/rl_nft.py workdir/rl_nft --config.normguard.weight=0.1
#   experiments/tpu_vm.sh cpu-local 2 4 configs/pretrain_mnist_dit.py /tmp/two_hosts \
#       --config.data.name=digits_sklearn --config.model.size=tiny --config.train.steps=20
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="normguard_jax"            # checkout location in each worker's home directory
PYTHON="${PYTHON:-python3}"

fail() { echo "error: $*" >&2; exit 1; }

# The help is this file's header comment (up to the first line that is not a comment).
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 1; }

mode="${1:-}"
[[ -n "${mode}" ]] || usage
shift

case "${mode}" in
  tpu-setup)
    [[ $# -eq 2 ]] || usage
    tpu="$1"; zone="$2"
    command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI"
    tarball="$(mktemp --suffix=.tar.gz)"
    trap 'rm -f "${tarball}"' EXIT
    git -C "${REPO_DIR}" archive --format=tar.gz -o "${tarball}" HEAD \
      || fail "git archive of ${REPO_DIR} failed (tpu-setup copies the committed HEAD)"
    gcloud compute tpus tpu-vm scp "${tarball}" "${tpu}:~/normguard_jax.tar.gz" \
      --zone="${zone}" --worker=all || fail "copying the checkout to ${tpu} (${zone}) failed"
    # Unpacked over the previous copy (a venv and workdirs inside it are kept).
    gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
      set -e
      mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/normguard_jax.tar.gz -C ~/${REMOTE_DIR}
      bash ~/${REMOTE_DIR}/experiments/tpu_vm_install.sh" \
      || fail "the install failed on at least one worker of ${tpu} (its 'error:' line is above)"
    ;;

  tpu)
    [[ $# -ge 4 ]] || usage
    tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
    command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI"
    # Same command on every worker; jax.distributed.initialize() finds the slice's topology.
    remote_args="$(printf ' %q' --config="${config}" --workdir="${workdir}" \
      --config.distributed.auto=True "$@")"
    gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all --command="
      cd ~/${REMOTE_DIR} && [ -x .venv/bin/python ] || { echo 'error: no ~/${REMOTE_DIR}/.venv: run tpu-setup first' >&2; exit 1; }
      .venv/bin/python -m normguard_jax.main${remote_args}"
    ;;

  gpu)
    [[ $# -ge 2 ]] || usage
    config="$1"; workdir="$2"; shift 2
    cd "${REPO_DIR}"
    exec "${PYTHON}" -m normguard_jax.main --config="${config}" --workdir="${workdir}" "$@"
    ;;

  gpu-node)
    [[ $# -ge 5 ]] || usage
    coordinator="$1"; nodes="$2"; index="$3"; config="$4"; workdir="$5"; shift 5
    cd "${REPO_DIR}"
    exec "${PYTHON}" -m normguard_jax.main --config="${config}" --workdir="${workdir}" \
      --config.distributed.coordinator_address="${coordinator}" \
      --config.distributed.num_processes="${nodes}" \
      --config.distributed.process_id="${index}" "$@"
    ;;

  cpu-local)
    [[ $# -ge 4 ]] || usage
    nprocs="$1"; ndev="$2"; config="$3"; workdir="$4"; shift 4
    port="$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cd "${REPO_DIR}"
    pids=()
    for ((i = 0; i < nprocs; i++)); do
      JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${ndev}" \
        "${PYTHON}" -m normguard_jax.main --config="${config}" --workdir="${workdir}" \
        --config.distributed.coordinator_address="127.0.0.1:${port}" \
        --config.distributed.num_processes="${nprocs}" \
        --config.distributed.process_id="${i}" "$@" &
      pids+=("$!")
    done
    status=0
    for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
    exit "${status}"
    ;;

  *)
    usage
    ;;
esac

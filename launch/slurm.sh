#!/usr/bin/env bash
# Submits launch/slurm.sbatch: lmssl on N SLURM nodes, one process per node using all of its
# GPUs. See launch/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
LAUNCH_NAME=slurm.sh
DRY_RUN=0
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
usage: launch/slurm.sh --nodes N --gpus-per-node G --config FILE[:ARGS] --workdir DIR
                       [--partition P] [--time T] [--account A] [--job-name NAME]
                       [--sbatch-arg ARG]... [--dry-run] [-- LMSSL_ARGS...]

Submits launch/slurm.sbatch with sbatch from the current directory (the job's output goes
to ./lmssl-JOBID.out). Each node runs one python -m lmssl.main --distributed process that
uses all of its GPUs (lmssl passes them to jax.distributed.initialize), in bfloat16. The job
is requeued after a preemption and resumes from the workdir's latest checkpoint.

Options:
  --nodes N             nodes (hosts) to train on
  --gpus-per-node G     GPUs per node, e.g. 8
  --config FILE[:ARGS]  e.g. configs/mlm_base.py:size=base (relative to the current
                        directory or the repository root)
  --workdir DIR         an absolute path on a filesystem every node mounts, or gs://...
  --partition P         SLURM partition
  --time T              time limit, e.g. 48:00:00 or 2-00:00:00 (default 24:00:00)
  --account A           account to charge
  --job-name NAME       default lmssl
  --sbatch-arg ARG      one more sbatch option, verbatim (repeatable), e.g. --sbatch-arg=--qos=high
  --dry-run             print the sbatch command instead of running it
  -h, --help            this message
  -- LMSSL_ARGS...      passed to lmssl.main verbatim (--config.KEY=VALUE ...)

Environment: sbatch passes yours to the job, so activate the environment that has lmssl and
JAX's CUDA build installed before submitting, or set LMSSL_PYTHON to its python. The build:
pip install -U "jax[cuda13]" (NVIDIA driver 580 or newer on the nodes), or "jax[cuda12]" with
an older driver.
EOF
}

NODES='' GPUS_PER_NODE='' CONFIG='' WORKDIR='' PARTITION='' TIME='' ACCOUNT='' JOB_NAME=''
SBATCH_ARGS=() EXTRA=()

parse_args() {
  while (($#)); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --nodes) need_value "$@"; NODES=$2; shift ;;
      --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$2; shift ;;
      --config) need_value "$@"; CONFIG=$2; shift ;;
      --workdir) need_value "$@"; WORKDIR=$2; shift ;;
      --partition) need_value "$@"; PARTITION=$2; shift ;;
      --time) need_value "$@"; TIME=$2; shift ;;
      --account) need_value "$@"; ACCOUNT=$2; shift ;;
      --job-name) need_value "$@"; JOB_NAME=$2; shift ;;
      --sbatch-arg)  # its value is itself an option, so need_value's "--" check does not apply
        [[ $# -ge 2 && -n $2 ]] || die "--sbatch-arg needs a value"
        SBATCH_ARGS+=("$2"); shift ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      -*) die "unknown option $1 (see launch/slurm.sh --help)" ;;
      *) die "unexpected argument '$1'; lmssl arguments go after -- (see launch/slurm.sh --help)" ;;
    esac
    shift
  done
}

check_args() {
  need_arg "$NODES" --nodes 2
  need_int --nodes "$NODES" 1
  need_arg "$GPUS_PER_NODE" --gpus-per-node 8
  need_int --gpus-per-node "$GPUS_PER_NODE" 1
  need_arg "$CONFIG" --config configs/mlm_base.py:size=base
  CONFIG=$(resolve_config "$CONFIG" "$REPO")
  need_arg "$WORKDIR" --workdir /shared/runs/mlm_base
  [[ $WORKDIR == /* || $WORKDIR == gs://* ]] ||
    die "--workdir must be an absolute path on a filesystem every node mounts, or gs://...;" \
      "got '$WORKDIR'"
  if [[ $WORKDIR == /tmp/* ]]; then
    note "warning: $WORKDIR is usually local to each node; every node must see the same checkpoints"
  fi
  [[ -z $TIME || $TIME =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] ||
    die "--time must be a SLURM time limit such as 48:00:00 or 2-00:00:00; got '$TIME'"
}

main() {
  parse_args "$@"
  check_args
  need_tool sbatch "run this on a SLURM login node (https://slurm.schedmd.com)"
  local opts=(--nodes="$NODES" --gpus-per-node="$GPUS_PER_NODE")
  if [[ -n $PARTITION ]]; then opts+=(--partition="$PARTITION"); fi
  if [[ -n $TIME ]]; then opts+=(--time="$TIME"); fi
  if [[ -n $ACCOUNT ]]; then opts+=(--account="$ACCOUNT"); fi
  if [[ -n $JOB_NAME ]]; then opts+=(--job-name="$JOB_NAME"); fi
  local job=(--config "$CONFIG" --workdir "$WORKDIR")
  if ((${#EXTRA[@]})); then job+=(-- "${EXTRA[@]}"); fi
  run sbatch "${opts[@]}" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"} "$HERE/slurm.sbatch" "${job[@]}"
}

main "$@"

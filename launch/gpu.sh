#!/usr/bin/env bash
# lmssl on one GPU host: one process that uses every local GPU (or those --gpus names), in
# bfloat16. See launch/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
LAUNCH_NAME=gpu.sh
DRY_RUN=0
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

PYTHON=${LMSSL_PYTHON:-python}

usage() {
  cat <<'EOF'
usage: launch/gpu.sh --config FILE[:ARGS] --workdir DIR [--gpus LIST] [--dry-run] [-- LMSSL_ARGS...]

Trains with python -m lmssl.main on this host's GPUs, adding --config.model.dtype=bfloat16.
Rerunning the same command resumes from the workdir's latest checkpoint.

Options:
  --config FILE[:ARGS]  e.g. configs/mlm_base.py:size=base (relative to the current
                        directory or the repository root)
  --workdir DIR         checkpoints and metrics: a local path or gs://bucket/path
  --gpus LIST           only these GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES); default all
  --dry-run             print the commands instead of running them
  -h, --help            this message
  -- LMSSL_ARGS...      passed to lmssl.main verbatim, after the bfloat16 setting (so
                        --config.model.dtype=float32 there overrides it)

Environment: LMSSL_PYTHON, the Python that has lmssl and JAX's CUDA build installed (default:
python on PATH): pip install -U "jax[cuda13]" (NVIDIA driver 580 or newer), or "jax[cuda12]"
with an older driver.
EOF
}

CONFIG='' WORKDIR='' GPUS=''
EXTRA=()

parse_args() {
  while (($#)); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --config) need_value "$@"; CONFIG=$2; shift ;;
      --workdir) need_value "$@"; WORKDIR=$2; shift ;;
      --gpus) need_value "$@"; GPUS=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      -*) die "unknown option $1 (see launch/gpu.sh --help)" ;;
      *) die "unexpected argument '$1'; lmssl arguments go after -- (see launch/gpu.sh --help)" ;;
    esac
    shift
  done
  need_arg "$CONFIG" --config configs/mlm_base.py:size=base
  need_arg "$WORKDIR" --workdir /data/runs/mlm_base
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "--gpus must be GPU indices separated by commas, e.g. 0,1; got '$GPUS'"
  CONFIG=$(resolve_config "$CONFIG" "$REPO")
}

# A CPU-only jaxlib would train, very slowly, without a word: catch it before the run.
check_jax_gpu() {
  "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' ||
    fail "JAX in $PYTHON sees no GPU; install its CUDA build: pip install -U \"jax[cuda13]\"" \
      "(NVIDIA driver 580 or newer; nvidia-smi shows it), or \"jax[cuda12]\" with an older driver"
}

main() {
  parse_args "$@"
  need_tool nvidia-smi "install the NVIDIA driver (https://www.nvidia.com/drivers)"
  need_tool "$PYTHON" "activate the environment with lmssl installed (pip install -e .) or set LMSSL_PYTHON"
  local env=() which=()
  if [[ -n $GPUS ]]; then
    env=(env CUDA_VISIBLE_DEVICES="$GPUS")
    which=(--id="$GPUS")
    export CUDA_VISIBLE_DEVICES=$GPUS
  fi
  run nvidia-smi ${which[@]+"${which[@]}"} --query-gpu=index,name,memory.total --format=csv,noheader
  if ((!DRY_RUN)); then check_jax_gpu; fi
  run ${env[@]+"${env[@]}"} "$PYTHON" -m lmssl.main --config "$CONFIG" --workdir "$WORKDIR" \
    --config.model.dtype=bfloat16 ${EXTRA[@]+"${EXTRA[@]}"}
}

main "$@"

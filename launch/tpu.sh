#!/usr/bin/env bash
# lmssl on Cloud TPU VM pod slices: create a slice (directly or as a queued resource), copy the
# project to every worker, train with one process per worker, follow the log, stop, delete,
# and keep a spot run going across preemptions. With --num-slices N > 1, a queued resource
# holds N slices (Multislice) trained as one job. See launch/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
LAUNCH_NAME=tpu.sh
DRY_RUN=0
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

# On each worker, relative to the home directory: the unpacked project, the training log, the
# lock a trainer holds while it runs, and the virtual environment setup makes.
REMOTE_DIR=lmssl
# shellcheck disable=SC2088  # the worker's shell expands these
REMOTE_LOG='~/lmssl.log' REMOTE_LOCK='~/lmssl.lock' REMOTE_VENV='~/lmssl-venv'
REMOTE_PYTHON=$REMOTE_VENV/bin/python
# The venv's Python: the images' own python3 is too old for jax (Ubuntu 22.04 has 3.10; jax 0.10
# needs 3.11, and 3.12 leaves room for releases that raise the floor again). uv fetches this
# version when the image lacks it.
PYTHON_VERSION=3.12
# pkill/pgrep pattern for the trainer; "[.]" keeps it from matching the shell running pkill.
TRAIN_PATTERN='lmssl-venv/bin/python -m lmssl[.]main'
# The status a worker answers when a trainer is already running there (EX_TEMPFAIL).
ALREADY_RUNNING=75
# Fail a connection attempt after 30 s (gcloud retries it) instead of hanging; and notice a
# preempted worker, which can vanish without closing its connection, within ~5 minutes.
SSH_FLAGS=(--ssh-flag=-oConnectTimeout=30 --ssh-flag=-oServerAliveInterval=60
           --ssh-flag=-oServerAliveCountMax=5)
# A failed describe that is not NOT_FOUND (network, credentials, a server error) says nothing
# about the resource: it is tried again, this many times in all, DESCRIBE_WAIT s apart (or
# --poll s, when less), before the script gives up.
DESCRIBE_TRIES=5 DESCRIBE_WAIT=30

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND --name NAME --zone ZONE [options] [-- LMSSL_ARGS...]

Commands:
  create     create a TPU VM slice (gcloud compute tpus tpu-vm create; one slice only)
  queued     request a slice (or --num-slices N) as a queued resource and wait until it is
             ACTIVE
  setup      copy the committed project (git HEAD) to every worker and install it there, with
             jax[tpu], into a Python 3.12 virtual environment ~/lmssl-venv (made with uv)
  run        train on every worker: ~/lmssl-venv/bin/python -m lmssl.main --distributed ...
             (output streams here and is appended to ~/lmssl.log on each worker; --detach
             returns at once). A worker where a trainer is already running refuses to start
             another
  logs       follow ~/lmssl.log on one worker (default worker 0, which prints the progress)
  stop       stop the training processes on every worker
  delete     delete the slice (with --queued or --num-slices N > 1: the queued resource and
             its slices)
  resilient  queued resource + setup + run, recreating the slice and running again after a
             preemption until training exits 0 (resumes from the workdir's latest checkpoint)

Options:
  --name NAME              TPU (and queued resource) name, e.g. lmssl-v5e
  --zone ZONE              e.g. us-west4-a
  --project PROJECT        default: gcloud's configured project
  --accelerator-type TYPE  create/queued/resilient, e.g. v5litepod-16, v4-32, v6e-16
  --version VERSION        TPU software version; default from the type: v6e v2-alpha-tpuv6e,
                           v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
  --spot                   create/queued/resilient: spot capacity (cheaper, preemptible)
  --config FILE[:ARGS]     run/resilient, relative to the repository root,
                           e.g. configs/mlm_base.py:size=base
  --workdir gs://B/PATH    run/resilient: checkpoints and metrics; must be gs://
  --allow-local-workdir    run: accept a workdir on the workers' own disks (single-host
                           slices only: every process must see the same checkpoints)
  --detach                 run: start training in the background and return
  --num-slices N           Multislice: N slices of --accelerator-type (v4 or later) as one
                           queued resource, nodes NAME-0 ... NAME-(N-1) (default 1). Give the
                           same N to queued/resilient and to setup, run, logs, stop and delete
                           for that name; create refuses N > 1
  --worker N               logs: which worker's log (default 0; of the first slice, NAME-0,
                           with --num-slices N > 1)
  --queued                 delete: the slice was made by `queued` or `resilient`
  --max-restarts N         resilient: restarts after preemptions before giving up (default 10)
  --poll SECONDS           queued/resilient: seconds between state checks (default 60)
  --dry-run                print the commands (one pass for resilient) instead of running them
  -h, --help               this message
  -- LMSSL_ARGS...         run/resilient: passed to lmssl.main verbatim (--config.KEY=VALUE)
EOF
}

NAME='' ZONE='' PROJECT='' ACCEL='' VERSION='' SPOT=0 CONFIG='' WORKDIR=''
ALLOW_LOCAL=0 DETACH=0 WORKER=0 QUEUED=0 MAX_RESTARTS=10 POLL=60 NUM_SLICES=1
EXTRA=()

parse_args() {
  while (($#)); do
    case $1 in
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --name) need_value "$@"; NAME=$2; shift ;;
      --zone) need_value "$@"; ZONE=$2; shift ;;
      --project) need_value "$@"; PROJECT=$2; shift ;;
      --accelerator-type) need_value "$@"; ACCEL=$2; shift ;;
      --version) need_value "$@"; VERSION=$2; shift ;;
      --spot) SPOT=1 ;;
      --config) need_value "$@"; CONFIG=$2; shift ;;
      --workdir) need_value "$@"; WORKDIR=$2; shift ;;
      --allow-local-workdir) ALLOW_LOCAL=1 ;;
      --detach) DETACH=1 ;;
      --worker) need_value "$@"; need_int --worker "$2" 0; WORKER=$2; shift ;;
      --queued) QUEUED=1 ;;
      --num-slices)
        need_value "$@"; need_int --num-slices "$2" 1; NUM_SLICES=$((10#$2)); shift ;;
      --max-restarts) need_value "$@"; need_int --max-restarts "$2" 0; MAX_RESTARTS=$2; shift ;;
      --poll) need_value "$@"; need_int --poll "$2" 0; POLL=$2; shift ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      -*) die "unknown option $1 (see launch/tpu.sh --help)" ;;
      *) die "unexpected argument '$1'; lmssl arguments go after -- (see launch/tpu.sh --help)" ;;
    esac
    shift
  done
}

check_args() {  # COMMAND
  need_arg "$NAME" --name lmssl-v5e
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
  need_arg "$ZONE" --zone us-west4-a
  LOC=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project="$PROJECT"); fi
  case $1 in
    create | queued | resilient)
      need_arg "$ACCEL" --accelerator-type v5litepod-16
      [[ $ACCEL =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
        die "--accelerator-type '$ACCEL' is not a TPU type such as v5litepod-16, v4-32 or v6e-8"
      if [[ -z $VERSION ]]; then VERSION=$(default_version "$ACCEL"); fi ;;
  esac
  if [[ $1 == create ]] && ((NUM_SLICES > 1)); then
    die "multislice needs queued resources: use \`queued\` or \`resilient\` with --num-slices"
  fi
  if [[ -n $ACCEL && $ACCEL =~ ^v[23]- ]] && ((NUM_SLICES > 1)); then
    die "--num-slices $NUM_SLICES needs a TPU generation with Multislice (v4 or later), but" \
      "--accelerator-type $ACCEL is a ${ACCEL%%-*}: drop --num-slices or use a v4/v5e/v5p/v6e type"
  fi
  case $1 in
    run | resilient)
      need_arg "$CONFIG" --config configs/mlm_base.py:size=base
      [[ -f $REPO/${CONFIG%%:*} ]] ||
        die "--config file ${CONFIG%%:*} not found in $REPO (give it relative to the" \
          "repository root, which setup copies to the workers)"
      need_arg "$WORKDIR" --workdir gs://my-bucket/lmssl/run1
      if [[ $WORKDIR != gs://* ]]; then
        if [[ $1 == resilient ]]; then
          die "--workdir must be gs://... for resilient: a recreated slice has fresh disks," \
            "and training resumes from the checkpoints in the workdir"
        elif multislice; then
          die "--workdir must be gs://... with --num-slices $NUM_SLICES: the slices are" \
            "separate hosts, and every process must read and write the same checkpoints"
        elif ((!ALLOW_LOCAL)); then
          die "--workdir must be gs://... (got '$WORKDIR'): every worker must read and write" \
            "the same checkpoints, which a path on the workers' own disks does not give;" \
            "--allow-local-workdir overrides this for single-host slices"
        fi
      fi ;;
    *)
      ((${#EXTRA[@]} == 0)) || die "arguments after -- are for run and resilient only" ;;
  esac
  if [[ $1 == resilient ]] && ((DETACH)); then
    die "--detach does not go with resilient, which watches the run to restart it"
  fi
}

default_version() {  # ACCELERATOR_TYPE
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

spot_flag() { if ((SPOT)); then echo --spot; fi; }

multislice() { ((NUM_SLICES > 1)); }

# The TPU nodes (slices) of NAME: NAME itself, or NAME-0 ... NAME-(N-1) for a multislice
# queued resource, which names its nodes after --node-prefix.
node_names() {
  if multislice; then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do echo "$NAME-$i"; done
  else
    echo "$NAME"
  fi
}

# WORKER is "all" (every worker of every slice) or one index (of the first slice). A multislice
# queued resource is reached through queued-resources ssh, which fans out over its nodes in
# batches (64 workers by default, each batch run to its end before the next starts);
# --batch-size=all makes it one batch, so every worker starts at once, as training needs.
tpu_ssh() {  # WORKER REMOTE-COMMAND
  if ! multislice; then
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" "${SSH_FLAGS[@]}" \
      --command="$2"
  elif [[ $1 == all ]]; then
    run gcloud compute tpus queued-resources ssh "$NAME" "${LOC[@]}" --node=all --worker=all \
      --batch-size=all "${SSH_FLAGS[@]}" --command="$2"
  else
    run gcloud compute tpus queued-resources ssh "$NAME" "${LOC[@]}" --node=0 --worker="$1" \
      "${SSH_FLAGS[@]}" --command="$2"
  fi
}

tpu_scp_all() {  # LOCAL-FILE REMOTE-PATH: to every worker (of every slice)
  if multislice; then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" "${LOC[@]}" --node=all \
      --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${LOC[@]}" --worker=all
  fi
}

# What `gcloud compute tpus ... describe` prints for a resource (its state), or MISSING when
# gcloud answers NOT_FOUND. Any other failure is retried DESCRIBE_TRIES times in all, then
# ends the script: reading it as MISSING would have the caller create what already exists.
describe() {  # GCLOUD-ARGUMENTS...
  local errors out try wait=$((POLL < DESCRIBE_WAIT ? POLL : DESCRIBE_WAIT))
  errors=$(mktemp)
  for ((try = 1; ; try++)); do
    if out=$(gcloud "$@" 2>"$errors"); then
      rm -f "$errors"
      printf '%s\n' "$out"
      return 0
    fi
    if grep -q NOT_FOUND "$errors"; then
      rm -f "$errors"
      echo MISSING
      return 0
    fi
    if ((try >= DESCRIBE_TRIES)); then
      out=$(grep -v '^ *$' "$errors" | tail -n 1)
      rm -f "$errors"
      fail "gcloud ${*:1:5} failed $try times (${out:-no message}); check" \
        "the network and \`gcloud auth list\`, then run the same command again"
    fi
    note "gcloud ${*:1:5} failed (try $try of $DESCRIBE_TRIES):" \
      "$(grep -v '^ *$' "$errors" | tail -n 1); trying again in ${wait}s"
    sleep "$wait"
  done
}

# States from gcloud; MISSING when the resource does not exist.
qr_state() {
  describe compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
    --format='value(state.state)'
}

# READY when every node (slice) is READY; else the first other state, after the node's name
# when there are several.
node_state() {
  local node state
  for node in $(node_names); do
    state=$(describe compute tpus tpu-vm describe "$node" "${LOC[@]}" --format='value(state)') ||
      exit
    if [[ $state != READY ]]; then
      if multislice; then echo "$node ${state:-MISSING}"; else echo "${state:-MISSING}"; fi
      return 0
    fi
  done
  echo READY
}

create() {
  # shellcheck disable=SC2046  # spot_flag is one word or nothing
  run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
    --version="$VERSION" $(spot_flag)
}

create_queued() {
  local nodes=(--node-id="$NAME")
  if multislice; then nodes=(--node-count="$NUM_SLICES" --node-prefix="$NAME"); fi
  # shellcheck disable=SC2046
  run gcloud compute tpus queued-resources create "$NAME" "${nodes[@]}" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --runtime-version="$VERSION" $(spot_flag)
}

wait_active() {
  if ((DRY_RUN)); then
    run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
      --format='value(state.state)'
    return
  fi
  local state
  while state=$(qr_state) || exit; [[ $state != ACTIVE ]]; do
    case $state in
      FAILED | SUSPENDING | SUSPENDED | DELETING | MISSING)
        fail "queued resource $NAME is $state; details:" \
          "gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" ;;
    esac
    note "queued resource $NAME is $state; checking again in ${POLL}s"
    sleep "$POLL"
  done
  note "queued resource $NAME is ACTIVE"
}

setup() {
  local tarball=${TMPDIR:-/tmp}/lmssl-$NAME.tar.gz
  if [[ -e $REPO/.git ]]; then
    if ((!DRY_RUN)) && [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
      note "warning: uncommitted changes are not copied; setup ships the last commit (HEAD)"
    fi
    run git -C "$REPO" archive --format=tar.gz --output="$tarball" HEAD
  else
    run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=__pycache__ .
  fi
  tpu_scp_all "$tarball" "$REMOTE_DIR.tar.gz"
  run rm -f "$tarball"
  local unpack="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  # uv (installed for the user with the image's pip) makes the venv, fetching a Python
  # $PYTHON_VERSION build when the image has none, and installs into it.
  local venv="python3 -m pip install -q --user -U uv && python3 -m uv venv -q --clear"
  venv+=" --python $PYTHON_VERSION $REMOTE_VENV"
  local install="python3 -m uv pip install -q --python $REMOTE_PYTHON -e . 'jax[tpu]'"
  tpu_ssh all "$unpack && cd $REMOTE_DIR && $venv && $install"
}

# The trainer starts only while it can take the worker's lock, which it (and tee) then hold
# until they exit; where it is taken, the worker says so and exits $ALREADY_RUNNING. gcloud
# runs the whole command again when the connection fails (ssh status 255), so a retry must
# not start a second trainer, and the log is appended to, never truncated.
train() {
  local cmd
  cmd="$REMOTE_PYTHON $(quote_all -m lmssl.main --distributed --config "$CONFIG" \
    --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
  local lock="exec 9>> $REMOTE_LOCK; flock -n 9 || { echo \"lmssl: not starting: a trainer"
  lock+=" is already running on \$(hostname) (it holds $REMOTE_LOCK); follow it with"
  lock+=" launch/tpu.sh logs, or end it with launch/tpu.sh stop first\" >&2;"
  lock+=" exit $ALREADY_RUNNING; }"
  if ((DETACH)); then
    tpu_ssh all "$lock; cd $REMOTE_DIR && nohup $cmd >> $REMOTE_LOG 2>&1 < /dev/null &"
  else
    tpu_ssh all "set -o pipefail; $lock; cd $REMOTE_DIR && $cmd 2>&1 | tee -a $REMOTE_LOG"
  fi
}

stop_training() {
  local p=$TRAIN_PATTERN
  # SIGTERM, up to 30 s to exit, then SIGKILL for any process stuck in a collective.
  local until_gone="for i in 1 2 3 4 5 6 7 8 9 10; do pgrep -f '$p' > /dev/null || break; sleep 3; done"
  tpu_ssh all "pkill -f '$p' || true; $until_gone; pkill -9 -f '$p' || true"
}

delete() {
  local qr=MISSING
  if ((!QUEUED && !DRY_RUN)) && ! multislice; then qr=$(qr_state) || exit; fi
  if ((QUEUED)) || multislice || [[ $qr != MISSING ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

RESTARTS=0
CREATED=0

count_restart() {  # WHY
  ((RESTARTS < MAX_RESTARTS)) || fail "$1; giving up after $MAX_RESTARTS restarts (--max-restarts)"
  RESTARTS=$((RESTARTS + 1))
  note "$1; restart $RESTARTS of $MAX_RESTARTS"
}

# Until the queued resource is ACTIVE with every node READY (each slice, for multislice):
# create it when missing, recreate it when preempted or failed, wait while it is queued or
# provisioning.
ensure_active() {
  if ((DRY_RUN)); then
    create_queued
    wait_active
    return
  fi
  local qr node
  while true; do
    qr=$(qr_state) || exit
    node=-
    if [[ $qr == ACTIVE ]]; then node=$(node_state) || exit; fi
    case $qr in
      ACTIVE) [[ $node == READY ]] && return 0
              delete ;;
      FAILED | SUSPENDING | SUSPENDED) delete ;;
      MISSING) ;;
      *) note "queued resource $NAME is $qr; checking again in ${POLL}s"
         sleep "$POLL"
         continue ;;
    esac
    if ((CREATED)); then
      count_restart "queued resource $NAME is $qr (node $node): recreating it"
    fi
    CREATED=1
    create_queued
  done
}

resilient() {
  QUEUED=1
  local rc qr node
  while true; do
    ensure_active
    # A subshell with -e of its own: a failed setup or run ends the attempt, not the loop.
    set +e
    (set -e; setup; train)
    rc=$?
    set -e
    if ((DRY_RUN)); then return 0; fi
    if ((rc == 0)); then
      note "training finished; delete the slice with:" \
        "launch/tpu.sh delete --queued --name $NAME --zone $ZONE"
      return 0
    fi
    note "the run ended with status $rc; checking the slice in ${POLL}s"
    sleep "$POLL"
    qr=$(qr_state) || exit
    node=$(node_state) || exit
    if [[ $qr == ACTIVE && $node == READY ]]; then
      # 255: ssh lost the connection. ALREADY_RUNNING: gcloud's retry of a dropped connection
      # found the first trainer still there, cut off from this terminal. Either way, stop what
      # is left and start again.
      ((rc == 255 || rc == ALREADY_RUNNING)) || fail "training exited with status $rc on a" \
        "healthy slice, so it was not preempted; fix the cause and rerun this command" \
        "(training resumes from the latest checkpoint in $WORKDIR)"
      count_restart "lost the connection to a healthy slice: running again"
      stop_training || note "could not reach every worker to stop leftover processes"
    fi  # else ensure_active recreates the slice and counts the restart
  done
}

main() {
  if (($# == 0)); then usage >&2; exit 2; fi
  local command=$1
  case $command in
    -h | --help) usage; exit 0 ;;
    create | queued | setup | run | logs | stop | delete | resilient) shift ;;
    *) die "unknown command '$command' (one of create, queued, setup, run, logs, stop," \
         "delete, resilient)" ;;
  esac
  parse_args "$@"
  check_args "$command"
  need_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  if [[ ($command == setup || $command == resilient) && -e $REPO/.git ]]; then
    need_tool git "install git (setup packs the project with git archive)"
  fi
  case $command in
    create) create ;;
    queued) create_queued; wait_active ;;
    setup) setup ;;
    run) train ;;
    logs) tpu_ssh "$WORKER" "tail -n +1 -F $REMOTE_LOG" ;;
    stop) stop_training ;;
    delete) delete ;;
    resilient) resilient ;;
  esac
}

main "$@"

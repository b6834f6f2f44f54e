# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): errors, dry-run and argument checks.
# The sourcing script sets LAUNCH_NAME (its file name) and DRY_RUN=0|1.

die() {  # a usage error: the caller asked for something that cannot work
  printf 'launch/%s: error: %s\n' "$LAUNCH_NAME" "$*" >&2
  exit 2
}

fail() {  # a runtime failure (a cloud call, the run itself)
  printf 'launch/%s: error: %s\n' "$LAUNCH_NAME" "$*" >&2
  exit 1
}

note() { printf 'launch/%s: %s\n' "$LAUNCH_NAME" "$*" >&2; }

# One argument as shell input: bare when plainly safe, in double quotes when it holds single
# quotes but nothing special to double quotes, else in single quotes. The result is what `run`
# prints and what remote commands are built from: it reads back as the same one argument in
# any POSIX shell (and with Python's shlex.split).
quote() {
  local safe='^[A-Za-z0-9_./:=,@%+-]+$' special='["$`\\!]'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 == *\'* && ! $1 =~ $special ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the arguments quoted and joined by spaces
  local first=1 arg
  for arg in "$@"; do
    ((first)) || printf ' '
    quote "$arg"
    first=0
  done
}

# Executes a command, or in dry-run prints it as one shell-quoted line after "+ ".
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

need_tool() {  # NAME HOW-TO-GET-IT
  ((DRY_RUN)) && return 0
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH; $2, or use --dry-run"
}

need_arg() {  # VALUE FLAG EXAMPLE
  [[ -n $1 ]] || die "missing $2 (for example: $2 $3)"
}

need_value() {  # the option being parsed and everything after it on the command line
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

need_int() {  # FLAG VALUE MIN
  if [[ ! $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
    die "$1 must be an integer of at least $3, got '$2'"
  fi
}

# A config argument FILE[:variants] whose file exists: as given when it does (relative to
# the current directory), else inside the repository. Prints the form to use.
resolve_config() {  # CONFIG REPO
  local file=${1%%:*}
  if [[ -f $file ]]; then
    printf '%s' "$1"
  elif [[ $file != /* && -f $2/$file ]]; then
    printf '%s/%s' "$2" "$1"
  else
    die "--config file $file not found (paths are relative to the current directory or" \
      "the repository root, e.g. configs/mlm_base.py:size=base)"
  fi
}

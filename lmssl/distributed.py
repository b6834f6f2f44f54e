"""Joining JAX's multi-controller runtime: one process per host, all running the same command.

Three ways in, tried in this order:
  1. --coordinator HOST:PORT --num_processes N --process_id I (flags, or the environment's
     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): GPU clusters without a
     scheduler JAX knows, and several processes on one machine;
  2. --distributed: `jax.distributed.initialize()` finds its peers itself on Cloud TPU VMs,
     SLURM and Open MPI (under SLURM with one task per node, lmssl gives each process all of
     its node's GPUs: see `slurm_local_device_ids`);
  3. neither: a single process, which needs nothing.
Must run before anything touches a JAX device.
"""

import os
import re

import jax
import numpy as np

from lmssl import errors

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
FLAGS = ("--coordinator", "--num_processes", "--process_id")


def settings(coordinator=None, num_processes=None, process_id=None, environ=None):
  """(coordinator, num_processes, process_id), flags first, then the environment; each may be
  None. Values are checked here, so a typo fails before any process waits on another."""
  environ = os.environ if environ is None else environ
  given = [coordinator, num_processes, process_id]
  for i, (name, flag) in enumerate(zip(ENV, FLAGS)):
    if given[i] is None and environ.get(name, "") != "":
      given[i] = environ[name]
      if i:
        try:
          given[i] = int(given[i])
        except ValueError:
          raise errors.UserError(f"{name}={environ[name]!r} is not an integer; set it to the "
                                 f"number {flag} takes, or unset it") from None
  coordinator, num_processes, process_id = given
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise errors.UserError(f"coordinator {coordinator!r} is not HOST:PORT; give process 0's "
                             "address and a free port, e.g. --coordinator=10.0.0.2:8476")
  if num_processes is not None and num_processes < 1:
    raise errors.UserError(f"num_processes {num_processes} must be at least 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise errors.UserError(f"process_id {process_id} is outside [0, {num_processes}); number "
                           f"the processes 0..{num_processes - 1}")
  return coordinator, num_processes, process_id


def _tasks_per_node(value: str) -> list[int] | None:
  """SLURM's compressed per-node task counts, e.g. "2(x3),1" -> [2, 2, 2, 1]; None if malformed."""
  counts = []
  for part in value.split(","):
    match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not match:
      return None
    counts += [int(match[1])] * int(match[2] or 1)
  return counts


def _tasks_on_this_node(environ) -> int | None:
  """How many tasks of this job step run on this node, from SLURM's environment, or None."""
  node = environ.get("SLURM_NODEID", "0")
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    counts = _tasks_per_node(environ.get(name, ""))
    if counts and node.isdigit() and int(node) < len(counts):
      return counts[int(node)]
  per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
  return int(per_node) if per_node.isdigit() else None


def _gpus_on_this_node(environ) -> int:
  """The GPUs this process can see: CUDA_VISIBLE_DEVICES's entries (SLURM sets it for the
  GPUs it allocates), else SLURM_GPUS_ON_NODE; 0 if neither says."""
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    entries = [e for e in visible.split(",") if e.strip()]
    return 0 if entries == ["NoDevFiles"] else len(entries)
  on_node = environ.get("SLURM_GPUS_ON_NODE", "")
  return int(on_node) if on_node.isdigit() else 0


# What JAX's SLURM detection needs (jax/_src/clusters/slurm_cluster.py): with all of these set,
# jax.distributed.initialize() takes the processes from SLURM.
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_local_device_ids(environ=None) -> list[int] | None:
  """The local GPUs this process should drive, as jax.distributed.initialize's
  `local_device_ids`, or None to leave JAX's choice.

  Under SLURM, JAX assumes one process per GPU and, given no ids, limits each process to the
  GPU numbered SLURM_LOCALID: with one task per node (launch/slurm.sbatch), that is GPU 0 of
  every node and the node's other GPUs idle. So with one task on this node this returns every
  GPU the process can see, 0..N-1 (CUDA's numbering, after CUDA_VISIBLE_DEVICES). None when not
  under SLURM, when several tasks share the node (one GPU each, as JAX assumes), when no GPU
  count is known (e.g. a CPU job), or when JAX_LOCAL_DEVICE_IDS is set (JAX reads it itself)."""
  environ = os.environ if environ is None else environ
  if not all(name in environ for name in SLURM) or environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  if _tasks_on_this_node(environ) != 1:
    return None
  gpus = _gpus_on_this_node(environ)
  return list(range(gpus)) if gpus else None


def initialize(coordinator=None, num_processes=None, process_id=None, auto: bool = False):
  """Joins the other processes as `settings` and `auto` (--distributed) say."""
  given = settings(coordinator, num_processes, process_id)
  if all(v is None for v in given) and not auto:
    return
  if any(v is None for v in given) and not auto:
    missing = [flag for flag, v in zip(FLAGS, given) if v is None]
    raise errors.UserError(
        f"a multi-process run needs all of {', '.join(FLAGS)} (or {', '.join(ENV)}); "
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. On Cloud TPU VMs "
        "and SLURM use --distributed instead, which finds them itself")
  # Cross-process collectives between CPU devices (tests, CPU clusters); accelerators use
  # their own interconnect whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  coordinator, num_processes, process_id = given
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=slurm_local_device_ids())
  except (RuntimeError, ValueError) as e:
    where = (f"coordinator {coordinator} as process {process_id} of {num_processes}"
             if coordinator else "the cluster JAX detects (--distributed)")
    raise errors.UserError(
        f"could not join {where}: {e}. Check that every process runs the same command with "
        "the same coordinator, that process 0 is running and its port is reachable") from e


def process_0_first(fn, what: str):
  """fn() on process 0, then, once it has succeeded, on the others. For work that writes
  files the others then find (a tokenizer trained into the workdir, the prepared-data cache)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # the others must hear of it before process 0 exits
      error = e
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise errors.UserError(f"process 0 could not {what}; its own error says why")
  return fn() if jax.process_index() else result


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def every_process(fn, what: str):
  """fn() on every process at once; then, if any failed, every process stops: a failed one with
  its own error, the others naming the first that failed. For work split between processes."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result, error = None, None
  try:
    result = fn()
  except Exception as e:  # the others must hear of it before this process exits
    error = e
  ok = np.asarray(multihost_utils.process_allgather(np.int32(error is None))).reshape(-1)
  if error is not None:
    raise error
  if not ok.all():
    raise errors.UserError(f"process {int(np.argmin(ok))} could not {what}; its own error says "
                           "why")
  return result

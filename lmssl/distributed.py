"""Joining JAX's multi-controller runtime: one process per host, all running the same command.

Three ways in, tried in this order:
  1. --coordinator HOST:PORT --num_processes N --process_id I (flags, or the environment's
     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): GPU clusters without a
     scheduler JAX knows, and several processes on one machine;
  2. --distributed: `jax.distributed.initialize()` finds its peers itself on Cloud TPU VMs,
     SLURM and Open MPI;
  3. neither: a single process, which needs nothing.
Must run before anything touches a JAX device.
"""

import os

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
    jax.distributed.initialize(coordinator, num_processes, process_id)
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

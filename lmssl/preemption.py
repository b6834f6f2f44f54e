"""Stopping cleanly when asked: SIGTERM (what Cloud TPU, Kubernetes and SLURM send before they
reclaim a machine) or Ctrl-C.

The training loop asks `Watch.requested(step)` after dispatching each step; when it says yes,
the loop saves that step and the run exits with `errors.Stopped`, to resume there.

One process: a signal handler records the signal and the loop acts at the next step.
Several processes: every host must save the same step, so the notice goes through JAX's
preemption service instead (its own SIGTERM notifier, installed by jax.distributed): a host
that is signalled tells the others, they agree on a step all of them will reach, and
`requested(step)` is true at that step on every host.
"""

import contextlib
import signal
import threading

import jax
from jax.experimental import multihost_utils

from lmssl import errors


class Watch:
  """Context manager watching for a stop request for the duration of a run."""

  def __init__(self):
    self.signal = None  # the number of the signal received (one process), else None
    self._previous = {}

  def __enter__(self) -> "Watch":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only: nothing to watch from here
    # With several processes JAX's notifier owns SIGTERM; Ctrl-C stays an immediate stop there,
    # since one host's keyboard cannot reach the others.
    watched = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    for signum in watched:
      self._previous[signum] = signal.signal(signum, self._record)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _record(self, signum, frame) -> None:
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    self.signal = signum

  def requested(self, step: int) -> bool:
    """Whether to save `step` and stop. Call once for every step, in order, on every host."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

  def reason(self) -> str:
    if self.signal is None:
      return "a preemption notice reached one of the processes"
    return f"received {signal.Signals(self.signal).name}"

  def exit_status(self) -> int:
    """The shell's status for death by that signal, 128 + its number: schedulers and wrappers
    read it as "stopped, not finished"."""
    return 128 + (self.signal or signal.SIGTERM)


class _StopNow(BaseException):
  """Raised by `stop_at_once`'s handler; a BaseException, so no `except Exception` on the way
  (a data reader that wraps its errors) mistakes it for a failure of its own."""


@contextlib.contextmanager
def stop_at_once(phase: str, outcome: str):
  """For a phase with nothing to save (data preparation): SIGTERM or Ctrl-C ends it at once
  with `errors.Stopped`, whose message names the signal, the `phase` and the `outcome`. One
  process only, as `Watch`: with several, JAX's notifier owns SIGTERM."""
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield
    return

  def stop(signum, frame):
    raise _StopNow(signum)

  previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  except _StopNow as e:
    signum = e.args[0]
    raise errors.Stopped(f"received {signal.Signals(signum).name} {phase}: stopped, "
                         f"{outcome}", 128 + signum) from None
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)

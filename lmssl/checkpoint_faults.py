"""What goes wrong with checkpoints for real, told in one line: a write the machine refuses (a
full disk, a quota, a file size limit, a read-only or unwritable directory), and a checkpoint
found damaged on reading (a missing or truncated file), passed over for the newest intact one.
Orbax and TensorStore report each of these from background threads as stack dumps; those are
dropped once lmssl has said it in its line.
"""

import contextlib
import errno
import json
import logging as py_logging
import os
import re
import sys
import threading
import time
import warnings

from absl import logging
import jax
import orbax.checkpoint as ocp

from lmssl import errors
from lmssl import files


# Write failures that are the machine's, not lmssl's: each with what to do about it.
WRITE_FIXES = {
    errno.ENOSPC: "free space there (or lower checkpoint.keep)",
    errno.EDQUOT: "raise the disk quota or free space (or lower checkpoint.keep)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or lift it",
    errno.EROFS: "point --workdir at a writable file system",
    errno.EACCES: "make the directory writable by this user",
    errno.ENOTDIR: "move or remove that file (checkpoints go in a directory of that name)",
}
# The same failures as other layers word them: tensorstore raises ValueError("RESOURCE_EXHAUSTED:
# ... No space left on device [os_error_code='28']"), not an OSError. Most specific first.
_WRITE_TEXTS = (
    (errno.EDQUOT, ("Disk quota exceeded", "EDQUOT")),
    (errno.EFBIG, ("File too large", "EFBIG")),
    (errno.EROFS, ("Read-only file system", "EROFS")),
    (errno.EACCES, ("Permission denied", "EACCES")),
    (errno.ENOTDIR, ("Not a directory", "ENOTDIR")),
    (errno.ENOSPC, ("No space left", "ENOSPC", "RESOURCE_EXHAUSTED")),
)


def refused(e: BaseException) -> tuple[int, str] | None:
  """(errno, "what (path)") when `e`, or an exception it was raised from, is the machine
  refusing a write (WRITE_FIXES); None for anything else, which stays a real error."""
  seen = []
  while e is not None and e not in seen and len(seen) < 16:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for e in seen:
    if isinstance(e, OSError) and e.errno in WRITE_FIXES:
      return e.errno, f"{e.strerror or os.strerror(e.errno)}" + (
          f" ({e.filename})" if e.filename else "")
  for e in seen:
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    code = int(code.group(1)) if code and int(code.group(1)) in WRITE_FIXES else next(
        (c for c, words in _WRITE_TEXTS if any(w in text for w in words)), None)
    if code is not None:
      paths = re.findall(r'"(/[^"]*)"', text) or re.findall(r"'(/[^']*)'", text)
      # A path quoted inside an escaped message keeps the escape: "/.../d/\\"
      where = " ({})".format(paths[-1].rstrip("\\")) if paths else ""
      return code, os.strerror(code) + where
  return None


@contextlib.contextmanager
def writes(mngr: ocp.CheckpointManager):
  """Turns a checkpoint write that the machine refused into one line saying what was kept.

  Orbax writes each checkpoint under a temporary name and renames it into place only once
  complete, so a failed (or killed) save leaves the committed ones as they were."""
  try:
    yield
  except Exception as e:  # whatever layer raises it: OSError, tensorstore's ValueError, Orbax's
    refusal = refused(e)
    if refusal is None:
      raise
    _release_waiting_writes()
    latest = mngr.latest_step()
    kept = (f"the last committed checkpoint, step {latest}, is intact" if latest is not None
            else "no checkpoint was committed")
    raise errors.UserError(
        f"could not write a checkpoint in {mngr.directory}: {refusal[1]}; {kept}. "
        f"{WRITE_FIXES[refusal[0]].capitalize()}, then run the same command to resume"
    ) from None


def remove_after_late_writes(path: str, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
  """Removes the checkpoints directory `path` of a run that committed none, and again what a
  failed save's late writes put back. TensorStore's writes are not cancelled with the save
  (Orbax reports the first that failed while the others are still in flight), and each one
  that lands makes its directories anew. Done once `path` stayed absent for `quiet_s`, or
  after `limit_s`; at once when `path` is missing or empty (no save began: none in flight)."""
  if not files.at(path).exists() or not any(files.at(path).iterdir()):
    files.remove(path)
    return
  deadline, gone_since = time.monotonic() + limit_s, time.monotonic()
  while time.monotonic() < deadline:
    if files.at(path).exists():
      files.remove(path)
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= quiet_s:
      return
    time.sleep(0.05)


def _release_waiting_writes() -> None:
  """Lets go the background threads of a failed save that wait for a step that never comes
  (each write waits for its directory to be created: when that failed, they would wait out
  Orbax's timeout, and the process could not exit). Cancelled, they end without writing.
  In-process signals only: a multi-process run's are left to Orbax."""
  # The failed save's coroutines that never started (these, or ones Orbax dropped itself)
  # would each print Python's "never awaited" warning, after lmssl's line, as they are freed.
  warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
  try:
    from orbax.checkpoint._src.futures import future as ocp_future
    from orbax.checkpoint._src.futures import signaling_client
    client = signaling_client.get_signaling_client()
    if not isinstance(client, signaling_client.ThreadSafeKeyValueSignalingClient):
      return
    for thread in threading.enumerate():
      # pylint: disable-next=protected-access
      if not isinstance(thread, ocp_future._SignalingThread) or not thread.is_alive():
        continue
      thread._cancelled = True  # pylint: disable=protected-access
      for s in thread._receive_signals:  # pylint: disable=protected-access
        key = ocp_future.AwaitableSignalsContract.get_unique_awaitable_singal_key(
            s, thread._operation_id)  # pylint: disable=protected-access
        client.key_value_set(key, "cancelled", allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass  # Orbax's internals moved: at worst, the process waits out Orbax's timeout


class _RefusedWriteRecords(py_logging.Filter):
  """Drops the error records, each with a traceback, of a write the machine refused that
  Orbax logs from its background threads (and asyncio, of its writes' tasks left behind):
  lmssl reports it in one line, naming what was kept."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR or (
        record.name != "asyncio" and "orbax" not in record.pathname):
      return True
    failure = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
    return refused(failure) is None


def _late_result(unraisable) -> bool:
  """Whether an unraisable exception is a TensorStore read or write of a failed restore or
  save finishing after Orbax closed its event loop: TensorStore hands the result to
  `loop.call_soon_threadsafe`, which raises "Event loop is closed" with no Python caller."""
  e, tb = unraisable.exc_value, unraisable.exc_traceback
  return (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and
          tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def quiet_refused_writes() -> None:
  """Installs, once, what keeps a refused write to lmssl's one line (see `writes`)."""
  absl_logger = py_logging.getLogger("absl")
  if any(isinstance(f, _RefusedWriteRecords) for f in absl_logger.filters):
    return
  absl_logger.addFilter(_RefusedWriteRecords())
  py_logging.getLogger("asyncio").addFilter(_RefusedWriteRecords())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _late_result(unraisable):
      previous(unraisable)
  sys.unraisablehook = hook


# Orbax's log records of a step's _CHECKPOINT_METADATA it could not read, written as it lists
# a checkpoints directory (before lmssl reads any step).
_METADATA_READS = ("Metadata file does not exist: ", "Failed to read Metadata file: ",
                   "Failed to json parse Metadata file: ")


def _not_a_metadata_read(record: py_logging.LogRecord) -> bool:
  return not ("orbax" in record.pathname and record.getMessage().startswith(_METADATA_READS))


def quiet_metadata_reads() -> None:
  """Installs, once, a filter that drops Orbax's records of a checkpoint metadata file it could
  not read: lmssl checks that file of every checkpoint it uses (`damage`) and names a damaged
  one in its own line, so Orbax's line would only come before it, saying the same."""
  absl_logger = py_logging.getLogger("absl")
  if _not_a_metadata_read not in absl_logger.filters:
    absl_logger.addFilter(_not_a_metadata_read)


# The metadata files of a checkpoint Orbax committed, each JSON: a step directory lacking one,
# or holding one that does not parse, is damaged.
_METADATA_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")


def damage(step_dir: str) -> str | None:
  """Why the checkpoint in `step_dir` is not complete, by cheap checks (its metadata files
  exist and parse, no file of its state is empty), or None. Reading it is the decisive check
  (see `newest_intact`)."""
  for name in _METADATA_FILES:
    f = files.at(os.path.join(step_dir, name))
    if not f.is_file():
      return f"{name} is missing"
    try:
      json.loads(f.read_bytes())
    except ValueError as e:
      return f"{name} is not JSON: {e}"
  folders = [files.at(os.path.join(step_dir, "state"))]
  while folders:  # every file of the state, walked folder by folder (no ** on cloud paths)
    for f in sorted(folders.pop().iterdir()):
      if f.is_dir():
        folders.append(f)
      elif f.stat().length == 0:
        return f"{os.path.relpath(str(f), step_dir)} is empty"
  return None


def _reason(e: BaseException, path: str) -> str:
  """One short line of why reading the checkpoint at `path` failed: the first line of the
  innermost cause (TensorStore's own words, e.g. a byte range past the end of a truncated
  file), its files named within the checkpoint."""
  while e.__cause__ is not None or (e.__context__ is not None and
                                    not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [""])[0].replace(f"{path}/", "")
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= 240 else text[:237] + "..."


def newest_intact(directory: str, steps: list[int], attempt, move_aside: bool):
  """(step, [paths moved aside], attempt(step)) for the newest of `steps` (newest first) whose
  checkpoint in `directory` is intact: it passes `damage`'s checks, and `attempt` (which
  reads it) fails with no error but a UserError (bad input, passed on as it is). Nothing is
  deleted: each damaged checkpoint passed over is moved aside to `STEP.damaged` (which no
  step listing counts) with `move_aside`, else left where it is; a line on stderr says which.
  When none is intact, all are left and this fails naming the directory and the fix."""
  damaged = []
  for step in steps:
    path = os.path.join(directory, str(step))
    why = damage(path)
    if why is None:
      try:
        result = attempt(step)
      except errors.UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        why = _reason(e, path)
        _quiet_about(path)
      else:
        moved = []
        for bad, bad_why in damaged:
          if move_aside:
            moved.append(_move_aside(bad))
            kept = f"moved aside to {moved[-1]}"
          else:
            kept = "left in place (resuming the run moves it aside)"
          _warn(f"checkpoint {bad} is damaged ({bad_why}): {kept}; using step {step}, the "
                "newest intact checkpoint")
        return step, moved, result
    damaged.append((path, why))
  listed = errors.first([f"{p} ({w})" for p, w in damaged], 3)
  raise errors.UserError(
      f"no intact checkpoint in {directory}: damaged {listed}; all left as they are. Start "
      "over in a new --workdir (or put back intact copies of them)")


# Damaged checkpoints already named: Orbax's other reads of one, started beside the read that
# failed, report their failures as they are collected (after `newest_intact` moved on), as
# stack dumps; those are dropped (see `_quiet_about`).
_NAMED = set()


def _about_named(e: BaseException | None) -> bool:
  seen = 0
  while e is not None and seen < 8:
    if any(f"{path}/" in str(e) for path in _NAMED):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


def _quiet_about(path: str) -> None:
  """Drops later reports of failed reads of the checkpoint at `path`: Python's "Exception
  ignored in <coroutine>", asyncio's "Task exception was never retrieved", and the results of
  reads still under way when the failed restore closed its event loop. Any other report passes
  as before."""
  if not _NAMED:
    previous = sys.unraisablehook

    def hook(unraisable):
      if not (_about_named(unraisable.exc_value) or _late_result(unraisable)):
        previous(unraisable)
    sys.unraisablehook = hook
    py_logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _about_named(record.exc_info[1])))
  _NAMED.add(path)


def _move_aside(path: str) -> str:
  """Renames the step directory `path` to `path.damaged` (or .damaged.2, ...); returns it."""
  target, n = f"{path}.damaged", 1
  while files.at(target).exists():
    n += 1
    target = f"{path}.damaged.{n}"
  if jax.process_index() == 0:
    files.at(path).rename(target)
  return target


def _warn(message: str) -> None:
  """A line of the run's own, on stderr (it is not output: eval's stdout stays its JSON)."""
  if jax.process_index() == 0:
    logging.info(message)
    print(f"lmssl: {message}", file=sys.stderr, flush=True)

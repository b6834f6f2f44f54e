"""Orbax checkpoints of the train state, saved asynchronously; the last K are kept.

The data position needs no saving of its own: batches are a pure function of (seed, step), so
restoring the step restores the stream. The seed and a digest of the tokenizer are stored
beside the state, to check a resuming run against them.
"""

import contextlib
import errno
import json
import logging as py_logging
import os
import re
import signal
import sys
import threading
import warnings

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from lmssl import errors
from lmssl import files


def manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  # The loop decides when to save (every N steps and at the end); Orbax keeps the last K.
  # Temporary directories that failed or killed saves left (`STEP.orbax-checkpoint-tmp*`,
  # never a committed step) are removed by process 0, before this manager's first save.
  directory = os.path.join(files.absolute(workdir), "checkpoints")
  if files.at(directory).exists() and not files.at(directory).is_dir():
    raise errors.UserError(
        f"could not write a checkpoint in {directory}: it is a file, not a directory; no "
        f"checkpoint was committed. {_WRITE_FIXES[errno.ENOTDIR].capitalize()}, then run the "
        "same command to resume")
  _quiet_refused_writes()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> bool:
  """Starts saving `step` (in the background when async); a write that failed since, this
  one's or an earlier one's, fails here or in `wait` (see `_writes`)."""
  with _writes(mngr):
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Returns once every save started has committed."""
  with _writes(mngr):
    mngr.wait_until_finished()


def check(mngr: ocp.CheckpointManager) -> None:
  """Fails (as `_writes` says) if a background save has failed; never waits for one still
  writing. Called at each step boundary, so a run learns of a failed save at the next step
  after it failed, not at its next save."""
  with _writes(mngr):
    if not mngr.is_saving_in_progress():
      mngr.wait_until_finished()  # nothing left to wait for: raises a failed save's error


def close(mngr: ocp.CheckpointManager) -> None:
  """Closes `mngr`. A save that failed was reported by `save`, `wait` or `check` already;
  it is not raised again here."""
  try:
    mngr.close()
  except Exception as e:  # pylint: disable=broad-except
    if _refused(e) is None:
      raise


def ignore_sigxfsz() -> None:
  """A write over the file size limit (`ulimit -f`) fails with EFBIG, to be reported as a
  refused write, instead of SIGXFSZ killing the process mid-save without a word."""
  if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# Write failures that are the machine's, not lmssl's: each with what to do about it.
_WRITE_FIXES = {
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


def _refused(e: BaseException) -> tuple[int, str] | None:
  """(errno, "what (path)") when `e`, or an exception it was raised from, is the machine
  refusing a write (_WRITE_FIXES); None for anything else, which stays a real error."""
  seen = []
  while e is not None and e not in seen and len(seen) < 16:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for e in seen:
    if isinstance(e, OSError) and e.errno in _WRITE_FIXES:
      return e.errno, f"{e.strerror or os.strerror(e.errno)}" + (
          f" ({e.filename})" if e.filename else "")
  for e in seen:
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    code = int(code.group(1)) if code and int(code.group(1)) in _WRITE_FIXES else next(
        (c for c, words in _WRITE_TEXTS if any(w in text for w in words)), None)
    if code is not None:
      paths = re.findall(r'"(/[^"]*)"', text) or re.findall(r"'(/[^']*)'", text)
      return code, os.strerror(code) + (f" ({paths[-1]})" if paths else "")
  return None


@contextlib.contextmanager
def _writes(mngr: ocp.CheckpointManager):
  """Turns a checkpoint write that the machine refused into one line saying what was kept.

  Orbax writes each checkpoint under a temporary name and renames it into place only once
  complete, so a failed (or killed) save leaves the committed ones as they were."""
  try:
    yield
  except Exception as e:  # whatever layer raises it: OSError, tensorstore's ValueError, Orbax's
    refused = _refused(e)
    if refused is None:
      raise
    _release_waiting_writes()
    latest = mngr.latest_step()
    kept = (f"the last committed checkpoint, step {latest}, is intact" if latest is not None
            else "no checkpoint was committed")
    raise errors.UserError(
        f"could not write a checkpoint in {mngr.directory}: {refused[1]}; {kept}. "
        f"{_WRITE_FIXES[refused[0]].capitalize()}, then run the same command to resume"
    ) from None


def _release_waiting_writes() -> None:
  """Lets go the background threads of a failed save that wait for a step that never comes
  (each write waits for its directory to be created: when that failed, they would wait out
  Orbax's timeout, and the process could not exit). Cancelled, they end without writing.
  In-process signals only: a multi-process run's are left to Orbax."""
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
      # Its coroutines are dropped unstarted: Python's "never awaited" warnings are not news.
      warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
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
    return _refused(failure) is None


def _late_result(unraisable) -> bool:
  """Whether an unraisable exception is a TensorStore read or write of a failed restore or
  save finishing after Orbax closed its event loop: TensorStore hands the result to
  `loop.call_soon_threadsafe`, which raises "Event loop is closed" with no Python caller."""
  e, tb = unraisable.exc_value, unraisable.exc_traceback
  return (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and
          tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _quiet_refused_writes() -> None:
  """Installs, once, what keeps a refused write to lmssl's one line (see `_writes`)."""
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


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None,
            check=None):
  """Restores onto `abstract_state` (ShapeDtypeStructs with their shardings, on any mesh:
  steps.abstract_state), or as saved when it is None.

  Without `step`, the newest intact checkpoint: a damaged one after it (see `_newest_intact`)
  is moved aside to `N.damaged`, so the run resumes from the intact one and later saves its
  own step N. `check(meta)` runs on a checkpoint's meta before its state is read (a resuming
  run's seed and tokenizer); it refuses with a UserError. Returns (state, meta), or None when
  there is no checkpoint.
  """
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    return None
  directory = str(mngr.directory)

  def attempt(step):
    meta = read_meta(mngr, step)
    if check is not None:
      check(meta)
    if abstract_state is not None and meta.get("params_only"):
      raise errors.UserError(
          f"{directory} holds parameters only ({meta.get('converted_from') or 'converted'}), "
          "not a run to resume; train in a new --workdir with --config.init.params_from="
          f"{os.path.dirname(directory)}")
    if abstract_state is not None:
      _check_same_model(directory, step, abstract_state.params)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  _, moved, result = _newest_intact(directory, steps, attempt, move_aside=step is None)
  if moved:
    mngr.reload()  # forget the steps moved aside: this run saves them anew
  return result


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """What was stored beside the state of `step` (default: the latest), or None if none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _locate(path: str, name: str = "") -> tuple[str, list[int]]:
  """(checkpoints directory, its steps newest first) for a run's workdir, its checkpoints/ or
  a checkpoints/STEP (that step alone). `name` is how the message of a path holding none
  names it (default: as init.params_from)."""
  path = files.absolute(path).rstrip("/")
  base = os.path.basename(path)
  if base.isdigit() and files.at(path).is_dir():
    return os.path.dirname(path), [int(base)]
  directory = os.path.join(path, "checkpoints")
  directory = directory if files.at(directory).is_dir() else path
  steps = _steps(directory)
  if not steps and name:
    raise errors.UserError(
        f"{name} holds no checkpoint (no {os.path.join(path, 'checkpoints')}/STEP directory); "
        "name the --workdir of a "
        "run that has saved one, or train this one first")
  if not steps:
    raise errors.UserError(
        f"init.params_from={path} holds no checkpoint; name a run's workdir, its checkpoints/ "
        "directory or one checkpoints/STEP directory")
  return directory, steps[::-1]


def _steps(directory: str) -> list[int]:
  """The steps saved in a checkpoints directory (STEP/ subdirectories), oldest first."""
  listed = files.at(directory).iterdir() if files.at(directory).is_dir() else []
  return sorted(int(p.name) for p in listed if p.name.isdigit())


# The metadata files of a checkpoint Orbax committed, each JSON: a step directory lacking one,
# or holding one that does not parse, is damaged.
_METADATA_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")


def _damage(step_dir: str) -> str | None:
  """Why the checkpoint in `step_dir` is not complete, by cheap checks (its metadata files
  exist and parse, no file of its state is empty), or None. Reading it is the decisive check
  (see `_newest_intact`)."""
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


def _newest_intact(directory: str, steps: list[int], attempt, move_aside: bool):
  """(step, [paths moved aside], attempt(step)) for the newest of `steps` (newest first) whose
  checkpoint in `directory` is intact: it passes `_damage`'s checks, and `attempt` (which
  reads it) fails with no error but a UserError (bad input, passed on as it is). Nothing is
  deleted: each damaged checkpoint passed over is moved aside to `STEP.damaged` (which no
  step listing counts) with `move_aside`, else left where it is; a line on stderr says which.
  When none is intact, all are left and this fails naming the directory and the fix."""
  damaged = []
  for step in steps:
    path = os.path.join(directory, str(step))
    why = _damage(path)
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
# failed, report their failures as they are collected (after `_newest_intact` moved on), as
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


def run_dir(path: str) -> str:
  """The workdir of the run that wrote the checkpoint(s) at `path`."""
  directory, _ = _locate(path)
  run = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory
  # A fine-tuning run's best/ checkpoints sit one level below the run's config.json.
  if not files.at(os.path.join(run, "config.json")).exists():
    run = os.path.dirname(run)
  return run


def read_params(path: str) -> dict:
  """The parameters saved at `path` (as `_locate` reads it; its newest intact checkpoint), as
  host numpy arrays."""
  directory, steps = _locate(path)
  mngr = _reader(directory)

  def attempt(step):
    metadata = _state_metadata(mngr, step)["params"]
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                     metadata)},
        restore_args={"params": jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)},
        partial_restore=True))).state["params"]

  try:
    return _newest_intact(directory, steps, attempt, move_aside=False)[2]
  finally:
    mngr.close()


def _state_metadata(mngr: ocp.CheckpointManager, step: int):
  metadata = mngr.item_metadata(step).state
  if metadata is None:  # Orbax's answer when state/_METADATA is gone
    raise ValueError("state/_METADATA is missing")
  return metadata


def _reader(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def _shape_table(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(path: str, abstract_params, may_be_new) -> tuple[dict, list[str]]:
  """Reads another run's parameters that `abstract_params` (shapes with shardings) also has.

  Every parameter of the new model must be in the checkpoint with its shape, except those
  for which `may_be_new(key)` holds (new heads, adapters): they keep their fresh init when
  absent or shaped differently. Anything else fails, naming each parameter. Returns
  ({key: array on the new sharding}, [keys left to the fresh init]) with `jax.tree_util.keystr`
  keys. Reads the newest intact checkpoint at `path` (see `_newest_intact`).
  """
  values, fresh, _ = _load(path, abstract_params, may_be_new)
  return values, fresh


def load_run_params(workdir: str, path: str, abstract_params) -> tuple[dict, dict]:
  """({key: array}, meta) of the newest intact checkpoint at `path` (the run in `workdir`, or
  its best/), for eval and sample: a damaged newer one is passed over and left in place."""
  values, _, meta = _load(path, abstract_params, lambda key: False,
                          name=f"--workdir {workdir}")
  return values, meta


def _load(path: str, abstract_params, may_be_new, name: str = ""):
  directory, steps = _locate(path, name)
  mngr = _reader(directory)

  def attempt(step):
    saved = _shape_table(_state_metadata(mngr, step)["params"])
    take, wanted = _fit(saved, abstract_params, may_be_new, f"checkpoint {directory}/{step}")
    target = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if jax.tree_util.keystr(p) in take else None, abstract_params)
    target = {"params": _prune(target)}
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target),
            partial_restore=True),
        meta=ocp.args.JsonRestore()))
    values = {jax.tree_util.keystr(p): v for p, v in
              jax.tree_util.tree_flatten_with_path(restored.state["params"])[0]}
    return values, sorted(set(wanted) - take), restored.meta or {}

  try:
    return _newest_intact(directory, steps, attempt, move_aside=False)[2]
  finally:
    mngr.close()


def place_params(source: dict, abstract_params, may_be_new, where: str):
  """`load_params` for parameters already in host memory (numpy), e.g. converted from HF."""
  arrays = {jax.tree_util.keystr(p): a
            for p, a in jax.tree_util.tree_flatten_with_path(source)[0]}
  take, wanted = _fit({k: tuple(a.shape) for k, a in arrays.items()}, abstract_params,
                      may_be_new, where)
  values = {}
  for k in take:
    array = np.asarray(arrays[k], wanted[k].dtype)
    values[k] = jax.make_array_from_callback(array.shape, wanted[k].sharding,
                                             lambda index, a=array: a[index])
  return values, sorted(set(wanted) - take)


def _fit(saved: dict, abstract_params, may_be_new, where: str) -> tuple[set, dict]:
  """(keys to read, {key: abstract leaf}); fails naming every parameter that does not fit."""
  wanted = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  missing = [k for k in wanted if k not in saved and not may_be_new(k)]
  mismatched = [f"{k} {saved[k]} in the checkpoint vs {tuple(wanted[k].shape)}" for k in wanted
                if k in saved and saved[k] != tuple(wanted[k].shape) and not may_be_new(k)]
  if missing or mismatched:
    problems = ([f"missing: {', '.join(missing[:8])}"] if missing else []) + (
        [f"shape differs: {'; '.join(mismatched[:8])}"] if mismatched else [])
    raise errors.UserError(
        f"{where} does not fit this model ({' | '.join(problems)}); start from a run with the "
        "same model settings (its config.json) or train from scratch")
  return {k for k in wanted if k in saved and saved[k] == tuple(wanted[k].shape)}, wanted


def _check_same_model(directory, step: int, abstract_params) -> None:
  """Fails, naming the parameters, when the checkpoint's are not exactly this model's."""
  reader = _reader(directory)
  saved = _shape_table(reader.item_metadata(step).state["params"])
  reader.close()
  wanted = _shape_table(abstract_params)
  problems = [f"{k}: {saved.get(k, 'absent')} in the checkpoint vs {wanted.get(k, 'absent')}"
              for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  if problems:
    raise errors.UserError(
        f"checkpoint {directory}/{step} is of another model ({errors.first(problems, 3)}); "
        "resume with the model settings of the run that wrote it (its config.json), or train "
        "this model in a new --workdir")


def _prune(tree):
  """Drops None leaves and empty dicts, leaving the tree of parameters to read."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and v != {}}
  return tree

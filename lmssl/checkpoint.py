"""Orbax checkpoints of the train state, saved asynchronously; the last K are kept.

The data position needs no saving of its own: batches are a pure function of (seed, step), so
restoring the step restores the stream. The seed and a digest of the tokenizer are stored
beside the state, to check a resuming run against them.
"""

import errno
import os
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmssl import checkpoint_faults as faults
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
        f"checkpoint was committed. {faults.WRITE_FIXES[errno.ENOTDIR].capitalize()}, then run "
        "the same command to resume")
  faults.quiet_refused_writes()
  faults.quiet_metadata_reads()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> bool:
  """Starts saving `step` (in the background when async); a write that failed since, this
  one's or an earlier one's, fails here or in `wait` (see `faults.writes`)."""
  with faults.writes(mngr):
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def wait(mngr: ocp.CheckpointManager) -> None:
  """Returns once every save started has committed."""
  with faults.writes(mngr):
    mngr.wait_until_finished()


def check(mngr: ocp.CheckpointManager) -> None:
  """Fails (as `faults.writes` says) if a background save has failed; never waits for one
  still writing. Called at each step boundary, so a run learns of a failed save at the next step
  after it failed, not at its next save."""
  with faults.writes(mngr):
    if not mngr.is_saving_in_progress():
      mngr.wait_until_finished()  # nothing left to wait for: raises a failed save's error


def close(mngr: ocp.CheckpointManager) -> None:
  """Closes `mngr`. A save that failed was reported by `save`, `wait` or `check` already;
  it is not raised again here."""
  try:
    mngr.close()
  except Exception as e:  # pylint: disable=broad-except
    if faults.refused(e) is None:
      raise


def ignore_sigxfsz() -> None:
  """A write over the file size limit (`ulimit -f`) fails with EFBIG, to be reported as a
  refused write, instead of SIGXFSZ killing the process mid-save without a word."""
  if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None,
            check=None):
  """Restores onto `abstract_state` (ShapeDtypeStructs with their shardings, on any mesh:
  steps.abstract_state), or as saved when it is None.

  Without `step`, the newest intact checkpoint: a damaged one after it (see
  `faults.newest_intact`) is moved aside to `N.damaged`, so the run resumes from the intact one
  and later saves its own step N. `check(meta)` runs on a checkpoint's meta before its state is
  read (a resuming run's seed and tokenizer); it refuses with a UserError. Returns (state, meta),
  or None when there is no checkpoint.
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

  _, moved, result = faults.newest_intact(directory, steps, attempt, move_aside=step is None)
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


def committed_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints a run committed in `workdir`, oldest first."""
  return _steps(os.path.join(files.absolute(workdir), "checkpoints"))


def _steps(directory: str) -> list[int]:
  """The steps saved in a checkpoints directory (STEP/ subdirectories), oldest first."""
  listed = files.at(directory).iterdir() if files.at(directory).is_dir() else []
  return sorted(int(p.name) for p in listed if p.name.isdigit())


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
    return faults.newest_intact(directory, steps, attempt, move_aside=False)[2]
  finally:
    mngr.close()


def _state_metadata(mngr: ocp.CheckpointManager, step: int):
  metadata = mngr.item_metadata(step).state
  if metadata is None:  # Orbax's answer when state/_METADATA is gone
    raise ValueError("state/_METADATA is missing")
  return metadata


def _reader(directory: str) -> ocp.CheckpointManager:
  faults.quiet_metadata_reads()
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
  keys. Reads the newest intact checkpoint at `path` (see `faults.newest_intact`).
  """
  values, fresh, _, _ = _load(path, abstract_params, may_be_new)
  return values, fresh


def load_run_params(workdir: str, path: str, abstract_params) -> tuple[dict, dict, str]:
  """({key: array}, meta, its checkpoints/STEP directory) of the newest intact checkpoint at
  `path` (the run in `workdir`, or its best/), for eval and sample: a damaged newer one is
  passed over and left in place."""
  values, _, meta, read = _load(path, abstract_params, lambda key: False,
                                name=f"--workdir {workdir}")
  return values, meta, read


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
    return values, sorted(set(wanted) - take), restored.meta or {}, f"{directory}/{step}"

  try:
    return faults.newest_intact(directory, steps, attempt, move_aside=False)[2]
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

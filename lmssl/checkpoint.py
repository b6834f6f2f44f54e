"""Orbax checkpoints of the train state, saved asynchronously; the last K are kept.

The data position needs no saving of its own: batches are a pure function of (seed, step), so
restoring the step restores the stream. The seed and a digest of the tokenizer are stored
beside the state, to check a resuming run against them.
"""

import contextlib
import errno
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from lmssl import errors
from lmssl import files


def manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  # The loop decides when to save (every N steps and at the end); Orbax keeps the last K.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
  )
  return ocp.CheckpointManager(os.path.join(files.absolute(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


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


# Write failures that are the machine's, not lmssl's: each with what to do about it.
_WRITE_FIXES = {
    errno.ENOSPC: "free space there (or lower checkpoint.keep)",
    errno.EDQUOT: "raise the disk quota or free space (or lower checkpoint.keep)",
    errno.EROFS: "point --workdir at a writable file system",
    errno.EACCES: "make the directory writable by this user",
}


@contextlib.contextmanager
def _writes(mngr: ocp.CheckpointManager):
  """Turns a checkpoint write that the machine refused into one line saying what was kept.

  Orbax writes each checkpoint under a temporary name and renames it into place only once
  complete, so a failed (or killed) save leaves the committed ones as they were."""
  try:
    yield
  except OSError as e:
    if e.errno not in _WRITE_FIXES:
      raise
    latest = mngr.latest_step()
    kept = (f"the last committed checkpoint, step {latest}, is intact" if latest is not None
            else "no checkpoint was committed")
    raise errors.UserError(
        f"could not write a checkpoint in {mngr.directory}: {e.strerror} ({e.filename}); "
        f"{kept}. {_WRITE_FIXES[e.errno].capitalize()}, then run the same command to "
        "resume") from None


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores onto the shardings in `abstract_state` (any mesh), or as saved when it is None.

  Returns (state, meta), or None when there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  meta = read_meta(mngr, step)
  if abstract_state is not None and meta.get("params_only"):
    raise errors.UserError(
        f"{mngr.directory} holds parameters only ({meta.get('converted_from') or 'converted'}), "
        "not a run to resume; train in a new --workdir with --config.init.params_from="
        f"{os.path.dirname(str(mngr.directory))}")
  if abstract_state is not None:
    _check_same_model(mngr.directory, step, abstract_state.params)
  target = None if abstract_state is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """What was stored beside the state of `step` (default: the latest), or None if none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _locate(path: str) -> tuple[str, int]:
  """(checkpoints directory, step) for a run's workdir, its checkpoints/ or a checkpoints/STEP."""
  path = files.absolute(path).rstrip("/")
  name = os.path.basename(path)
  if name.isdigit() and files.at(path).is_dir():
    return os.path.dirname(path), int(name)
  directory = os.path.join(path, "checkpoints")
  directory = directory if files.at(directory).is_dir() else path
  listed = files.at(directory).iterdir() if files.at(directory).is_dir() else []
  steps = sorted(int(p.name) for p in listed if p.name.isdigit())
  if not steps:
    raise errors.UserError(
        f"init.params_from={path} holds no checkpoint; name a run's workdir, its checkpoints/ "
        f"directory or one checkpoints/STEP directory")
  return directory, steps[-1]


def run_dir(path: str) -> str:
  """The workdir of the run that wrote the checkpoint(s) at `path`."""
  directory, _ = _locate(path)
  run = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory
  # A fine-tuning run's best/ checkpoints sit one level below the run's config.json.
  if not files.at(os.path.join(run, "config.json")).exists():
    run = os.path.dirname(run)
  return run


def read_params(path: str) -> dict:
  """The parameters saved at `path` (as `_locate` reads it), as host numpy arrays."""
  directory, step = _locate(path)
  mngr = _reader(directory)
  metadata = mngr.item_metadata(step).state["params"]
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)},
      restore_args={"params": jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)},
      partial_restore=True)))
  mngr.close()
  return restored.state["params"]


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
  keys.
  """
  directory, step = _locate(path)
  mngr = _reader(directory)
  saved = _shape_table(mngr.item_metadata(step).state["params"])
  take, wanted = _fit(saved, abstract_params, may_be_new, f"checkpoint {directory}/{step}")
  target = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if jax.tree_util.keystr(p) in take else None, abstract_params)
  target = {"params": _prune(target)}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=jax.tree.map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target),
      partial_restore=True)))
  mngr.close()
  values = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(restored.state["params"])[0]}
  return values, sorted(set(wanted) - take)


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

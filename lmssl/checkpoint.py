"""Orbax checkpoints of the train state, saved asynchronously; the last K are kept.

The data position needs no saving of its own: batches are a pure function of (seed, step), so
restoring the step restores the stream. The seed is stored beside the state to check it.
"""

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  # The loop decides when to save (every N steps and at the end); Orbax keeps the last K.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores onto the shardings in `abstract_state` (any mesh), or as saved when it is None.

  Returns (state, meta), or None when there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  target = None if abstract_state is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta

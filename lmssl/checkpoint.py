"""Orbax checkpoints of the train state, saved asynchronously every N steps, the last K kept.

The data position needs no saving of its own: batches are a pure function of (seed, step), so
restoring the step restores the stream. The seed is stored beside the state to check it.
"""

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=ckpt_cfg.every_steps,
      max_to_keep=ckpt_cfg.keep,
      enable_async_checkpointing=ckpt_cfg.async_save,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores onto the shardings in `abstract_state` (any mesh). Returns (state, meta) or None."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta

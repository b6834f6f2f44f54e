"""Where a run starts: the architecture and tokenizer of init.params_from adopted, the
workdir's settings checked against the run's, the state restored from the workdir's latest
checkpoint or warm-started from another run's (or a HuggingFace model's) parameters, and what a
fresh run undoes when it ends before committing a checkpoint."""

import contextlib
import os

import jax

from lmssl import checkpoint
from lmssl import checkpoint_faults
from lmssl import config as config_lib
from lmssl import errors
from lmssl import files
from lmssl import lora as lora_lib
from lmssl import metrics as metrics_lib
from lmssl import steps
from lmssl.hf import extra as hf_extra
from lmssl.hf import tokenizer as tokenizer_lib
from lmssl.hf import weights as hf


def resolve(cfg):
  """Phase 1a: the config with the architecture and tokenizer of init.params_from adopted
  (read from the source's config alone: its weights are read at phase 4, once the run is
  known to be valid), and that source's path or None."""
  path, given = cfg.init.params_from, cfg.data.tokenizer
  if not path:
    return config_lib.resolved(cfg), None
  if path.startswith("hf:"):
    hf_dir = path[len("hf:"):]
    source = _from_hf(path, hf.source_config)
    if not source.data.tokenizer:
      raise errors.UserError(f"init.params_from={path}: the folder has no tokenizer files "
                             "(tokenizer.json, vocab.txt, or vocab.json + merges.txt); add the "
                             "model's tokenizer files to it")
    cfg = config_lib.resolved(cfg, config_lib.source_changes(source, hf_dir))
  else:
    source_workdir = checkpoint.run_dir(path)
    cfg = config_lib.resolved(cfg, config_lib.source_changes(
        config_lib.load_run_config(source_workdir), source_workdir))
  theirs = cfg.data.tokenizer
  if given and given != theirs and (tokenizer_lib.load(given).fingerprint !=
                                    tokenizer_lib.load(theirs).fingerprint):
    raise errors.UserError(
        f"data.tokenizer={given} is not the tokenizer the parameters in "
        f"init.params_from={path} were trained with ({theirs}); leave data.tokenizer empty "
        "to use that one")
  return cfg, path


def _from_hf(path: str, read):
  """read(the folder of init.params_from=hf:DIR), or one line on installing the hf extra, or
  on what is wrong with the folder, naming the setting."""
  hf_dir = path[len("hf:"):]
  try:
    return read(hf_dir)
  except hf_extra.MissingExtra as e:
    # A converted run's weights read without the extra; its tokenizer (the folder's) does not.
    convert = (f", or convert the folder where it is installed (python -m lmssl.convert "
               f"from-hf --hf_dir {hf_dir} --workdir RUN) and set init.params_from=RUN"
               if e.module.split(".")[0] in ("torch", "safetensors") else "")
    raise errors.UserError(
        f"init.params_from={path} reads a HuggingFace model folder, which needs the `hf` "
        f"extra: {e.missing}; install it with {hf_extra.INSTALL}{convert}") from e
  except errors.UserError as e:
    raise errors.UserError(f"init.params_from={path}: {e}") from None


def warm_start(state, path: str):
  """The state with another run's (or a HF model's, converted now) parameters: the backbone
  must fit exactly; heads and adapters the source lacks (or shapes differently) keep their
  fresh init."""
  def may_be_new(key):
    return not key.startswith("['transformer']") or lora_lib.is_adapter(key)
  if path.startswith("hf:"):
    values, fresh = checkpoint.place_params(_from_hf(path, hf.load)[1], state.params,
                                            may_be_new, path)
  else:
    values, fresh = checkpoint.load_params(path, state.params, may_be_new)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: values.get(jax.tree_util.keystr(p), x), state.params)
  if fresh:
    metrics_lib.log(f"initialized fresh: {', '.join(fresh)}")
  return state.replace(params=params)


def check_own_tokenizer(cfg, workdir: str) -> None:
  """A tokenizer.model this workdir's run trained, damaged, is told as that (restore it, or
  start over), not as a data.tokenizer to set: data preparation would load it as a setting's.
  A missing one is trained again, the same from the same text."""
  own = config_lib.tokenizer_path(cfg, workdir)
  if not cfg.task.kind and not cfg.data.tokenizer and files.at(own).exists():
    tokenizer_lib.load_of_run(own, workdir)


def check_same_run(cfg, workdir: str) -> None:
  """Refuses a workdir that holds a run made with other run-defining settings, unless told."""
  if not files.at(os.path.join(workdir, "config.json")).exists():
    return
  changes = config_lib.run_changes(config_lib.load_run_config(workdir), cfg)
  if changes and not cfg.checkpoint.allow_config_change:
    raise errors.UserError(
        f"workdir {workdir} holds a run with other settings ({errors.first(changes, 6)}); "
        "use a new --workdir, resume with that run's settings (its config.json), or set "
        "--config.checkpoint.allow_config_change=True to continue it with these")
  if changes:
    metrics_lib.log(f"continuing {workdir} with changed settings: {'; '.join(changes)}")


# What a run writes in its workdir (and lock.json, which its lock removes).
_OUTPUTS = ("config.json", "tokenizer.model", "metrics.jsonl", "tensorboard", "checkpoints",
            "best", "best.json")


class FreshRun:
  """A run starting in a workdir with no run in it (no config.json, no checkpoint), and the
  outputs the workdir lacked. Ending without a committed checkpoint, it removes those again
  (`undo`): bad input writes nothing, and no config.json is left to refuse the next command's
  settings for a run that never saved anything."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.new = [n for n in _OUTPUTS if not files.at(os.path.join(workdir, n)).exists()]
    self.fresh = "config.json" in self.new and not checkpoint.committed_steps(workdir)

  def undo(self) -> None:
    if not self.fresh or checkpoint.committed_steps(self.workdir):
      return
    for name in self.new:
      path = os.path.join(self.workdir, name)
      with contextlib.suppress(OSError):  # the run's own error is the one to report
        if name == "checkpoints":  # where a failed save's writes may still land
          checkpoint_faults.remove_after_late_writes(path)
        else:
          files.remove(path)


class Settings:
  """workdir/config.json, the settings the workdir's checkpoints were made with: written at
  once by a run from step 0, and by a resumed one (whose settings may have changed, with
  checkpoint.allow_config_change) with its first checkpoint, so that one failing before then
  leaves the workdir's settings, and the command that made them, as they were."""

  def __init__(self, cfg, workdir: str, start: int):
    self.cfg, self.path, self.pending = cfg, os.path.join(workdir, "config.json"), True
    if start == 0:
      self.saved()

  def saved(self, result=None):
    """Call after each checkpoint is saved (passes `result` through)."""
    if self.pending and jax.process_index() == 0:
      files.write_atomically(self.path, config_lib.to_json(self.cfg))
    self.pending = False
    return result


def restore(ckpt, abstract, init, cfg, mesh, workdir: str, meta: dict, tok):
  """The state to start from, laid out as `abstract` (shapes and shardings), in this order of
  precedence:
    1) the workdir's latest checkpoint: resume this run exactly (state, step, data order);
    2) init.params_from: another run's parameters (backbone + matching heads), new
       optimizer, step 0 (fine-tuning);
    3) neither: a fresh init, to train from scratch.
  Only one state is ever in memory: a resumed run reads into `abstract`, not over a fresh
  init. `meta` is what this run stores beside each checkpoint; a resumed one must agree."""
  def check(saved):  # checked before the state, whose shapes follow the tokenizer's
    if saved.get("seed", meta["seed"]) != meta["seed"]:
      raise errors.UserError(f"workdir {workdir} was trained with seed {saved['seed']}, not "
                             f"{meta['seed']}; use the same seed to resume or a new workdir")
    if saved.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
      raise errors.UserError(
          f"tokenizer {tok.path} is not the one the checkpoints in {ckpt.directory} were "
          "trained with (its pieces differ); resume with that run's tokenizer, or train this "
          "one in a new --workdir")

  # The newest intact checkpoint; a damaged one after it is moved aside (checkpoint.restore).
  restored = checkpoint.restore(ckpt, abstract, check=check)
  if restored is not None:
    state, _ = restored
    metrics_lib.log(f"resumed from step {int(state.step)} in {ckpt.directory}")
    return state
  state, _ = steps.create_state(cfg, mesh, abstract)
  if init is not None:
    state = warm_start(state, init)
    metrics_lib.log(f"parameters from {init}")
  return state

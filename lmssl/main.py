"""lmssl [train|eval|sample] ...

  python -m lmssl.main --config configs/mlm_base.py:size=tiny --workdir DIR [--config.KEY=VALUE]
  python -m lmssl.main eval --workdir DIR [--eval_source SOURCE] [--best]
  python -m lmssl.main sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [--temperature T]
(`lmssl` is the same command once installed.) An MLM run's `sample` fills each [MASK] in the
prompt; a causal LM continues the prompts.
"""

import json
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lmssl import config_file

MODES = ("train", "eval", "sample")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variants] (train).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_MODE = flags.DEFINE_enum("mode", None, MODES, "Same as the first argument; default train.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "HOST:PORT of process 0 for multi-process runs without auto-detection "
    "(with --num_processes and --process_id; or env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
    "JAX_PROCESS_ID). Cloud TPU VMs and SLURM need none of these: use --distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the other processes with jax.distributed.initialize(), which "
    "finds them itself on Cloud TPU VMs, SLURM and Open MPI.")
_BEST = flags.DEFINE_bool("best", False, "eval/sample: a fine-tuning run's best checkpoint.")
_EVAL_SOURCE = flags.DEFINE_string("eval_source", "", "eval: a corpus or task file instead of "
                                   "the run's own eval data (same forms as the config).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: a prompt (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 50, "sample: tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sample: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample: keep the k likeliest tokens (0: all); "
                              "fill-mask: candidates shown.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample: nucleus probability mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
flags.mark_flag_as_required("workdir")


def _run(mode: str) -> None:
  from lmssl import errors
  if mode == "train":
    if _CONFIG.value is None:
      raise errors.UserError("train needs --config FILE[:variants]")
    from lmssl import train
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  elif mode == "eval":
    from lmssl import evaluate
    print(json.dumps(evaluate.evaluate_run(_WORKDIR.value, _EVAL_SOURCE.value, _BEST.value)))
  else:
    if not _PROMPT.value:
      raise errors.UserError("sample needs at least one --prompt TEXT")
    from lmssl import config as config_lib
    from lmssl import inference
    if config_lib.load_run_config(_WORKDIR.value).objective == "mlm":
      for text in _PROMPT.value:
        found = inference.fill_mask_text(_WORKDIR.value, text, top_k=_TOP_K.value or 5,
                                         best=_BEST.value)
        print(json.dumps({"prompt": text, "masks": [
            [{"piece": piece, "prob": round(prob, 4)} for piece, prob in c] for c in found]}))
      return
    outputs = inference.generate_text(
        _WORKDIR.value, _PROMPT.value, best=_BEST.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        seed=_SEED.value)
    for prompt, text in zip(_PROMPT.value, outputs):
      print(json.dumps({"prompt": prompt, "continuation": text}))


def main(argv):
  mode = _MODE.value or (argv[1] if len(argv) > 1 else "train")
  extra = argv[2:] if len(argv) > 1 and not _MODE.value else argv[1:]
  if mode not in MODES or extra:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; the one positional argument is the "
                         f"mode ({'|'.join(MODES)}); knobs go as --config.KEY=VALUE")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter; lmssl prints its own progress
  from lmssl import distributed
  from lmssl import errors
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value)
    _run(mode)
  except errors.UserError as e:
    sys.exit(f"lmssl: error: {e}")
  except errors.Stopped as e:
    print(f"lmssl: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
    message = _path_mixup(e)
    if message is None:  # not a file and a directory mixed up
      _bug(e)
    sys.exit(f"lmssl: error: {message}")
  except Exception as e:  # pylint: disable=broad-except
    _bug(e)


def _bug(e: Exception) -> None:
  """Anything not a user's mistake (those are UserErrors) is lmssl's: the traceback, then a
  last line that says so."""
  traceback.print_exc()
  sys.exit(f"lmssl: this is a bug in lmssl ({type(e).__name__} above), not in your command or "
           "data; please report it with the traceback and the command")


def _path_mixup(e: OSError) -> str | None:
  """One line for a file standing where lmssl needs a directory (a --workdir that is a file),
  or a directory where it writes or reads a file (a metrics.jsonl that is a directory); None
  when `e` is neither."""
  path = e.filename
  if not isinstance(path, str) or not path:
    return None
  workdir = os.path.abspath(_WORKDIR.value or "")
  if isinstance(e, IsADirectoryError):
    if not os.path.isdir(path):
      return None
    where = " in the workdir" if os.path.dirname(os.path.abspath(path)) == workdir else ""
    return (f"{path} is a directory, but lmssl reads or writes a file of that name{where}; "
            "move the directory away (or use another --workdir) and run again")
  blocking = path  # the path itself or the first of its parents that is a file
  while not os.path.isfile(blocking) and os.path.dirname(blocking) not in ("", blocking):
    blocking = os.path.dirname(blocking)
  if not os.path.isfile(blocking):
    return None
  if os.path.abspath(blocking) == workdir:
    return (f"--workdir {blocking} is a file, but a run needs a directory there; give --workdir "
            "a new or existing directory, or move the file away")
  if workdir.startswith(os.path.abspath(blocking) + os.sep):
    return (f"--workdir {_WORKDIR.value} cannot be made: {blocking} is a file, not a directory; "
            "give --workdir a path whose parents are directories, or move the file away")
  return (f"{blocking} is a file, but lmssl needs a directory there (to hold {path}); move the "
          "file away, or choose another path")


def _parse_flags(argv):
  """absl's flag parsing, with these mistakes told in one line instead of a traceback: a config
  file that cannot be loaded (config_file.py), a --config.KEY naming no setting, and a value
  the config code refuses. Anything else raised here is lmssl's bug, and says so."""
  try:
    return config_file.parse_flags(argv)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, (KeyError, AttributeError, flags.UnrecognizedFlagError)):
      unknown = _unknown_setting(argv)
      if unknown is not None:
        sys.exit(f"lmssl: error: {unknown}")
    if not isinstance(e, flags.Error):
      _bug(e)
    refused = _innermost_user_error(e)
    if refused is not None:  # the config code's own message, which absl wraps in its report
      sys.exit(f"lmssl: error: {refused}")
    sys.exit(f"lmssl: error: {e}\nPass --helpfull to see every flag.")


def _unknown_setting(argv) -> str | None:
  """The first --config.KEY in `argv` that names no setting of the base config (which
  declares every knob), told with the nearest name; None when every one names a setting."""
  import difflib
  from lmssl import config as config_lib
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    given = arg.split("=", 1)[0]
    section = config_lib.base_config()
    for part in given.split(".")[1:]:
      known = list(section.keys()) if hasattr(section, "keys") else []
      if part not in known:
        near = difflib.get_close_matches(part, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return (f"{given} names no setting: the config has no {part!r}{hint}; lmssl/config.py "
                "lists every setting")
      section = section[part]
  return None


def _innermost_user_error(e: BaseException):
  """The UserError `e` was raised from, if any: the first one raised, whose message is lmssl's
  own line (absl and ml_collections re-raise it with their report around it)."""
  from lmssl import errors
  found, seen = None, 0
  while e is not None and seen < 16:
    if isinstance(e, errors.UserError):
      found = e
    e, seen = e.__cause__ or e.__context__, seen + 1
  return found


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

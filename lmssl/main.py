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
  """absl's flag parsing, with these mistakes told in one line instead of a traceback: a
  --config.KEY naming no setting, a config file (or variant) the config code refuses, and a
  config file that is missing, unreadable or not valid Python."""
  try:
    parsed = flags.FLAGS(argv)
  except SyntaxError as e:  # the config file (or one it imports) is not valid Python
    sys.exit(f"lmssl: error: {_syntax(e, _config_file(argv))}")
  except OSError as e:  # a --config.KEY=VALUE given for a config file that failed to load
    if e.__cause__ is None:  # not ml_collections' report of the config file's own error
      raise
    sys.exit(f"lmssl: error: {_unloadable(e.__cause__, _config_file(argv))}")
  except (KeyError, AttributeError, flags.UnrecognizedFlagError):  # a --config.KEY unknown
    unknown = _unknown_setting(argv)
    if unknown is None:
      raise
    sys.exit(f"lmssl: error: {unknown}")
  except flags.Error as e:
    refused = _innermost_user_error(e)
    if refused is not None:  # the config code's own message, which absl wraps in its report
      sys.exit(f"lmssl: error: {refused}")
    sys.exit(f"lmssl: error: {e}\nPass --helpfull to see every flag.")
  value = flags.FLAGS["config"].value  # ml_collections keeps a load error until first use
  if type(value).__name__ == "_ErrorConfig":
    sys.exit(f"lmssl: error: {_unloadable(vars(value)['_error'], _config_file(argv))}")
  return parsed


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


_CONFIG_EXAMPLE = "e.g. --config configs/mlm_base.py:smoke (configs/ holds lmssl's own)"


def _config_file(argv) -> str:
  """The --config file named in `argv`, without its :variants."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.lstrip("-").partition("=")
    if name == "config" and arg.startswith("-"):
      value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
      return value.split(":", 1)[0] or "FILE"
  return "FILE"


def _unloadable(error: Exception, path: str) -> str:
  """Why the --config file could not be read, in one line."""
  if isinstance(error, FileNotFoundError) or "No such file or directory" in str(error):
    return (f"--config {path}: no such file (relative to {os.getcwd()}); give an existing "
            f"config file, {_CONFIG_EXAMPLE}")
  reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
  return (f"--config {path} cannot be read ({reason}); give a config file, "
          f"{_CONFIG_EXAMPLE}")


def _syntax(e: SyntaxError, path: str) -> str:
  where = f"{e.filename}, line {e.lineno}" if e.filename else "the config file"
  text = f" at {e.text.strip()!r}" if e.text and e.text.strip() else ""
  return (f"{where} is not valid Python: {e.msg}{text}; fix it there (--config {path} must be "
          "a Python file defining get_config)")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

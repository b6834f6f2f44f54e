"""lmssl [train|eval|sample] ...

  python -m lmssl.main --config configs/mlm_base.py:size=tiny --workdir DIR [--config.KEY=VALUE]
  python -m lmssl.main eval --workdir DIR [--eval_source SOURCE] [--best]
  python -m lmssl.main sample --workdir DIR --prompt TEXT [--prompt TEXT ...] [--temperature T]
(`lmssl` is the same command once installed.) An MLM run's `sample` fills each [MASK] in the
prompt; a causal LM continues the prompts.
"""

import json
import re
import sys

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
    from lmssl import train
    print(json.dumps(train.evaluate_run(_WORKDIR.value, _EVAL_SOURCE.value, _BEST.value)))
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


def _parse_flags(argv):
  """absl's flag parsing, with two mistakes told in one line instead of a traceback: a
  --config.KEY naming no setting, and a config file (or variant) the config code refuses."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # how ml_collections refuses an unknown key
    text = str(e).replace("\\", "")
    key = re.search(r"'(\w+)'", text)
    key = key.group(1) if key else text
    hint = re.search(r'Did you mean "(\w+)"', text)
    given = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                  and key in a.split("=")[0].split(".")), "--config.KEY")
    sys.exit(f"lmssl: error: {given} names no setting: the config has no {key!r}"
             f"{f' (did you mean {hint.group(1)!r}?)' if hint else ''}; lmssl/config.py lists "
             "every setting")
  except flags.Error as e:
    _, marker, refused = str(e).rpartition("lmssl.errors.UserError: ")
    if marker:  # the config code's own message, from inside absl's report of it
      sys.exit(f"lmssl: error: {refused.strip()}")
    sys.exit(f"lmssl: error: {e}\nPass --helpfull to see every flag.")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""A run's data: its tokenizer and examples (`load`), then its batches on a mesh (`batches`).

Training and evaluation both build on this, so neither imports the other. `load` reads the
config and changes nothing: what the data decides about the run (the tokenizer's vocabulary,
a task's labels) is returned for the caller to resolve its config with.
"""

import dataclasses

from lmssl import config as config_lib
from lmssl import distributed
from lmssl import errors
from lmssl import sharding
from lmssl.data import packed
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import tasks
from lmssl.hf import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class RunData:
  tokenizer: tokenizer_lib.AnyTokenizer
  objective: str  # the pipeline's: "mlm", "clm" or "task"
  train: dict  # arrays of examples
  eval: dict
  where: str  # the prepared data's directory, or the task's sources
  changes: dict  # config values the data decides (model.vocab_size, task.labels)


def load(cfg, workdir: str) -> RunData:
  """The tokenizer and examples of the run `cfg` describes. Pretraining data is prepared (and
  cached) on first use, by process 0 before the others; a task's files are read and encoded."""
  if cfg.task.kind:
    if not cfg.data.tokenizer:
      raise errors.UserError("fine-tuning needs the pretrained model's tokenizer: set "
                             "--config.init.params_from=RUN (or --config.data.tokenizer)")
    tok = tokenizer_lib.load(cfg.data.tokenizer)
    train, evals, names = tasks.load(cfg.task, tok, cfg.data.seq_len)
    changes = {"task.labels": config_lib.joined_labels(names)}
    objective, where = "task", f"{cfg.task.train_source}, {cfg.task.eval_source}"
  else:
    tok, where = prepare_data(cfg.data, workdir)
    train = prepare.load_prepared(where, "train")
    evals = prepare.load_prepared(where, "validation")
    objective, changes = cfg.objective, {}
  changes.update(config_lib.vocab_change(cfg, tok.vocab_size))
  return RunData(tok, objective, train, evals, where, changes)


def prepare_data(data_cfg, workdir: str):
  """(tokenizer, prepared directory) of pretraining data, prepared where missing. Process 0
  trains a tokenizer if there is none; then every process prepares its part of the shards,
  and each completes what it cannot see (a cache on local disks) and writes the manifest."""
  given = tokenizer_lib.load(data_cfg.tokenizer) if data_cfg.tokenizer else None
  tok = distributed.process_0_first(lambda: prepare.tokenizer_for(data_cfg, given, workdir),
                                    "prepare the data")
  workers = data_cfg.prepare_workers
  if distributed.process_count() > 1:
    part = (distributed.process_index(), distributed.process_count())
    distributed.every_process(
        lambda: prepare.prepare(data_cfg, tok, workdir, part=part, workers=workers),
        "prepare the data")
  return tok, prepare.prepare(data_cfg, tok, workdir, workers=workers)[1]


def batches(cfg, data: RunData, mesh, full_eval: bool = False):
  """(a factory of this host's train batches for steps [start, end), this host's eval batches,
  the same in each pass). Each host reads the rows of each batch that its devices in `mesh`
  hold. Task evals, and all evals with `full_eval`, cover every example once; else pretraining
  evals read eval.steps batches."""
  eval_arrays, eval_steps = data.eval, cfg.eval.steps
  streamed = full_eval and isinstance(eval_arrays, packed.PackedRows)
  if full_eval or data.objective == "task":  # pad to whole batches with rows that weigh nothing
    eval_arrays = (eval_arrays.padded(cfg.eval.batch_size) if streamed else
                   tasks.pad_rows(dict(eval_arrays), cfg.eval.batch_size))
    eval_steps = (eval_arrays.num_rows if streamed else
                  len(next(iter(eval_arrays.values())))) // cfg.eval.batch_size
  common = dict(objective=data.objective, seed=cfg.seed, data_cfg=cfg.data,
                tokenizer=data.tokenizer)

  def train_batches(start_step, end_step):
    ds = pipeline.make_dataset(
        data.train, global_batch=cfg.train.batch_size, start_step=start_step,
        host_rows=sharding.host_rows(mesh, cfg.train.batch_size),
        num_steps=end_step - start_step, **common)
    return pipeline.iterate(ds)

  def eval_batches():
    return pipeline.iterate(pipeline.make_dataset(
        eval_arrays, global_batch=cfg.eval.batch_size, start_step=0, shuffle=False,
        host_rows=sharding.host_rows(mesh, cfg.eval.batch_size), num_steps=eval_steps,
        **common))

  # The eval set is the same rows and masks every time. eval.steps batches, or a task's
  # examples, are read once and kept for each evaluation; all of a prepared split is read
  # from its shards as each pass needs it, so a host's memory does not grow with the split.
  return train_batches, _EachPass(eval_batches) if streamed else list(eval_batches())


class _EachPass:
  """Batches made anew by `make()` for each pass over them."""

  def __init__(self, make):
    self._make = make

  def __iter__(self):
    return iter(self._make())

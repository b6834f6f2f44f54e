"""Evaluation: a model's metrics on a fixed list of eval batches (pretraining losses,
perplexity and bits per byte, or a fine-tuning task's scores from its predictions), the metric
that picks a fine-tuning run's best checkpoint and the keeping of it, and the `eval` command."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import datasets
from lmssl import errors
from lmssl import files
from lmssl import heads
from lmssl import inference
from lmssl import metrics as metrics_lib
from lmssl import scores
from lmssl import sharding
from lmssl import steps

# The metric that picks a fine-tuning run's best checkpoint unless task.metric names another.
MAIN_METRIC = {"classification": "accuracy", "regression": "pearson", "tokens": "entity_f1"}


def run(eval_fn, params, eval_batches, mesh, cfg, token_bytes_V) -> dict:
  """{"eval_...": value} over all of `eval_batches` (this host's part of each global batch)."""
  head_names = heads.heads_for(cfg)
  totals, rows = None, []
  for local in eval_batches:
    sums, batch_rows = eval_fn(params, sharding.global_batch(local, mesh), token_bytes_V)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if batch_rows:
      rows.append(jax.device_get(batch_rows))
  totals = jax.device_get(totals)
  out = {k: float(v) for k, v in steps.summarize(totals, head_names, "eval_").items()}
  if "clm" in totals:
    nats = float(totals["clm"]["loss_sum"])
    out["eval_perplexity"] = math.exp(min(nats / max(float(totals["clm"]["weight_sum"]), 1), 50))
    out["eval_bits_per_byte"] = nats / math.log(2) / max(float(totals["clm"]["byte_sum"]), 1)
  if rows:
    joined = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    out.update({f"eval_{k}": v for k, v in task_scores(joined, cfg).items()})
  return out


def task_scores(rows: dict, cfg) -> dict:
  """Scores of a fine-tuning head from its predictions, labels and weights (0 on padding)."""
  kind = cfg.task.kind
  preds, labels, weights = rows["predictions"], rows["labels"], rows["weights"] > 0
  if kind == "classification":
    return scores.classification(preds[weights], labels[weights].astype(np.int64))
  if kind == "regression":
    return scores.regression(preds[weights], labels[weights])
  names = np.array(cfg.task.labels.split(","))
  keep = weights.any(axis=1)  # rows that are padding have no words
  return scores.token_classification(
      [list(names[p[w]]) for p, w in zip(preds[keep], weights[keep])],
      [list(names[y[w]]) for y, w in zip(labels[keep], weights[keep])])


def main_metric(cfg) -> tuple[str, bool]:
  """(eval key, higher is better) that decides the best checkpoint of a fine-tuning run."""
  name = cfg.task.metric or MAIN_METRIC[cfg.task.kind]
  known = sorted(set(scores.HIGHER_IS_BETTER) | {"loss"})
  if name not in known:
    raise errors.UserError(f"task.metric={name!r} is not a metric lmssl reports; use one of "
                           f"{known}")
  return f"eval_{name}", scores.HIGHER_IS_BETTER.get(name, name != "loss")


class Best:
  """Keeps the parameters of the best evaluation so far in `workdir/best` (+ best.json)."""

  def __init__(self, workdir: str, key: str, higher_is_better: bool):
    self.key, self.sign = key, 1.0 if higher_is_better else -1.0
    self.path = os.path.join(files.absolute(workdir), "best.json")
    # Laid out like a run's checkpoints ({"params"} as the state), so `init.params_from`,
    # `lmssl eval --best` and `lmssl sample --best` read it like any checkpoint.
    self.mngr = checkpoint.manager(os.path.join(workdir, "best"), ml_collections.ConfigDict(
        dict(keep=1, async_save=False)))
    self.record = None
    if files.at(self.path).exists():  # resuming: beat the best of the interrupted run
      self.record = json.loads(files.read_text(self.path))

  def update(self, step: int, evals: dict, params) -> None:
    value = evals[self.key]
    if self.record is not None and self.sign * value <= self.sign * self.record["value"]:
      return
    checkpoint.save(self.mngr, step, {"params": params}, {"metric": self.key, "value": value})
    checkpoint.wait(self.mngr)  # best.json only ever names a committed checkpoint
    self.record = {"step": step, "metric": self.key, "value": value, "evals": evals}
    if jax.process_index() == 0:
      files.write_atomically(self.path, json.dumps(self.record, indent=2))
    metrics_lib.log(f"best {self.key} {value:.4f} at step {step}")

  def close(self) -> None:
    self.mngr.close()


def evaluate_run(workdir: str, eval_source: str = "", best: bool = False) -> dict:
  """The `eval` command: metrics of the run in `workdir` on all of its eval data, or on
  `eval_source` (a corpus for a pretraining run, a task file for a fine-tuning run). Writes
  nothing."""
  mesh = inference.inference_mesh()
  cfg, params, read = inference.load_checkpoint(workdir, best, mesh)
  shards = sharding.batch_shards(mesh)
  changes = {"data.tokenizer": config_lib.tokenizer_path(cfg, workdir),
             "eval.batch_size": shards * max(1, cfg.eval.batch_size // shards)}
  if eval_source:
    changes["task.eval_source" if cfg.task.kind else "data.val_source"] = eval_source
  cfg = config_lib.resolved(cfg, changes)
  data = datasets.load(cfg, workdir)
  cfg = config_lib.resolved(cfg, data.changes)
  _, eval_batches = datasets.batches(cfg, data, mesh, full_eval=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    eval_fn = steps.compile_eval(cfg, jax.tree.map(lambda x: x.sharding, params), mesh)
    evals = run(eval_fn, params, eval_batches, mesh, cfg,
                np.asarray(data.tokenizer.piece_bytes()))
  # The checkpoint read, by its step: the newest intact one, the latest only when undamaged.
  return {"workdir": files.absolute(workdir), "data": data.where, "checkpoint": read,
          "step": int(os.path.basename(read)), **evals}

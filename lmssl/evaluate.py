"""Metrics of a model on a fixed list of eval batches: pretraining losses, perplexity and bits
per byte, or a fine-tuning task's scores from its predictions."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmssl import errors
from lmssl import heads
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

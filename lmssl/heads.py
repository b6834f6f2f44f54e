"""Objective heads over the shared Transformer, and the full model built from a config.

MLM predicts only at the gathered masked positions (at most P per sequence, as in BERT), so the
vocabulary projection costs P/L of a full one. CLM predicts the next token at every position;
which of them count, and every head's loss, is `losses.py`'s business.

Shape letters as in `model.py`, plus P masked predictions per sequence.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lmssl import losses
from lmssl import model as model_lib


class _Kernel(nn.Module):
  """An untied output kernel [V, D], laid out as the embedding table it stands in for (and as
  torch's lm_head.weight), so that the logits and their gradient take the tied table's path:
  a [D, V] kernel transposed in the step made XLA's CPU Llama-mini step 25% slower."""
  cfg: Any

  @nn.compact
  def __call__(self):
    cfg = self.cfg
    return self.param("kernel", model_lib.logical_init(("vocab", "embed")),
                      (cfg.vocab_size, cfg.d_model), cfg.param_dtype)


class OutputProjection(nn.Module):
  """Hidden states to vocabulary logits: the tied embedding table (plus bias) or its own kernel;
  with `chunks` > 0 the projection comes back `Unprojected`, for a loss in that many pieces."""
  cfg: Any

  @nn.compact
  def __call__(self, h_BxXxD, table_VxD, chunks: int = 0):
    cfg = self.cfg
    w_VxD = table_VxD if cfg.tie_embeddings else _Kernel(cfg, name="kernel")()
    bias_V = None
    if cfg.output_bias:
      bias_V = self.param("bias", model_lib.logical_init(("vocab",), nn.initializers.zeros),
                          (cfg.vocab_size,), cfg.param_dtype)
    out = losses.Unprojected(h_BxXxD, w_VxD, bias_V, cfg.dtype, max(chunks, 1))
    return out if chunks else out.logits()


# The [D, D] kernels of the MLM transform and the pooler are named as Mlp.wo's [F, D]: a logical
# name may occur only once per array, and ("mlp", "embed") shards the input dim over tensor and
# the output dim over fsdp (sharding.py), so the output comes back with D whole (one all-reduce
# over tensor) for the LayerNorm or tanh that follows.
_SQUARE_AXES = ("mlp", "embed")


class MLMHead(nn.Module):
  """BERT's head: gather masked positions, dense + GELU + LayerNorm, then project to the vocab."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD, table_VxD, masked_positions_BxP):
    cfg = self.cfg
    h_BxPxD = jnp.take_along_axis(x_BxLxD, masked_positions_BxP[..., None], axis=1)
    h_BxPxD = _dense(cfg, cfg.d_model, _SQUARE_AXES, "transform", cfg.use_bias)(h_BxPxD)
    h_BxPxD = model_lib.norm(cfg, "transform_norm")(model_lib.gelu(cfg, h_BxPxD))
    return OutputProjection(cfg, name="output")(h_BxPxD, table_VxD)


class Pooler(nn.Module):
  """One vector per sequence: [CLS] (position 0) through dense + tanh as BERT does for an
  encoder; the last real token for a causal decoder (the only one that has seen the whole row)."""
  cfg: Any
  causal: bool

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL):
    if self.causal:
      length_B = jnp.sum((segment_ids_BxL > 0).astype(jnp.int32), axis=1)
      last_B = jnp.maximum(length_B - 1, 0)
      return jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    cfg = self.cfg
    return jnp.tanh(_dense(cfg, cfg.d_model, _SQUARE_AXES, "dense", cfg.use_bias)(
        x_BxLxD[:, 0]))


def _dense(cfg, features: int, kernel_axes: tuple, name: str, bias: bool = True):
  """A dense layer over the last axis (the params of `nn.Dense`: kernel [in, out], bias
  [out]), as a `Projection`, so that its bias gradient sums in float32. Task classifiers keep
  their bias whatever model.use_bias says (they are lmssl's heads, not a family's)."""
  def apply(x):
    return model_lib.Projection(cfg, "...d,df->...f", (x.shape[-1], features), kernel_axes,
                                kernel_axes[-1:], bias, name=name)(x)
  return apply


def _classifier(cfg, num_outputs: int, name: str):
  return _dense(cfg, num_outputs, ("embed", "classes"), name)


# What each head predicts: "mlm" masked tokens, "clm" next tokens, "pair" NSP/SOP label per
# sequence, and the fine-tuning heads "classification", "regression", "tokens" (a tag per token).
HEADS = ("mlm", "clm", "pair", "classification", "regression", "tokens")
PRETRAINING_HEADS = ("mlm", "clm", "pair")
SEQUENCE_HEADS = ("pair", "classification", "regression")


def heads_for(cfg) -> tuple[str, ...]:
  """The heads a run trains: the task's when fine-tuning, else the objective's (+ pair)."""
  if cfg.task.kind:
    return (cfg.task.kind,)
  if cfg.objective == "mlm" and cfg.data.sentence_pair:
    return ("mlm", "pair")
  return (cfg.objective,)


def module_config(cfg):
  return model_lib.module_config(cfg.model, cfg.lora)


def build_model(cfg, deterministic: bool = True) -> "LanguageModel":
  """The full model of a run config: the backbone (with any adapters) and the run's heads."""
  labels = [n for n in cfg.task.labels.split(",") if n]
  return LanguageModel(module_config(cfg), cfg.objective, heads_for(cfg), len(labels),
                       cfg.task.dropout, deterministic, cfg.train.loss_chunks)


class LanguageModel(nn.Module):
  """The Transformer (causal when `objective` is "clm") with `heads` on top.

  Returns {head: output}: logits [B, P, V] for mlm, [B, L, V] for clm (`Unprojected`, for a
  loss in `loss_chunks` pieces, when that is set), [B, 2] for pair, [B, C] for classification,
  [B] for regression and [B, L, C] for tokens (C = num_labels).
  """
  cfg: Any
  objective: str
  heads: tuple = ()
  num_labels: int = 0
  head_dropout: float = 0.0
  deterministic: bool = True
  loss_chunks: int = 0  # k > 0: clm's output is Unprojected, for a loss in k pieces

  @nn.compact
  def __call__(self, batch):
    cfg, causal = self.cfg, self.objective == "clm"
    x_BxLxD, table_VxD = model_lib.Transformer(cfg, self.deterministic, name="transformer")(
        batch["input_ids"], batch["segment_ids"], batch["positions"], batch.get("token_types"),
        causal=causal)
    heads = self.heads or (self.objective,)
    drop = nn.Dropout(self.head_dropout, deterministic=self.deterministic)
    out = {}
    if any(h in SEQUENCE_HEADS for h in heads):
      pooled_BxD = Pooler(cfg, causal, name="pooler")(x_BxLxD, batch["segment_ids"])
    for head in heads:
      if head == "mlm":
        out[head] = MLMHead(cfg, name="mlm_head")(x_BxLxD, table_VxD, batch["masked_positions"])
      elif head == "clm":
        out[head] = OutputProjection(cfg, name="clm_head")(x_BxLxD, table_VxD,
                                                            self.loss_chunks)
      elif head == "pair":
        out[head] = _classifier(cfg, 2, "pair_head")(pooled_BxD).astype(jnp.float32)
      elif head == "classification":
        out[head] = _classifier(cfg, self.num_labels, "task_head")(
            drop(pooled_BxD)).astype(jnp.float32)
      elif head == "regression":
        out[head] = _classifier(cfg, 1, "task_head")(drop(pooled_BxD))[:, 0].astype(jnp.float32)
      elif head == "tokens":
        out[head] = _classifier(cfg, self.num_labels, "task_head")(
            drop(x_BxLxD)).astype(jnp.float32)
      else:
        raise ValueError(f"unknown head {head!r}; known: {list(HEADS)}")
    return out


def predictions(outputs: dict, head: str):
  """Host-side predictions of a fine-tuning head: label ids, or values for regression."""
  out = outputs[head]
  return out if head == "regression" else jnp.argmax(out, axis=-1).astype(jnp.int32)

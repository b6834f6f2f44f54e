"""Objective heads over the shared Transformer, and their losses.

MLM predicts only at the gathered masked positions (at most P per sequence, as in BERT), so the
vocabulary projection costs P/L of a full one. CLM predicts the next token at every position but
never across a document boundary or into padding.

Shape letters as in `model.py`, plus P masked predictions per sequence.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import optax

from lmssl import model as model_lib


class OutputProjection(nn.Module):
  """Hidden states to vocabulary logits: the tied embedding table (plus bias) or its own kernel."""
  cfg: Any

  @nn.compact
  def __call__(self, h_BxXxD, table_VxD):
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits_BxXxV = jnp.einsum("bxd,vd->bxv", h_BxXxD, table_VxD.astype(cfg.dtype))
    else:
      logits_BxXxV = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          kernel_init=model_lib.logical_init(("embed", "vocab")), name="kernel")(h_BxXxD)
    if cfg.output_bias:
      bias_V = self.param("bias", model_lib.logical_init(("vocab",), nn.initializers.zeros),
                          (cfg.vocab_size,), cfg.param_dtype)
      logits_BxXxV += bias_V.astype(cfg.dtype)
    # fp32 for the softmax in the loss.
    return nn.with_logical_constraint(logits_BxXxV.astype(jnp.float32),
                                      ("batch", "length", "vocab"))


class MLMHead(nn.Module):
  """BERT's head: gather masked positions, dense + GELU + LayerNorm, then project to the vocab."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD, table_VxD, masked_positions_BxP):
    cfg = self.cfg
    h_BxPxD = jnp.take_along_axis(x_BxLxD, masked_positions_BxP[..., None], axis=1)
    h_BxPxD = nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       kernel_init=model_lib.logical_init(("mlp", "embed")),
                       bias_init=model_lib.logical_init(("embed",), nn.initializers.zeros),
                       name="transform")(h_BxPxD)
    h_BxPxD = model_lib.layer_norm(cfg, "transform_norm")(model_lib.gelu(cfg, h_BxPxD))
    return OutputProjection(cfg, name="output")(h_BxPxD, table_VxD)


class LanguageModel(nn.Module):
  """The Transformer with the head of `objective` ("mlm" or "clm")."""
  cfg: Any
  objective: str
  deterministic: bool = True

  @nn.compact
  def __call__(self, batch):
    x_BxLxD, table_VxD = model_lib.Transformer(
        self.cfg, self.deterministic, name="transformer")(
            batch["input_ids"], batch["segment_ids"], batch["positions"],
            batch.get("token_types"), causal=self.objective == "clm")
    if self.objective == "mlm":
      return MLMHead(self.cfg, name="mlm_head")(x_BxLxD, table_VxD, batch["masked_positions"])
    return OutputProjection(self.cfg, name="clm_head")(x_BxLxD, table_VxD)


def targets_and_weights(batch, objective: str):
  """What each logit row should predict, and whether it counts."""
  if objective == "mlm":
    return batch["masked_ids"], batch["masked_weights"].astype(jnp.float32)
  tokens_BxL, segments_BxL = batch["input_ids"], batch["segment_ids"]
  next_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))
  next_segment_BxL = jnp.pad(segments_BxL[:, 1:], ((0, 0), (0, 1)))
  same_document_BxL = (next_segment_BxL == segments_BxL) & (segments_BxL != 0)
  return next_BxL, same_document_BxL.astype(jnp.float32)


def loss_sums(logits_BxXxV, targets_BxX, weights_BxX):
  """Summed (not averaged) loss, weight and hits, so microbatches add up to the full batch."""
  xent_BxX = optax.softmax_cross_entropy_with_integer_labels(logits_BxXxV, targets_BxX)
  hits_BxX = (jnp.argmax(logits_BxXxV, axis=-1) == targets_BxX).astype(jnp.float32)
  return {"loss_sum": jnp.sum(xent_BxX * weights_BxX),
          "weight_sum": jnp.sum(weights_BxX),
          "correct_sum": jnp.sum(hits_BxX * weights_BxX)}

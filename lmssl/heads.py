"""Objective heads over the shared Transformer, and their losses.

MLM predicts only at the gathered masked positions (at most P per sequence, as in BERT), so the
vocabulary projection costs P/L of a full one. CLM predicts the next token at every position but
never across a document boundary or into padding.

Shape letters as in `model.py`, plus P masked predictions per sequence.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lmssl import model as model_lib


@flax.struct.dataclass
class Unprojected:
  """Hidden states and the vocabulary projection not yet applied: `logits()` applies it, and
  `loss_sums` applies it inside the loss, `chunks` pieces of the sequence at a time."""
  h_BxXxD: jax.Array
  w_VxD: jax.Array
  bias_V: jax.Array | None
  dtype: Any = flax.struct.field(pytree_node=False)
  chunks: int = flax.struct.field(pytree_node=False, default=1)

  def logits(self):
    logits_BxXxV = jnp.einsum("bxd,vd->bxv", self.h_BxXxD.astype(self.dtype),
                              self.w_VxD.astype(self.dtype))
    # fp32 for the softmax in the loss; the bias added in fp32 sums its gradient in fp32.
    logits_BxXxV = logits_BxXxV.astype(jnp.float32)
    if self.bias_V is not None:
      logits_BxXxV += self.bias_V.astype(jnp.float32)
    return nn.with_logical_constraint(logits_BxXxV, ("batch", "length", "vocab"))


class _Kernel(nn.Module):
  """An untied output kernel [D, V], where a DenseGeneral named "kernel" keeps it."""
  cfg: Any

  @nn.compact
  def __call__(self):
    cfg = self.cfg
    return self.param("kernel", model_lib.logical_init(("embed", "vocab")),
                      (cfg.d_model, cfg.vocab_size), cfg.param_dtype)


class OutputProjection(nn.Module):
  """Hidden states to vocabulary logits: the tied embedding table (plus bias) or its own kernel;
  with `chunks` > 0 the projection comes back `Unprojected`, for a loss in that many pieces."""
  cfg: Any

  @nn.compact
  def __call__(self, h_BxXxD, table_VxD, chunks: int = 0):
    cfg = self.cfg
    w_VxD = table_VxD if cfg.tie_embeddings else _Kernel(cfg, name="kernel")().T
    bias_V = None
    if cfg.output_bias:
      bias_V = self.param("bias", model_lib.logical_init(("vocab",), nn.initializers.zeros),
                          (cfg.vocab_size,), cfg.param_dtype)
    out = Unprojected(h_BxXxD, w_VxD, bias_V, cfg.dtype, max(chunks, 1))
    return out if chunks else out.logits()


class MLMHead(nn.Module):
  """BERT's head: gather masked positions, dense + GELU + LayerNorm, then project to the vocab."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD, table_VxD, masked_positions_BxP):
    cfg = self.cfg
    h_BxPxD = jnp.take_along_axis(x_BxLxD, masked_positions_BxP[..., None], axis=1)
    h_BxPxD = _dense(cfg, cfg.d_model, ("mlp", "embed"), "transform")(h_BxPxD)
    h_BxPxD = model_lib.layer_norm(cfg, "transform_norm")(model_lib.gelu(cfg, h_BxPxD))
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
    return jnp.tanh(_dense(cfg, cfg.d_model, ("mlp", "embed"), "dense")(x_BxLxD[:, 0]))


def _dense(cfg, features: int, kernel_axes: tuple, name: str):
  """A dense layer over the last axis (the params of `nn.Dense`: kernel [in, out], bias
  [out]), as a `Projection`, so that its bias gradient sums in float32."""
  def apply(x):
    return model_lib.Projection(cfg, "...d,df->...f", (x.shape[-1], features), kernel_axes,
                                kernel_axes[-1:], name=name)(x)
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


def targets_and_weights(batch, head: str):
  """What each output row of `head` should predict, and whether it counts."""
  if head == "mlm":
    return batch["masked_ids"], batch["masked_weights"].astype(jnp.float32)
  if head == "clm":
    tokens_BxL, segments_BxL = batch["input_ids"], batch["segment_ids"]
    next_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))
    next_segment_BxL = jnp.pad(segments_BxL[:, 1:], ((0, 0), (0, 1)))
    same_document_BxL = (next_segment_BxL == segments_BxL) & (segments_BxL != 0)
    return next_BxL, same_document_BxL.astype(jnp.float32)
  if head == "pair":
    labels_B = batch["pair_labels"]
    return labels_B, (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)
  return batch["labels"], batch["label_weights"].astype(jnp.float32)


def loss_sums(output, targets, weights, head: str = ""):
  """Summed (not averaged) loss, weight and hits, so microbatches add up to the full batch.

  Cross-entropy over the last axis of `output` (logits), or squared error for regression.
  """
  if head == "regression":
    err = output - targets.astype(jnp.float32)
    return {"loss_sum": jnp.sum(err * err * weights), "weight_sum": jnp.sum(weights),
            "correct_sum": jnp.zeros((), jnp.float32)}
  if isinstance(output, Unprojected):
    loss_sum, correct_sum = _chunked_terms(output, targets, weights)
    return {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights), "correct_sum": correct_sum}
  xent = optax.softmax_cross_entropy_with_integer_labels(output, targets)
  hits = (jnp.argmax(output, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(xent * weights), "weight_sum": jnp.sum(weights),
          "correct_sum": jnp.sum(hits * weights)}


def term_sums(outputs: dict, batch) -> dict:
  """{head: loss_sums} for every head in `outputs`."""
  return {head: loss_sums(out, *targets_and_weights(batch, head), head)
          for head, out in outputs.items()}


def predictions(outputs: dict, head: str):
  """Host-side predictions of a fine-tuning head: label ids, or values for regression."""
  out = outputs[head]
  return out if head == "regression" else jnp.argmax(out, axis=-1).astype(jnp.int32)


def _chunked_terms(out: Unprojected, targets_BxL, weights_BxL):
  """The summed cross-entropy and hits of `out.logits()`, made over `out.chunks` pieces of the
  length axis so that one piece's logits exist at a time, never all [B, L, V] of them.

  Under differentiation each piece's gradient (softmax minus one-hot) is used at once, to make
  the hidden states', the projection's and the bias's: nothing is recomputed or kept for the
  backward pass but those gradients, which are as large as the inputs.
  """
  def pieces(x_BxL_):
    batch, length = x_BxL_.shape[:2]
    x = x_BxL_.reshape(batch, out.chunks, length // out.chunks, *x_BxL_.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  has_bias = out.bias_V is not None
  bias_V = out.bias_V if has_bias else jnp.zeros(out.w_VxD.shape[:1], out.w_VxD.dtype)

  def piece_terms(h_BxCxD, w_VxD, bias_V, targets_BxC, weights_BxC, grads: bool):
    piece = Unprojected(h_BxCxD, w_VxD, bias_V if has_bias else None, out.dtype)
    logits_BxCxV = piece.logits()
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    terms = (jnp.sum((lse_BxC - target_BxC) * weights_BxC),
             jnp.sum((jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC) * weights_BxC))
    if not grads:
      return terms
    vocab = logits_BxCxV.shape[-1]
    d_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None])
               - jax.nn.one_hot(targets_BxC, vocab, dtype=jnp.float32)) * weights_BxC[..., None]
    d_BxCxV = d_BxCxV.astype(out.dtype)
    dh_BxCxD = jnp.einsum("bcv,vd->bcd", d_BxCxV, w_VxD.astype(out.dtype))
    dw_VxD = jnp.einsum("bcv,bcd->vd", d_BxCxV, h_BxCxD.astype(out.dtype),
                        preferred_element_type=jnp.float32)
    dbias_V = jnp.sum(d_BxCxV, axis=(0, 1), dtype=jnp.float32)
    return terms, (dh_BxCxD, dw_VxD, dbias_V)

  def forward(h_BxLxD, w_VxD, bias_V, targets_BxL, weights_BxL, grads: bool):
    def body(carry, xs):
      h, targets, weights = xs
      result = piece_terms(h, w_VxD, bias_V, targets, weights, grads)
      terms, piece_grads = result if grads else (result, None)
      sums = jax.tree.map(jnp.add, carry[0], terms)
      if not grads:
        return (sums, None), None
      dw_bias = jax.tree.map(jnp.add, carry[1], piece_grads[1:])
      return (sums, dw_bias), piece_grads[0]

    zero = jnp.zeros((), jnp.float32)
    init = ((zero, zero), (jnp.zeros(w_VxD.shape, jnp.float32),
                           jnp.zeros(bias_V.shape, jnp.float32)) if grads else None)
    (sums, dw_bias), dh = jax.lax.scan(body, init, tuple(pieces(x) for x in (
        h_BxLxD, targets_BxL, weights_BxL)))
    if not grads:
      return sums
    dh_BxLxD = jnp.moveaxis(dh, 0, 1).reshape(h_BxLxD.shape)
    return sums, (dh_BxLxD, *dw_bias)

  @jax.custom_vjp
  def terms(*args):
    return forward(*args, grads=False)

  def terms_bwd(grads, cotangents):
    g = cotangents[0]  # hits have no gradient, nor have the targets and weights
    return (*((d * g).astype(x.dtype) for d, x in zip(grads, (out.h_BxXxD, out.w_VxD, bias_V))),
            None, None)

  terms.defvjp(lambda *args: forward(*args, grads=True), terms_bwd)
  return terms(out.h_BxXxD, out.w_VxD, bias_V, targets_BxL, weights_BxL)

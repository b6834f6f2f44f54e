"""Every objective's loss: MLM, CLM (whole or in chunks), NSP/SOP and the fine-tuning heads.

Each head's loss comes back summed with its weight and hits (`loss_sums`), never averaged, so
that microbatches add up to the full batch and eval batches to the whole eval set; the step
divides by the batch's total weight once (`normalizers`, `total`). What a head should predict
and which rows count (`targets_and_weights`) is the loss's business too: CLM's next token stops
at document boundaries and padding.

Shape letters as in `model.py`, plus X any length (P masked predictions for MLM, L for CLM) and
C a chunk of L.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


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

  Cross-entropy over the last axis of `output` (logits, or `Unprojected` ones), or squared
  error for regression.
  """
  if head == "regression":
    err = output - targets.astype(jnp.float32)
    return {"loss_sum": jnp.sum(err * err * weights), "weight_sum": jnp.sum(weights),
            "correct_sum": jnp.zeros((), jnp.float32)}
  if isinstance(output, Unprojected):
    loss_sum, correct_sum = chunked_terms(output, targets, weights)
    return {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights), "correct_sum": correct_sum}
  xent = optax.softmax_cross_entropy_with_integer_labels(output, targets)
  target_logit = jnp.take_along_axis(output, targets[..., None], axis=-1)[..., 0]
  hits = _hits(target_logit, output)
  return {"loss_sum": jnp.sum(xent * weights), "weight_sum": jnp.sum(weights),
          "correct_sum": jnp.sum(hits * weights)}


def _hits(target_logit_BxX, logits_BxXxV):
  """1.0 where the target's logit is the largest (a tie counts, as argmax's first index may
  not), else 0.0. argmax's (value, index) reduce is 5x the cost of the whole softmax over a
  32000-word vocabulary on a CPU; this max is the one logsumexp takes already."""
  return (target_logit_BxX >= jnp.max(logits_BxXxV, axis=-1)).astype(jnp.float32)


def term_sums(outputs: dict, batch) -> dict:
  """{head: loss_sums} for every head in `outputs` (the model's {head: output})."""
  return {head: loss_sums(out, *targets_and_weights(batch, head), head)
          for head, out in outputs.items()}


def normalizers(batch, head_names) -> dict:
  """Each head's total weight over the whole batch: its loss is a weighted mean over it."""
  return {h: jnp.maximum(jnp.sum(targets_and_weights(batch, h)[1]), 1.0) for h in head_names}


def total(sums: dict, norms: dict):
  """The objective: each head's weighted mean loss, summed over heads."""
  return sum(sums[h]["loss_sum"] / norms[h] for h in sums)


def chunked_terms(out: Unprojected, targets_BxL, weights_BxL):
  """The summed cross-entropy and hits of `out.logits()`, made over `out.chunks` pieces of the
  length axis so that one piece's logits exist at a time, never all [B, L, V] of them.

  Under differentiation each piece's gradient (softmax minus one-hot) is used at once, to make
  the hidden states', the projection's and the bias's: nothing is recomputed or kept for the
  backward pass but those gradients, which are as large as the inputs. A length the chunks do
  not divide is padded with rows of weight 0, which add nothing to the sums or gradients.
  """
  length = targets_BxL.shape[1]
  pad = -length % out.chunks
  padded = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
            for x in (out.h_BxXxD, targets_BxL, weights_BxL)]
  has_bias = out.bias_V is not None
  bias_V = out.bias_V if has_bias else jnp.zeros(out.w_VxD.shape[:1], out.w_VxD.dtype)
  piece_terms = _piece_terms(out.dtype, has_bias)

  @jax.custom_vjp
  def terms(*args):
    return _scan_pieces(piece_terms, out.chunks, *args, grads=False)

  def terms_fwd(*args):
    return _scan_pieces(piece_terms, out.chunks, *args, grads=True)

  def terms_bwd(grads, cotangents):
    g = cotangents[0]  # hits have no gradient, nor have the targets and weights
    return (*((d * g).astype(x.dtype) for d, x in zip(grads, (padded[0], out.w_VxD, bias_V))),
            None, None)

  terms.defvjp(terms_fwd, terms_bwd)
  return terms(padded[0], out.w_VxD, bias_V, *padded[1:])


def _piece_terms(dtype, has_bias: bool):
  """One piece's (loss sum, hits) and, with `grads`, the gradients of its three inputs."""
  def piece_terms(h_BxCxD, w_VxD, bias_V, targets_BxC, weights_BxC, grads: bool):
    piece = Unprojected(h_BxCxD, w_VxD, bias_V if has_bias else None, dtype)
    logits_BxCxV = piece.logits()
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    terms = (jnp.sum((lse_BxC - target_BxC) * weights_BxC),
             jnp.sum(_hits(target_BxC, logits_BxCxV) * weights_BxC))
    if not grads:
      return terms
    vocab = logits_BxCxV.shape[-1]
    d_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None])
               - jax.nn.one_hot(targets_BxC, vocab, dtype=jnp.float32)) * weights_BxC[..., None]
    d_BxCxV = d_BxCxV.astype(dtype)
    dh_BxCxD = jnp.einsum("bcv,vd->bcd", d_BxCxV, w_VxD.astype(dtype))
    dw_VxD = jnp.einsum("bcv,bcd->vd", d_BxCxV, h_BxCxD.astype(dtype),
                        preferred_element_type=jnp.float32)
    dbias_V = jnp.sum(d_BxCxV, axis=(0, 1), dtype=jnp.float32)
    return terms, (dh_BxCxD, dw_VxD, dbias_V)
  return piece_terms


def _scan_pieces(piece_terms, chunks: int, h_BxLxD, w_VxD, bias_V, targets_BxL, weights_BxL,
                 grads: bool):
  """`piece_terms` over the length axis in `chunks` pieces, summing terms and w/bias grads."""
  def pieces(x_BxL_):
    batch, length = x_BxL_.shape[:2]
    x = x_BxL_.reshape(batch, chunks, length // chunks, *x_BxL_.shape[2:])
    return jnp.moveaxis(x, 1, 0)

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

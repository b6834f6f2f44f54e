"""Loss invariants: cross-entropy is -log softmax of the target, rows of weight 0 count for
nothing, the chunked CLM loss (and its gradient) is the whole-logits one for any chunk count,
CLM targets stop at documents, and summed terms add up over microbatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmssl import losses


def _logits(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 3, jnp.float32)


def test_cross_entropy_is_minus_log_softmax_of_the_target_by_hand():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])
  targets, weights = jnp.array([[0, 1]]), jnp.array([[1.0, 2.0]])
  sums = losses.loss_sums(logits, targets, weights)
  first = -np.log(np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0)))
  second = -np.log(np.exp(0.5) / (2 * np.exp(0.5) + np.exp(3.0)))
  np.testing.assert_allclose(sums["loss_sum"], first + 2 * second, rtol=1e-6)
  assert float(sums["weight_sum"]) == 3.0
  assert float(sums["correct_sum"]) == 1.0  # row 1 predicts 2, not 1


def test_hits_are_argmax_hits_and_a_tie_counts():
  """Hits come from the max logsumexp takes, not argmax: on untied logits they are argmax's;
  a target tied for the largest logit counts (argmax would pick the first of the tie)."""
  logits = _logits((4, 16, 50))
  rng = np.random.default_rng(2)
  targets = jnp.where(jnp.asarray(rng.random((4, 16)) < 0.5), jnp.argmax(logits, -1),
                      jnp.asarray(rng.integers(0, 50, (4, 16))))
  weights = jnp.asarray(rng.random((4, 16)), jnp.float32)
  expected = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
  sums = losses.loss_sums(logits, targets, weights)
  np.testing.assert_allclose(sums["correct_sum"], expected, rtol=1e-6)
  tied = losses.loss_sums(jnp.array([[[1.0, 3.0, 3.0]]]), jnp.array([[2]]), jnp.ones((1, 1)))
  assert float(tied["correct_sum"]) == 1.0


def test_regression_loss_is_weighted_squared_error():
  sums = losses.loss_sums(jnp.array([1.0, 2.0, 5.0]), jnp.array([0.0, 4.0, 0.0]),
                          jnp.array([1.0, 0.5, 0.0]), "regression")
  assert float(sums["loss_sum"]) == pytest.approx(1.0 + 0.5 * 4.0)
  assert float(sums["weight_sum"]) == 1.5


@pytest.mark.parametrize("head", ["mlm", "pair", "tokens"])
def test_rows_of_weight_zero_change_nothing(head):
  """Logits at unmasked MLM slots, padded pair rows or untagged tokens may be anything."""
  shape = {"mlm": (2, 5, 11), "pair": (4, 2), "tokens": (2, 6, 3)}[head]
  logits = _logits(shape)
  targets = jnp.asarray(np.random.default_rng(1).integers(0, shape[-1], shape[:-1]))
  weights = jnp.asarray(np.random.default_rng(2).random(shape[:-1]) < 0.5, jnp.float32)
  weights = weights.at[(0,) * weights.ndim].set(1.0)
  noisy = jnp.where(weights[..., None] > 0, logits, _logits(shape, seed=3) * 100)
  want, got = losses.loss_sums(logits, targets, weights), losses.loss_sums(noisy, targets, weights)
  for key in want:
    assert float(got[key]) == float(want[key]), key
  grad = jax.grad(lambda x: losses.loss_sums(x, targets, weights)["loss_sum"])(noisy)
  assert not np.any(np.asarray(grad)[np.asarray(weights) == 0])


def test_clm_targets_stop_at_document_boundaries_and_padding():
  batch = {"input_ids": jnp.array([[2, 11, 12, 3, 2, 21, 3, 0]]),
           "segment_ids": jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])}
  targets, weights = losses.targets_and_weights(batch, "clm")
  np.testing.assert_array_equal(targets[0, :3], [11, 12, 3])
  np.testing.assert_array_equal(weights[0], [1, 1, 1, 0, 1, 1, 0, 0])


def _unprojected(chunks, bias: bool, length=12):
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, length, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(13,)), jnp.float32) if bias else None
  return losses.Unprojected(h, w, b, jnp.float32, chunks)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 7, 12])
def test_chunked_clm_loss_and_gradients_equal_whole_logits(chunks, bias):
  """Any chunk count, dividing the length (12) or not, gives the whole-logits sums and the
  gradients of the hidden states, the projection and the bias."""
  rng = np.random.default_rng(1)
  targets = jnp.asarray(rng.integers(0, 13, (2, 12)))
  weights = jnp.asarray(rng.random((2, 12)) < 0.7, jnp.float32)

  def terms(h, w, b, chunked):
    out = losses.Unprojected(h, w, b, jnp.float32, chunks)
    sums = losses.loss_sums(out if chunked else out.logits(), targets, weights)
    return sums["loss_sum"], sums

  base = _unprojected(chunks, bias)
  args = (base.h_BxXxD, base.w_VxD, base.bias_V)
  argnums = (0, 1, 2) if bias else (0, 1)
  (whole, whole_sums), whole_grads = jax.value_and_grad(terms, argnums, has_aux=True)(
      *args, False)
  (chunked, chunked_sums), chunked_grads = jax.value_and_grad(terms, argnums, has_aux=True)(
      *args, True)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  assert float(chunked_sums["correct_sum"]) == float(whole_sums["correct_sum"])
  assert float(chunked_sums["weight_sum"]) == float(whole_sums["weight_sum"])
  for got, want in zip(chunked_grads, whole_grads):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_summed_terms_add_up_over_microbatches():
  """Halves of a batch sum to the whole's terms, so accumulated gradients are the full one's."""
  logits, targets = _logits((4, 6, 9)), jnp.asarray(np.random.default_rng(4).integers(0, 9, (4, 6)))
  batch = {"masked_ids": targets,
           "masked_weights": jnp.asarray(np.random.default_rng(5).random((4, 6)) < 0.6)}
  whole = losses.term_sums({"mlm": logits}, batch)
  halves = [losses.term_sums({"mlm": logits[i::2]}, jax.tree.map(lambda x: x[i::2], batch))
            for i in (0, 1)]
  for key in whole["mlm"]:
    np.testing.assert_allclose(halves[0]["mlm"][key] + halves[1]["mlm"][key], whole["mlm"][key],
                               rtol=1e-6)
  norms = losses.normalizers(batch, ("mlm",))
  np.testing.assert_allclose(losses.total(whole, norms),
                             whole["mlm"]["loss_sum"] / np.sum(batch["masked_weights"]),
                             rtol=1e-6)

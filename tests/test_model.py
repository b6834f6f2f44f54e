"""Model invariants: causality, packing isolation, head shapes (CLM targets: test_losses)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from lmssl import heads
from lmssl import model as model_lib


def _backbone(norm="post", position="learned", vocab=64):
  cfg = load_config("mlm_base").model
  cfg.vocab_size, cfg.norm, cfg.position = vocab, norm, position
  return model_lib.Transformer(model_lib.module_config(cfg))


def _init(module, *args, **kwargs):
  return nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs)["params"])


def _inputs(length=12):
  tokens = jnp.arange(10, 10 + length)[None]  # distinct ids: one embedding row per position
  return tokens, jnp.ones_like(tokens), jnp.arange(length)[None]


@pytest.mark.parametrize("norm,position", [("post", "learned"), ("pre", "rope")])
def test_causal_gradient_to_future_is_exactly_zero(norm, position):
  net = _backbone(norm, position)
  tokens, segments, positions = _inputs()
  params = _init(net, tokens, segments, positions, causal=True)
  t = 5

  def grad_rows(causal):
    def out_at_t(table):
      p = {**params, "embedder": {**params["embedder"], "tokens": {"embedding": table}}}
      h, _ = net.apply({"params": p}, tokens, segments, positions, causal=causal)
      return jnp.sum(h[0, t] ** 2)
    g = jax.grad(out_at_t)(params["embedder"]["tokens"]["embedding"])
    return np.abs(np.asarray(g[tokens[0]])).sum(axis=-1)  # one row per position

  causal, bidirectional = grad_rows(True), grad_rows(False)
  assert np.all(causal[t + 1:] == 0.0)
  assert np.all(causal[:t + 1] > 0)
  assert np.all(bidirectional > 0)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_do_not_see_each_other(causal):
  net = _backbone()
  doc_a, doc_b = jnp.arange(10, 17), jnp.arange(30, 35)
  tokens = jnp.concatenate([doc_a, doc_b, jnp.zeros(4, jnp.int32)])[None]
  segments = jnp.array([[1] * 7 + [2] * 5 + [0] * 4])
  positions = jnp.array([list(range(7)) + list(range(5)) + [0] * 4])
  params = _init(net, tokens, segments, positions, causal=causal)
  packed, _ = net.apply({"params": params}, tokens, segments, positions, causal=causal)
  alone, _ = net.apply({"params": params}, doc_b[None], jnp.ones((1, 5), jnp.int32),
                       jnp.arange(5)[None], causal=causal)
  np.testing.assert_allclose(packed[0, 7:12], alone[0], atol=1e-5)
  # A different first document leaves the second one's states unchanged.
  other = tokens.at[0, :7].set(jnp.arange(40, 47))
  packed2, _ = net.apply({"params": params}, other, segments, positions, causal=causal)
  np.testing.assert_allclose(packed2[0, 7:12], packed[0, 7:12], atol=1e-5)
  assert not np.allclose(packed2[0, :7], packed[0, :7])


def test_mlm_head_predicts_only_masked_positions():
  cfg = load_config("mlm_base")
  cfg.model.vocab_size = 64
  lm = heads.LanguageModel(model_lib.module_config(cfg.model), "mlm")
  tokens, segments, positions = _inputs(16)
  batch = {"input_ids": tokens, "segment_ids": segments, "positions": positions,
           "masked_positions": jnp.array([[3, 7, 0]])}
  params = _init(lm, batch)
  logits = lm.apply({"params": params}, batch)["mlm"]
  assert logits.shape == (1, 3, 64) and logits.dtype == jnp.float32
  # Each logit row belongs to its gathered position: reordering the slots reorders the rows.
  swapped = lm.apply({"params": params},
                     {**batch, "masked_positions": jnp.array([[7, 3, 0]])})["mlm"]
  np.testing.assert_allclose(swapped[0, 0], logits[0, 1], atol=1e-5)


def test_bert_and_gpt2_options_change_the_parameter_tree():
  bert = load_config("mlm_base").model
  gpt = load_config("clm_base").model
  for c in (bert, gpt):
    c.vocab_size = 64
  tokens, segments, positions = _inputs()
  trees = {}
  for name, c in (("bert", bert), ("gpt", gpt)):
    net = model_lib.Transformer(model_lib.module_config(c))
    trees[name] = _init(net, tokens, segments, positions, causal=False)
  assert "embed_norm" in trees["bert"] and "token_types" in trees["bert"]["embedder"]
  assert "final_norm" in trees["gpt"] and "token_types" not in trees["gpt"]["embedder"]
  assert trees["bert"]["layers"]["attn"]["query"]["kernel"].shape[0] == bert.num_layers

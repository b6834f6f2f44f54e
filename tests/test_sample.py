"""Generation and fill-mask: the KV cache reproduces full recomputation, sampling options behave."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from lmssl import heads
from lmssl import model as model_lib
from lmssl import sample

VOCAB = 64
# Lengths 1, 4 and 7: left padding of 6, 3 and 0 slots.
PROMPTS = [[2], [2, 10, 11, 12], [2, 20, 21, 22, 23, 24, 25]]
NEW = 8
NO_EOS = -1


def _random_params(model_cfg, objective, seed=0):
  """Random weights on the LanguageModel's tree, broad enough that the model does not just echo
  its last token (as a 0.02-scale init with tied embeddings does)."""
  lm = heads.LanguageModel(model_lib.module_config(model_cfg), objective)
  batch = {k: jnp.zeros((1, 8), jnp.int32) for k in ("input_ids", "segment_ids", "positions")}
  batch["masked_positions"] = jnp.zeros((1, 2), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(lm.init, jax.random.key(0), batch)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _model_cfg(name="clm_base", norm="pre", position="learned"):
  cfg = load_config(name).model
  cfg.vocab_size, cfg.norm, cfg.position = VOCAB, norm, position
  return cfg


def _greedy_reference(model_cfg, params, prompt, max_new_tokens):
  """Greedy continuation of one prompt without a cache: the training model's full causal
  forward per new token. The sequence grows in a buffer of fixed length (rounded up to a
  multiple of 32, so that nearby lengths share one compiled forward); the causal mask keeps
  the not-yet-filled tail from reaching the real tokens."""
  lm = heads.LanguageModel(model_lib.module_config(model_cfg), "clm")
  forward = jax.jit(lambda p, batch: lm.apply({"params": p}, batch)["clm"])
  end = len(prompt) + max_new_tokens
  width = -(-end // 32) * 32
  if model_cfg.position == "learned":
    width = max(min(width, model_cfg.max_len), end)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  for n in range(len(prompt), end):
    batch = {"input_ids": tokens, "positions": np.arange(width, dtype=np.int32)[None],
             "segment_ids": (np.arange(width) < n).astype(np.int32)[None]}
    tokens[0, n] = int(jnp.argmax(forward(params, batch)[0, n - 1]))
  return tokens[0, len(prompt):end].tolist()


_CACHE = {}


def _clm(norm="pre", position="rope"):
  """(model cfg, params, greedy references of PROMPTS), built once per configuration."""
  if (norm, position) not in _CACHE:
    cfg = _model_cfg(norm=norm, position=position)
    params = _random_params(cfg, "clm")
    refs = [_greedy_reference(cfg, params, p, NEW) for p in PROMPTS]
    _CACHE[norm, position] = cfg, params, refs
  return _CACHE[norm, position]


@pytest.mark.parametrize("norm,position", [("pre", "learned"), ("pre", "rope"),
                                           ("post", "learned"), ("post", "rope")])
def test_cached_greedy_matches_full_recompute(norm, position):
  cfg, params, refs = _clm(norm, position)
  assert len({t for r in refs for t in r}) > 3, refs  # the model does more than repeat itself
  assert sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS) == refs


def _llama_cfg(**changes):
  """A Llama/Mistral-style decoder: RMSNorm, SwiGLU, 4 query heads on 2 key/value heads, no
  biases, RoPE; a 4-position window on layer 1 (layer 0 global)."""
  cfg = load_config("llama_base").model
  cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads = VOCAB, 4, 2
  cfg.attention_window, cfg.global_every = 4, 2
  for key, value in changes.items():
    cfg[key] = value
  return cfg


def test_grouped_query_windowed_decoder_cached_greedy_matches_full_recompute():
  cfg = _llama_cfg()
  params = _random_params(cfg, "clm")
  refs = [_greedy_reference(cfg, params, p, NEW) for p in PROMPTS]
  assert len({t for r in refs for t in r}) > 3, refs
  assert sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS) == refs
  # The window matters here: with every layer global the same weights continue otherwise.
  unwindowed = _llama_cfg(attention_window=0, global_every=0)
  assert [_greedy_reference(unwindowed, params, p, NEW) for p in PROMPTS] != refs


def test_grouped_query_cache_holds_only_the_key_value_heads():
  def cache_shapes(**changes):
    cfg = _llama_cfg(**changes)
    _, cache = sample._prefill(_random_params(cfg, "clm"), np.zeros((3, 5), np.int32),
                               jnp.zeros(3, jnp.int32), cfg=sample._inference_config(cfg),
                               cache_len=12)
    return {x.shape for x in jax.tree.leaves(cache)}
  assert cache_shapes() == {(2, 3, 12, 2, 16)}  # [N, B, S, G, K]: 2 key/value heads
  assert cache_shapes(num_kv_heads=1) == {(2, 3, 12, 1, 16)}
  assert cache_shapes(num_kv_heads=0) == {(2, 3, 12, 4, 16)}  # one per query head: 2x, 4x


def test_sampling_is_seeded_and_degenerate_filters_are_greedy():
  cfg, params, refs = _clm()

  def run(**kwargs):
    return sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=NO_EOS, **kwargs)
  drawn = run(temperature=2.0, seed=1)
  assert run(temperature=2.0, seed=1) == drawn
  assert run(temperature=2.0, seed=2) != drawn
  assert drawn != refs
  assert run(temperature=2.0, top_k=1, seed=3) == refs
  assert run(temperature=2.0, top_p=1e-6, seed=3) == refs


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
  logits_1xV = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  rngs = jax.random.split(jax.random.key(0), 2000)

  def draws(top_k, top_p):
    picks = jax.vmap(lambda r: sample._pick(logits_1xV, 1.0, top_k, top_p, r)[0])(rngs)
    return set(np.asarray(picks).tolist())
  assert draws(0, 1.0) == {0, 1, 2, 3, 4}
  assert draws(2, 1.0) == {1, 3}
  # Mass before each candidate, best first: 0, 0.4, 0.7, 0.85, 0.95.
  assert draws(0, 0.5) == {1, 3}
  assert draws(0, 0.75) == {1, 3, 4}
  assert draws(2, 0.3) == {1}


def test_eos_stops_its_row_and_the_others_continue():
  cfg, params, refs = _clm()
  # An eos that the first row emits first at step k >= 2 and some other row emits later or never.
  eos = next(t for k, t in enumerate(refs[0]) if k >= 2 and refs[0].index(t) == k
             and any(t not in r[:k + 1] for r in refs[1:]))
  cut = [r[:r.index(eos)] if eos in r else r for r in refs]
  assert len(cut[0]) < NEW and max(len(c) for c in cut) > len(cut[0])
  assert sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=eos) == cut


def test_generation_stops_once_every_row_has_emitted_eos(monkeypatch):
  cfg, params, refs = _clm()
  # Identical rows (the same shapes as PROMPTS, so nothing recompiles) all end at step k.
  k = next(k for k, t in enumerate(refs[2]) if k >= 2 and refs[2].index(t) == k)
  steps = []
  real_step = sample._step

  def counted_step(*args, **kwargs):
    steps.append(1)
    return real_step(*args, **kwargs)
  monkeypatch.setattr(sample, "_step", counted_step)
  out = sample.generate(cfg, params, [PROMPTS[2]] * 3, max_new_tokens=NEW, eos_id=refs[2][k])
  assert out == [refs[2][:k]] * 3
  assert len(steps) == k  # the step that emitted eos was the last one run


def test_fill_mask_ranks_the_heads_probabilities():
  cfg = _model_cfg("mlm_base", norm="post")
  params = _random_params(cfg, "mlm")
  ids = [2, 10, 40, 12, 13, 40, 3]  # the caller's mask id (a GPT-2-style tokenizer's differs)
  got = sample.fill_mask(cfg, params, ids, mask_id=40, top_k=5)
  assert len(got) == 2 and all(len(c) == 5 for c in got)
  module_cfg = model_lib.module_config(cfg)
  tokens = jnp.array([ids])
  hidden, table = model_lib.Transformer(module_cfg).apply(
      {"params": params["transformer"]}, tokens, jnp.ones_like(tokens),
      jnp.arange(len(ids))[None], causal=False)
  logits = heads.MLMHead(module_cfg).apply({"params": params["mlm_head"]}, hidden, table,
                                           jnp.array([[2, 5]]))
  for candidates, row in zip(got, np.asarray(logits[0])):
    probs = [p for _, p in candidates]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert candidates[0][0] == int(np.argmax(row))
    np.testing.assert_allclose(probs[0], np.max(jax.nn.softmax(row)), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_k": -1}, r"top_k=-1 must be in \[0, vocab_size=64\]"),
    ({"temperature": -0.5}, r"temperature=-0.5 must be >= 0"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 must be at least 1"),
    ({"prompts": [[2], []]}, r"non-empty token-id lists; start an empty prompt with the "
     r"tokenizer's bos id$"),
    ({"prompts": [[2, 64]]}, r"prompts\[0\] holds ids \[64\] outside the vocabulary"),
    ({"prompts": [[2] * 1020]}, r"plus max_new_tokens=8 exceeds model.max_len=1024"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
  cfg = _model_cfg()
  args = {"prompts": [[2, 5]], "max_new_tokens": NEW, "eos_id": NO_EOS, **kwargs}
  with pytest.raises(ValueError, match=match):
    sample.generate(cfg, {}, args.pop("prompts"), **args)


def test_fill_mask_rejects_bad_arguments():
  cfg = _model_cfg("mlm_base", norm="post")
  with pytest.raises(ValueError, match="no mask_id=4"):
    sample.fill_mask(cfg, {}, [2, 10, 3], mask_id=4)
  with pytest.raises(ValueError, match="top_k=0 must be in"):
    sample.fill_mask(cfg, {}, [2, 4, 3], mask_id=4, top_k=0)

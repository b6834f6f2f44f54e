"""Inference on trained parameters: CLM text generation over a KV cache, and MLM fill-mask.

Both take `cfg.model` and the `params` of a LanguageModel of the matching objective; the modules
here rebuild its parameter tree ({"transformer", "clm_head"} or {"transformer", "mlm_head"}), so
a trained or restored `params` dict applies as is.

Generation left-pads the batch so that every row's last prompt token sits in the same cache slot
P - 1; row b's first real token sits in slot pad_b and has position 0. One jitted prefill fills
slots [0, P) and gives the logits of each row's first new token; then one jitted step per token
feeds the last pick at the next slot. A token sees the slots of its own row's real tokens up to
its own. The sampler is jitted apart, so that one compiled copy serves every step and model.

Shape letters as in `model.py`, plus P prompt slots (the longest prompt) and M masks.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmssl import config as config_lib
from lmssl import heads
from lmssl import masks
from lmssl import model as model_lib

class _Decoder(nn.Module):
  """The CLM LanguageModel's modules, with a cached decoding entry point."""
  cfg: Any

  def setup(self):
    self.transformer = model_lib.Transformer(self.cfg)
    self.clm_head = heads.OutputProjection(self.cfg)

  def decode(self, tokens_BxL, positions_BxL, mask, cache_index):
    """Logits [B, V] after each row's last new token."""
    x_BxLxD, table_VxD = self.transformer.decode(tokens_BxL, positions_BxL, mask, cache_index)
    return self.clm_head(x_BxLxD[:, -1:], table_VxD)[:, 0]


class _Encoder(nn.Module):
  """The MLM LanguageModel's modules: the bidirectional stack and the masked-position head."""
  cfg: Any

  def setup(self):
    self.transformer = model_lib.Transformer(self.cfg)
    self.mlm_head = heads.MLMHead(self.cfg)

  def __call__(self, tokens_BxL, masked_positions_BxM):
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x_BxLxD, table_VxD = self.transformer(tokens_BxL, jnp.ones_like(tokens_BxL), positions_BxL,
                                          causal=False)
    return self.mlm_head(x_BxLxD, table_VxD, masked_positions_BxM)


def _inference_config(model_cfg):
  """The frozen module config, minus training-only choices that do not touch the parameters."""
  # Rematerialization only saves memory for a backward pass.
  return model_lib.module_config(config_lib.resolved(model_cfg, {"remat": "none"}))


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _check_ids(ids, vocab_size: int, what: str) -> None:
  bad = [i for i in ids if not 0 <= i < vocab_size]
  _check(not bad, f"{what} holds ids {bad[:5]} outside the vocabulary [0, {vocab_size}); "
         "encode text with the model's own tokenizer")


def _check_generate_args(cfg, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
  _check(isinstance(prompts, (list, tuple)) and prompts
         and all(isinstance(p, (list, tuple)) and p for p in prompts),
         "prompts must be a non-empty list of non-empty token-id lists; start an empty prompt "
         "with the tokenizer's bos id")
  for i, prompt in enumerate(prompts):
    _check_ids(prompt, cfg.vocab_size, f"prompts[{i}]")
  _check(max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be at least 1")
  _check(temperature >= 0, f"temperature={temperature} must be >= 0; use 0 for greedy decoding")
  _check(0 <= top_k <= cfg.vocab_size,
         f"top_k={top_k} must be in [0, vocab_size={cfg.vocab_size}]; use 0 to turn it off")
  _check(0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]; use 1.0 to turn nucleus sampling off")
  longest = max(len(p) for p in prompts)
  _check(cfg.position != "learned" or longest < cfg.max_len,
         f"the longest prompt ({longest} tokens) is "
         f"{'as long as' if longest == cfg.max_len else 'longer than'} the model's context, "
         f"model.max_len={cfg.max_len} learned positions, which must hold the prompt and the new "
         f"tokens together; shorten the prompt to fewer than {cfg.max_len} tokens")
  _check(cfg.position != "learned" or longest + max_new_tokens <= cfg.max_len,
         f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds "
         f"model.max_len={cfg.max_len} learned positions; shorten the prompt or ask for at most "
         f"{max(cfg.max_len - longest, 0)} new tokens")


def _decode_mask(pad_B, tokens: int, first_slot, cache_len: int) -> masks.Mask:
  """`tokens` new queries from slot `first_slot` on: each sees its own row's real (not left
  padding) slots up to its own."""
  real_BxS = (jnp.arange(cache_len)[None] >= pad_B[:, None]).astype(jnp.int32)
  return masks.Mask(jnp.ones((pad_B.shape[0], tokens), jnp.int32), real_BxS, first_slot,
                    causal=True)


@jax.jit
def _pick(logits_BxV, temperature, top_k, top_p, rng):
  """Greedy at temperature 0; otherwise a draw from the top-k, then top-p, filtered softmax."""
  vocab = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  rank_V = jnp.arange(vocab)
  in_top_k_V = rank_V < jnp.where(top_k > 0, top_k, vocab)
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
  # The mass strictly before each candidate: the best one always has 0 and so always stays.
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_B = jnp.sum(in_top_k_V & (before_BxV < top_p), axis=-1)
  floor_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
  filtered_BxV = jnp.where(scaled_BxV >= floor_Bx1, scaled_BxV, -jnp.inf)
  sampled_B = jax.random.categorical(rng, filtered_BxV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(params, tokens_BxP, pad_B, *, cfg, cache_len: int):
  """Fills cache slots [0, P) with the prompts; returns the next-token logits and the cache."""
  prompt = tokens_BxP.shape[1]
  positions_BxP = jnp.maximum(jnp.arange(prompt)[None] - pad_B[:, None], 0)
  logits_BxV, variables = _Decoder(cfg).apply(
      {"params": params}, tokens_BxP, positions_BxP, _decode_mask(pad_B, prompt, 0, cache_len),
      0, method="decode", mutable=["cache"])
  return logits_BxV, variables["cache"]


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, cache, token_B, pad_B, slot, *, cfg):
  """Feeds one token per row at cache slot `slot`; returns the next-token logits and the cache."""
  cache_len = jax.tree.leaves(cache)[0].shape[2]  # [N, B, S, H, K]
  logits_BxV, variables = _Decoder(cfg).apply(
      {"params": params, "cache": cache}, token_B[:, None], (slot - pad_B)[:, None],
      _decode_mask(pad_B, 1, slot, cache_len), slot, method="decode", mutable=["cache"])
  return logits_BxV, variables["cache"]


def _cut(tokens, eos_id: int) -> list[int]:
  tokens = [int(t) for t in tokens]
  return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def generate(model_cfg, params, prompts: list[list[int]], *, max_new_tokens: int,
             eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens from a CLM model.

  Args:
    model_cfg: the run's `cfg.model`.
    params: the CLM LanguageModel's parameters ({"transformer": ..., "clm_head": ...}).
    prompts: token ids per row; lengths may differ.
    max_new_tokens: tokens to generate per row at most.
    temperature: 0 decodes greedily; otherwise samples from softmax(logits / temperature).
    top_k: sample among the k likeliest tokens only (0: no limit).
    top_p: sample among the fewest likeliest tokens whose mass reaches top_p (1.0: no limit).
    eos_id: the tokenizer's; a row stops after emitting it (an id outside the vocabulary
      never stops a row).
    seed: the sampling seed; a fixed seed reproduces the same tokens.

  Returns:
    Each row's new tokens, cut before its first eos_id.
  """
  cfg = _inference_config(model_cfg)
  _check_generate_args(cfg, prompts, max_new_tokens, temperature, top_k, top_p)
  params = nn.meta.unbox(params)
  width = max(len(p) for p in prompts)
  # Left padding is kept out of attention (pad_B), so its id only has to be in the
  # vocabulary: each row repeats its own first token.
  tokens_BxP = np.array([[p[0]] * (width - len(p)) + list(p) for p in prompts], np.int32)
  pad_B = jnp.asarray([width - len(p) for p in prompts], jnp.int32)
  sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  rng = jax.random.key(seed)
  logits_BxV, cache = _prefill(params, tokens_BxP, pad_B, cfg=cfg,
                               cache_len=width + max_new_tokens - 1)
  token_B = _pick(logits_BxV, *sampling, jax.random.fold_in(rng, 0))
  generated = [np.asarray(token_B)]
  done_B = generated[-1] == eos_id
  for t in range(1, max_new_tokens):
    if done_B.all():
      break
    logits_BxV, cache = _step(params, cache, token_B, pad_B, jnp.int32(width + t - 1), cfg=cfg)
    token_B = _pick(logits_BxV, *sampling, jax.random.fold_in(rng, t))
    generated.append(np.asarray(token_B))
    done_B |= generated[-1] == eos_id
  return [_cut(row, eos_id) for row in np.stack(generated, axis=1)]


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _fill_mask_top_k(params, tokens_1xL, masked_positions_1xM, *, cfg, top_k: int):
  logits_1xMxV = _Encoder(cfg).apply({"params": params}, tokens_1xL, masked_positions_1xM)
  return jax.lax.top_k(jax.nn.softmax(logits_1xMxV[0], axis=-1), top_k)


def fill_mask(model_cfg, params, ids: list[int], *, mask_id: int,
              top_k: int = 5) -> list[list[tuple[int, float]]]:
  """The `top_k` likeliest (id, probability) fillers for each `mask_id` in `ids`, best first.

  Args:
    model_cfg: the run's `cfg.model`.
    params: the MLM LanguageModel's parameters ({"transformer": ..., "mlm_head": ...}).
    ids: one sequence, `[CLS] ... [SEP]` included, with at least one mask_id.
    top_k: candidates per masked position.
    mask_id: the tokenizer's [MASK] id.

  Returns:
    One list of top_k (id, probability) pairs per mask, in the order the masks appear.
  """
  cfg = _inference_config(model_cfg)
  _check_ids(ids, cfg.vocab_size, "ids")
  masked = [i for i, t in enumerate(ids) if t == mask_id]
  _check(bool(masked), f"ids hold no mask_id={mask_id}; put [MASK] where a token should be "
         "predicted")
  _check(1 <= top_k <= cfg.vocab_size,
         f"top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]")
  _check(cfg.position != "learned" or len(ids) <= cfg.max_len,
         f"ids hold {len(ids)} tokens but model.max_len={cfg.max_len}; shorten the text")
  probs_MxK, ids_MxK = _fill_mask_top_k(
      nn.meta.unbox(params), np.asarray([ids], np.int32), np.asarray([masked], np.int32),
      cfg=cfg, top_k=top_k)
  probs_MxK, ids_MxK = np.asarray(probs_MxK), np.asarray(ids_MxK)
  return [[(int(i), float(p)) for i, p in zip(row_ids, row_probs)]
          for row_ids, row_probs in zip(ids_MxK, probs_MxK)]

"""The Transformer stack shared by both objectives (heads live in `heads.py`).

The MLM encoder and the CLM decoder are the same modules; they differ only in what attention may
see: an `attention.Mask` of the packing segment ids and `causal`, which each attention kernel
takes as structure (`lmssl/attention.py`). Options cover BERT (post-LN, erf GELU,
token types, embedding LayerNorm) and GPT-2 (pre-LN, tanh GELU, final LayerNorm) exactly.

Precision policy (docs/precision.md; held by tests/test_precision.py): parameters, their
gradients and the optimizer state are `param_dtype` (float32), and each module casts its
parameters to `dtype` where it uses them. With `dtype=bfloat16` every matmul takes bfloat16
operands (attention's scores come out float32) and activations between matmuls are bfloat16,
while LayerNorm statistics, the attention softmax, the logits that reach the loss, the loss and
the optimizer update stay float32. Keep `param_dtype` float32.

Shape letters: B batch, L length (queries), S length (keys), D d_model, H heads, K head dim,
F mlp hidden, V vocab, T token types, N layers.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lmssl import attention as attention_lib
from lmssl import lora

init_normal = nn.initializers.normal(stddev=0.02)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def logical_init(names, init=init_normal):
  return nn.with_logical_partitioning(init, names)


def layer_norm(cfg, name):
  return nn.LayerNorm(
      epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=logical_init(("norm",), nn.initializers.ones),
      bias_init=logical_init(("norm",), nn.initializers.zeros))


# The choices of model.norm, model.position and model.gelu (validation.py reads these).
NORMS = ("post", "pre")  # LayerNorm after each residual add (BERT) or before each sublayer
POSITIONS = ("learned", "rope")
GELU_APPROXIMATE = {"erf": False, "tanh": True}
# The projections a LoRA adapter can sit on (lora.targets), by module name.
PROJECTIONS = ("query", "key", "value", "out", "wi", "wo")


def gelu(cfg, x):
  return nn.gelu(x, approximate=GELU_APPROXIMATE[cfg.gelu])


def rope(x_BxLxHxK, positions_BxL, theta: float):
  half = x_BxLxHxK.shape[-1] // 2
  freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq_K
  sin, cos = jnp.sin(angle_BxLxK)[:, :, None], jnp.cos(angle_BxLxK)[:, :, None]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Embedder(nn.Module):
  cfg: Any

  def setup(self):
    cfg = self.cfg
    # Looked up in the parameter dtype and cast once summed: the gradients are then scatter-adds
    # in float32. In bfloat16 a GPU has no native atomic add for them, and every token of a
    # BERT batch adds into one token-type row (a 14x slower step on an H200).
    embed = functools.partial(nn.Embed, features=cfg.d_model, dtype=cfg.param_dtype,
                              param_dtype=cfg.param_dtype)
    self.tokens = embed(cfg.vocab_size, embedding_init=logical_init(("vocab", "embed")))
    if cfg.position == "learned":
      self.positions = embed(cfg.max_len, embedding_init=logical_init(("pos", "embed")))
    if cfg.type_vocab_size:
      self.token_types = embed(cfg.type_vocab_size, embedding_init=logical_init(("types", "embed")))

  def __call__(self, tokens_BxL, positions_BxL, token_types_BxL):
    x_BxLxD = self.tokens(tokens_BxL)
    if self.cfg.position == "learned":
      x_BxLxD += self.positions(positions_BxL)
    if self.cfg.type_vocab_size:
      x_BxLxD += self.token_types(token_types_BxL)
    return x_BxLxD.astype(self.cfg.dtype)

  def table(self):
    return self.tokens.embedding


class Projection(nn.Module):
  """`einsum(eq, x, kernel) + bias` with logically named kernel and bias axes.

  The kernel's leading dims contract with x, the trailing ones (the bias's) are outputs. When
  the config names this projection among `lora_targets`, a low-rank adapter (`lora.py`) runs
  beside the kernel.
  """
  cfg: Any
  eq: str
  kernel_shape: tuple
  kernel_axes: tuple
  bias_axes: tuple

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", logical_init(self.kernel_axes), self.kernel_shape,
                        cfg.param_dtype)
    n_out = len(self.bias_axes)
    bias = self.param("bias", logical_init(self.bias_axes, nn.initializers.zeros),
                      self.kernel_shape[-n_out:], cfg.param_dtype)
    x = x.astype(cfg.dtype)
    y = jnp.einsum(self.eq, x, kernel.astype(cfg.dtype))
    # Broadcast, then cast: the bias gradient sums over the leading dims in float32.
    y += jnp.broadcast_to(bias, y.shape).astype(cfg.dtype)
    if cfg.lora_rank and self.name in cfg.lora_targets:
      (a_shape, a_axes), (b_shape, b_axes) = lora.adapter_shapes(
          self.kernel_shape, self.kernel_axes, len(self.kernel_shape) - n_out, cfg.lora_rank)
      a = self.param("lora_a", logical_init(a_axes), a_shape, cfg.param_dtype)
      b = self.param("lora_b", logical_init(b_axes, nn.initializers.zeros), b_shape,
                     cfg.param_dtype)
      y += lora.delta(self.eq, x, a.astype(cfg.dtype), b.astype(cfg.dtype), cfg.lora_alpha)
    return y


class Attention(nn.Module):
  """Multi-head attention over what an `attention.Mask` allows, by `cfg.attention` (resolved);
  given a `cache_index` it decodes against a KV cache instead, always with XLA.

  Decoding keeps `cached_key` and `cached_value` [B, S, H, K] in the "cache" collection, with S
  the mask's key length: a call writes its L new (rotated) keys and values at slots
  [cache_index, cache_index + L) and attends over all S slots, so the caller's mask must hide
  empty, padding and future slots.
  """
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD, mask: attention_lib.Mask, positions_BxL, cache_index=None):
    cfg = self.cfg
    shape = (cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads)
    q_BxLxHxK, k_BxSxHxK, v_BxSxHxK = (
        Projection(cfg, "bld,dhk->blhk", shape, ("embed", "heads", "kv"), ("heads", "kv"),
                   name=n)(x_BxLxD) for n in ("query", "key", "value"))
    if cfg.position == "rope":
      q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
      k_BxSxHxK = rope(k_BxSxHxK, positions_BxL, cfg.rope_theta)
    if cache_index is not None:
      k_BxSxHxK, v_BxSxHxK = self._cached(k_BxSxHxK, v_BxSxHxK,
                                          mask.kv_segment_ids_BxS.shape[1], cache_index)
    q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "heads", "kv"))
    out_BxLxHxK = attention_lib.attend(
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask,
        "xla" if cache_index is not None else cfg.attention, max_segments=cfg.max_segments)
    return Projection(cfg, "blhk,hkd->bld", shape[1:] + shape[:1], ("heads", "kv", "embed"),
                      ("embed",), name="out")(out_BxLxHxK)

  def _cached(self, k_BxLxHxK, v_BxLxHxK, cache_len, cache_index):
    """Writes the new keys and values into the cache; returns the whole cache [B, S, H, K]."""
    batch, _, heads, head_dim = k_BxLxHxK.shape
    shape = (batch, cache_len, heads, head_dim)
    out = []
    for name, new_BxLxHxK in (("cached_key", k_BxLxHxK), ("cached_value", v_BxLxHxK)):
      cached = self.variable("cache", name, jnp.zeros, shape, new_BxLxHxK.dtype)
      cached.value = jax.lax.dynamic_update_slice(cached.value, new_BxLxHxK,
                                                  (0, cache_index, 0, 0))
      out.append(cached.value)
    return tuple(out)


class Mlp(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    h_BxLxF = Projection(cfg, "bld,df->blf", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"),
                         ("mlp",), name="wi")(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(gelu(cfg, h_BxLxF), ("batch", "length", "mlp"))
    return Projection(cfg, "blf,fd->bld", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"),
                      ("embed",), name="wo")(h_BxLxF)


class Block(nn.Module):
  """One layer; post-LN: x = LN(x + f(x)) (BERT); pre-LN: x = x + f(LN(x)) (GPT-2)."""
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, mask, positions_BxL, cache_index=None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    for name, sublayer in (("attn", Attention(cfg, name="attn")), ("mlp", Mlp(cfg, name="mlp"))):
      args = (mask, positions_BxL, cache_index) if name == "attn" else ()
      if cfg.norm == "pre":
        x_BxLxD = x_BxLxD + drop(sublayer(layer_norm(cfg, f"{name}_norm")(x_BxLxD), *args))
      else:
        x_BxLxD = layer_norm(cfg, f"{name}_norm")(x_BxLxD + drop(sublayer(x_BxLxD, *args)))
      x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, None


class Transformer(nn.Module):
  """Embeddings and N scanned Blocks. Returns hidden states and the token embedding table.

  `__call__` is the training forward; `decode` runs new tokens against a per-layer KV cache.
  """
  cfg: Any
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.embedder = Embedder(cfg)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.deterministic, name="layers")
    # BERT normalizes the embeddings; GPT-2 (pre-LN) normalizes the stack's output instead.
    self.final_norm = layer_norm(cfg, "embed_norm" if cfg.norm == "post" else "final_norm")
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, token_types_BxL=None,
               *, causal: bool):
    return self._stack(tokens_BxL, positions_BxL, token_types_BxL,
                       attention_lib.Mask.packed(segment_ids_BxL, causal), None)

  def decode(self, tokens_BxL, positions_BxL, mask, cache_index, token_types_BxL=None):
    """Runs L new tokens against the KV cache; apply it with `mutable=["cache"]`.

    The tokens fill slots [cache_index, cache_index + L) of every layer's cache, which holds
    S = mask.kv_segment_ids_BxS.shape[1] slots and starts zeroed when the "cache" collection is
    empty. `mask` (an `attention.Mask`) says which slots each new token sees (filled, not
    padding, not in its future); positions_BxL are the tokens' positions within their own
    rows, which left padding makes differ from slots.
    """
    return self._stack(tokens_BxL, positions_BxL, token_types_BxL, mask, cache_index)

  def _stack(self, tokens_BxL, positions_BxL, token_types_BxL, mask, cache_index):
    if token_types_BxL is None:
      token_types_BxL = jnp.zeros_like(tokens_BxL)
    x_BxLxD = self.embedder(tokens_BxL, positions_BxL, token_types_BxL)
    if self.cfg.norm == "post":
      x_BxLxD = self.final_norm(x_BxLxD)
    x_BxLxD = nn.with_logical_constraint(self.drop(x_BxLxD), ("batch", "length", "embed"))
    x_BxLxD, _ = self.layers(x_BxLxD, mask, positions_BxL, cache_index)
    if self.cfg.norm == "pre":
      x_BxLxD = self.final_norm(x_BxLxD)
    return x_BxLxD, self.embedder.table()


def module_config(model_cfg, lora_cfg=None):
  """The model ConfigDict as a frozen, hashable view with dtypes and the attention
  implementation resolved (for this process's platform), plus the LoRA
  settings the projections read (rank 0: no adapters)."""
  d = model_cfg.to_dict()
  d["dtype"], d["param_dtype"] = jnp.dtype(d["dtype"]), jnp.dtype(d["param_dtype"])
  d["attention"] = attention_lib.resolve(d["attention"], dtype=d["dtype"].name)
  d.update(lora.settings(lora_cfg))
  return ml_collections.FrozenConfigDict(d)

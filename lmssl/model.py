"""The Transformer stack shared by both objectives (heads live in `heads.py`).

The MLM encoder and the CLM decoder are the same modules; they differ only in what attention may
see: a `masks.Mask` of the packing segment ids and `causal`, which each attention kernel takes
as structure (`lmssl/attention.py`). Options, each a table below that validation.py reads,
cover BERT (post-LN, erf GELU, token types, embedding LayerNorm), GPT-2 (pre-LN, tanh GELU,
final LayerNorm), Llama, Mistral and Qwen2 (RMSNorm, SwiGLU, fewer key/value heads, RoPE, no
biases or q/k/v biases only, sliding windows) and ModernBERT (GeGLU, bias-free LayerNorms,
global layers between windowed ones, each with its own RoPE theta).

Layers differ only by data scanned with them (`layer_data`: the window and RoPE frequencies),
so one compiled Block serves every layer and the parameter tree keeps one [N, ...] array each.

Precision policy (docs/precision.md; held by tests/test_precision.py): parameters, their
gradients and the optimizer state are `param_dtype` (float32), and each module casts its
parameters to `dtype` where it uses them. With `dtype=bfloat16` every matmul takes bfloat16
operands (attention's scores come out float32) and activations between matmuls are bfloat16,
while norm statistics (LayerNorm's and RMSNorm's), the attention softmax, the logits that reach
the loss, the loss and the optimizer update stay float32. Keep `param_dtype` float32.

Shape letters: B batch, L length (queries), S length (keys), D d_model, H heads, G key/value
heads, K head dim, F mlp hidden, V vocab, T token types, N layers.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lmssl import attention as attention_lib
from lmssl import lora
from lmssl import masks
from lmssl import rope

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
      epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.use_bias,
      name=name, scale_init=logical_init(("norm",), nn.initializers.ones),
      bias_init=logical_init(("norm",), nn.initializers.zeros))


def rms_norm(cfg, name):
  # Flax keeps the mean of squares and rsqrt in float32 (force_float32_reductions).
  return nn.RMSNorm(epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    scale_init=logical_init(("norm",), nn.initializers.ones))


def gelu(cfg, x):
  return nn.gelu(x, approximate=GELU_APPROXIMATE[cfg.gelu])


def silu(cfg, x):
  return nn.silu(x)


# The choices of model.norm, model.norm_type, model.position, model.gelu and model.mlp
# (validation.py reads these).
NORMS = ("post", "pre")  # the norm after each residual add (BERT) or before each sublayer
NORM_TYPES = {"layernorm": layer_norm, "rmsnorm": rms_norm}
POSITIONS = ("learned", "rope")
GELU_APPROXIMATE = {"erf": False, "tanh": True}
# model.mlp -> (activation, input projections): one input, act(x wi); or gated, act(x wi_gate)
# * (x wi_up) (SwiGLU: Llama; GeGLU: ModernBERT, GELU by model.gelu). Then wo.
MLPS = {
    "gelu": (gelu, ("wi",)),
    "swiglu": (silu, ("wi_gate", "wi_up")),
    "geglu": (gelu, ("wi_gate", "wi_up")),
}
ATTENTION_PROJECTIONS = ("query", "key", "value", "out")


def projections(model_cfg) -> tuple:
  """The projections of a Block under `model_cfg`, by module name: where LoRA can sit."""
  return ATTENTION_PROJECTIONS + MLPS[model_cfg.mlp][1] + ("wo",)


def norm(cfg, name):
  return NORM_TYPES[cfg.norm_type](cfg, name)


def num_kv_heads(cfg) -> int:
  return cfg.num_kv_heads or cfg.num_heads


def layer_data(cfg) -> dict:
  """What differs between layers, as arrays scanned with them: the attention window [N],
  whether the attention norm applies [N] (not on layer 0 with `skip_first_attn_norm`) and,
  with RoPE, the inverse frequencies [N, K/2]."""
  data = {"window": jnp.asarray(masks.layer_windows(cfg)),
          "attn_norm": jnp.arange(cfg.num_layers) >= int(cfg.skip_first_attn_norm)}
  if cfg.position == "rope":
    data["rope_freq"] = jnp.asarray(rope.layer_frequencies(cfg))
  return data


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
  """`einsum(eq, x, kernel) (+ bias)` with logically named kernel and bias axes.

  The kernel's leading dims contract with x, the trailing ones (the bias's) are outputs. When
  the config names this projection among `lora_targets`, a low-rank adapter (`lora.py`) runs
  beside the kernel.
  """
  cfg: Any
  eq: str
  kernel_shape: tuple
  kernel_axes: tuple
  bias_axes: tuple
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", logical_init(self.kernel_axes), self.kernel_shape,
                        cfg.param_dtype)
    n_out = len(self.bias_axes)
    x = x.astype(cfg.dtype)
    y = jnp.einsum(self.eq, x, kernel.astype(cfg.dtype))
    if self.bias:
      bias = self.param("bias", logical_init(self.bias_axes, nn.initializers.zeros),
                        self.kernel_shape[-n_out:], cfg.param_dtype)
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
  """Attention over what a `masks.Mask` allows, by `cfg.attention` (resolved); given a
  `cache_index` it decodes against a KV cache instead, always with XLA.

  H query heads share G = `num_kv_heads` key/value heads, query head h reading key/value head
  h // (H / G) (grouped-query attention; G = H is multi-head, G = 1 multi-query). Decoding
  keeps `cached_key` and `cached_value` [B, S, G, K] in the "cache" collection, with S the
  mask's key length: a call writes its L new (rotated) keys and values at slots
  [cache_index, cache_index + L) and attends over all S slots, so the caller's mask must hide
  empty, padding and future slots.
  """
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD, mask: masks.Mask, positions_BxL, layer, cache_index=None):
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.num_heads
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    q_BxLxHxK = Projection(cfg, "bld,dhk->blhk", (cfg.d_model, cfg.num_heads, head_dim),
                           ("embed", "heads", "kv"), ("heads", "kv"), qkv_bias,
                           name="query")(x_BxLxD)
    k_BxSxGxK, v_BxSxGxK = (
        Projection(cfg, "bld,dhk->blhk", (cfg.d_model, num_kv_heads(cfg), head_dim),
                   ("embed", "kv_heads", "kv"), ("kv_heads", "kv"), qkv_bias, name=n)(x_BxLxD)
        for n in ("key", "value"))
    if cfg.position == "rope":
      q_BxLxHxK = rope.rotate(q_BxLxHxK, positions_BxL, layer["rope_freq"])
      k_BxSxGxK = rope.rotate(k_BxSxGxK, positions_BxL, layer["rope_freq"])
    if cache_index is not None:
      k_BxSxGxK, v_BxSxGxK = self._cached(k_BxSxGxK, v_BxSxGxK,
                                          mask.kv_segment_ids_BxS.shape[1], cache_index)
    q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "heads", "kv"))
    out_BxLxHxK = attention_lib.attend(
        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask.for_layer(layer["window"]),
        "xla" if cache_index is not None else cfg.attention, max_segments=cfg.max_segments)
    return Projection(cfg, "blhk,hkd->bld", (cfg.num_heads, head_dim, cfg.d_model),
                      ("heads", "kv", "embed"), ("embed",), cfg.use_bias,
                      name="out")(out_BxLxHxK)

  def _cached(self, k_BxLxGxK, v_BxLxGxK, cache_len, cache_index):
    """Writes the new keys and values into the cache; returns the whole cache [B, S, G, K]."""
    batch, _, heads, head_dim = k_BxLxGxK.shape
    shape = (batch, cache_len, heads, head_dim)
    out = []
    for name, new_BxLxGxK in (("cached_key", k_BxLxGxK), ("cached_value", v_BxLxGxK)):
      cached = self.variable("cache", name, jnp.zeros, shape, new_BxLxGxK.dtype)
      cached.value = jax.lax.dynamic_update_slice(cached.value, new_BxLxGxK,
                                                  (0, cache_index, 0, 0))
      out.append(cached.value)
    return tuple(out)


class Mlp(nn.Module):
  """wo(act(x wi)), or gated: wo(act(x wi_gate) * (x wi_up)), by `model.mlp` (MLPS)."""
  cfg: Any

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    activation, inputs = MLPS[cfg.mlp]
    first_BxLxF, *gated = (
        Projection(cfg, "bld,df->blf", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), ("mlp",),
                   cfg.use_bias, name=n)(x_BxLxD) for n in inputs)
    h_BxLxF = activation(cfg, first_BxLxF)
    if gated:
      h_BxLxF = h_BxLxF * gated[0]
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    return Projection(cfg, "blf,fd->bld", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"),
                      ("embed",), cfg.use_bias, name="wo")(h_BxLxF)


class Block(nn.Module):
  """One layer; post-norm: x = N(x + f(x)) (BERT); pre-norm: x = x + f(N(x)) (GPT-2, Llama).

  `layer` holds this layer's slice of `layer_data`.
  """
  cfg: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, mask, positions_BxL, cache_index, layer):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    for name, sublayer in (("attn", Attention(cfg, name="attn")), ("mlp", Mlp(cfg, name="mlp"))):
      args = (mask, positions_BxL, layer, cache_index) if name == "attn" else ()
      if cfg.norm == "pre":
        h_BxLxD = norm(cfg, f"{name}_norm")(x_BxLxD)
        if name == "attn" and cfg.skip_first_attn_norm:  # its scale stays, unused, on layer 0
          h_BxLxD = jnp.where(layer["attn_norm"], h_BxLxD, x_BxLxD)
        x_BxLxD = x_BxLxD + drop(sublayer(h_BxLxD, *args))
      else:
        x_BxLxD = norm(cfg, f"{name}_norm")(x_BxLxD + drop(sublayer(x_BxLxD, *args)))
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
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, self.deterministic, name="layers")
    # BERT (post-norm) normalizes the embeddings; pre-norm models normalize the stack's output,
    # and with `embed_norm` the embeddings too (ModernBERT).
    if cfg.norm == "post" or cfg.embed_norm:
      self.embed_norm = norm(cfg, "embed_norm")
    if cfg.norm == "pre":
      self.final_norm = norm(cfg, "final_norm")
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, token_types_BxL=None,
               *, causal: bool):
    return self._stack(tokens_BxL, positions_BxL, token_types_BxL,
                       masks.Mask.packed(segment_ids_BxL, causal), None)

  def decode(self, tokens_BxL, positions_BxL, mask, cache_index, token_types_BxL=None):
    """Runs L new tokens against the KV cache; apply it with `mutable=["cache"]`.

    The tokens fill slots [cache_index, cache_index + L) of every layer's cache, which holds
    S = mask.kv_segment_ids_BxS.shape[1] slots and starts zeroed when the "cache" collection is
    empty. `mask` (a `masks.Mask`) says which slots each new token sees (filled, not
    padding, not in its future); positions_BxL are the tokens' positions within their own
    rows, which left padding makes differ from slots.
    """
    return self._stack(tokens_BxL, positions_BxL, token_types_BxL, mask, cache_index)

  def _stack(self, tokens_BxL, positions_BxL, token_types_BxL, mask, cache_index):
    cfg = self.cfg
    if token_types_BxL is None:
      token_types_BxL = jnp.zeros_like(tokens_BxL)
    x_BxLxD = self.embedder(tokens_BxL, positions_BxL, token_types_BxL)
    if cfg.norm == "post" or cfg.embed_norm:
      x_BxLxD = self.embed_norm(x_BxLxD)
    x_BxLxD = nn.with_logical_constraint(self.drop(x_BxLxD), ("batch", "length", "embed"))
    mask = mask.replace(windows=masks.distinct_windows(cfg))
    x_BxLxD, _ = self.layers(x_BxLxD, mask, positions_BxL, cache_index, layer_data(cfg))
    if cfg.norm == "pre":
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

"""Model options beyond BERT and GPT-2, each against a plain definition: RMSNorm, gated MLPs,
grouped-query attention, sliding windows per layer, RoPE scaling; key/value heads on a tensor
axis that does not divide them; the Llama and ModernBERT presets training through lmssl.train."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from lmssl import attention
from lmssl import masks
from lmssl import model as model_lib
from lmssl import rope
from lmssl import sharding
from lmssl import steps
from lmssl import train


def _module_cfg(name="llama_base", **changes):
  cfg = load_config(name).model
  cfg.vocab_size = 64
  for key, value in changes.items():
    cfg[key] = value
  return model_lib.module_config(cfg)


def _random(shapes, seed=0, scale=0.5):
  """Normal values on a tree of shapes; norm scales around 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + rng.normal(0.0, scale, leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _init_random(module, *args, seed=0, **kwargs):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)["params"])
  return _random(nn.meta.unbox(shapes), seed)


# --- norms and MLPs against numpy ------------------------------------------------------------

@pytest.mark.parametrize("norm_type,use_bias", [("rmsnorm", False), ("layernorm", False),
                                                ("layernorm", True)])
def test_norms_match_numpy(norm_type, use_bias):
  cfg = _module_cfg(norm_type=norm_type, use_bias=use_bias, ln_eps=1e-5)
  x = np.random.default_rng(1).normal(2.0, 3.0, (2, 5, cfg.d_model)).astype(np.float32)
  module = model_lib.norm(cfg, "n")
  params = _init_random(module, x)
  assert sorted(params) == (["bias", "scale"] if use_bias else ["scale"])
  got = np.asarray(module.apply({"params": params}, x))
  x64 = x.astype(np.float64)
  if norm_type == "rmsnorm":  # no mean taken out: x / rms(x)
    want = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-5)
  else:
    centered = x64 - x64.mean(-1, keepdims=True)
    want = centered / np.sqrt(np.mean(centered ** 2, -1, keepdims=True) + 1e-5)
  want = want * params["scale"] + (params["bias"] if use_bias else 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_ERF = np.vectorize(math.erf)


def _gelu(x, form):
  if form == "erf":
    return 0.5 * x * (1 + _ERF(x / np.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("mlp,gelu,use_bias", [("swiglu", "erf", False), ("geglu", "erf", False),
                                               ("geglu", "tanh", True)])
def test_gated_mlps_match_numpy(mlp, gelu, use_bias):
  cfg = _module_cfg(mlp=mlp, gelu=gelu, use_bias=use_bias)
  x = np.random.default_rng(2).normal(size=(2, 5, cfg.d_model)).astype(np.float32)
  module = model_lib.Mlp(cfg)
  p = _init_random(module, x, seed=3)
  assert sorted(p) == ["wi_gate", "wi_up", "wo"]
  assert p["wi_gate"]["kernel"].shape == p["wi_up"]["kernel"].shape == (cfg.d_model, cfg.mlp_dim)
  assert ("bias" in p["wo"]) == use_bias
  got = np.asarray(module.apply({"params": p}, x))

  def dense(name, h):
    out = h.astype(np.float64) @ np.asarray(p[name]["kernel"], np.float64)
    return out + np.asarray(p[name]["bias"]) if use_bias else out
  gate = dense("wi_gate", x)
  act = gate / (1 + np.exp(-gate)) if mlp == "swiglu" else _gelu(gate, gelu)
  want = dense("wo", act * dense("wi_up", x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_biases_follow_use_bias_and_qkv_bias():
  def tree(**changes):
    cfg = _module_cfg(**changes)
    x = jnp.zeros((1, 4, cfg.d_model))
    mask = masks.Mask.packed(jnp.ones((1, 4), jnp.int32), True)
    layer = model_lib.layer_data(cfg)
    block = model_lib.Block(cfg)
    args = (x, mask, jnp.arange(4)[None], None, jax.tree.map(lambda a: a[0], layer))
    return nn.meta.unbox(jax.eval_shape(lambda: block.init(jax.random.key(0), *args)))["params"]

  def biased(t):
    return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)
                  if p[-1].key == "bias")
  assert biased(tree()) == []  # Llama
  assert biased(tree(qkv_bias=True)) == [f"['attn']['{n}']['bias']"
                                         for n in ("key", "query", "value")]  # Qwen2
  assert len(biased(tree(use_bias=True))) == 4 + 3  # attention and MLP projections (RMSNorm
  # has no bias), and with LayerNorm its two norms too
  assert len(biased(tree(use_bias=True, norm_type="layernorm"))) == 4 + 3 + 2


# --- grouped-query attention ----------------------------------------------------------------

def _packed_row():
  segments = np.array([[1] * 9 + [2] * 14 + [3] * 5 + [0] * 4, [1] * 20 + [2] * 12], np.int32)
  positions = np.zeros_like(segments)
  for b, row in enumerate(segments):
    for l in range(1, len(row)):
      positions[b, l] = positions[b, l - 1] + 1 if row[l] == row[l - 1] != 0 else 0
  return jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize("kv_heads", [2, 1])  # grouped-query, multi-query
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_is_multi_head_with_repeated_key_value_heads(kv_heads, causal):
  gqa_cfg = _module_cfg(num_heads=4, num_kv_heads=kv_heads, qkv_bias=True)
  mha_cfg = _module_cfg(num_heads=4, num_kv_heads=0, qkv_bias=True)
  segments, positions = _packed_row()
  x = jax.random.normal(jax.random.key(1), segments.shape + (gqa_cfg.d_model,))
  cotangent = jax.random.normal(jax.random.key(2), x.shape) * (segments != 0)[..., None]
  mask = masks.Mask.packed(segments, causal)
  layer = jax.tree.map(lambda a: a[0], model_lib.layer_data(gqa_cfg))
  gqa = model_lib.Attention(gqa_cfg)
  params = _init_random(gqa, x, mask, positions, layer, seed=4)
  assert params["key"]["kernel"].shape == (gqa_cfg.d_model, kv_heads, 16)
  group = 4 // kv_heads
  repeated = {**params, **{n: jax.tree.map(lambda w: jnp.repeat(w, group, axis=-2), params[n])
                           for n in ("key", "value")}}

  def loss(module):
    return lambda p: jnp.sum(module.apply({"params": p}, x, mask, positions, layer) * cotangent)
  got, got_grads = jax.value_and_grad(loss(gqa))(params)
  want, want_grads = jax.value_and_grad(loss(model_lib.Attention(mha_cfg)))(repeated)
  np.testing.assert_allclose(got, want, rtol=1e-5)

  def close(g, w):  # float32 sums of terms up to ~100: relative to the largest
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())
  for name in ("query", "out"):
    for leaf in params[name]:
      close(got_grads[name][leaf], want_grads[name][leaf])
  for name in ("key", "value"):  # a shared head's gradient sums its group's
    for leaf in params[name]:
      summed = want_grads[name][leaf]
      close(got_grads[name][leaf],
            summed.reshape(summed.shape[:-2] + (kv_heads, group, 16)).sum(-2))


# --- sliding windows ---------------------------------------------------------------------------

def _banded(segments, window, causal):
  """The definition, one pair at a time: same real segment, causal if asked, and within the
  window (causal: the `window` latest slots; bidirectional: at most window // 2 away)."""
  out = np.zeros((len(segments), len(segments[0]), len(segments[0])), bool)
  for b, row in enumerate(segments):
    for l, q in enumerate(row):
      for s, k in enumerate(row):
        near = 0 <= l - s < window if causal else abs(l - s) <= window // 2
        out[b, l, s] = q == k != 0 and (not causal or s <= l) and (window == 0 or near)
  return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 8])
def test_window_mask_is_the_banded_definition(causal, window):
  segments, _ = _packed_row()
  mask = masks.Mask.packed(segments, causal).replace(window=window, windows=(window,))
  np.testing.assert_array_equal(np.asarray(mask.dense())[:, 0],
                                _banded(np.asarray(segments), window, causal))
  assert masks.has_effect(window, 32, causal) and not masks.has_effect(0, 32, causal)
  assert not masks.has_effect(32 if causal else 62, 32, causal)
  assert masks.has_effect(31 if causal else 61, 32, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_windowed_kernels_match_the_reference_with_a_dense_band(causal):
  """xla (the reference) and splash (interpret mode), grouped-query, each against
  jax.nn.dot_product_attention given the banded mask written out by hand: values and
  gradients."""
  segments = np.array([[1] * 37 + [2] * 50 + [3] * 41, [1] * 90 + [0] * 38], np.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 128, 4, 16))
  k, v = (jax.random.normal(key, (2, 128, 2, 16)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape) * (segments != 0)[:, :, None, None]
  band = jnp.asarray(_banded(segments, 24, causal))[:, None]

  def value_and_grads(f):
    @jax.jit
    def run(q, k, v):
      out, vjp = jax.vjp(f, q, k, v)
      return out * (segments != 0)[:, :, None, None], vjp(cotangent)  # padding rows aside
    return run(q, k, v)
  want, want_grads = value_and_grads(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=band))
  for implementation in ("xla", "splash"):
    # Two windows (0, 24) with the layer's window as data: the kernel for 24 is picked.
    mask = masks.Mask.packed(jnp.asarray(segments), causal).replace(windows=(0, 24))
    got, got_grads = value_and_grads(lambda q, k, v: attention.attend(
        q, k, v, mask.replace(window=jnp.int32(24)), implementation))
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=implementation)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max(), err_msg=implementation)
  # The window matters here: without it the same packed rows attend otherwise.
  unwindowed, _ = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=masks.Mask.packed(jnp.asarray(segments), causal).dense()))
  assert np.abs(np.asarray(unwindowed) - np.asarray(want)).max() > 0.1


def _layer_reach(cfg, params, quiet_layer):
  """Which earlier positions reach position 31's hidden state (nonzero gradient) when layer
  `quiet_layer`'s attention outputs nothing, so that only the other layer's attention mixes
  positions."""
  net = model_lib.Transformer(cfg)
  out = params["layers"]["attn"]["out"]
  quiet = {**params, "layers": {**params["layers"], "attn": {**params["layers"]["attn"], "out": {
      "kernel": out["kernel"].at[quiet_layer].set(0.0)}}}}
  tokens = jnp.arange(10, 42)[None]

  def at_last(table):
    p = {**quiet, "embedder": {"tokens": {"embedding": table}}}
    h, _ = net.apply({"params": p}, tokens, jnp.ones_like(tokens), jnp.arange(32)[None],
                     causal=True)
    return jnp.sum(h[0, 31] ** 2)
  g = jax.grad(at_last)(quiet["embedder"]["tokens"]["embedding"])
  return np.abs(np.asarray(g[tokens[0]])).sum(-1) > 0


def test_global_every_alternates_global_and_windowed_layers():
  """global_every=2 over 2 layers: layer 0 global, layer 1 the 4 latest positions. With one
  layer's attention silenced, position 31 hears exactly what the other layer lets through."""
  cfg = _module_cfg(num_layers=2, attention_window=4, global_every=2)
  np.testing.assert_array_equal(masks.layer_windows(cfg), [0, 4])
  tokens = jnp.arange(10, 42)[None]
  params = _init_random(model_lib.Transformer(cfg), tokens, jnp.ones_like(tokens),
                        jnp.arange(32)[None], causal=True, seed=5)
  only_layer_0 = _layer_reach(cfg, params, quiet_layer=1)
  only_layer_1 = _layer_reach(cfg, params, quiet_layer=0)
  assert only_layer_0.all()  # global: every position up to 31
  np.testing.assert_array_equal(only_layer_1, np.arange(32) >= 28)  # positions 28..31


def test_skip_first_attn_norm_feeds_layer_0_the_normalized_embeddings():
  """ModernBERT's layer 0: its attention reads the embedding norm's output as it is. Its
  attn_norm scale is kept (scanned layers share one tree) but neither changes the output nor
  gets a gradient; layer 1's does both."""
  cfg = _module_cfg("modernbert_base", num_layers=2)
  assert cfg.skip_first_attn_norm
  tokens = jnp.arange(10, 42)[None]
  args = (tokens, jnp.ones_like(tokens), jnp.arange(32)[None])
  params = _init_random(model_lib.Transformer(cfg), *args, causal=False, seed=3)
  def loss(p):
    return jnp.sum(model_lib.Transformer(cfg).apply({"params": p}, *args, causal=False)[0] ** 2)
  grads = jax.grad(loss)(params)["layers"]["attn_norm"]["scale"]
  assert float(jnp.abs(grads[0]).max()) == 0.0 and float(jnp.abs(grads[1]).max()) > 0.0
  scaled = jax.tree.map(lambda x: x, params)
  scaled["layers"]["attn_norm"]["scale"] = params["layers"]["attn_norm"]["scale"].at[0].mul(3.0)
  np.testing.assert_array_equal(loss(scaled), loss(params))
  plain = _module_cfg("modernbert_base", num_layers=2, skip_first_attn_norm=False)
  with_norm = jnp.sum(model_lib.Transformer(plain).apply({"params": params}, *args,
                                                         causal=False)[0] ** 2)
  assert abs(float(with_norm) - float(loss(params))) > 1e-3


def test_windowed_layers_take_their_own_rope_theta():
  cfg = _module_cfg("modernbert_base", num_layers=4)  # smoke: the window shrinks to 16
  np.testing.assert_array_equal(masks.layer_windows(cfg), [0, 16, 16, 0])
  freq = rope.layer_frequencies(cfg)
  head_dim = cfg.d_model // cfg.num_heads
  for layer, theta in enumerate([160_000.0, 10_000.0, 10_000.0, 160_000.0]):
    np.testing.assert_allclose(freq[layer], theta ** (-np.arange(0, head_dim, 2) / head_dim),
                               rtol=1e-6)


# --- RoPE scaling ------------------------------------------------------------------------------

def _llama3_numpy(theta, head_dim, factor, low, high, original):
  """Llama 3.1's frequency rule, frequency by frequency in float64."""
  out = []
  for i in range(0, head_dim, 2):
    freq = 1.0 / theta ** (i / head_dim)
    wavelength = 2 * math.pi / freq
    if wavelength < original / high:
      out.append(freq)
    elif wavelength > original / low:
      out.append(freq / factor)
    else:
      smooth = (original / wavelength - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


@pytest.mark.parametrize("factor,low,high,original", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                      (4.0, 2.0, 8.0, 256)])
def test_llama3_rope_scaling_is_the_formula(factor, low, high, original):
  cfg = _module_cfg(d_model=512, num_heads=4, rope_scaling="llama3", rope_theta=500_000.0,
                    rope_scaling_factor=factor, rope_low_freq_factor=low,
                    rope_high_freq_factor=high, rope_original_max_len=original)
  got = rope.inverse_frequencies(cfg, cfg.rope_theta)
  want = _llama3_numpy(500_000.0, 128, factor, low, high, original)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  plain = rope.inverse_frequencies(_module_cfg(d_model=512, num_heads=4, rope_theta=500_000.0),
                                   500_000.0)
  # All three regimes occur: kept, divided by the factor, and blended between.
  ratio = plain / got
  assert (np.isclose(ratio, 1).any() and np.isclose(ratio, factor).any()
          and ((ratio > 1.01) & (ratio < factor * 0.99)).any())
  np.testing.assert_allclose(rope.inverse_frequencies(_module_cfg(
      d_model=512, num_heads=4, rope_theta=500_000.0, rope_scaling="linear",
      rope_scaling_factor=factor), 500_000.0), plain / factor, rtol=1e-6)


# --- key/value heads on the mesh ------------------------------------------------------------

def _llama(**changes):
  cfg = load_config("llama_base")
  cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size = 96, 32, 8
  cfg.model.num_heads = 4
  cfg.train.lr, cfg.train.warmup_steps = 1e-2, 0
  for key, value in changes.items():
    cfg.model[key] = value
  return cfg


def _two_steps(cfg, mesh_shape):
  rng = np.random.default_rng(0)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, shardings = steps.create_state(cfg, mesh)
    step_fn, _ = steps.compile_steps(cfg, shardings, mesh)
    losses = []
    for _ in range(2):
      batch = steps.example_batch(cfg, cfg.train.batch_size)
      batch["input_ids"] = rng.integers(5, 96, batch["input_ids"].shape).astype(np.int32)
      idx = np.broadcast_to(np.arange(32), batch["input_ids"].shape)
      batch["segment_ids"] = np.where(idx < 20, 1, 2).astype(np.int32)  # two documents a row
      batch["positions"] = np.where(idx < 20, idx, idx - 20).astype(np.int32)
      state, m = step_fn(state, sharding.global_batch(batch, mesh))
      losses.append(float(m["loss"]))
  return state, losses


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_tensor_axis_wider_than_the_key_value_heads_replicates_them(kv_heads):
  """tensor=4 splits the 4 query heads but not 2 (or 1) key/value heads: those are whole on
  every device, and the sharded steps equal the single-device ones."""
  single, single_losses = _two_steps(_llama(num_kv_heads=kv_heads), (1, 1, 1))
  sharded, sharded_losses = _two_steps(_llama(num_kv_heads=kv_heads), (2, 1, 4))
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)
  attn = sharded.params["transformer"]["layers"]["attn"]
  for name, heads in (("query", 1), ("key", kv_heads), ("value", kv_heads)):
    kernel = attn[name]["kernel"]  # [N, D, heads, K]
    assert kernel.addressable_shards[0].data.shape[2] == heads, name


def test_tensor_axis_dividing_the_key_value_heads_splits_them():
  cfg = _llama(num_kv_heads=4, num_heads=8)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 1, 4
  abstract = steps.abstract_params(cfg, sharding.make_mesh(cfg.mesh))
  key = abstract["transformer"]["layers"]["attn"]["key"]["kernel"]
  assert key.sharding.spec[2] == "tensor"
  assert sharding.mesh_axes(("kv_heads",), (2,), key.sharding.mesh) == jax.sharding.PartitionSpec(
      None)


# --- the presets train ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama_base", "modernbert_base"])
def test_preset_smoke_trains_with_falling_loss(name, tmp_path):
  cfg = load_config(name, "smoke")
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.train.steps, cfg.train.log_every, cfg.train.lr, cfg.train.warmup_steps = 12, 1, 3e-3, 2
  cfg.eval.every_steps = cfg.checkpoint.every_steps = 12
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses) == 12 and np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  assert np.isfinite(final["eval_loss"])

"""Attention over packed rows: the mask's definition, the kernels against the XLA reference
(splash in Pallas interpret mode here; cuDNN only on a GPU), the choice of kernel, and the
packed layout cuDNN takes. Windows and grouped-query heads: also tests/test_architectures.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from lmssl import attention
from lmssl import errors
from lmssl import masks
from lmssl import model as model_lib
from lmssl import sample
from lmssl import sharding
from lmssl import validation


def _row(*lengths, pad=0):
  """Segment ids 1, 2, ... with the given lengths, then `pad` padding (0) slots."""
  return [i + 1 for i, n in enumerate(lengths) for _ in range(n)] + [0] * pad


# Several uneven documents; several and a padding tail; one document filling the row.
PACKED_128 = np.array([_row(37, 50, 41), _row(20, 61, 9, pad=38), _row(128)], np.int32)


def _allowed(q_segments, kv_segments, causal):
  """The definition, one pair at a time: same real segment, and with `causal` a key slot at
  most the query's slot."""
  return np.array([[[q_seg == kv_seg != 0 and (not causal or s <= l)
                     for s, kv_seg in enumerate(kv_row)]
                    for l, q_seg in enumerate(q_row)]
                   for q_row, kv_row in zip(q_segments, kv_segments)])


@pytest.mark.parametrize("causal", [False, True])
def test_packed_dense_mask_is_the_definition(causal):
  segments = [_row(3, 2, 4, pad=3), _row(5, 7)]
  got = np.asarray(masks.Mask.packed(jnp.array(segments), causal).dense())
  assert got.shape == (2, 1, 12, 12) and got.dtype == bool
  np.testing.assert_array_equal(got[:, 0], _allowed(segments, segments, causal))
  # Spot checks of the definition itself: documents are closed to each other, and padding
  # sees and is seen by nothing.
  assert got[0, 0, 4, 3] and not got[0, 0, 4, 2] and got[0, 0, 3, 4] != causal
  assert not got[0, 0, 9:].any() and not got[0, 0, :, 9:].any()


def test_decode_mask_sees_its_rows_real_slots_up_to_its_own():
  pad, cache_len = np.array([0, 2, 5]), 9

  def expected(first_slot, tokens):
    # Row b's query l sits at slot first_slot + l and sees slots pad[b] .. that slot.
    return np.array([[[pad[b] <= s <= first_slot + l for s in range(cache_len)]
                      for l in range(tokens)] for b in range(len(pad))])

  prefill = sample._decode_mask(jnp.asarray(pad), 6, 0, cache_len).dense()
  np.testing.assert_array_equal(np.asarray(prefill)[:, 0], expected(0, 6))
  step = sample._decode_mask(jnp.asarray(pad), 1, jnp.asarray(7), cache_len).dense()
  assert step.shape == (3, 1, 1, cache_len)
  np.testing.assert_array_equal(np.asarray(step)[:, 0], expected(7, 1))
  # Two new tokens at once from slot 6 (a multi-token step): the second sees one slot more.
  pair = sample._decode_mask(jnp.asarray(pad), 2, jnp.asarray(6), cache_len).dense()
  np.testing.assert_array_equal(np.asarray(pair)[:, 0], expected(6, 2))


def _qkv(shape, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent


def _value_and_grads(implementation, q, k, v, mask, weights_BxL, cotangent, **kwargs):
  """The output, and the gradients wrt q, k, v of a loss that weights each real position by
  `weights_BxL` (0 at padding), computed in float32."""
  def loss(q, k, v):
    out = attention.attend(q, k, v, mask, implementation, **kwargs).astype(jnp.float32)
    return jnp.sum(weights_BxL[:, :, None, None] * cotangent * out)

  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, implementation, **kwargs))(
      q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def _weights(segments):
  uneven = jax.random.uniform(jax.random.key(7), segments.shape, minval=0.5, maxval=2.0)
  return jnp.where(segments != 0, uneven, 0.0)


def _assert_grads_close(got, want, rel):
  for name, g, w in zip("qkv", got, want):
    scale = np.abs(w).max()
    assert scale > 0, name
    np.testing.assert_allclose(g, w, atol=rel * scale, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_splash_matches_xla_values_and_grads(causal):
  """Measured on CPU (interpret mode): values differ by <= 5e-7, gradients by <= 5e-7 of
  their largest magnitude."""
  segments = jnp.asarray(PACKED_128)
  q, k, v, cotangent = _qkv((3, 128, 2, 16))
  mask, weights = masks.Mask.packed(segments, causal), _weights(segments)
  out, grads = _value_and_grads("splash", q, k, v, mask, weights, cotangent)
  ref, ref_grads = _value_and_grads("xla", q, k, v, mask, weights, cotangent)
  real = PACKED_128 != 0
  np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=0)
  _assert_grads_close(grads, ref_grads, rel=1e-4)
  # The packing matters here: attending across documents would give other values.
  across = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  assert np.abs(np.asarray(across)[real] - ref[real]).max() > 0.1


def _hidden_states(module_cfg, params, batch, mesh):
  net = model_lib.Transformer(module_cfg)

  @jax.jit
  def forward(params, batch):
    h, _ = net.apply({"params": params}, batch["tokens"], batch["segments"],
                     batch["positions"], causal=True)
    return h

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    return np.asarray(forward(params, sharding.global_batch(batch, mesh)))


@pytest.mark.parametrize("heads,kv_heads,window", [(2, 0, 0), (2, 1, 16), (4, 2, 0)])
def test_transformer_with_splash_on_a_mesh_matches_xla(heads, kv_heads, window):
  """Rows over the data axis and heads over the tensor axis: splash runs under shard_map
  on each device's rows and heads. With one key/value head (too few for the tensor axis, so
  each device gets its query heads' copy) and a window on layer 1 (layer 0 global), the
  layer's window picks its kernel; with 4 query heads on 2 key/value heads each device runs
  the multi-query kernel on its 2 query heads and their key/value head."""
  cfg = load_config("clm_base", "smoke")
  cfg.model.vocab_size, cfg.model.num_heads = 64, heads
  cfg.model.num_kv_heads, cfg.model.attention_window = kv_heads, window
  cfg.model.global_every = 2 if window else 0
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1, 2
  assert cfg.model.num_heads % cfg.mesh.tensor == 0
  xla_cfg = model_lib.module_config(cfg.model)
  assert xla_cfg.attention == "xla"  # what auto means on CPU
  splash_cfg = ml_collections.FrozenConfigDict(
      {**xla_cfg.as_configdict().to_dict(), "attention": "splash"})
  assert splash_cfg.dtype == xla_cfg.dtype and splash_cfg.lora_targets == ()

  segments = np.array([_row(40, 88), _row(128), _row(17, 30, 50, pad=31), _row(64, 64)],
                      np.int32)
  positions = np.zeros_like(segments)
  for b, row in enumerate(segments):
    for l in range(1, len(row)):
      positions[b, l] = positions[b, l - 1] + 1 if row[l] == row[l - 1] != 0 else 0
  tokens = np.where(segments != 0, np.random.default_rng(0).integers(1, 64, segments.shape), 0)
  batch = {"tokens": tokens.astype(np.int32), "segments": segments, "positions": positions}
  params = nn.meta.unbox(model_lib.Transformer(xla_cfg).init(
      jax.random.key(0), tokens[:1], segments[:1], positions[:1], causal=True)["params"])

  mesh = sharding.make_mesh(cfg.mesh)
  want = _hidden_states(xla_cfg, params, batch, mesh)
  got = _hidden_states(splash_cfg, params, batch, mesh)
  real = segments != 0
  assert np.isfinite(want[real]).all() and np.abs(want[real]).max() > 0.1
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=0)


@pytest.mark.parametrize("platform,implementation", [
    ("gpu", "cudnn"), ("tpu", "splash"), ("cpu", "xla")])
def test_auto_picks_the_platforms_kernel(platform, implementation):
  assert attention.resolve("auto", platform) == implementation
  assert attention.resolve("xla", platform) == "xla"
  assert attention.resolve(implementation, platform) == implementation


@pytest.mark.parametrize("name", ["cudnn", "splash"])
def test_forced_kernel_off_its_platform_names_the_fix(name):
  with pytest.raises(errors.UserError, match=(
      rf"model.attention='{name}' cannot run here: it runs on .* only, and this run's devices "
      r"are cpu; use --config.model.attention=auto \(picks xla here\) or xla")):
    attention.resolve(name, "cpu")


@pytest.mark.parametrize("dtype,capability,reason", [
    ("float32", "9.0", r"cuDNN flash attention takes bfloat16 or float16, and model.dtype is "
                       r"float32 \(set --config.model.dtype=bfloat16\)"),
    ("bfloat16", "8.0", r"cuDNN's packed-sequence attention needs compute capability 9.0 "
                        r"\(Hopper\) or newer, and this GPU has 8.0")])
def test_cudnn_where_it_cannot_run_names_why_and_auto_falls_back_to_xla(dtype, capability,
                                                                         reason):
  assert attention.resolve("auto", "gpu", dtype, capability) == "xla"
  with pytest.raises(errors.UserError, match=(
      rf"model.attention='cudnn' cannot run here: {reason}; use --config.model.attention=auto "
      r"\(picks xla here\) or xla")):
    attention.resolve("cudnn", "gpu", dtype, capability)
  assert attention.resolve("cudnn", "gpu", "bfloat16", "9.0") == "cudnn"
  assert attention.resolve("cudnn", "gpu", "float16", "10.0") == "cudnn"


def test_unknown_kernel_lists_the_known_ones():
  with pytest.raises(errors.UserError, match=(
      r"model.attention='flash' is not known; use one of "
      r"\['auto', 'xla', 'cudnn', 'splash'\]")):
    attention.resolve("flash", "gpu")


@pytest.mark.parametrize("field,value,message", [
    ("attention", "flash", r"model.attention='flash' is not known; use one of \['auto'"),
    ("max_segments", 0, "model.max_segments=0 must be at least 1"),
])
def test_config_refuses_bad_attention_settings(field, value, message):
  cfg = load_config("clm_base", "size=tiny")
  validation.validate(cfg, batch_shards=8)  # valid as it comes
  setattr(cfg.model, field, value)
  with pytest.raises(errors.UserError, match=message):
    validation.validate(cfg, batch_shards=8)


def test_forced_cudnn_refuses_a_bidirectional_window(monkeypatch):
  """cuDNN's sliding window is causal only: an encoder's window is refused for a forced
  cudnn at start (under auto its windowed layers run XLA)."""
  monkeypatch.setattr(attention, "resolve", lambda name, **kwargs: name)  # as on a GPU
  cfg = load_config("mlm_base", "size=tiny")
  cfg.model.attention, cfg.model.attention_window = "cudnn", 32
  with pytest.raises(errors.UserError, match=(
      r"model.attention='cudnn' takes no bidirectional sliding window \(objective 'mlm'\); "
      r"use --config.model.attention=auto or xla")):
    validation.validate(cfg, batch_shards=8)
  cfg.objective = "clm"
  validation.validate(cfg, batch_shards=8)
  assert attention.WINDOWS["cudnn"] == ("causal",)


def test_segment_layout_by_hand():
  segments = jnp.array([
      [1, 1, 1, 2, 2, 3, 0, 0],  # three documents, padding tail
      [1, 1, 1, 1, 1, 1, 1, 1],  # one document filling the row
      [0, 0, 0, 0, 0, 0, 0, 0],  # all padding
      [1, 2, 2, 3, 4, 4, 4, 0],  # four documents: one more than M = 3
  ])
  lengths, starts, overflow = attention.segment_layout(segments, 3)
  np.testing.assert_array_equal(lengths, [[3, 2, 1], [8, -1, -1], [-1, -1, -1], [1, 2, 1]])
  np.testing.assert_array_equal(starts, [[0, 3, 5, -1], [0, -1, -1, -1], [-1, -1, -1, -1],
                                         [0, 1, 3, -1]])
  np.testing.assert_array_equal(overflow, [False, False, False, True])
  assert lengths.dtype == starts.dtype == jnp.int32


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention runs on NVIDIA GPUs only (its packed layout on Hopper "
                    "or later)")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_xla_and_overflowing_rows_are_nan(causal):
  """bfloat16 through cuDNN against XLA in float32 on the same (rounded) inputs. Gradients
  are compared everywhere: at padding both must be zero, since there what cuDNN leaves in its
  buffers would reach the weights' gradients."""
  segments = np.array([_row(100, 37, 80, pad=39), _row(60, 50, 70, 76)], np.int32)
  q, k, v, cotangent = _qkv((2, 256, 4, 64), jnp.bfloat16)
  mask, weights = masks.Mask.packed(jnp.asarray(segments), causal), _weights(segments)
  real = segments != 0
  out, grads = _value_and_grads("cudnn", q, k, v, mask, weights, cotangent, max_segments=4)
  as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref, ref_grads = _value_and_grads("xla", *as_f32, mask, weights, cotangent)
  np.testing.assert_allclose(out[real], ref[real], atol=2e-2, rtol=2e-2)
  assert np.isfinite(out).all()  # padding's outputs meet zero weights in the loss
  _assert_grads_close(grads, ref_grads, rel=2e-2)
  # Row 1 holds 4 documents, one more than max_segments=3: that row is NaN, row 0 still right.
  fewer = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, "cudnn", max_segments=3))
  out = np.asarray(fewer(q, k, v).astype(jnp.float32))
  assert np.isnan(out[1]).all()
  np.testing.assert_allclose(out[0][real[0]], ref[0][real[0]], atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention runs on NVIDIA GPUs only (its packed layout on Hopper "
                    "or later)")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_grouped_query_heads_and_windows_match_xla(causal):
  """Four query heads on two key/value heads, two windows (0 and 48) chosen by the layer's
  window as data: cuDNN runs the global one and the causal window (its (slot - W, slot]);
  a bidirectional window runs XLA."""
  segments = np.array([_row(100, 37, 80, pad=39), _row(60, 50, 70, 76)], np.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (2, 256, 4, 64)).astype(jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, 256, 2, 64)).astype(jnp.bfloat16) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  weights, real = _weights(segments), segments != 0
  for window in (0, 48):
    mask = masks.Mask.packed(jnp.asarray(segments), causal).replace(
        windows=(0, 48), window=jnp.int32(window))
    out, grads = _value_and_grads("cudnn", q, k, v, mask, weights, cotangent, max_segments=4)
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_grads = _value_and_grads("xla", *as_f32, mask, weights, cotangent)
    np.testing.assert_allclose(out[real], ref[real], atol=2e-2, rtol=2e-2)
    _assert_grads_close(grads, ref_grads, rel=2e-2)

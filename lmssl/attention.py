"""Attention over packed rows, given as structure (`masks.Mask`: segment ids, causality, a
decode offset, a sliding window) rather than a dense mask, and dispatched to the kernel each
platform runs best.

Packing puts several documents in one row; a token sees only its own document (segment), with
`causal` only its past, and with a window only nearby keys. Queries may have more heads than
keys and values (grouped-query attention): every implementation takes the fewer key/value
heads as they are. Fused kernels take that structure directly, so no [B, L, S] mask or bias is
ever built for them:

  xla     the reference: XLA's attention with the dense mask built from the structure. Runs
          anywhere; the only path for KV-cache decoding.
  cudnn   GPUs: cuDNN flash attention with the packing passed as per-document offsets and
          lengths (cuDNN's packed layout), at most `model.max_segments` documents per row.
          A row with more makes that row's output NaN, so a train step with it is never
          applied (the non-finite guard) and evaluation shows it; raise `max_segments`.
  splash  TPUs: Pallas splash attention with `SegmentIds` (and its causal mask), under
          shard_map over the batch and head axes; off a TPU it runs in Pallas interpret mode,
          which the tests use.
  auto    cudnn on Hopper or newer GPUs in bfloat16/float16, splash on TPU, xla elsewhere.

Windows differ between layers as data (`Mask.window`, traced in the scan over layers), while
fused kernels are built for one window: there the layer's window picks, at run time, among the
kernels built for each window the model uses (`Mask.windows`). cuDNN's window is causal only; a
bidirectional windowed layer (`WINDOWS`) runs the XLA reference when `auto` chose cuDNN, and
a forced cudnn is refused at start.

Padding tokens (segment 0) are seen by no real token in any implementation; what padding
queries themselves compute differs between kernels (finite; zeros with cudnn) and never reaches
a real position.

Shape letters: B batch, L queries, S keys, H query heads, G key/value heads, K head dim,
M max segments per row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmssl import errors
from lmssl import masks
from lmssl import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Which implementation `auto` picks, and where a forced one can run.
AUTO = {"gpu": "cudnn", "tpu": "splash"}
RUNS_ON = {"xla": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",), "splash": ("tpu",)}
# What a compiled program's text holds when the fused kernel runs: cuDNN's fMHA custom call;
# on a TPU the Mosaic custom call, in interpret mode the kernel's name.
FUSED_MARKERS = {"cudnn": ("__cudnn$fmha",), "splash": ("tpu_custom_call", "splash")}
# The windows each implementation takes: "causal" (the W latest keys) and "bidirectional" (keys
# within W // 2 on either side).
WINDOWS = {"xla": ("causal", "bidirectional"), "cudnn": ("causal",),
           "splash": ("causal", "bidirectional")}


def resolve(name: str, platform: str | None = None, dtype: str = "bfloat16",
            capability: str | None = None) -> str:
  """The implementation `name` means for `dtype` on `platform` and, for GPUs, its compute
  `capability` (default: this process's first device); a forced choice that cannot run
  stops with one line naming why and the fix."""
  if platform is None:
    device = jax.devices()[0]
    platform, capability = device.platform, getattr(device, "compute_capability", None)
  if name not in IMPLEMENTATIONS:
    raise errors.UserError(f"model.attention={name!r} is not known; use one of "
                           f"{list(IMPLEMENTATIONS)}")
  if name == "auto":
    fused = AUTO.get(platform, "xla")
    return fused if _cannot_run(fused, platform, dtype, capability) is None else "xla"
  why = _cannot_run(name, platform, dtype, capability)
  if why:
    picks = resolve("auto", platform, dtype, capability)
    raise errors.UserError(f"model.attention={name!r} cannot run here: {why}; use "
                           f"--config.model.attention=auto (picks {picks} here) or xla")
  return name


def _cannot_run(name: str, platform: str, dtype: str, capability: str | None) -> str | None:
  if platform not in RUNS_ON[name]:
    return (f"it runs on {' or '.join(RUNS_ON[name])} only, and this run's devices are "
            f"{platform}")
  if name == "cudnn" and str(dtype) not in ("bfloat16", "float16"):
    return (f"cuDNN flash attention takes bfloat16 or float16, and model.dtype is {dtype} "
            "(set --config.model.dtype=bfloat16)")
  if name == "cudnn" and capability and float(capability) < 9.0:
    return (f"cuDNN's packed-sequence attention needs compute capability 9.0 (Hopper) or "
            f"newer, and this GPU has {capability}")
  return None


def runs_fused(compiled_text: str, implementation: str) -> bool | None:
  """Whether a compiled program runs `implementation`'s fused kernel (None for xla)."""
  if implementation == "xla":
    return None
  return any(marker in compiled_text for marker in FUSED_MARKERS[implementation])


def attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: masks.Mask, implementation: str, *,
           max_segments: int = 0):
  """softmax(q k^T / sqrt(K)) v over what `mask` allows, by a resolved implementation; query
  head h reads key/value head h // (H / G)."""
  if implementation == "xla":
    return _xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  one = functools.partial(_one_window, implementation=implementation, max_segments=max_segments)
  if isinstance(mask.window, (int, np.integer)):
    return one(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  # The layer's window is data: it picks the kernel built for its value.
  branches = [functools.partial(one, mask=mask.replace(window=w)) for w in mask.windows]
  index = jnp.argmax(jnp.asarray(mask.windows) == mask.window)
  return jax.lax.switch(index, [lambda q, k, v, f=f: f(q, k, v) for f in branches],
                        q_BxLxHxK, k_BxSxGxK, v_BxSxGxK)


def _xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: masks.Mask):
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask.dense(),
                                      implementation="xla")


def _one_window(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: masks.Mask, *, implementation: str,
                max_segments: int):
  """A fused kernel for a mask whose window is a Python int."""
  if mask.window and masks.window_kind(mask.causal) not in WINDOWS[implementation]:
    return _xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)
  if implementation == "cudnn":
    return _cudnn(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, max_segments)
  return _splash(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)


def segment_layout(segment_ids_BxL, max_segments: int):
  """cuDNN's packed layout of rows whose segment ids count 1, 2, 3... with 0 as padding:
  each segment's length [B, M] and start [B, M + 1], unused entries -1, and whether the row
  holds more than M segments [B]."""
  seg_BxL = segment_ids_BxL.astype(jnp.int32)
  ids_M = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
  hit_BxMxL = seg_BxL[:, None, :] == ids_M[None, :, None]
  lengths_BxM = jnp.sum(hit_BxMxL, axis=-1, dtype=jnp.int32)
  starts_BxM = jnp.argmax(hit_BxMxL, axis=-1).astype(jnp.int32)
  present_BxM = lengths_BxM > 0
  lengths_BxM = jnp.where(present_BxM, lengths_BxM, -1)
  starts_BxM = jnp.where(present_BxM, starts_BxM, -1)
  starts_BxM1 = jnp.pad(starts_BxM, ((0, 0), (0, 1)), constant_values=-1)
  overflow_B = jnp.max(seg_BxL, axis=-1) > max_segments
  return lengths_BxM, starts_BxM1, overflow_B


def _cudnn(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: masks.Mask, max_segments: int):
  # The packed layout is public only through this module of JAX's (jax.nn's wrapper does not
  # take offsets yet); it is the call jax.nn.dot_product_attention makes for cuDNN, which takes
  # G < H key/value heads as they are.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  if max_segments < 1:
    raise errors.UserError(f"model.max_segments={max_segments} must be at least 1 for "
                           "model.attention=cudnn")
  lengths_BxM, starts_BxM1, overflow_B = segment_layout(mask.q_segment_ids_BxL, max_segments)
  kind = cudnn.MaskType.PADDING_CAUSAL if mask.causal else cudnn.MaskType.PADDING
  if max_segments == 1:  # one document per row: cuDNN's plain padded form.
    lengths_BxM, starts_BxM1 = lengths_BxM[:, 0].clip(0), None
  # cuDNN computes only the tokens inside segments and leaves the rest of its outputs (O, and
  # dQ, dK, dV) as the buffers held them: on an H200 (jax 0.11.2, cuDNN 9.19) padding came out
  # as values up to 1e38 and NaN gradients, which make the loss (padding's zero weight times
  # them) and the weights' gradients NaN. Zeroing padding on the way in (whose gradient then
  # zeroes theirs) and on the way out keeps it out.
  q_real_BxLx1x1 = (mask.q_segment_ids_BxL != 0)[:, :, None, None]
  kv_real_BxSx1x1 = (mask.kv_segment_ids_BxS != 0)[:, :, None, None]
  q_BxLxHxK = jnp.where(q_real_BxLx1x1, q_BxLxHxK, 0)
  k_BxSxGxK, v_BxSxGxK = (jnp.where(kv_real_BxSx1x1, x, 0) for x in (k_BxSxGxK, v_BxSxGxK))
  # cuDNN's window is (slot - W, slot]: the W latest keys, causal only (WINDOWS).
  out_BxLxHxK = cudnn.dot_product_attention(
      q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
      q_offsets=starts_BxM1, kv_offsets=starts_BxM1, mask_type=kind,
      scale=1.0 / np.sqrt(q_BxLxHxK.shape[-1]), qkv_layout="BTNH",
      sliding_window_length=int(mask.window) or None)
  out_BxLxHxK = jnp.where(q_real_BxLx1x1, out_BxLxHxK, 0)
  return jnp.where(overflow_B[:, None, None, None], jnp.nan, out_BxLxHxK).astype(
      q_BxLxHxK.dtype)


def _splash_mask(mask: masks.Mask, shape: tuple):
  """The splash mask object of `mask`'s causality and (Python int) window over `shape`."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  window = int(mask.window)
  if window:
    sides = (window - 1, 0) if mask.causal else (window // 2, window // 2)
    return sm.LocalMask(shape, window_size=sides, offset=0)
  return sm.CausalMask(shape) if mask.causal else sm.FullMask(shape)


def _splash(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask: masks.Mask):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, length, heads, head_dim = q_BxLxHxK.shape
  interpret = jax.devices()[0].platform != "tpu"
  base = _splash_mask(mask, (length, k_BxSxGxK.shape[1]))
  block = _block(length)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)

  def local(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, q_seg_BxL, kv_seg_BxS):
    batch, _, local_heads, _ = q_BxLxHxK.shape
    local_kv_heads = k_BxSxGxK.shape[2]
    group = local_heads // local_kv_heads
    segment_ids = sk.SegmentIds(q=q_seg_BxL, kv=kv_seg_BxS)
    to_heads = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, H, L, K]
    q = to_heads(q_BxLxHxK * (1.0 / np.sqrt(head_dim))).astype(q_BxLxHxK.dtype)
    k_BxGxSxK, v_BxGxSxK = to_heads(k_BxSxGxK), to_heads(v_BxSxGxK)
    if group == 1:
      kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * local_heads), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes, interpret=interpret)
      return to_heads(jax.vmap(kernel)(q, k_BxGxSxK, v_BxGxSxK, segment_ids=segment_ids))
    # Each key/value head serves its group of query heads: splash's multi-query kernel, mapped
    # over the key/value heads and the rows.
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([base] * group), head_shards=1,
                                q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    q_BxGxgxLxK = q.reshape(batch, local_kv_heads, group, length, head_dim)

    def row(q_GxgxLxK, k_GxSxK, v_GxSxK, ids):
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GxgxLxK, k_GxSxK,
                                                                        v_GxSxK)
    out_BxGxgxLxK = jax.vmap(row)(q_BxGxgxLxK, k_BxGxSxK, v_BxGxSxK, segment_ids)
    return to_heads(out_BxGxgxLxK.reshape(batch, local_heads, length, head_dim))

  mesh = jax.sharding.get_abstract_mesh()
  spec_BLHK = spec_BLGK = spec_BL = None
  if not mesh.empty:
    spec_BLHK = sharding.mesh_axes(("batch", "length", "heads", "kv"), q_BxLxHxK.shape, mesh)
    spec_BLGK = sharding.mesh_axes(("batch", "length", "kv_heads", "kv"), k_BxSxGxK.shape, mesh)
    spec_BL = sharding.mesh_axes(("batch", "length"), mask.q_segment_ids_BxL.shape, mesh)
    if spec_BLGK[2] != spec_BLHK[2]:
      # Key/value heads too few to split as the query heads are: each query head gets its own
      # copy, so that every device holds the key/value heads of its query heads.
      k_BxSxGxK, v_BxSxGxK = (jnp.repeat(x, heads // x.shape[2], axis=2)
                              for x in (k_BxSxGxK, v_BxSxGxK))
      spec_BLGK = spec_BLHK
  args = (q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask.q_segment_ids_BxL.astype(jnp.int32),
          mask.kv_segment_ids_BxS.astype(jnp.int32))
  if mesh.empty:
    return local(*args)
  # A Pallas kernel is not partitioned by XLA: each device runs it on its own rows and heads.
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(spec_BLHK, spec_BLGK, spec_BLGK, spec_BL, spec_BL),
                       out_specs=spec_BLHK, check_vma=False)(*args)


def _block(length: int) -> int:
  """The largest of 512, 256, 128 dividing `length` (TPU lanes are 128 wide); short test rows
  (interpret mode) take the whole row."""
  for block in (512, 256, 128):
    if length % block == 0:
      return block
  return length

"""What each query may see, as structure: packing segments, causality, a decode offset and a
sliding window. Attention kernels take this structure (`attention.py`); `Mask.dense` writes it
out for the XLA reference.

A window W limits a query to nearby keys: in a causal decoder to the W latest positions, its
own included (Mistral); in a bidirectional encoder to keys at most W // 2 positions away on
either side (ModernBERT's `local_attention`). Each layer has its own window (0: global), an
array scanned with the layers, so that one compiled Block serves global and local layers.

Shape letters: B batch, L queries, S keys, N layers.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Mask:
  """What each query may see: same segment (0 is padding, seen by none), and with `causal`
  only keys at slots <= its own. Query l sits at slot `q_offset + l` (decoding writes new
  tokens at the cache index; training has offset 0).

  `windows` are the distinct windows the model's layers use, () when every layer is global;
  `window` is this layer's, one of them (traced inside the scan over layers when they differ).
  """
  q_segment_ids_BxL: jax.Array
  kv_segment_ids_BxS: jax.Array
  q_offset: jax.Array | int = 0
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  window: jax.Array | int = 0
  windows: tuple = flax.struct.field(pytree_node=False, default=())

  @classmethod
  def packed(cls, segment_ids_BxL, causal: bool) -> "Mask":
    return cls(segment_ids_BxL, segment_ids_BxL, 0, causal)

  def for_layer(self, window_of_layer) -> "Mask":
    """This mask for one layer, whose window is `window_of_layer`: a Python int when all
    layers share one window, so that kernels see it as a constant."""
    if not self.windows:
      return self
    return self.replace(window=self.windows[0] if len(self.windows) == 1 else window_of_layer)

  def dense(self):
    """[B, 1, L, S] bool: the same mask written out, for the reference."""
    q_BL11 = self.q_segment_ids_BxL[:, None, :, None]
    kv_B11S = self.kv_segment_ids_BxS[:, None, None, :]
    mask_B1LS = (q_BL11 == kv_B11S) & (kv_B11S != 0)
    length, keys = self.q_segment_ids_BxL.shape[1], self.kv_segment_ids_BxS.shape[1]
    distance_LxS = (self.q_offset + jnp.arange(length))[:, None] - jnp.arange(keys)[None, :]
    if self.causal:
      mask_B1LS &= (distance_LxS >= 0)[None, None]
    if self.windows:
      mask_B1LS &= within(distance_LxS, self.window, self.causal)[None, None]
    return mask_B1LS


def within(distance, window, causal: bool):
  """Whether keys at `distance` (query slot minus key slot) lie in `window` (0: all do)."""
  near = distance < window if causal else jnp.abs(distance) <= window // 2
  return (window == 0) | near


def window_kind(causal: bool) -> str:
  return "causal" if causal else "bidirectional"


def has_effect(window: int, seq_len: int, causal: bool) -> bool:
  """Whether a window hides any key in rows of `seq_len` (distances up to seq_len - 1)."""
  return window > 0 and not bool(within(seq_len - 1, window, causal))


def layer_windows(model_cfg) -> np.ndarray:
  """[N] int32: each layer's window. With `global_every` k, layers 0, k, 2k, ... are global."""
  layers = np.arange(model_cfg.num_layers)
  every = model_cfg.global_every
  windowed = layers % every != 0 if every else np.ones_like(layers, bool)
  return np.where(windowed, model_cfg.attention_window, 0).astype(np.int32)


def distinct_windows(model_cfg) -> tuple:
  """The windows the layers use, ascending; () when all are global."""
  windows = tuple(sorted(set(layer_windows(model_cfg).tolist())))
  return () if windows == (0,) else windows

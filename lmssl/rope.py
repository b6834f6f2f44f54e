"""Rotary position embeddings: each layer's inverse frequencies, scaled as the HF families that
scale them do, and their rotation of queries and keys.

Frequencies are constants of the config, made once in float32 numpy (as transformers makes them
in float32 torch) and handed to the layers as an [N, K/2] array scanned with them: windowed
layers may use another theta (`model.local_rope_theta`, ModernBERT's local layers).
The rotation pairs dimension i with i + K/2 (transformers' `rotate_half`), so HF checkpoints'
query and key kernels map over unpermuted.

Shape letters: B batch, L length, H heads, K head dim, N layers.
"""

import jax.numpy as jnp
import numpy as np

from lmssl import masks


def _llama3(inv_freq, m):
  """Llama 3.1's scaling (transformers' `_compute_llama3_parameters`): wavelengths beyond the
  original context divided by `factor`, those within `original / high_freq_factor` kept, and a
  smooth blend between."""
  f32 = np.float32
  factor, low, high = f32(m.rope_scaling_factor), f32(m.rope_low_freq_factor), f32(
      m.rope_high_freq_factor)
  old_context = f32(m.rope_original_max_len)
  wavelen = f32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(medium, blended, scaled).astype(f32)


# model.rope_scaling -> inverse frequencies [K/2] from the unscaled ones and the model config.
SCALINGS = {
    "": lambda inv_freq, m: inv_freq,
    "linear": lambda inv_freq, m: (inv_freq / np.float32(m.rope_scaling_factor)),
    "llama3": _llama3,
}


def inverse_frequencies(model_cfg, theta: float) -> np.ndarray:
  """[K/2] float32: 1 / theta^(2i / K), then `model.rope_scaling`'s change."""
  head_dim = model_cfg.d_model // model_cfg.num_heads
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)
  return SCALINGS[model_cfg.rope_scaling](inv_freq, model_cfg).astype(np.float32)


def layer_frequencies(model_cfg) -> np.ndarray:
  """[N, K/2] float32: each layer's inverse frequencies; windowed layers take
  `local_rope_theta` where it is set."""
  local = model_cfg.local_rope_theta or model_cfg.rope_theta
  by_theta = {t: inverse_frequencies(model_cfg, t) for t in {model_cfg.rope_theta, local}}
  return np.stack([by_theta[local if w else model_cfg.rope_theta]
                   for w in masks.layer_windows(model_cfg)])


def rotate(x_BxLxHxK, positions_BxL, inv_freq_K2):
  """x rotated by position x frequency, in float32 (angles reach 1e3 and more), cast back."""
  angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2
  sin, cos = jnp.sin(angle_BxLxK2)[:, :, None], jnp.cos(angle_BxLxK2)[:, :, None]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)

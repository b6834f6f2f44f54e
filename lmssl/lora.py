"""Low-rank adapters: folding them into their kernels, and counting what trains.

The adapters themselves live in `model.Projection`; training freezes everything else (see
`optimizer.lora_trainable`). Merging gives an ordinary model with the adapted weights, for
sampling and export without any adapter code.
"""

import jax
import jax.numpy as jnp

from lmssl import optimizer


def merge(params, alpha: float, rank: int):
  """Params with kernel += (alpha / rank) * A @ B wherever an adapter sits, adapters removed."""
  def walk(tree, scanned):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree:
      a, b = tree["lora_a"], tree["lora_b"]
      # A: [(N,) in..., R], B: [(N,) R, out...]; scanned layers carry a leading N.
      product = jax.vmap(_outer) if scanned else _outer
      delta = product(a, b) * (alpha / rank)
      rest = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
      return dict(rest, kernel=(rest["kernel"] + delta.astype(rest["kernel"].dtype)))
    return {k: walk(v, scanned or k == "layers") for k, v in tree.items()}
  return walk(params, False)


def _outer(a, b):
  return jnp.tensordot(a, b, axes=1)


def count(params, lora: bool) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  sizes = jax.tree.map(lambda x: x.size, params)
  total = sum(jax.tree.leaves(sizes))
  if not lora:
    return total, total
  trains = optimizer.lora_trainable(params)
  return sum(s for s, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(trains)) if t), total

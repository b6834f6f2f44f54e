"""Low-rank adapters (LoRA): their math, what trains beside them, merging and counting.

A projection named in `lora.targets` adds (alpha / R) * x A B to its output, A [in, R] and
B [R, out]; B starts at zero so the adapted model starts as the pretrained one. With adapters
the backbone is frozen: only adapters and the heads outside the backbone train (`trains`).

One freezing mechanism, a partition: `split` cuts the parameters into the trainable part and
the frozen rest, the step differentiates only the trainable part (the frozen one enters the
loss as a constant) and the optimizer is built and updated on that part alone. So frozen
parameters get no gradient computed (no weight-gradient matmuls for the backbone), no optimizer
state, no zero updates and no select; they never pass through any arithmetic, so they stay the
same bit for bit by construction. The alternatives cost more and freeze less surely: an
optimizer mask (`multi_transform` to `set_to_zero`) still needs every frozen gradient computed,
and stop_gradient alone leaves weight decay moving the frozen kernels.

Merging gives an ordinary model with the adapted weights, for sampling and export without any
adapter code. A leaf module (jax only): model.py, the step and train.py ask it.
"""

import jax
import jax.numpy as jnp

ADAPTER_PARAMS = ("lora_a", "lora_b")
BACKBONE = "transformer"  # the top-level parameter collection that adapters freeze


def settings(lora_cfg) -> dict:
  """The LoRA fields of the model's module config (rank 0, or no `lora_cfg`: no adapters)."""
  rank = lora_cfg.rank if lora_cfg is not None else 0
  return {"lora_rank": rank, "lora_alpha": lora_cfg.alpha if rank else 0.0,
          "lora_targets": tuple(t.strip() for t in lora_cfg.targets.split(",")) if rank else ()}


def adapter_shapes(kernel_shape: tuple, kernel_axes: tuple, n_in: int, rank: int):
  """((A's shape, A's logical axes), (B's shape, B's axes)) beside a kernel whose first `n_in`
  dims are inputs and whose others are outputs."""
  return ((kernel_shape[:n_in] + (rank,), kernel_axes[:n_in] + ("lora",)),
          ((rank,) + kernel_shape[n_in:], ("lora",) + kernel_axes[n_in:]))


def delta(eq: str, x, a, b, alpha: float):
  """The adapter's term of `einsum(eq, x, kernel)`: (alpha / R) * einsum(eq, x, A @ B), made as
  x A then B, so that the [in, out] product never exists."""
  inputs, _, out = eq.partition("->")
  x_dims, kernel_dims = inputs.split(",")
  n_in, rank = a.ndim - 1, a.shape[-1]
  batch_dims = "".join(c for c in x_dims if c not in kernel_dims)
  # "z" is the rank dim; projections never use it.
  xa = jnp.einsum(f"{x_dims},{kernel_dims[:n_in]}z->{batch_dims}z", x, a)
  delta_out = jnp.einsum(f"{batch_dims}z,z{kernel_dims[n_in:]}->{out}", xa, b)
  return delta_out * (alpha / rank)


def is_adapter(key) -> bool:
  """Whether the parameter at `key` (a tuple of names, or a `jax.tree_util.keystr`) is an
  adapter's."""
  if isinstance(key, str):
    return key.endswith(tuple(f"['{n}']" for n in ADAPTER_PARAMS))
  return key[-1] in ADAPTER_PARAMS


def trains(names: tuple) -> bool:
  """With adapters, whether the parameter at `names` trains: adapters and heads do."""
  return names[0] != BACKBONE or is_adapter(names)


def split(params, lora: bool):
  """(trainable, frozen): two trees shaped as `params`, each with None where the other has a
  leaf; without `lora` everything trains and frozen is None. Boxed leaves stay boxed."""
  if not lora:
    return params, None

  def walk(tree, names):
    if not isinstance(tree, dict):
      return (tree, None) if trains(names) else (None, tree)
    parts = {k: walk(v, names + (k,)) for k, v in tree.items()}
    return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}
  return walk(params, ())


def join(trainable, frozen):
  """The inverse of `split`."""
  if frozen is None:
    return trainable
  if isinstance(trainable, dict):
    return {k: join(v, frozen[k]) for k, v in trainable.items()}
  return frozen if trainable is None else trainable


def merge(params, alpha: float, rank: int):
  """Params with kernel += (alpha / rank) * A @ B wherever an adapter sits, adapters removed."""
  def walk(tree, scanned):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree:
      a, b = tree["lora_a"], tree["lora_b"]
      # A: [(N,) in..., R], B: [(N,) R, out...]; scanned layers carry a leading N.
      product = jax.vmap(_outer) if scanned else _outer
      d = product(a, b) * (alpha / rank)
      rest = {k: v for k, v in tree.items() if k not in ADAPTER_PARAMS}
      return dict(rest, kernel=(rest["kernel"] + d.astype(rest["kernel"].dtype)))
    return {k: walk(v, scanned or k == "layers") for k, v in tree.items()}
  return walk(params, False)


def _outer(a, b):
  return jnp.tensordot(a, b, axes=1)


def count(params, lora: bool) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  total = sum(x.size for x in jax.tree.leaves(params))
  return sum(x.size for x in jax.tree.leaves(split(params, lora)[0])), total

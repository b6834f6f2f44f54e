"""The pure train and eval steps, the sharded state they run on, and their jitted forms."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmssl import heads
from lmssl import lora as lora_lib
from lmssl import losses
from lmssl import optimizer as optimizer_lib
from lmssl import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def example_batch(cfg, batch_size: int) -> dict:
  """Zeros shaped like a pipeline batch, for initialization and shape checks."""
  shape = (batch_size, cfg.data.seq_len)
  batch = {k: np.zeros(shape, np.int32)
           for k in ("input_ids", "segment_ids", "positions", "token_types")}
  for head in heads.heads_for(cfg):
    if head == "mlm":
      pshape = (batch_size, cfg.data.max_predictions)
      batch.update(masked_positions=np.zeros(pshape, np.int32),
                   masked_ids=np.zeros(pshape, np.int32),
                   masked_weights=np.zeros(pshape, np.float32))
    elif head == "pair":
      batch["pair_labels"] = np.zeros((batch_size,), np.int32)
    elif head != "clm":
      lshape = shape if head == "tokens" else (batch_size,)
      batch["labels"] = np.zeros(lshape, np.float32 if head == "regression" else np.int32)
      batch["label_weights"] = np.zeros(lshape, np.float32)
  return batch


def make_optimizer(cfg):
  """The optimizer of the trainable parameters (`lora.split`): all of them without LoRA."""
  return optimizer_lib.make(cfg.train)


def state_init(cfg):
  """rng -> the initial TrainState, its leaves boxed with their logical axis names."""
  model, tx, batch = heads.build_model(cfg), make_optimizer(cfg), example_batch(cfg, 1)

  def init(rng):
    params = model.init({"params": rng}, batch)["params"]
    trainable, _ = lora_lib.split(params, cfg.lora.rank > 0)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))

  return init


def abstract_state(cfg, mesh):
  """The train state's shapes and dtypes, with their shardings from the logical rules
  (ShapeDtypeStructs): what a restore reads into and the steps compile for, computing nothing."""
  return _with_shardings(jax.eval_shape(state_init(cfg), jax.random.key(cfg.seed)), mesh)


def create_state(cfg, mesh, abstract=None):
  """(the initial train state, born sharded; its shardings). `abstract`: its `abstract_state`,
  when the caller has it already (tracing the init for it again costs start-up time)."""
  abstract = abstract_state(cfg, mesh) if abstract is None else abstract
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  init = state_init(cfg)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
      jax.random.key(cfg.seed))
  return state, shardings


def abstract_params(cfg, mesh):
  """Parameter shapes and dtypes with their shardings on `mesh`, without computing them."""
  model = heads.build_model(cfg)
  return _with_shardings(jax.eval_shape(
      lambda r: model.init({"params": r}, example_batch(cfg, 1))["params"], jax.random.key(0)),
                         mesh)


def _with_shardings(boxed, mesh):
  """ShapeDtypeStructs of a tree of logically named abstract values, sharded on `mesh`."""
  def is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)
  # The boxes' own values: unboxing would also constrain them to a sharding, which abstract
  # values under a mesh context cannot take.
  values = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      values, sharding.logical_shardings(boxed, mesh))


def _loss_and_grads(model, trainable, frozen, batch, normalizers, rng):
  """Gradients of the trainable parameters only: the frozen ones enter as constants."""
  def loss_fn(t):
    outputs = model.apply({"params": lora_lib.join(t, frozen)}, batch, rngs={"dropout": rng})
    sums = losses.term_sums(outputs, batch)
    return losses.total(sums, normalizers), sums
  (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  return grads, sums


def train_step(state: TrainState, batch: dict, *, model, tx, microbatches: int, seed: int,
               lora: bool = False):
  """One optimizer update on a global batch, accumulating gradients over microbatches.

  Each head's loss is its summed loss over the whole batch's weight (computed up front), so
  k microbatches add up to exactly the full batch's gradient. With `lora` the backbone is
  frozen (`lora.split`): no gradient, no optimizer state, bit-identical values.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  trainable, frozen = lora_lib.split(state.params, lora)
  normalizers = losses.normalizers(batch, model.heads)
  if microbatches == 1:
    grads, sums = _loss_and_grads(model, trainable, frozen, batch, normalizers, rng)
  else:
    # Row j of microbatch i is row j*k + i: every device keeps contributing to every microbatch.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches,
                                         *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      out = _loss_and_grads(model, trainable, frozen, mb, normalizers,
                            jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: _loss_and_grads(model, trainable, frozen, jax.tree.map(lambda x: x[0], micro),
                                normalizers, rng)))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  # A NaN/Inf loss, gradient or update leaves parameters and optimizer state as they were (the
  # loop then stops or skips, per train.nonfinite); the step still counts, so data moves on.
  # The update is checked too: finite gradients can still give a non-finite update (a NaN
  # learning rate, an overflow inside the optimizer). Its norm is one more reduction.
  grad_norm = optax.tree.norm(grads)
  finite = (jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
            & jnp.all(jnp.stack([jnp.isfinite(s["loss_sum"]) for s in sums.values()])))
  keep = functools.partial(jnp.where, finite)
  params = lora_lib.join(jax.tree.map(keep, new_trainable, trainable), frozen)
  new_state = TrainState(step=state.step + 1, params=params,
                         opt_state=jax.tree.map(keep, opt_state, state.opt_state))
  return new_state, {**summarize(sums, model.heads), "grad_norm": grad_norm,
                     "nonfinite": 1 - finite.astype(jnp.int32)}


def summarize(sums: dict, head_names, prefix: str = "") -> dict:
  """Scalars from summed terms: loss (summed over heads) and the first head's accuracy; with
  several heads also each head's own loss and accuracy."""
  mean = {h: (sums[h]["loss_sum"] / jnp.maximum(sums[h]["weight_sum"], 1.0),
              sums[h]["correct_sum"] / jnp.maximum(sums[h]["weight_sum"], 1.0))
          for h in head_names}
  out = {f"{prefix}loss": sum(m[0] for m in mean.values()),
         f"{prefix}accuracy": mean[head_names[0]][1]}
  if len(head_names) > 1:
    for h in head_names:
      out[f"{prefix}{h}_loss"], out[f"{prefix}{h}_accuracy"] = mean[h]
  return out


def eval_step(params, batch, token_bytes_V, *, model):
  """Summed terms per head; for clm also the UTF-8 bytes of the predicted tokens (bits per
  byte); for fine-tuning heads the predictions, labels and weights themselves."""
  outputs = model.apply({"params": params}, batch)
  sums = losses.term_sums(outputs, batch)
  if "clm" in sums:
    targets, weights = losses.targets_and_weights(batch, "clm")
    sums["clm"]["byte_sum"] = jnp.sum(token_bytes_V[targets] * weights)
  rows = {}
  for head in outputs:
    if head not in heads.PRETRAINING_HEADS:
      labels, weights = losses.targets_and_weights(batch, head)
      rows = {"predictions": heads.predictions(outputs, head), "labels": labels,
              "weights": weights}
  return sums, rows


def compile_steps(cfg, state_shardings, mesh):
  """The jitted train and eval steps with explicit in/out shardings; the state is donated.

  Eval outputs are replicated so every process can read the predictions of the whole batch.
  """
  tx = make_optimizer(cfg)
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(
      functools.partial(train_step, model=heads.build_model(cfg, deterministic=False), tx=tx,
                        microbatches=cfg.train.microbatches, seed=cfg.seed, lora=cfg.lora.rank > 0),
      in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
      donate_argnums=0)
  return step, compile_eval(cfg, state_shardings.params, mesh)


def compile_eval(cfg, params_shardings, mesh):
  return jax.jit(functools.partial(eval_step, model=heads.build_model(cfg)),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh), None),
                 out_shardings=sharding.replicated(mesh))

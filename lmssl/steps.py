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
from lmssl import model as model_lib
from lmssl import optimizer as optimizer_lib
from lmssl import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def build_model(cfg, deterministic: bool = True) -> heads.LanguageModel:
  return heads.LanguageModel(model_lib.module_config(cfg.model), cfg.objective, deterministic)


def example_batch(cfg, batch_size: int) -> dict:
  """Zeros shaped like a pipeline batch, for initialization and shape checks."""
  shape = (batch_size, cfg.data.seq_len)
  batch = {k: np.zeros(shape, np.int32) for k in ("input_ids", "segment_ids", "positions")}
  if cfg.objective == "mlm":
    pshape = (batch_size, cfg.data.max_predictions)
    batch.update(masked_positions=np.zeros(pshape, np.int32),
                 masked_ids=np.zeros(pshape, np.int32),
                 masked_weights=np.zeros(pshape, np.float32))
  return batch


def create_state(cfg, model, tx, mesh):
  """The train state, born sharded: shapes from eval_shape, shardings from the logical rules."""
  batch = example_batch(cfg, 1)

  def init(rng):
    params = model.init({"params": rng}, batch)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.key(cfg.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.logical_shardings(abstract, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def _loss_and_grads(model, objective, params, batch, rng):
  def loss_fn(p):
    logits = model.apply({"params": p}, batch, rngs={"dropout": rng})
    sums = heads.loss_sums(logits, *heads.targets_and_weights(batch, objective))
    return sums["loss_sum"], sums
  (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, sums


def train_step(state: TrainState, batch: dict, *, model, tx, objective: str, microbatches: int,
               seed: int):
  """One optimizer update on a global batch, accumulating gradients over microbatches.

  Losses are summed per microbatch and divided once by the batch's total weight, so k
  microbatches give the same update as the full batch.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  if microbatches == 1:
    grads, sums = _loss_and_grads(model, objective, state.params, batch, rng)
  else:
    # Row j of microbatch i is row j*k + i: every device keeps contributing to every microbatch.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches,
                                         *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, xs):
      i, mb = xs
      grads, sums = _loss_and_grads(model, objective, state.params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: _loss_and_grads(model, objective, state.params,
                                jax.tree.map(lambda x: x[0], micro), rng)))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
  weight = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
  return new_state, {"loss": sums["loss_sum"] / weight, "accuracy": sums["correct_sum"] / weight,
                     "grad_norm": optax.tree.norm(grads), "weight": sums["weight_sum"]}


def eval_step(params, batch, *, model, objective: str):
  logits = model.apply({"params": params}, batch)
  return heads.loss_sums(logits, *heads.targets_and_weights(batch, objective))


def compile_steps(cfg, state_shardings, mesh):
  """The jitted train and eval steps with explicit in/out shardings; the state is donated."""
  tx = optimizer_lib.make(cfg.train)
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(
      functools.partial(train_step, model=build_model(cfg, deterministic=False), tx=tx,
                        objective=cfg.objective, microbatches=cfg.train.microbatches,
                        seed=cfg.seed),
      in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=build_model(cfg), objective=cfg.objective),
                     in_shardings=(state_shardings.params, batch_sh))
  return step, evaluate


def evaluate(eval_fn, params, eval_batches, mesh, objective: str) -> dict:
  totals = None
  for local in eval_batches:
    sums = eval_fn(params, sharding.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals["weight_sum"]), 1.0)
  loss = float(totals["loss_sum"]) / weight
  out = {"eval_loss": loss, "eval_accuracy": float(totals["correct_sum"]) / weight}
  if objective == "clm":
    out["eval_perplexity"] = float(np.exp(min(loss, 50.0)))
  return out

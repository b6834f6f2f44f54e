"""The benchmark's pieces beside the timed step: the step compiled from abstract values and its
memory, the input pipeline alone, compile time against depth, and the largest batch that fits
a memory budget under each remat policy (`python -m lmssl.bench` runs them).
"""

import functools
import os
import time

import flax.linen as nn
import jax

from lmssl import config as config_lib
from lmssl import sharding
from lmssl import steps

def mesh_for(cfg):
  return sharding.make_mesh(cfg.mesh, jax.local_devices())


def abstract_state(cfg, mesh):
  """The train state's shapes with their shardings, and the shardings, without computing it."""
  boxed = jax.eval_shape(steps.state_init(cfg), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
  return shapes, shardings


def compile_step(cfg, mesh):
  """The train step compiled for cfg's shapes (from abstract values), and the seconds taken
  to trace, lower and compile it."""
  with jax.set_mesh(mesh):
    state, shardings = abstract_state(cfg, mesh)
    step, _ = steps.compile_steps(cfg, shardings, mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         steps.example_batch(cfg, cfg.train.batch_size))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


def step_memory(compiled) -> int:
  """Bytes the compiled step needs at its peak: inputs, outputs not aliased to them, temps."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def pipeline_row(cfg, args, step_tokens_per_s: float | None) -> dict:
  """tf.data batches from prepared data (made, and cached, on first use), timed alone,
  each put on the device as a training step would take it."""
  from lmssl.data import pipeline
  from lmssl.data import prepare
  from lmssl import datasets
  workdir = args.workdir or os.path.join(os.path.expanduser("~/.cache/lmssl"), "bench")
  cfg = config_lib.resolved(cfg, {"data.source": args.data_source,
                                  "data.tokenizer": args.tokenizer, "data.cache_dir": workdir})
  tok, prepared_dir = datasets.prepare_data(cfg.data, workdir)
  mesh = mesh_for(cfg)
  batch = cfg.train.batch_size
  ds = pipeline.make_dataset(
      prepare.load_prepared(prepared_dir, "train"), objective=cfg.objective,
      global_batch=batch, seed=cfg.seed, start_step=0, data_cfg=cfg.data, tokenizer=tok,
      host_rows=sharding.host_rows(mesh, batch))
  batches = pipeline.iterate(ds)
  for _ in range(args.warmup + 2):
    jax.block_until_ready(sharding.global_batch(next(batches), mesh))
  count = max(args.steps * args.rounds * 4, 8)
  start = time.perf_counter()
  for _ in range(count):
    jax.block_until_ready(sharding.global_batch(next(batches), mesh))
  seconds = time.perf_counter() - start
  tokens_per_s = count * batch * cfg.data.seq_len / seconds
  return dict(measurement="pipeline", impl="lmssl", task=cfg.objective, batch=batch,
              seq=cfg.data.seq_len, tokens_per_s=tokens_per_s, batches=count,
              step_ratio=tokens_per_s / step_tokens_per_s if step_tokens_per_s else None)


def compile_rows(cfg, layers: list[int]) -> list[dict]:
  """Trace + lower + compile seconds of the train step at each depth, and each against the
  first; after one untimed compile, so that none pays the process's first-compile costs."""
  compile_step(config_lib.resolved(cfg, {"model.num_layers": layers[0]}), mesh_for(cfg))
  rows = []
  for n in layers:
    _, seconds = compile_step(config_lib.resolved(cfg, {"model.num_layers": n}), mesh_for(cfg))
    rows.append(dict(measurement="compile", impl="lmssl", task=cfg.objective,
                     batch=cfg.train.batch_size, seq=cfg.data.seq_len, layers=n,
                     remat=cfg.model.remat, compile_s=seconds,
                     vs_first=seconds / rows[0]["compile_s"] if rows else 1.0))
  return rows


def largest_batch(memory, budget: int, start: int = 1) -> int:
  """The largest k with memory(k) <= budget (0 if memory(1) exceeds it), for a memory(k) that
  grows with k, about linearly: a line through k = start and 2 * start (far enough apart for
  the buffers' rounding not to matter) gives a guess, which steps that double then bracket
  and halving narrows, so a good guess costs few calls."""
  if memory(1) > budget:
    return 0
  slope = max((memory(2 * start) - memory(start)) / start, 1)
  k = max(int(start + (budget - memory(start)) / slope), 1)
  step = 1
  if memory(k) <= budget:  # then find a high that does not fit
    while memory(k + step) <= budget:
      k, step = k + step, step * 2
    low, high = k, k + step
  else:  # find a low that fits
    while k - step > 1 and memory(k - step) > budget:
      k, step = k - step, step * 2
    low, high = max(k - step, 1), k
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if memory(middle) <= budget else (low, middle)
  return low


def remat_rows(cfg, budget_gib: float, policies: list[str]) -> list[dict]:
  """Per remat policy, the largest batch (a multiple of the batch shards) whose compiled step
  fits the budget on each device."""
  budget = int(budget_gib * 2 ** 30)
  mesh = mesh_for(cfg)
  shards = sharding.batch_shards(mesh)
  rows = []
  for policy in policies:
    memory = functools.cache(lambda k, policy=policy: step_memory(compile_step(
        config_lib.resolved(cfg, {"model.remat": policy, "train.batch_size": k * shards,
                                  "eval.batch_size": k * shards}), mesh)[0]))
    batch = largest_batch(memory, budget, max(cfg.train.batch_size // shards, 1)) * shards
    rows.append(dict(measurement="max_batch", impl="lmssl", task=cfg.objective, batch=batch,
                     seq=cfg.data.seq_len, layers=cfg.model.num_layers, remat=policy,
                     budget_bytes=budget, memory_bytes=memory(max(batch // shards, 1)),
                     vs_first=(batch / rows[0]["batch"] if rows[0]["batch"] else None)
                     if rows else 1.0))
  return rows

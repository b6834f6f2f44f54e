"""Pretraining loop, in phases: mesh, data, model + optimizer, restore, loop."""

import os

import flax.linen as nn
import jax

from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import errors
from lmssl import metrics as metrics_lib
from lmssl import optimizer as optimizer_lib
from lmssl import sharding
from lmssl import steps
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import tokenizer as tokenizer_lib


def _datasets(cfg, workdir):
  """Prepared data (built and cached on first use), the tokenizer, a factory of per-host train
  iterators and this host's fixed list of eval batches."""
  tokenizer_path, prepared_dir = prepare.prepare(cfg.data, None, workdir)
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  config_lib.set_vocab(cfg, tok.vocab_size)
  common = dict(objective=cfg.objective, seed=cfg.seed, process_index=jax.process_index(),
                process_count=jax.process_count(), cfg=cfg.data, vocab_size=tok.vocab_size,
                word_start=tok.word_start)

  def train_batches(start_step, end_step):
    ds = pipeline.make_dataset(prepare.load_prepared(prepared_dir, "train"),
                               global_batch=cfg.train.batch_size, start_step=start_step,
                               num_steps=end_step - start_step, **common)
    return ds.as_numpy_iterator()

  # The eval set is the same rows and masks every time: read it once, reuse it each evaluation.
  eval_batches = list(pipeline.make_dataset(
      prepare.load_prepared(prepared_dir, "validation"), global_batch=cfg.eval.batch_size,
      start_step=0, shuffle=False, num_steps=cfg.eval.steps, **common).as_numpy_iterator())

  return tokenizer_path, prepared_dir, train_batches, eval_batches


def train_and_evaluate(cfg, workdir: str, until_step: int | None = None) -> dict:
  """Pretrains per `cfg` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

  `until_step` stops early (with a checkpoint) as an interruption would; the schedule still
  follows `train.steps`.
  """
  # 1. Mesh, and the config checked against it before anything is written.
  mesh = sharding.make_mesh(cfg.mesh)
  config_lib.validate(cfg, batch_shards=sharding.batch_shards(mesh),
                      process_count=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  metrics_lib.log(f"process {jax.process_index()}/{jax.process_count()}: "
                  f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
                  f"mesh {dict(mesh.shape)}")

  # 2. Data.
  tokenizer_path, prepared_dir, train_batches, eval_batches = _datasets(cfg, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    # 3. Model and optimizer, state born sharded.
    state, state_shardings = steps.create_state(cfg, steps.build_model(cfg),
                                                optimizer_lib.make(cfg.train), mesh)
    step_fn, eval_fn = steps.compile_steps(cfg, state_shardings, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    metrics_lib.log(f"model: {cfg.objective} {cfg.model.size}, {n_params:,} parameters")

    # 4. Restore: resume from the workdir's latest checkpoint, else start from scratch.
    ckpt = checkpoint.manager(workdir, cfg.checkpoint)
    restored = checkpoint.restore(ckpt, state)
    if restored is not None:
      state, meta = restored
      if meta["seed"] != cfg.seed:
        raise errors.UserError(f"workdir {workdir} was trained with seed {meta['seed']}, not "
                         f"{cfg.seed}; use the same seed to resume or a new workdir")
      metrics_lib.log(f"resumed from step {int(state.step)} in {ckpt.directory}")
    start = int(state.step)

    # 5. Loop.
    end = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    writer = metrics_lib.Writer(workdir, start)
    state, last = _loop(cfg, state, step_fn, train_batches(start, end),
                        lambda params: steps.evaluate(eval_fn, params, eval_batches, mesh,
                                                      cfg.objective),
                        lambda step, st: checkpoint.save(ckpt, step, st, {"seed": cfg.seed}),
                        writer, mesh, start, end)
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
  final = {"step": int(state.step), **last}
  metrics_lib.log("final: " + ", ".join(
      f"{k} {v:.4g}" for k, v in final.items() if k in ("step", "loss", "accuracy") or
      k.startswith("eval_")))
  metrics_lib.log(f"outputs in {os.path.abspath(workdir)}: metrics.jsonl, tensorboard/, "
                  f"checkpoints/, config.json; tokenizer {tokenizer_path}; data {prepared_dir}")
  return final


def _loop(cfg, state, step_fn, batches, evaluate, save, writer, mesh, start: int, end: int):
  """Steps start+1..end. Dispatches step N before reading step N-1's metrics, so the device
  never waits on the host; evaluates and saves on their schedules. Returns (state, last)."""
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = cfg.train.batch_size * metrics_lib.train_flops_per_sequence(
      cfg.model, cfg.objective, cfg.data.seq_len, cfg.data.max_predictions)
  meter = metrics_lib.Throughput(tokens, flops, metrics_lib.peak_flops_per_device(
      cfg.train.peak_flops_per_device), start, cfg.train.steps)
  schedule = optimizer_lib.learning_rate(cfg.train)
  pending, last = None, {}
  for step, local in enumerate(batches, start=start + 1):
    state, step_metrics = step_fn(state, sharding.global_batch(local, mesh))
    if pending is not None:
      last = _report(writer, meter, cfg, *pending)
    pending = None
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      pending = (step, step_metrics, schedule(step - 1))
    if step % cfg.eval.every_steps == 0 or step == cfg.train.steps:
      if pending is not None:
        last, pending = _report(writer, meter, cfg, *pending), None
      evals = evaluate(state.params)
      writer.write(step, evals)
      metrics_lib.log(metrics_lib.console_line(step, cfg.train.steps, evals))
      last = {**last, **evals}
      meter.restart(step)  # evaluation time is not training throughput
    if step % cfg.checkpoint.every_steps == 0 or step == end:
      save(step, state)
  if pending is not None:
    last = _report(writer, meter, cfg, *pending)
  return state, last


def _report(writer, meter, cfg, step, step_metrics, lr) -> dict:
  scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "weight"}
  scalars.update(lr=float(lr), **meter.update(step))
  writer.write(step, scalars)
  metrics_lib.log(metrics_lib.console_line(step, cfg.train.steps, scalars))
  return scalars

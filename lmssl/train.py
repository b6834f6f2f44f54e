"""Training loop, in phases: mesh, data, model + optimizer, restore, loop.

One loop serves pretraining (MLM, CLM, + NSP/SOP) and fine-tuning (a task head on a
pretrained backbone, optionally through LoRA adapters); they differ in data and heads only.
"""

import contextlib
import hashlib
import os

import flax.linen as nn
import jax
import numpy as np

from lmssl import attention
from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import datasets
from lmssl import distributed
from lmssl import errors
from lmssl import evaluate as evaluate_lib
from lmssl import files
from lmssl import heads
from lmssl import lora as lora_lib
from lmssl import metrics as metrics_lib
from lmssl import optimizer as optimizer_lib
from lmssl import preemption
from lmssl import sharding
from lmssl import start
from lmssl import steps
from lmssl import validation
from lmssl import workdir_lock


def train_and_evaluate(cfg, workdir: str, until_step: int | None = None) -> dict:
  """Trains per `cfg` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

  `cfg` itself is left as given: the run resolves a frozen copy of it (phases 1 and 2).
  `until_step` stops early (with a checkpoint) as an interruption would; the schedule still
  follows `train.steps`.
  """
  # 1. The config, with a warm start's architecture and tokenizer, checked against the mesh
  #    before anything is written.
  checkpoint.ignore_sigxfsz()  # a file over `ulimit -f` is a refused write, reported as one
  cfg, init = start.resolve(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  validation.validate(cfg, batch_shards=sharding.batch_shards(mesh),
                      process_count=jax.process_count())
  best_key = evaluate_lib.main_metric(cfg) if cfg.task.kind else None
  # One run per workdir: process 0 holds its lock (workdir_lock.py) from before the settings
  # check (so it reads a config.json no other run is writing) until this run ends, however it
  # ends; when process 0 cannot take it, every process stops.
  made = not files.at(workdir).exists()
  lock = distributed.process_0_first(
      lambda: workdir_lock.acquire(workdir) if jax.process_index() == 0 else None,
      "lock the workdir")
  fresh = start.FreshRun(workdir) if lock is not None else None  # listed once the lock is held
  try:
    return _train(cfg, workdir, until_step, init, mesh, best_key)
  except BaseException:
    if fresh is not None:
      fresh.undo()
    raise
  finally:
    if lock is not None:
      lock.release()
      if made and not files.is_url(workdir):
        with contextlib.suppress(OSError):  # left empty by a run that failed: not made at all
          os.rmdir(workdir)


def _train(cfg, workdir: str, until_step, init, mesh, best_key) -> dict:
  """train_and_evaluate's run, once this run owns the workdir."""
  start.check_same_run(cfg, workdir)
  files.at(workdir).mkdir(parents=True, exist_ok=True)
  metrics_lib.log_all(
      f"{jax.local_device_count()} local / {jax.device_count()} global devices "
      f"({jax.devices()[0].platform}, attention "
      f"{attention.resolve(cfg.model.attention, dtype=cfg.model.dtype)}), mesh "
      f"{dict(mesh.shape)}; reads rows "
      f"{_ranges(sharding.host_rows(mesh, cfg.train.batch_size))} of each global batch of "
      f"{cfg.train.batch_size}")

  # 2. Data, and the config completed with what it decides (vocabulary, labels): final now.
  #    A stop request here ends the run at once: nothing is trained yet, nothing to save.
  with preemption.stop_at_once(
      "during data preparation", "before any training step, so nothing was trained or saved; run "
      "the same command to start again (data finished preparing is reused)"):
    start.check_own_tokenizer(cfg, workdir)
    data = datasets.load(cfg, workdir)
    cfg = config_lib.resolved(cfg, data.changes)
    train_batches, eval_batches = datasets.batches(cfg, data, mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    # 3. Model and optimizer: the state's shapes and shardings, and the steps compiled for them.
    abstract = steps.abstract_state(cfg, mesh)
    step_fn, eval_fn = steps.compile_steps(
        cfg, jax.tree.map(lambda x: x.sharding, abstract), mesh)
    trainable, total = lora_lib.count(abstract.params, cfg.lora.rank > 0)
    metrics_lib.log(f"model: {cfg.model.size} {cfg.objective} backbone, heads "
                    f"{'+'.join(heads.heads_for(cfg))}; {total:,} parameters, {trainable:,} "
                    "trainable")

    # 4. Restore (see start.restore for the order of precedence).
    ckpt = checkpoint.manager(workdir, cfg.checkpoint)
    meta = {"seed": cfg.seed, "tokenizer": hashlib.sha256(data.tokenizer.fingerprint).hexdigest()}
    state = start.restore(ckpt, abstract, init, cfg, mesh, workdir, meta, data.tokenizer)

    # 5. Loop.
    best = evaluate_lib.Best(workdir, *best_key) if best_key else None
    token_bytes = np.asarray(data.tokenizer.piece_bytes())

    def evaluate(step, params):
      evals = evaluate_lib.run(eval_fn, params, eval_batches, mesh, cfg, token_bytes)
      if best is not None:
        best.update(step, evals, params)
      return evals

    state, last = _train_loop(cfg, workdir, until_step, state, step_fn, train_batches,
                              evaluate, ckpt, meta, best, mesh)
  return _final(workdir, state, last, trainable, best, data)


def _train_loop(cfg, workdir, until_step, state, step_fn, train_batches, evaluate, ckpt, meta,
                best, mesh):
  """Phase 5: the loop from the restored step, with the run's outputs opened and closed around
  it; (state, last metrics). A stop request ends it early, saved, as errors.Stopped."""
  first = int(state.step)
  end = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
  settings = start.Settings(cfg, workdir, first)  # once the workdir's checkpoints fit it
  writer = metrics_lib.Writer(workdir, first)
  # SIGTERM or Ctrl-C from here on saves the step in flight and stops (preemption.py).
  with preemption.Watch() as watch:
    try:
      # A background save that failed stops the run at the next step (one process: with
      # several, each learns of it at its next save, at the same step as the others).
      state, last = _loop(cfg, state, step_fn, train_batches(first, end), evaluate,
                          lambda step, st: settings.saved(checkpoint.save(ckpt, step, st, meta)),
                          writer, mesh, first, end, watch.requested,
                          check_saves=(lambda: checkpoint.check(ckpt))
                          if jax.process_count() == 1 else None)
    finally:  # a run that stops early still commits the checkpoints it started
      try:
        checkpoint.wait(ckpt)
      finally:
        checkpoint.close(ckpt)
        writer.close()
        if best is not None:
          best.close()
  if int(state.step) < end:
    raise errors.Stopped(
        f"{watch.reason()}: stopped after step {int(state.step)} of {cfg.train.steps}, "
        f"saved in {ckpt.directory}; run the same command to resume from there",
        watch.exit_status())
  return state, last


def _final(workdir: str, state, last: dict, trainable: int, best, data) -> dict:
  """The final metrics of a finished run, logged with where its outputs are."""
  final = {"step": int(state.step), **last, "trainable_params": trainable}
  if best is not None and best.record:
    final["best"] = best.record
  metrics_lib.log("final: " + ", ".join(
      f"{k} {v:.4g}" for k, v in final.items() if k in ("step", "loss", "accuracy") or
      k.startswith("eval_")))
  metrics_lib.log(f"outputs in {files.absolute(workdir)}: metrics.jsonl, tensorboard/, "
                  f"checkpoints/, config.json{', best/' if best else ''}; tokenizer "
                  f"{data.tokenizer.path}; data {data.where}")
  return final


def _ranges(rows) -> str:
  """[0, 4) + [8, 12) for rows 0..3 and 8..11."""
  breaks = [i + 1 for i in range(len(rows) - 1) if rows[i + 1] != rows[i] + 1]
  runs = [(part[0], part[-1] + 1) for part in np.split(np.asarray(rows), breaks)]
  return " + ".join(f"[{a}, {b})" for a, b in runs)


def _loop(cfg, state, step_fn, batches, evaluate, save, writer, mesh, start: int, end: int,
          stop_requested, check_saves=None):
  """Steps start+1..end. Dispatches step N before reading step N-1's metrics, so the device
  never waits on the host; evaluates and saves on their schedules. Each step's finiteness is
  checked before anything after it is reported or saved. When `stop_requested(step)`, saves
  that step and returns early. `check_saves()`, before each step, fails if a background save
  has failed (without waiting for one in flight). Returns (state, last)."""
  tokens = cfg.train.batch_size * cfg.data.seq_len
  flops = cfg.train.batch_size * metrics_lib.train_flops_per_sequence(
      cfg.model, cfg.objective, cfg.data.seq_len, cfg.data.max_predictions)
  meter = metrics_lib.Throughput(tokens, flops, metrics_lib.peak_flops_per_device(
      cfg.train.peak_flops_per_device), start, cfg.train.steps)
  schedule = optimizer_lib.learning_rate(cfg.train)
  pending, last, unchecked = None, {}, None
  for step, local in enumerate(batches, start=start + 1):
    if check_saves is not None:
      check_saves()
    state, step_metrics = step_fn(state, sharding.global_batch(local, mesh))
    _check_finite(cfg, unchecked)
    unchecked = (step, step_metrics)
    if pending is not None:
      last = _report(writer, meter, cfg, *pending)
    pending = None
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      pending = (step, step_metrics, schedule(step - 1))
    if step % cfg.eval.every_steps == 0 or step == cfg.train.steps:
      if pending is not None:
        last, pending = _report(writer, meter, cfg, *pending), None
      evals = evaluate(step, state.params)
      writer.write(step, evals)
      metrics_lib.log(metrics_lib.console_line(step, cfg.train.steps, evals))
      last = {**last, **evals}
      meter.restart(step)  # evaluation time is not training throughput
    stop = stop_requested(step)
    if step % cfg.checkpoint.every_steps == 0 or step == end or stop:
      _check_finite(cfg, unchecked)
      unchecked = None
      save(step, state)
    if stop:
      break
  _check_finite(cfg, unchecked)
  if pending is not None:
    last = _report(writer, meter, cfg, *pending)
  return state, last


def _check_finite(cfg, unchecked) -> None:
  """Acts on train.nonfinite when the (step, metrics) given had a NaN/Inf loss, gradient or
  update: the step itself left the state unchanged."""
  if unchecked is None or not int(unchecked[1]["nonfinite"]):
    return
  step, m = unchecked
  values = f"loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}"
  if cfg.train.nonfinite == "skip":
    metrics_lib.log(f"step {step}: {values}; update skipped (train.nonfinite=skip)")
    return
  packing = ""
  if attention.resolve(cfg.model.attention, dtype=cfg.model.dtype) == "cudnn":
    packing = (f" (with cuDNN attention, a row packing more than model.max_segments="
               f"{cfg.model.max_segments} documents does this too: raise it)")
  raise errors.UserError(
      f"step {step}: the loss, gradients or update are not finite ({values}); the update was "
      "not applied and the run stopped, its checkpoints (all from finite steps) kept. Lower "
      f"train.lr or lengthen train.warmup_steps, check the data{packing}, or set "
      "--config.train.nonfinite=skip to skip such steps")


def _report(writer, meter, cfg, step, step_metrics, lr) -> dict:
  scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "nonfinite"}
  scalars.update(lr=float(lr), **meter.update(step))
  writer.write(step, scalars)
  metrics_lib.log(metrics_lib.console_line(step, cfg.train.steps, scalars))
  return scalars

"""The timed train step: lmssl's, and the HuggingFace PyTorch peer's in a child process, taking
turns round by round so the machine's drift touches both alike; the config and synthetic batches
they run on; the FLOPs and the peak that MFU is made of.

MFU is analytic model FLOPs per second over the peak: the device's dense bf16 peak on
accelerators, on CPUs a large float32 matmul's measured rate. Each implementation's FLOPs count
what it computes: the HuggingFace MLM head projects every position to the vocabulary, lmssl's
only the masked ones.
"""

import importlib
import importlib.util
import math
import multiprocessing
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmssl import attention
from lmssl import config as config_lib
from lmssl import errors
from lmssl import metrics
from lmssl import sharding
from lmssl import steps
from lmssl.bench import parts

# task: (batch, seq_len) of the reference CPU comparison.
SHAPES = {"mlm": (32, 128), "clm": (16, 256)}
# --arch: (the objective it trains, its config under lmssl/configs/); the first of a task's
# is that task's default. The peer builds the HuggingFace model of the same name.
ARCHS = {"bert": ("mlm", "mlm_base"), "gpt2": ("clm", "clm_base"),
         "llama": ("clm", "llama_base")}


def arch_for(task: str, arch: str = "") -> str:
  """`arch`, or the task's classic one when empty; a UserError if it does not train `task`."""
  default = next(a for a, (t, _) in ARCHS.items() if t == task)
  if arch and ARCHS[arch][0] != task:
    raise errors.UserError(f"--arch {arch} trains {ARCHS[arch][0]}, not --task {task}; use "
                           f"--task {ARCHS[arch][0]}, or --arch {default} for {task}")
  return arch or default


def bench_config(task: str, *, arch="", size="mini", layers=0, vocab=32000, batch=0, seq=0,
                 dtype="float32", remat="none", dropout=0.0, attention="auto", loss_chunks=0):
  """The architecture's base config at `size` (its own size table), with the benchmark's
  shape (0: the reference one). Imported by name from the package, so an installed lmssl
  benchmarks from any directory."""
  module = ARCHS[arch_for(task, arch)][1]
  c = importlib.import_module(f"lmssl.configs.{module}").get_config(f"size={size}")
  m = c.model
  m.num_layers = layers or m.num_layers
  m.vocab_size, m.dtype, m.remat, m.dropout, m.attention = vocab, dtype, remat, dropout, attention
  c.train.batch_size, c.data.seq_len = batch or SHAPES[task][0], seq or SHAPES[task][1]
  c.train.loss_chunks = loss_chunks
  m.max_len = max(m.max_len, c.data.seq_len)
  c.data.max_predictions = math.ceil(c.data.mask_rate * c.data.seq_len)
  c.eval.batch_size = c.train.batch_size
  return config_lib.resolved(c)  # read from here on, as a run reads its own


def arch_of(cfg) -> str:
  """The --arch a resolved bench config was made for: Llama's options (RMSNorm, SwiGLU, RoPE)
  tell it apart from GPT-2's, so the peer builds the model lmssl built."""
  m = cfg.model
  if (m.norm_type, m.mlp, m.position) == ("rmsnorm", "swiglu", "rope"):
    return arch_for(cfg.objective, "llama")
  return arch_for(cfg.objective)


def synthetic_batches(cfg, count: int, seed: int = 0, packed: bool = False) -> list[dict]:
  """Full rows of random tokens, one document each or (`packed`) several of random lengths;
  MLM rows predict ceil(15%) distinct positions each."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    b = steps.example_batch(cfg, cfg.train.batch_size)
    rows, length = b["input_ids"].shape
    b["input_ids"] = rng.integers(5, cfg.model.vocab_size, (rows, length), dtype=np.int32)
    b["segment_ids"][:] = packed_segments(rows, length, rng) if packed else 1
    starts = np.maximum.accumulate(np.where(
        np.diff(b["segment_ids"], axis=1, prepend=0) != 0, np.arange(length), 0), axis=1)
    b["positions"][:] = np.arange(length, dtype=np.int32) - starts
    if "masked_positions" in b:
      predictions = b["masked_positions"].shape[1]
      b["masked_positions"] = np.sort(np.stack(
          [rng.permutation(length)[:predictions] for _ in range(rows)]), axis=1).astype(np.int32)
      b["masked_ids"] = np.take_along_axis(b["input_ids"], b["masked_positions"], axis=1)
      b["input_ids"][np.arange(rows)[:, None], b["masked_positions"]] = 4
      b["masked_weights"][:] = 1.0
    out.append(b)
  return out


def packed_segments(rows: int, length: int, rng, min_doc: int = 16) -> np.ndarray:
  """[rows, length] segment ids 1, 2, 3... of whole documents of random lengths (at least
  `min_doc`, mean about length / 4), as the data pipeline packs them."""
  out = np.zeros((rows, length), np.int32)
  for r in range(rows):
    start, seg = 0, 1
    while start < length:
      size = max(min_doc, int(rng.exponential(length / 4)))
      out[r, start:start + size] = seg
      start, seg = start + size, seg + 1
  return out


def flops_per_step(cfg, predictions: int | None = None) -> float:
  """Analytic train FLOPs of one step; `predictions` vocabulary projections per row."""
  d = cfg.data
  return cfg.train.batch_size * metrics.train_flops_per_sequence(
      cfg.model, cfg.objective, d.seq_len, d.max_predictions if predictions is None
      else predictions)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 [n, n] x [n, n] matmuls: a CPU's practical peak."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def device_peak(measured_cpu: float) -> tuple[float, str]:
  """FLOP/s of all local devices together, and where the figure comes from."""
  per_device = metrics.peak_flops_per_device(0.0)
  if per_device is None:
    return measured_cpu, "measured float32 matmul"
  return per_device * jax.local_device_count(), f"{jax.devices()[0].device_kind} bf16 peak"


class Lmssl:
  """lmssl's jitted train step on a state born sharded, cycling through device batches."""

  def __init__(self, cfg, packed: bool = False):
    self.mesh = parts.mesh_for(cfg)
    self.compiled, self.compile_s = parts.compile_step(cfg, self.mesh)
    self.attention = attention.resolve(cfg.model.attention, dtype=cfg.model.dtype)
    self.fused = attention.runs_fused(self.compiled.as_text(), self.attention)
    with jax.set_mesh(self.mesh):
      self.state, _ = steps.create_state(cfg, self.mesh)
      self.batches = [sharding.global_batch(b, self.mesh)
                      for b in synthetic_batches(cfg, 4, packed=packed)]
    self.steps_run = 0
    self.params = sum(x.size for x in jax.tree.leaves(self.state.params))

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, _ = self.compiled(self.state, self.batches[self.steps_run % 4])
      self.steps_run += 1
    jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def memory(self) -> tuple[int, str]:
    # The compiled step's own figure: a device's peak in use would carry over from whatever
    # ran before in this process.
    return parts.step_memory(self.compiled), "XLA compiled step"

  def close(self) -> None:
    pass


class Peer:
  """The HuggingFace PyTorch step (`lmssl.bench.hf_peer`) in a child process with its own threads
  and memory, run on request."""

  def __init__(self, cfg, peer: str):
    if peer != "hf":
      raise errors.UserError(f"--peer {peer!r} is unknown; the peer is 'hf'")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec(
        "transformers") is None:
      raise errors.UserError("--peer hf needs PyTorch and transformers: pip install "
                             "'lmssl[hf]' (on CPU first pip install torch==2.13.0 "
                             "--index-url https://download.pytorch.org/whl/cpu)")
    m, t = cfg.model, cfg.train
    settings = dict(
        task=cfg.objective, arch=arch_of(cfg), num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads, mlp_dim=m.mlp_dim,
        vocab_size=m.vocab_size, ln_eps=m.ln_eps, rope_theta=m.rope_theta,
        batch=t.batch_size, seq_len=cfg.data.seq_len, dtype=m.dtype, dropout=m.dropout,
        mask_rate=cfg.data.mask_rate, lr=t.lr, b1=t.b1, b2=t.b2, eps=t.eps,
        weight_decay=t.weight_decay, grad_clip=t.grad_clip, schedule=t.schedule,
        warmup_steps=t.warmup_steps, total_steps=t.steps, seed=cfg.seed, threads=None)
    from lmssl.bench import hf_peer  # imports torch: only with --peer hf
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=hf_peer.serve, args=(child, settings), daemon=True)
    self._process.start()
    self.info = self._ask("info")
    self.params = self.info["params"]

  def _ask(self, *message):
    self._conn.send(message)
    reply = self._conn.recv()
    if isinstance(reply, tuple) and reply and reply[0] == "error":
      self.close()
      raise RuntimeError(f"the HuggingFace peer failed:\n{reply[1]}")
    return reply

  def run(self, n: int) -> float:
    return self._ask("run", n)

  def memory(self) -> tuple[int, str]:
    where = "CUDA max allocated" if self.info["device"] != "cpu" else "peak RSS growth"
    return self._ask("memory"), where

  def close(self) -> None:
    try:
      self._conn.send(("stop",))
    except OSError:  # it has already stopped (after reporting an error)
      pass
    self._process.join(timeout=30)


def time_rounds(runners: dict, warmup: int, steps_per_round: int, rounds: int) -> dict:
  """{name: [seconds per step, one per round]}, the runners taking turns within each round."""
  for runner in runners.values():
    runner.run(warmup)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, runner in runners.items():
      times[name].append(runner.run(steps_per_round) / steps_per_round)
  return times


def step_rows(cfg, args, peak: float, peak_source: str, packed: bool = False) -> list[dict]:
  """One row per implementation (lmssl, then the peer if asked), plus the ratio. `packed`
  gives lmssl rows of several documents (the peer's rows are always one)."""
  runners = {"lmssl": Lmssl(cfg, packed)}
  try:
    if args.peer:
      runners[args.peer] = Peer(cfg, args.peer)
    times = time_rounds(runners, args.warmup, args.steps, args.rounds)
    seq = cfg.data.seq_len
    flops = {"lmssl": flops_per_step(cfg), args.peer: flops_per_step(cfg, predictions=seq)}
    rows = []
    for name, runner in runners.items():
      step_s = statistics.median(times[name])
      memory, memory_source = runner.memory()
      rows.append(dict(
          measurement="train_step", impl=name, task=cfg.objective, arch=arch_of(cfg),
          params=runner.params, batch=cfg.train.batch_size, seq=seq,
          layers=cfg.model.num_layers, d_model=cfg.model.d_model,
          vocab=cfg.model.vocab_size, dtype=cfg.model.dtype, remat=cfg.model.remat,
          tokens_per_s=cfg.train.batch_size * seq / step_s, step_time_s=step_s,
          rounds_step_time_s=times[name], flops_per_s=flops[name] / step_s,
          mfu=flops[name] / step_s / peak, peak_flops_per_s=peak, peak_source=peak_source,
          compile_s=getattr(runner, "compile_s", None), peak_memory_bytes=memory,
          memory_source=memory_source, device=_device_name(runner),
          attention=getattr(runner, "attention", None) or runner.info.get("attn_implementation"),
          fused_attention=getattr(runner, "fused", None), packed=packed and name == "lmssl"))
  finally:
    for runner in runners.values():
      runner.close()
  if args.peer:
    rows.append(dict(measurement="ratio", impl=f"lmssl/{args.peer}", task=cfg.objective,
                     arch=arch_of(cfg), batch=cfg.train.batch_size, seq=seq,
                     tokens_per_s_ratio=rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]))
  return rows


def _device_name(runner) -> str:
  if isinstance(runner, Peer):
    return runner.info["device"]
  return f"{jax.local_device_count()} x {jax.devices()[0].device_kind}"

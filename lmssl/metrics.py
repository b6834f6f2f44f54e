"""Metrics out: a JSONL file, TensorBoard event files and a console line; analytic FLOPs for MFU.

Only process 0 writes. TensorBoard files are written with the `tensorboard` package's own
writer, so nothing here imports TensorFlow.
"""

import json
import math
import os
import sys
import time

from absl import logging
import jax

from lmssl import errors
from lmssl import files

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix. CPUs have none listed: their MFU
# needs `train.peak_flops_per_device` (a measured large-matmul rate).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(configured: float) -> float | None:
  if configured:
    return configured
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def train_flops_per_sequence(model_cfg, objective: str, seq_len: int, max_predictions: int):
  """Matmul FLOPs of forward + backward (3x forward) for one sequence; attention counted full.
  Keys and values project to `num_kv_heads` heads; gated MLPs (SwiGLU, GeGLU) have two input
  projections."""
  m = model_cfg
  kv_dim = (m.num_kv_heads or m.num_heads) * (m.d_model // m.num_heads)
  mlp_matrices = 2 if m.mlp == "gelu" else 3
  per_layer = 2 * seq_len * (2 * m.d_model ** 2 + 2 * m.d_model * kv_dim
                             + mlp_matrices * m.d_model * m.mlp_dim)
  per_layer += 2 * 2 * seq_len * seq_len * m.d_model
  if objective == "mlm":
    head = 2 * max_predictions * (m.d_model ** 2 + m.d_model * m.vocab_size)
  else:
    head = 2 * seq_len * m.d_model * m.vocab_size
  return 3 * (m.num_layers * per_layer + head)


class Writer:
  """Writes scalars to `metrics.jsonl` and TensorBoard event files in the workdir.

  Each JSONL line is strict JSON: a NaN/Inf scalar is written as null and named in the row's
  "nonfinite_keys" list (TensorBoard gets the float itself).

  On resume from `start_step`, rows logged after that step by the interrupted run are dropped
  (and a last line cut short by a kill), so the file reads as if the run had never stopped.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self.path = os.path.join(files.absolute(workdir), "metrics.jsonl")
    kept = []
    if files.at(self.path).exists():
      kept = [_json_line(row) for row in _rows(self.path) if row["step"] <= start_step]
    if files.is_url(self.path):  # objects cannot be appended to: rewrite it on each flush
      self._jsonl = files.at(self.path).open("w")
      self._jsonl.writelines(kept)
    else:
      files.write_atomically(self.path, "".join(kept))
      self._jsonl = open(self.path, "a", encoding="utf-8")
    self._events = EventFileWriter(os.path.join(files.absolute(workdir), "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(_json_line({"step": int(step), **scalars}))
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))
    self._events.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._events.close()


NONFINITE_KEYS = "nonfinite_keys"


def _json_line(row: dict) -> str:
  """`row` as one line of strict JSON: a NaN or Inf value (which JSON cannot hold; Python would
  write a bare NaN) becomes null, and the row's "nonfinite_keys" lists those keys in order.
  Rows with every value finite have no such key."""
  out, bad = {}, list(row.get(NONFINITE_KEYS) or [])
  for key, value in row.items():
    if key == NONFINITE_KEYS:
      continue
    if isinstance(value, float) and not math.isfinite(value):
      value = None
      if key not in bad:
        bad.append(key)
    out[key] = value
  if bad:
    out[NONFINITE_KEYS] = bad
  return json.dumps(out, allow_nan=False) + "\n"


def _rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; each line is written whole and flushed, so only the last can
  be cut short (by a kill mid-write), and it is dropped."""
  lines = files.read_text(path).splitlines()
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise errors.UserError(f"{path}:{i + 1} is not a JSON row, and only a last line can be "
                               "cut short by a kill: the file was changed by hand; fix or "
                               "delete that line (the checkpoints do not depend on it)") from None
  return rows


class Throughput:
  """Tokens/s, MFU and ETA between two log points."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float | None,
               start_step: int, total_steps: int):
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.peak = peak_flops * jax.device_count() if peak_flops else None
    self.total_steps = total_steps
    self.restart(start_step)

  def restart(self, step: int) -> None:
    self.last_step, self.last_time = step, time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    out = {"tokens_per_s": steps * self.tokens_per_step / seconds,
           "step_time_s": seconds / max(steps, 1)}
    if self.peak:
      out["mfu"] = steps * self.flops_per_step / seconds / self.peak
    out["eta_s"] = out["step_time_s"] * (self.total_steps - step)
    return out


def console_line(step: int, total: int, scalars: dict) -> str:
  parts = [f"step {step}/{total}"]
  for key, fmt in (("loss", "{:.4f}"), ("accuracy", "{:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                   ("mfu", "MFU {:.1%}"), ("eta_s", "ETA {:.0f}s")):
    if key in scalars:
      parts.append((f"{key} " if key in ("loss", "accuracy") else "") + fmt.format(scalars[key]))
  evals = " ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k.startswith("eval_"))
  return " | ".join(parts + ([evals] if evals else []))


def log(message: str) -> None:
  if jax.process_index() == 0:
    logging.info(message)
    print(message, flush=True)


def log_all(message: str) -> None:
  """From every process, prefixed with its index: what each host has and does. Process 0's
  line joins the console output; the others' go to their stderr (their logs)."""
  line = f"process {jax.process_index()}/{jax.process_count()}: {message}"
  logging.info(line)
  print(line, file=sys.stderr if jax.process_index() else sys.stdout, flush=True)

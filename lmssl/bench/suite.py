"""`python -m lmssl.bench --suite accelerator`: one command that measures an accelerator.

It writes one JSON file (`--out`, rewritten after each measurement, so a run cut short keeps
what it measured) and prints tables:

  attention   each attention implementation the platform runs against XLA's, on packed
              batches (causal and bidirectional) of GPT-2 medium's and BERT-base-128's shapes,
              cuDNN at two `max_segments`: largest difference of outputs and gradients,
              seconds per forward + backward, and whether the compiled program holds the fused
              kernel (cuDNN's fMHA custom call, the TPU's Mosaic kernel);
  train_step  bfloat16 train steps on packed batches for BERT-base MLM at 128 and 512 tokens
              and GPT-2 small and medium CLM at 1024: tokens/s, MFU against the device's bf16
              peak, peak memory and compile time, each beside HuggingFace PyTorch (bf16
              autocast, SDPA attention) on the same device; GPT-2 small and BERT-base at 512
              also with XLA attention;
  max_batch   the largest GPT-2 small batch whose step fits a memory budget, per remat policy.

`--scale tiny` runs the same measurements at toy shapes in a minute or two on a CPU (CI does,
so the command cannot rot). Nothing here imports TensorFlow: an accelerator host needs jax,
flax, optax, orbax-checkpoint, ml-collections and, for the peer, torch and transformers.
"""

import argparse
import datetime
import json
import os
import platform as platform_lib
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lmssl import attention
from lmssl import config as config_lib
from lmssl import masks
from lmssl.bench import parts
from lmssl.bench import step

# name: (task, size, global batch, seq_len, vocab) at full scale; tiny keeps the task only.
# In order of what matters most, should a run be cut short.
MODELS = {
    "gpt2_medium_1024": ("clm", "large", 16, 1024, 50257),
    "bert_base_512": ("mlm", "base", 64, 512, 30522),
    "gpt2_small_1024": ("clm", "base", 32, 1024, 50257),
    "bert_base_128": ("mlm", "base", 256, 128, 30522),
}
TINY = {"layers": 2, "size": "tiny", "batch": 4, "seq": 128, "vocab": 1000}
# The attention comparison's shapes [B, L, H, K]: GPT-2 medium's and BERT-base's at 128 tokens,
# each at its train-step batch.
ATTENTION_SHAPES = {"full": [(16, 1024, 16, 64), (256, 128, 12, 64)], "tiny": [(2, 128, 2, 16)]}
# Models also timed with XLA attention, to show what the fused kernel buys (or costs).
XLA_TWINS = ("gpt2_small_1024", "bert_base_512")
REMAT = {"model": "gpt2_small_1024", "budget_gib": {"full": 40.0, "tiny": 0.25},
         "policies": ("none", "full")}


def variants(platform: str) -> list[tuple[str, int]]:
  """(implementation, max_segments) pairs this platform runs: XLA, and its fused kernel
  (splash in Pallas interpret mode off a TPU: slow but exact); cuDNN at two segment bounds,
  since its packed layout sizes work and statistics by rows x max_segments."""
  fused = attention.AUTO.get(platform, "splash")
  return [("xla", 0)] + ([(fused, 8), (fused, 64)] if fused == "cudnn" else [(fused, 0)])


def attention_rows(scale: str, platform: str, rounds: int = 3) -> list[dict]:
  rows = []
  for shape in ATTENTION_SHAPES[scale]:
    for causal in (True, False):
      rows += _attention_shape_rows(shape, causal, platform, rounds)
  return rows


def _attention_shape_rows(shape, causal: bool, platform: str, rounds: int) -> list[dict]:
  """Each variant's forward + backward on one packed batch, against XLA's."""
  batch, length, heads, head_dim = shape
  rng = np.random.default_rng(0)
  dtype = jnp.bfloat16 if platform != "cpu" else jnp.float32
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  segments = step.packed_segments(batch, length, rng)
  segments[-1, -length // 8:] = 0  # a padding tail
  real_BxLx1x1 = jnp.asarray(segments > 0)[..., None, None]
  weight_K = jnp.asarray(rng.normal(size=(head_dim,)), jnp.float32)
  mask = masks.Mask.packed(jnp.asarray(segments), causal)
  rows, reference = [], None
  for impl, max_segments in variants(platform):
    if impl != "xla" and max_segments and segments.max() > max_segments:
      continue  # rows the bound cannot take come out NaN, by design

    def loss(q, k, v, impl=impl, max_segments=max_segments):
      out = attention.attend(q, k, v, mask, impl, max_segments=max_segments)
      return jnp.sum(jnp.where(real_BxLx1x1, out.astype(jnp.float32), 0) * weight_K), out

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    text = fwd_bwd.lower(q, k, v).compile().as_text()
    (_, out), grads = jax.block_until_ready(fwd_bwd(q, k, v))
    seconds = []
    for _ in range(rounds):
      start = time.perf_counter()
      for _ in range(5):
        result = fwd_bwd(q, k, v)
      jax.block_until_ready(result)
      seconds.append((time.perf_counter() - start) / 5)
    reference = reference or (out, grads)
    real_out = lambda x: jnp.where(real_BxLx1x1, x.astype(jnp.float32), 0)
    rows.append(dict(
        measurement="attention", impl=impl, causal=causal, batch=batch, seq=length,
        heads=heads, head_dim=head_dim, dtype=jnp.dtype(dtype).name,
        segments=int(segments.max()), max_segments=max_segments or None,
        fwd_bwd_s=statistics.median(seconds),
        max_abs_diff_out=float(jnp.max(jnp.abs(real_out(out) - real_out(reference[0])))),
        max_abs_diff_grad=max(float(jnp.max(jnp.abs(a.astype(jnp.float32)
                                                    - b.astype(jnp.float32))))
                              for a, b in zip(grads, reference[1])),
        fused=attention.runs_fused(text, impl)))
  return rows


def model_configs(scale: str):
  """(name, config) of each train-step measurement, bfloat16, packed batches."""
  for name, (task, size, batch, seq, vocab) in MODELS.items():
    if scale == "tiny":
      yield name, step.bench_config(task, size=TINY["size"], layers=TINY["layers"],
                                    vocab=TINY["vocab"], batch=TINY["batch"],
                                    seq=TINY["seq"], dtype="bfloat16")
    else:
      yield name, step.bench_config(task, size=size, vocab=vocab, batch=batch, seq=seq,
                                    dtype="bfloat16")


def train_rows(cfg, args, peak: float, peak_source: str, with_xla: bool) -> list[dict]:
  """lmssl beside the peer; `with_xla` adds lmssl with XLA attention too, where the
  platform's own differs."""
  rows = step.step_rows(cfg, args, peak, peak_source, packed=True)
  own = attention.resolve(cfg.model.attention, dtype=cfg.model.dtype)
  if with_xla and own != "xla":
    no_peer = argparse.Namespace(**{**vars(args), "peer": ""})
    rows += step.step_rows(config_lib.resolved(cfg, {"model.attention": "xla"}), no_peer, peak,
                           peak_source, packed=True)
  return rows


def remat_rows(scale: str) -> list[dict]:
  rows = parts.remat_rows(dict(model_configs(scale))[REMAT["model"]],
                          REMAT["budget_gib"][scale], list(REMAT["policies"]))
  for row in rows:
    row["model"] = REMAT["model"]
  return rows


def meta() -> dict:
  versions = {}
  for module in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      versions[module] = __import__(module).__version__
    except ImportError:
      versions[module] = None
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              device=f"{jax.local_device_count()} x {jax.devices()[0].device_kind}",
              platform=jax.devices()[0].platform, host=platform_lib.node(),
              cpu_count=os.cpu_count(), versions=versions)


def run(args, report) -> list[dict]:
  """Every suite measurement; `report(rows)` prints each batch of rows as it comes, and the
  JSON file at `args.out` is rewritten after each."""
  scale = args.scale
  platform = jax.devices()[0].platform
  document = dict(suite="accelerator", scale=scale, meta=meta(), rows=[], errors=[])

  def keep(rows):
    document["rows"].extend(rows)
    _write(args.out, document)
    report(rows)

  def attempt(what, fn) -> bool:
    # One failed measurement (say, a kernel this device's driver refuses) is recorded and the
    # rest still run: a device hour is too dear to lose to one.
    try:
      fn()
      return True
    except Exception as e:  # pylint: disable=broad-except
      document["errors"].append(dict(measurement=what, error=traceback.format_exc()[-4000:]))
      _write(args.out, document)
      print(f"lmssl.bench: {what} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
      return False

  matmul = step.matmul_rate()
  peak, source = step.device_peak(matmul)
  keep([dict(measurement="peak", impl="jax", matmul_flops_per_s=matmul, peak_flops_per_s=peak,
             peak_source=source)])
  attempt("attention", lambda: keep(attention_rows(scale, platform)))

  for name, cfg in model_configs(scale):
    def measure(name=name, cfg=cfg):
      rows = train_rows(cfg, args, peak, source, with_xla=name in XLA_TWINS)
      keep([dict(row, model=name) for row in rows])
    if not attempt(f"train_step {name}", measure) and attention.resolve(
        "auto", dtype=cfg.model.dtype) != "xla":
      attempt(f"train_step {name} with xla attention",
              lambda name=name, cfg=cfg: measure(name, config_lib.resolved(
                  cfg, {"model.attention": "xla"})))
  attempt("max_batch", lambda: keep(remat_rows(scale)))
  print(f"lmssl.bench: wrote {args.out}", flush=True)
  return document["rows"]


def _write(path: str, document: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(document, f, indent=1)
  os.replace(tmp, path)

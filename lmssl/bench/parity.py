"""Training parity with HuggingFace PyTorch, step by step: `python -m lmssl.bench --parity hf
--arch bert|gpt2|llama|modernbert [--steps 50] [--json]`.

A tiny float32 model of the architecture's config trains for `steps` steps on batches of
lmssl's own data pipeline (a trained tokenizer, prepared packed rows with segment ids and
per-document positions, MLM masks as lmssl draws them), through lmssl's compiled train step
and optimizer. The same initial parameters, exported with `lmssl.hf.convert.to_hf` as a user
exports a run, are loaded with transformers and trained on the same batches in PyTorch
(`hf_train.py`): positions and a 4D attention mask from lmssl's segment ids, the loss at the
positions lmssl's loss reads, AdamW with lmssl's decay set (its `optimizer.decay_mask` mapped
to HF names by lmssl's weight tables), lmssl's learning-rate schedule and optax's clipping.
Both loss curves are compared at every step, and the final parameters once HF's tensors are
mapped back to lmssl's paths.

Another architecture is one `ARCHITECTURES` entry (its lmssl config), once `lmssl.hf` exports
it: the HF class is the one `to_hf` writes in the folder.
"""

import dataclasses
import importlib
import os
import shutil
import tempfile
import time

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lmssl import config as config_lib
from lmssl import datasets
from lmssl import errors
from lmssl import heads
from lmssl import losses
from lmssl import masks
from lmssl import optimizer as optimizer_lib
from lmssl import sharding
from lmssl import steps as steps_lib
from lmssl.hf import convert
from lmssl.hf import extra as hf_extra
from lmssl.hf import families
from lmssl.hf import weights

# --arch -> (the lmssl config in lmssl/configs/ whose smoke shape trains, the global-norm clip:
# below the gradient norm of some of the steps, so that clipping really happens).
ARCHITECTURES = {"bert": ("mlm_base", 1.5), "gpt2": ("clm_base", 1.5),
                 "llama": ("llama_base", 1.5), "modernbert": ("modernbert_base", 1.5)}
# Weight decay of at least this, so that it moves a decaying tensor beyond PARAM_RTOL within the
# run (ModernBERT's own 1e-5 would move it by 2.5e-7: a decay missing on one side would pass).
MIN_WEIGHT_DECAY = 0.01
LOSS_RTOL = 1e-4  # every step's |lmssl - HF| / |HF|
# Each final tensor's max |lmssl - HF| over its max |lmssl|. float32 training of this length
# lands near 1e-6; weight decay alone moves a decaying tensor by weight_decay * sum(lr)
# (2.5e-4 and more here), so a tensor decayed on one side only fails it.
PARAM_RTOL = 5e-5
# Tensors whose gradient is zero in exact arithmetic: a key bias adds q.b to every score of a
# query alike, which the softmax cancels. Adam scales their rounding noise into steps, so they
# are reported, not held to PARAM_RTOL.
GRADIENT_FREE = ("attn/key/bias",)


@dataclasses.dataclass(frozen=True)
class Settings:
  arch: str
  steps: int = 50
  batch: int = 8
  seq_len: int = 64
  warmup: int = 10
  lr: float = 1e-3
  grad_clip: float = 0.0  # 0: the architecture's own (ARCHITECTURES)
  workdir: str = "~/.cache/lmssl/parity"  # tokenizer and prepared data, kept and reused


def parity_config(s: Settings) -> ml_collections.ConfigDict:
  """The architecture's config at its smoke shape (2 layers, d_model 64, 500-piece vocabulary),
  float32, no dropout, no sentence pairs, warmup then the config's decay, its weight decay (at
  least MIN_WEIGHT_DECAY)."""
  if s.arch not in ARCHITECTURES:
    raise errors.UserError(f"--arch {s.arch!r} is not known; known: {sorted(ARCHITECTURES)}")
  config_name, grad_clip = ARCHITECTURES[s.arch]
  c = importlib.import_module(f"lmssl.configs.{config_name}").get_config("size=tiny,smoke")
  c.model.dtype = c.model.param_dtype = "float32"
  c.model.dropout, c.model.attention = 0.0, "xla"
  c.data.sentence_pair, c.data.seq_len = "", s.seq_len
  c.data.cache_dir = os.path.join(os.path.expanduser(s.workdir), "cache")
  c.train.steps, c.train.batch_size, c.train.warmup_steps = s.steps, s.batch, s.warmup
  c.train.lr, c.train.grad_clip = s.lr, s.grad_clip or grad_clip
  c.train.weight_decay = max(c.train.weight_decay, MIN_WEIGHT_DECAY)
  c.checkpoint.async_save = False
  return c


def lmssl_run(cfg, workdir: str):
  """(the resolved config, the host batches, the initial params, the lmssl curve): the data as
  `train.train_and_evaluate` loads it and the state and compiled step it builds."""
  mesh = sharding.make_mesh(cfg.mesh)
  data = datasets.load(cfg, workdir)
  cfg = config_lib.resolved(cfg, data.changes)
  train_batches, _ = datasets.batches(cfg, data, mesh)
  host = list(train_batches(0, cfg.train.steps))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, shardings = steps_lib.create_state(cfg, mesh)
    initial = jax.device_get(state.params)
    step_fn, _ = steps_lib.compile_steps(cfg, shardings, mesh)
    start = time.perf_counter()
    step_fn = step_fn.lower(state, sharding.global_batch(host[0], mesh)).compile()
    compile_s = time.perf_counter() - start
    curve = {"loss": [], "grad_norm": []}
    start = time.perf_counter()
    for batch in host:
      state, metrics = step_fn(state, sharding.global_batch(batch, mesh))
      curve["loss"].append(float(metrics["loss"]))
      curve["grad_norm"].append(float(metrics["grad_norm"]))
    curve["seconds"], curve["compile_s"] = time.perf_counter() - start, compile_s
    curve["params"] = jax.device_get(state.params)
  return cfg, host, initial, curve


def export(cfg, params, tokenizer_path: str, out: str) -> dict:
  """`params` as a run directory (config.json, checkpoints/0) exported by `to_hf` into
  out/hf; returns to_hf's summary."""
  run_dir = os.path.join(out, "run")
  convert.write_run(run_dir, config_lib.resolved(cfg, {"data.tokenizer": tokenizer_path}),
                    params, {})
  return convert.to_hf(run_dir, os.path.join(out, "hf"))


def decay_flags(family, params, base_only: bool) -> dict:
  """{HF tensor name: decays}, from lmssl's decay mask sent through the exporter's weight
  tables (tied names are added by `ties`)."""
  mask = optimizer_lib.decay_mask(params)
  ones = jax.tree.map(lambda d, x: np.full(np.shape(x), float(d), np.float32), mask, params)
  flags = {}
  for name, array in weights.from_lmssl(family, ones, base_only).items():
    if array.any() and not array.all():
      raise ValueError(f"{name} joins tensors that decay and tensors that do not")
    flags[name] = bool(array.all())
  return flags


def ties(family, flags: dict, base_only: bool) -> dict:
  """{tied HF tensor: the one it is tied to}, for the ties the exported model has."""
  out = weights.tied_names(family, "" if base_only else family.base_prefix)
  return {k: v for k, v in out.items() if k not in flags and v in flags}


def hf_mask(cfg, segment_ids_BxL, causal: bool):
  """What attention may see, [B, 1, L, L] bool, as lmssl's own `masks.Mask` writes it out. A
  model with windowed layers gets one per transformers layer type (a dict, as ModernBERT
  takes it): its global layers' and its windowed layers'."""
  mask = masks.Mask.packed(segment_ids_BxL, causal)
  windows = [w for w in masks.distinct_windows(cfg.model) if w]
  if not windows:
    return np.asarray(mask.dense())
  (window,) = windows  # model.attention_window: one per model
  return {"full_attention": np.asarray(mask.dense()),
          "sliding_attention": np.asarray(mask.replace(windows=(window,), window=window).dense())}


def hf_batches(cfg, host: list) -> list:
  """lmssl's batches as the HF model takes them, with what lmssl's loss reads: the output
  positions (MLM's masked ones; CLM's all), targets and weights, from `losses`."""
  (head,) = heads.heads_for(cfg)
  out = []
  for b in host:
    targets, weights_ = (np.asarray(x) for x in losses.targets_and_weights(b, head))
    ids = b["input_ids"]
    positions = (b["masked_positions"] if head == "mlm"
                 else np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    item = dict(input_ids=ids, position_ids=b["positions"], positions=positions,
                targets=targets, weights=weights_,
                allowed=hf_mask(cfg, b["segment_ids"], cfg.objective == "clm"))
    if cfg.model.type_vocab_size:
      item["token_type_ids"] = b.get("token_types", np.zeros_like(ids))
    out.append(item)
  return out


def compare_params(ours: dict, theirs: dict, initial: dict) -> dict:
  """Per tensor, max |lmssl - HF| and that over max |lmssl|; their maxima over the tensors
  that have a gradient, and beside them how far training moved the parameters."""
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(ours, sep="/").items()}
  flat_theirs = flax.traverse_util.flatten_dict(theirs, sep="/")
  flat_init = flax.traverse_util.flatten_dict(initial, sep="/")
  per = {}
  for k, a in flat.items():
    diff = float(np.max(np.abs(a - flat_theirs[k])))
    per[k] = {"abs": diff, "rel": diff / max(float(np.max(np.abs(a))), 1e-30)}
  held = [k for k in per if not k.endswith(GRADIENT_FREE)]
  worst = max(held, key=lambda k: per[k]["rel"])
  return {"max_abs_diff": max(per[k]["abs"] for k in held), "max_rel_diff": per[worst]["rel"],
          "worst_tensor": worst, "param_rtol": PARAM_RTOL,
          "max_abs_moved": max(float(np.max(np.abs(a - np.asarray(flat_init[k]))))
                               for k, a in flat.items()),
          "gradient_free": {k: per[k] for k in per if k not in held}, "per_tensor": per}


def hf_run(cfg, host: list, initial: dict, workdir: str) -> dict:
  """The HF side: `initial` exported by `to_hf`, loaded and trained on `host` in PyTorch with
  lmssl's decay set, schedule and clipping; hf_train.train's result, plus what it was given."""
  from lmssl.bench import hf_train  # the hf extra, needed only here
  family = families.check_exportable(cfg)
  out = tempfile.mkdtemp(prefix="lmssl-parity-")
  try:
    exported = export(cfg, initial, config_lib.tokenizer_path(cfg, workdir), out)
    base_only = exported["architecture"] == family.base_model
    flags = decay_flags(family, initial, base_only)
    tied = ties(family, flags, base_only)
    model = hf_train.load(os.path.join(out, "hf"), exported["architecture"], tied)
  finally:
    shutil.rmtree(out, ignore_errors=True)
  flags.update({k: flags[v] for k, v in tied.items()})
  schedule = optimizer_lib.learning_rate(cfg.train)
  # optax's update i (from 0) takes schedule(i), the train loop's `schedule(step - 1)`.
  lrs = [float(np.float32(schedule(i))) for i in range(cfg.train.steps)]
  t = cfg.train
  theirs = hf_train.train(model, hf_batches(cfg, host), lrs=lrs, decays=flags, b1=t.b1, b2=t.b2,
                          eps=t.eps, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
  shapes = {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(initial, sep="/").items()}
  theirs["params"], _ = weights.to_lmssl(family, theirs.pop("tensors"), shapes,
                                         cfg.model.num_layers, tied=cfg.model.tie_embeddings)
  return dict(theirs, architecture=exported["architecture"], decays=flags, lrs=lrs)


def run(s: Settings) -> dict:
  """Both curves, their per-step relative differences, clipping, and the final parameters'."""
  for module in ("torch", "transformers", "safetensors", "tokenizers"):
    hf_extra.load(module)  # before any training: a missing one is told in one line
  start = time.perf_counter()
  workdir = os.path.expanduser(s.workdir)
  cfg, host, initial, ours = lmssl_run(parity_config(s), workdir)
  theirs = hf_run(cfg, host, initial, workdir)
  t = cfg.train
  rel = [abs(a - b) / abs(b) for a, b in zip(ours["loss"], theirs["loss"])]
  return {
      "arch": s.arch, "architecture": theirs["architecture"], "steps": t.steps,
      "batch": t.batch_size, "seq_len": cfg.data.seq_len,
      "model": {k: cfg.model[k] for k in ("num_layers", "d_model", "num_heads", "mlp_dim",
                                          "vocab_size")},
      "lr": t.lr, "warmup_steps": t.warmup_steps, "schedule": t.schedule,
      "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
      "lmssl_loss": ours["loss"], "hf_loss": theirs["loss"], "rel_diff": rel,
      "max_rel_diff": max(rel), "loss_rtol": LOSS_RTOL,
      "lmssl_grad_norm": ours["grad_norm"], "hf_grad_norm": theirs["grad_norm"],
      "clipped_steps": sum(g >= t.grad_clip for g in ours["grad_norm"]),
      "hf_clipped_steps": sum(theirs["clipped"]),
      "decayed": sorted(k for k, v in theirs["decays"].items() if v),
      "undecayed": sorted(k for k, v in theirs["decays"].items() if not v),
      # How far weight decay alone moves a decaying tensor, relative to its size.
      "decay_rel_shift": t.weight_decay * sum(theirs["lrs"]),
      "params": compare_params(ours["params"], theirs["params"], initial),
      "seconds": {"lmssl_compile": ours["compile_s"], "lmssl_steps": ours["seconds"],
                  "hf_steps": theirs["seconds"], "total": time.perf_counter() - start},
  }


def text(result: dict) -> str:
  """Both loss curves side by side, then one summary line."""
  lines = [f"{'step':>4}  {'lmssl loss':>12}  {'HF loss':>12}  {'rel diff':>9}  clipped"]
  for i, (a, b, r, g) in enumerate(zip(result["lmssl_loss"], result["hf_loss"],
                                       result["rel_diff"], result["lmssl_grad_norm"])):
    lines.append(f"{i + 1:>4}  {a:>12.7f}  {b:>12.7f}  {r:>9.1e}  "
                 f"{'yes' if g >= result['grad_clip'] else ''}")
  p, sec = result["params"], result["seconds"]
  ok = result["max_rel_diff"] <= LOSS_RTOL and p["max_rel_diff"] <= PARAM_RTOL
  lines.append(
      f"{result['arch']} ({result['architecture']}), {result['steps']} steps: max loss rel diff "
      f"{result['max_rel_diff']:.1e} (<= {LOSS_RTOL:g}), final params max abs diff "
      f"{p['max_abs_diff']:.1e}, max rel diff {p['max_rel_diff']:.1e} (<= {PARAM_RTOL:g}, "
      f"{p['worst_tensor']}); clipped {result['clipped_steps']}/{result['steps']} steps "
      f"(HF {result['hf_clipped_steps']}); {len(result['decayed'])} HF tensors decayed; "
      f"{sec['total']:.0f} s in all: {'PASS' if ok else 'FAIL'}")
  return "\n".join(lines)

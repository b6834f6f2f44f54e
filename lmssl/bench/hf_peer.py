"""The HuggingFace PyTorch peer that `lmssl.bench --peer hf` times side by side with lmssl's JAX
train step: BertForMaskedLM, GPT2LMHeadModel or LlamaForCausalLM (by `--arch`) trained as HF's
Trainer trains them. It runs in
its own process, so its threads and memory are its own; `serve` answers the parent's messages.
"""

import contextlib
import os
import resource
import time
import traceback

import torch
import transformers
from torch import nn

MASK_ID = 4  # any id below the sampled range [5, vocab) serves as [MASK]
NUM_BATCHES = 4


def resident_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


def build_model(s: dict) -> nn.Module:
  if s["task"] == "mlm":
    config = transformers.BertConfig(
        vocab_size=s["vocab_size"], hidden_size=s["d_model"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], intermediate_size=s["mlp_dim"],
        max_position_embeddings=max(512, s["seq_len"]), type_vocab_size=2,
        hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=0.0, hidden_act="gelu",
        layer_norm_eps=1e-12)
    return transformers.BertForMaskedLM(config)
  if s["arch"] == "llama":
    return transformers.LlamaForCausalLM(llama_config(s))
  if s["task"] == "clm":
    # GPT-2's default bos/eos (50256) lie outside a smaller vocabulary and only draw warnings.
    config = transformers.GPT2Config(
        vocab_size=s["vocab_size"], n_positions=max(1024, s["seq_len"]), n_embd=s["d_model"],
        n_layer=s["num_layers"], n_head=s["num_heads"], n_inner=s["mlp_dim"],
        resid_pdrop=s["dropout"], embd_pdrop=s["dropout"], attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=None,
        eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)
  raise ValueError(f"unknown task {s['task']!r}: expected 'mlm' or 'clm'")


def llama_config(s: dict) -> transformers.LlamaConfig:
  """lmssl's Llama shape (configs/llama_base.py): untied output embedding, no biases."""
  if s["dropout"]:
    raise ValueError(f"dropout {s['dropout']}: HF Llama has attention dropout only; use 0")
  return transformers.LlamaConfig(
      vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["mlp_dim"],
      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
      num_key_value_heads=s["num_kv_heads"], hidden_act="silu",
      max_position_embeddings=max(2048, s["seq_len"]), rms_norm_eps=s["ln_eps"],
      rope_parameters=dict(rope_type="default", rope_theta=s["rope_theta"]),
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
      use_cache=False, bos_token_id=None, eos_token_id=None)


def make_batch(s: dict, gen: torch.Generator) -> dict:
  shape = (s["batch"], s["seq_len"])
  ids = torch.randint(5, s["vocab_size"], shape, generator=gen)
  ones = torch.ones(shape, dtype=torch.long)
  if s["task"] == "clm":
    return dict(input_ids=ids, attention_mask=ones, labels=ids.clone())
  # Distinct positions per row: the first k of a random permutation of each row.
  k = round(s["mask_rate"] * s["seq_len"])
  picked = torch.rand(shape, generator=gen).argsort(dim=1)[:, :k]
  masked = torch.zeros(shape, dtype=torch.bool).scatter_(1, picked, True)
  return dict(input_ids=ids.masked_fill(masked, MASK_ID), attention_mask=ones,
              token_type_ids=torch.zeros_like(ids), labels=ids.masked_fill(~masked, -100))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """Trainer's split: no decay for biases or anything inside a norm (BERT's LayerNorm.*,
  GPT-2's ln_1/ln_2/ln_f, both weight and bias; Llama's RMSNorms, named *norm)."""
  norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                 for p in m.parameters()}
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    no = "bias" in name or "norm" in name or id(p) in norm_params
    (no_decay if no else decay).append(p)
  return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class Peer:
  """The model, optimizer, schedule and device-resident batches; `step()` is one train step."""

  def __init__(self, s: dict):
    if s["dtype"] not in ("float32", "bfloat16"):
      raise ValueError(f"unknown dtype {s['dtype']!r}")
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(s["seed"])
    self.model = build_model(s).to(self.device).train()
    self.opt = torch.optim.AdamW(
        param_groups(self.model, s["weight_decay"]), lr=s["lr"], betas=(s["b1"], s["b2"]),
        eps=s["eps"])
    self.sched = transformers.get_scheduler(  # "linear" or "cosine", as lmssl's
        s["schedule"], self.opt, s["warmup_steps"], s["total_steps"])
    self.grad_clip = s["grad_clip"]
    self.bf16 = s["dtype"] == "bfloat16"
    gen = torch.Generator().manual_seed(s["seed"])
    self.batches = [{k: v.to(self.device) for k, v in make_batch(s, gen).items()}
                    for _ in range(NUM_BATCHES)]
    self.steps = 0

  def step(self) -> torch.Tensor:
    batch = self.batches[self.steps % len(self.batches)]
    self.steps += 1
    # Mixed precision as Trainer's bf16=True: fp32 weights, autocast forward and loss.
    autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                else contextlib.nullcontext())
    with autocast:
      loss = self.model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    self.sched.step()
    self.opt.zero_grad(set_to_none=True)
    return loss

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.step()
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  def peak_memory(self, baseline: int) -> int:
    if self.device.type == "cuda":
      return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # KiB on Linux

  def info(self) -> dict:
    return dict(
        device=(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"),
        torch=torch.__version__, transformers=transformers.__version__,
        attn_implementation=self.model.config._attn_implementation,
        params=sum(p.numel() for p in self.model.parameters()))


def serve(conn, settings: dict) -> None:
  """Child entry point: build the peer, then answer ("run", n) with seconds, ("memory",) with
  peak training bytes, ("info",) with a dict and ("stop",) with None. Any failure is answered
  with ("error", traceback text) so the parent reports it instead of waiting forever."""
  try:
    transformers.logging.set_verbosity_error()  # config notes that do not touch the timing
    if settings.get("threads"):
      torch.set_num_threads(settings["threads"])
    baseline = resident_bytes()
    peer = Peer(settings)
    while True:
      msg = conn.recv()
      if msg[0] == "run":
        conn.send(peer.run(msg[1]))
      elif msg[0] == "memory":
        conn.send(peer.peak_memory(baseline))
      elif msg[0] == "info":
        conn.send(peer.info())
      elif msg[0] == "stop":
        conn.send(None)
        return
      else:
        raise ValueError(f"unknown message {msg!r}")
  except (EOFError, BrokenPipeError):
    return  # the parent is gone: nobody is left to tell
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", "".join(traceback.format_exception(e))))

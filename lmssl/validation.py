"""The checks a run's config passes at start: each names the value, the rule and the fix.

The allowed values are read from the tables the code dispatches on (the model's norms, norm
types, MLPs, positions, GELU forms, remat policies and projections, RoPE scalings, the
optimizer's schedules, the attention implementations and the windows each takes), so a choice
is valid exactly when the code can run it.
"""

import math

import ml_collections

from lmssl import attention
from lmssl import config as config_lib
from lmssl import errors
from lmssl import masks
from lmssl import model as model_lib
from lmssl import optimizer
from lmssl import rope


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


def _one_of(value, name: str, known) -> None:
  _check(value in known, f"{name}={value!r} is not known; use one of {list(known)}")


def _shortest_row(c: ml_collections.ConfigDict) -> tuple[int, str]:
  """The fewest positions a row needs to hold one target, and what that row is."""
  if c.data.sentence_pair:
    return 5, "a sentence pair ([CLS] A [SEP] B [SEP])"
  if c.task.kind:
    return 3, "a fine-tuning row ([CLS] text [SEP])"
  if c.objective == "mlm":
    return 3, "a masked-LM row ([CLS] token [SEP])"
  return 2, "a causal-LM row (a token and its next)"


def validate(c: ml_collections.ConfigDict, batch_shards: int, process_count: int = 1) -> None:
  """Fails at start, naming the fix, on values that would otherwise fail deep inside a run."""
  _choices(c)
  _objective(c)
  _shapes(c)
  _architecture(c)
  _run_lengths_and_batches(c, batch_shards, process_count)


def _choices(c: ml_collections.ConfigDict) -> None:
  """Each named choice is one the code dispatches on, and runs here; the learning rate."""
  m, d, t = c.model, c.data, c.train
  _one_of(c.objective, "objective", config_lib.OBJECTIVES)
  _one_of(t.nonfinite, "train.nonfinite", ("stop", "skip"))
  _one_of(m.norm, "model.norm", model_lib.NORMS)
  _one_of(m.norm_type, "model.norm_type", tuple(model_lib.NORM_TYPES))
  _one_of(m.mlp, "model.mlp", tuple(model_lib.MLPS))
  _one_of(m.rope_scaling, "model.rope_scaling", tuple(rope.SCALINGS))
  _one_of(m.gelu, "model.gelu", tuple(model_lib.GELU_APPROXIMATE))
  _one_of(m.position, "model.position", model_lib.POSITIONS)
  _one_of(m.remat, "model.remat", tuple(model_lib.REMAT_POLICIES))
  _one_of(m.attention, "model.attention", attention.IMPLEMENTATIONS)
  _one_of(m.dtype, "model.dtype", config_lib.DTYPES)
  _one_of(m.param_dtype, "model.param_dtype", config_lib.DTYPES)
  attention.resolve(m.attention, dtype=m.dtype)  # a kernel these devices or dtype cannot run
  _check(m.max_segments >= 1, f"model.max_segments={m.max_segments} must be at least 1; it "
         "bounds the documents per packed row for cuDNN attention (default 64)")
  _one_of(t.schedule, "train.schedule", tuple(optimizer.SCHEDULES))
  # Both schedules warm up to train.lr and decay from it: lr 0 never moves a parameter,
  # a negative one climbs the loss, and NaN/Inf poison the first update.
  _check(isinstance(t.lr, (int, float)) and math.isfinite(t.lr) and t.lr > 0,
         f"train.lr={t.lr} must be a finite number above 0 (the peak learning rate that "
         "warmup reaches); use e.g. 1e-4")
  _one_of(d.sentence_pair, "data.sentence_pair", ("", "nsp", "sop"))
  _one_of(c.task.kind, "task.kind", ("", "classification", "regression", "tokens"))


def _objective(c: ml_collections.ConfigDict) -> None:
  """The objective's settings fit together: pairs, row length, loss pieces, task, LoRA."""
  d, t = c.data, c.train
  _check(not (c.task.kind and d.sentence_pair),
         "data.sentence_pair is a pretraining objective; leave it empty when fine-tuning")
  _check(not d.sentence_pair or c.objective == "mlm",
         f"data.sentence_pair={d.sentence_pair!r} needs objective 'mlm' (it adds to the MLM loss)")
  min_len, row = _shortest_row(c)
  _check(d.seq_len >= min_len,
         f"data.seq_len={d.seq_len} is too short: {row} needs at least "
         f"{min_len} positions; use a longer seq_len (128 is typical)")
  _check(0 <= t.loss_chunks <= d.seq_len,
         f"train.loss_chunks={t.loss_chunks} must be 0 (all logits at once) or a number of "
         f"pieces of the sequence, at most data.seq_len={d.seq_len}")
  _check(not c.task.kind or (c.task.train_source and c.task.eval_source),
         "fine-tuning needs --config.task.train_source and --config.task.eval_source "
         "(tsv:PATH, csv:PATH, jsonl:PATH, tfds:NAME:SPLIT or conll:PATH)")
  _check(0 <= d.short_seq_prob <= 1, f"data.short_seq_prob={d.short_seq_prob} must be in [0, 1]")
  _check(c.lora.rank >= 0, f"lora.rank={c.lora.rank} must be 0 (off) or positive")
  if c.lora.rank:
    targets = [x.strip() for x in c.lora.targets.split(",")]
    known = model_lib.projections(c.model)
    _check(bool(targets) and all(x in known for x in targets),
           f"lora.targets={c.lora.targets!r} must name projections among {list(known)} "
           f"(model.mlp={c.model.mlp!r})")
    _check(bool(c.task.kind), "LoRA is for fine-tuning: set task.kind, or lora.rank=0 to "
           "pretrain every parameter")


def _shapes(c: ml_collections.ConfigDict) -> None:
  """Heads, positions, vocabulary and masking fit the model and the row length."""
  m, d = c.model, c.data
  _check(m.d_model % m.num_heads == 0,
         f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
         "choose heads that divide d_model")
  _check(m.position != "rope" or (m.d_model // m.num_heads) % 2 == 0,
         "rope needs an even head dimension (d_model / num_heads)")
  _check(m.position != "learned" or d.seq_len <= m.max_len,
         f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len} learned positions; "
         f"raise --config.model.max_len to at least {d.seq_len}")
  _check(d.vocab_size >= 100 or d.tokenizer,
         f"data.vocab_size={d.vocab_size} is too small: 5 ids are reserved "
         "(pad, unk, cls/bos, sep/eos, mask); use at least 100")
  # mask_rate 1 is allowed: every candidate piece, up to max_predictions, is predicted.
  _check(0 < d.mask_rate <= 1 and min(d.mask_token_frac, d.random_token_frac) >= 0 and
         d.mask_token_frac + d.random_token_frac <= 1,
         f"masking rates mask_rate={d.mask_rate}, mask_token_frac={d.mask_token_frac}, "
         f"random_token_frac={d.random_token_frac}: need 0 < mask_rate <= 1 and the two "
         "fractions non-negative, summing to at most 1 (BERT: 0.15, 0.8, 0.1)")
  _check(c.objective != "mlm" or c.task.kind or 0 < d.max_predictions <= d.seq_len,
         f"data.max_predictions={d.max_predictions} must be in [1, seq_len={d.seq_len}]")


def _run_lengths_and_batches(c: ml_collections.ConfigDict, batch_shards: int,
                             process_count: int) -> None:
  """Positive run lengths, intervals and input pieces; batches that split over the data
  shards."""
  t = c.train
  _check(t.steps > 0 and t.log_every > 0 and c.eval.every_steps > 0 and c.eval.steps > 0,
         "train.steps, train.log_every, eval.every_steps and eval.steps must be positive")
  _check(c.checkpoint.every_steps > 0 and c.checkpoint.keep > 0,
         "checkpoint.every_steps and checkpoint.keep must be positive")
  _check(c.data.shard_bytes >= 1, f"data.shard_bytes={c.data.shard_bytes} must be at least 1 "
         "(the size of the pieces a big input file is read in; default 67108864, 64 MiB)")
  _check(t.microbatches >= 1, f"train.microbatches={t.microbatches} must be at least 1 "
         "(1: no gradient accumulation)")
  shards = max(batch_shards, process_count)
  # On one shard any size splits: "a multiple of 1" would be no advice at all.
  fix = f"a multiple of {shards}" if shards > 1 else "e.g. 32"
  for name, batch in (("train.batch_size", t.batch_size), ("eval.batch_size", c.eval.batch_size)):
    _check(batch >= 1, f"{name}={batch} must be at least 1 (sequences per step, over all "
           f"devices); use {fix}")
    _check(batch % shards == 0,
           f"{name}={batch} is not divisible by {shards} data shards (mesh data x fsdp, "
           f"and {process_count} processes); use a multiple of {shards}")
  _check(t.microbatches > 0 and (t.batch_size // t.microbatches) % batch_shards == 0
         and t.batch_size % t.microbatches == 0,
         f"train.batch_size={t.batch_size} must split into train.microbatches="
         f"{t.microbatches} microbatches each divisible by {batch_shards} data shards; use a "
         f"batch size that is a multiple of {t.microbatches * batch_shards}")


def _architecture(c: ml_collections.ConfigDict) -> None:
  """Key/value heads, biases, windows and RoPE settings fit together and have an effect."""
  m = c.model
  _check(0 <= m.num_kv_heads <= m.num_heads,
         f"model.num_kv_heads={m.num_kv_heads} must be in [0, model.num_heads={m.num_heads}] "
         "(0: one per query head)")
  _check(not m.num_kv_heads or m.num_heads % m.num_kv_heads == 0,
         f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads="
         f"{m.num_kv_heads}; each key/value head serves an equal group of query heads, so use "
         "a divisor of num_heads")
  _check(not (m.qkv_bias and m.use_bias),
         "model.qkv_bias adds query/key/value biases to a model without biases (Qwen2); with "
         "model.use_bias every projection has one already: set use_bias=False or qkv_bias=False")
  _check(not m.embed_norm or m.norm == "pre",
         "model.embed_norm adds an embedding norm to a pre-norm model; a post-norm model "
         "(model.norm='post') always has one: leave embed_norm False")
  _check(not m.skip_first_attn_norm or (m.norm == "pre" and m.embed_norm),
         "model.skip_first_attn_norm drops layer 0's attention norm in a pre-norm model whose "
         "embeddings are normalized (ModernBERT); it needs model.norm='pre' and "
         "model.embed_norm=True")
  _windows(c)
  _rope(m)


def _windows(c: ml_collections.ConfigDict) -> None:
  m, seq_len, causal = c.model, c.data.seq_len, c.objective == "clm"
  kind = masks.window_kind(causal)
  _check(m.attention_window >= 0 and m.global_every >= 0,
         f"model.attention_window={m.attention_window} and model.global_every="
         f"{m.global_every} must be 0 (off) or positive")
  _check(not m.global_every or m.attention_window,
         f"model.global_every={m.global_every} picks the global layers among windowed ones, "
         "but model.attention_window=0 makes every layer global; set attention_window > 0, or "
         "global_every=0")
  _check(m.global_every != 1, "model.global_every=1 makes every layer global, so "
         "model.attention_window has no effect; use global_every >= 2, or attention_window=0")
  # The model's context: rows it trains on, or its max_len (HF's max_position_embeddings),
  # where generation and longer rows later reach.
  context = max(seq_len, m.max_len)
  _check(not m.attention_window or masks.has_effect(m.attention_window, context, causal),
         f"model.attention_window={m.attention_window} has no effect within data.seq_len="
         f"{seq_len} or model.max_len={m.max_len}: every {kind} query already sees its whole "
         f"row within it; use a window below {context if causal else 2 * (context - 1)}, or 0 "
         "for global attention")
  _check(not m.attention_window or m.attention == "auto"
         or kind in attention.WINDOWS[m.attention],
         f"model.attention={m.attention!r} takes no {kind} sliding window "
         f"(objective {c.objective!r}); use --config.model.attention=auto or xla")


def _rope(m: ml_collections.ConfigDict) -> None:
  rope_fields = [f"model.{k}={m[k]!r}" for k, off in (("rope_scaling", ""),
                                                       ("local_rope_theta", 0.0)) if m[k] != off]
  _check(m.position == "rope" or not rope_fields,
         f"{', '.join(rope_fields)} set RoPE options, but model.position={m.position!r}; set "
         "--config.model.position=rope, or leave them at their defaults")
  _check(not m.local_rope_theta or m.attention_window,
         f"model.local_rope_theta={m.local_rope_theta} is the windowed layers' theta, and "
         "model.attention_window=0 leaves no layer windowed; set a window, or "
         "local_rope_theta=0")
  _check(m.rope_theta > 0 and m.local_rope_theta >= 0,
         f"model.rope_theta={m.rope_theta} must be above 0 and model.local_rope_theta="
         f"{m.local_rope_theta} at least 0 (0: rope_theta)")
  _check(m.rope_scaling != "linear" or m.rope_scaling_factor > 0,
         f"model.rope_scaling_factor={m.rope_scaling_factor} must be above 0 for linear RoPE "
         "scaling")
  _check(m.rope_scaling != "llama3" or (
      m.rope_scaling_factor > 0 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
      and m.rope_original_max_len > 0),
         f"llama3 RoPE scaling needs rope_scaling_factor > 0 (got {m.rope_scaling_factor}), "
         f"0 < rope_low_freq_factor (got {m.rope_low_freq_factor}) < rope_high_freq_factor "
         f"(got {m.rope_high_freq_factor}) and rope_original_max_len > 0 (got "
         f"{m.rope_original_max_len}); Llama 3.1 uses 8, 1, 4, 8192")

"""Every knob of an lmssl run, declared once, the size table and variants, and a run's config
resolved (frozen), written and read back. Its checks are `validation.py`'s.

Config files in `configs/` start from `base_config()` and set objective-specific defaults;
`--config.x.y=v` overrides any of these on the command line.
"""

import json
import os

import ml_collections

from lmssl import errors
from lmssl import files

# name: (num_layers, d_model, num_heads, mlp_dim). base/large are BERT-base/large shaped,
# which is also GPT-2 small/medium (12x768x12, 24x1024x16).
SIZES = {
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}

OBJECTIVES = ("mlm", "clm")
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype and model.param_dtype


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "mlm"  # "mlm" (bidirectional encoder) or "clm" (causal decoder)
  c.seed = 0
  c.model = _model_section()
  c.data = _data_section()
  _add_finetuning_sections(c)
  _add_run_sections(c)
  return c


def _model_section() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.size = "base"  # the SIZES row chosen by the `size=` variant (a label; the fields below rule)
  m.num_layers = 12
  m.d_model = 768
  m.num_heads = 12
  m.mlp_dim = 3072
  m.vocab_size = 0  # 0: taken from the tokenizer
  m.max_len = 512  # rows of the learned position table
  m.type_vocab_size = 2  # token-type embeddings (BERT: 2); 0 turns them off
  m.norm = "post"  # "post" (BERT) or "pre" (GPT-2, adds a final norm)
  m.norm_type = "layernorm"  # "layernorm" or "rmsnorm" (scale only, no mean: Llama)
  m.embed_norm = False  # a pre-norm model that also normalizes its embeddings (ModernBERT)
  # A pre-norm model whose first layer's attention takes the embedding norm's output as it is
  # (ModernBERT: with embed_norm, its layer 0 has no attention norm).
  m.skip_first_attn_norm = False
  m.ln_eps = 1e-12  # every norm's epsilon
  m.gelu = "erf"  # "erf" (exact, BERT) or "tanh" (GPT-2); also GeGLU's
  # "gelu" (BERT, GPT-2), or gated: "swiglu" (Llama), "geglu" (ModernBERT): wi_gate, wi_up, wo
  m.mlp = "gelu"
  m.num_kv_heads = 0  # key/value heads: 0 means num_heads; fewer: grouped-query (1: multi-query)
  m.use_bias = True  # biases on every dense projection and norm (Llama, ModernBERT: False)
  m.qkv_bias = False  # query/key/value biases in a model without others (Qwen2)
  # 0: global attention. W: a causal layer sees the W latest positions, itself included
  # (Mistral); a bidirectional one the positions at most W // 2 away (ModernBERT).
  m.attention_window = 0
  m.global_every = 0  # with a window, layers 0, k, 2k, ... stay global (ModernBERT: 3); 0: none
  m.position = "learned"  # "learned" or "rope"
  m.rope_theta = 10000.0
  m.local_rope_theta = 0.0  # windowed layers' theta (ModernBERT: 10000); 0: rope_theta
  m.rope_scaling = ""  # "" (none), "linear" or "llama3" (Llama 3.1+): lmssl/rope.py
  m.rope_scaling_factor = 8.0
  m.rope_low_freq_factor = 1.0  # llama3 only, as the next two
  m.rope_high_freq_factor = 4.0
  m.rope_original_max_len = 8192  # the context the model was pretrained with
  m.tie_embeddings = True
  m.output_bias = True  # bias on the tied output projection (BERT yes, GPT-2 no)
  m.dropout = 0.0
  m.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  m.param_dtype = "float32"
  m.remat = "none"  # "none", "full", "dots", "dots_no_batch"
  # "auto" (cudnn on GPU, splash on TPU, else xla), "xla", "cudnn", "splash": lmssl/attention.py
  m.attention = "auto"
  m.max_segments = 64  # documents per packed row that cuDNN's packed attention takes
  return m


def _data_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # builtin | text:GLOB | jsonl:GLOB:FIELD | parquet:GLOB:COLUMN | tfds:NAME[/CONFIG]:SPLIT:FEATURE
  # (text and JSONL files may be .gz or .zst): lmssl/data/sources.py
  d.source = "builtin"
  d.val_source = ""  # same forms; empty: hold out val_fraction of `source` by document hash
  d.val_fraction = 0.05
  d.builtin_max_chars = 6_000_000  # cap on the built-in docstring corpus
  # An uncompressed text or JSONL file larger than this is read as byte ranges of about this
  # size (parquet: runs of row groups), so workers share a big file and memory stays bounded.
  d.shard_bytes = 64 * 2**20
  d.tokenizer = ""  # a sentencepiece .model to use as is; empty: train one into the workdir
  d.vocab_size = 8000  # for a trained tokenizer
  d.tokenizer_type = "unigram"  # sentencepiece model type: unigram | bpe
  d.tokenizer_max_sentences = 300_000  # lines of the sample sentencepiece trains on, at most
  # A trained tokenizer learns from a seeded sample of about this many characters, drawn
  # evenly from every input shard (a window at a seeded offset of each), not the corpus' start.
  d.tokenizer_sample_chars = 20_000_000
  d.tokenizer_sample_seed = 0
  d.seq_len = 128
  d.cache_dir = ""  # prepared data cache, a local path or gs://; empty: ~/.cache/lmssl
  d.prepare_workers = 0  # processes that prepare shards at once; 0: one per CPU core
  d.mask_rate = 0.15
  d.mask_token_frac = 0.8  # of the chosen positions: [MASK]
  d.random_token_frac = 0.1  # of the chosen positions: a random token (the rest kept)
  d.max_predictions = 20  # masked positions predicted per sequence
  d.whole_word_mask = False
  # Sentence-pair objective added to MLM: "" (none), "nsp" (BERT: is B the text after A, or
  # from another document?) or "sop" (ALBERT: are A and B in their original order?). Rows are
  # then `[CLS] A [SEP] B [SEP]` pairs cut at sentence (or line) boundaries instead of packed
  # documents; half are negatives, drawn per (seed, row).
  d.sentence_pair = ""
  d.short_seq_prob = 0.1  # of pairs built to a shorter random length, as BERT does
  return d


def _add_finetuning_sections(c: ml_collections.ConfigDict) -> None:
  # Fine-tuning: a task head on a pretrained backbone. kind "" means pretraining.
  c.task = k = ml_collections.ConfigDict()
  k.kind = ""  # "classification" | "regression" | "tokens" (NER-style tagging)
  # tsv:PATH | csv:PATH | jsonl:PATH | tfds:NAME[/CONFIG]:SPLIT | conll:PATH (kind "tokens")
  k.train_source = ""
  k.eval_source = ""
  k.text_fields = "sentence"  # one column, or two ("sentence1,sentence2") for sentence pairs
  k.label_field = "label"
  k.labels = ""  # comma-separated label set in order; empty: the sorted labels of the train file
  k.metric = ""  # eval metric that picks the best checkpoint; empty: the kind's main metric
  k.dropout = 0.1  # on the pooled / token features before the task head

  # Start from another run's parameters (the backbone, and the MLM/CLM head where shapes
  # match): a pretraining workdir, one of its checkpoints/STEP directories, a fine-tuning
  # run's best/, or hf:DIR (a local HuggingFace folder of a family lmssl converts, converted in
  # memory).
  c.init = ml_collections.ConfigDict()
  c.init.params_from = ""

  # Low-rank adapters: rank 0 trains every parameter; rank R > 0 freezes the backbone and
  # trains adapters on the named projections plus the task head.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = "query,value"  # of: query, key, value, out (attention), wi, wo (MLP)


def _add_run_sections(c: ml_collections.ConfigDict) -> None:
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # one axis may be -1: it takes the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.train = t = ml_collections.ConfigDict()
  t.steps = 10_000
  t.batch_size = 256  # global, in sequences
  t.microbatches = 1  # gradient accumulation
  # CLM's vocabulary projection and loss, made over this many pieces of the sequence so that
  # only one piece's [B, L/k, V] logits exist at a time (0: all [B, L, V] at once).
  t.loss_chunks = 0
  t.lr = 1e-4
  t.warmup_steps = 1000
  t.schedule = "linear"  # decay after warmup: "linear" or "cosine" (to end_lr_frac * lr)
  t.end_lr_frac = 0.0
  t.weight_decay = 0.01
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-6
  t.grad_clip = 1.0
  # A step whose loss, gradients or update are NaN/Inf never updates the state. "stop": the run
  # ends there with a message, its last checkpoint (all finite) kept; "skip": it goes on to the
  # next batch, logging each skipped step.
  t.nonfinite = "stop"
  t.log_every = 50
  t.peak_flops_per_device = 0.0  # 0: looked up from the device kind (MFU omitted if unknown)

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 1000
  e.steps = 20  # batches per evaluation
  e.batch_size = 64

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 1000
  k.keep = 3
  k.async_save = True
  # Resume a workdir whose run was made with other run-defining settings (see RESUMABLE): off,
  # such a workdir is refused with the differences listed, so two runs never mix in one.
  k.allow_config_change = False


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses "size=tiny,smoke" into {"size": "tiny", "smoke": True} over `defaults`, each value
  typed as its default: a bare name or true/false (yes/no, 1/0) for a boolean, a number for a
  number, text for text. Anything else is refused, naming the variant."""
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    if key not in out:
      raise errors.UserError(f"unknown config variant {key!r}; known: {sorted(out)}")
    out[key] = _variant_value(key, value.strip() if eq else None, defaults[key])
  return ml_collections.ConfigDict(out)


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _variant_value(key: str, value: str | None, default):
  """`value` (None: the variant named bare) read as the type of `default`."""
  if isinstance(default, bool):
    if value is None or value.lower() in _BOOLEANS:
      return value is None or _BOOLEANS[value.lower()]
    raise errors.UserError(f"config variant {key}={value!r} is not a boolean; write {key} "
                           f"(on), or {key}=true / {key}=false")
  if value is None:
    raise errors.UserError(f"config variant {key} needs a value; write {key}=VALUE")
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise errors.UserError(f"config variant {key}={value!r} is not a number; write e.g. "
                             f"{key}={default}") from None
  return value


def apply_size(c: ml_collections.ConfigDict, size: str, sizes: dict = SIZES) -> None:
  """The `sizes` row `size`: (num_layers, d_model, num_heads, mlp_dim[, num_kv_heads])."""
  if size not in sizes:
    raise errors.UserError(f"unknown model size {size!r}; known: {list(sizes)}")
  c.model.size = size
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = sizes[size][:4]
  c.model.num_kv_heads = sizes[size][4] if len(sizes[size]) > 4 else 0


def vocab_change(c: ml_collections.ConfigDict, tokenizer_vocab: int) -> dict:
  """{"model.vocab_size": the tokenizer's}, unless the config fixes a size that differs."""
  if c.model.vocab_size and c.model.vocab_size != tokenizer_vocab:
    raise errors.UserError(f"model.vocab_size={c.model.vocab_size} but the tokenizer has "
                     f"{tokenizer_vocab} pieces; set --config.model.vocab_size=0 to follow it")
  return {"model.vocab_size": tokenizer_vocab}


def joined_labels(names) -> str:
  """task.labels for a fine-tuning task's label set, in order, so a checkpoint reads back."""
  bad = [n for n in names if "," in n or not n]
  if bad:
    raise errors.UserError(f"labels {bad} are empty or contain a comma; rename them in the task "
                           "files (task.labels is a comma-separated list)")
  return ",".join(names)


def resolved(c: ml_collections.ConfigDict, changes: dict | None = None
             ) -> ml_collections.FrozenConfigDict:
  """A frozen copy of `c` with `changes` ({"model.vocab_size": 8000, ...}) made: how a run
  takes in what it derives (a warm start's architecture, the tokenizer's vocabulary, a task's
  labels) once, at the top, leaving `c` as it was and nothing to rewrite later."""
  out = ml_collections.ConfigDict(c.to_dict())
  for key, value in (changes or {}).items():
    *parents, name = key.split(".")
    section = out
    for parent in parents:
      section = section[parent]
    section[name] = value
  return ml_collections.FrozenConfigDict(out)


# Model fields that describe how to run a model, not what it is: a run that starts from
# another run's parameters keeps its own values of these.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "remat", "attention", "max_segments", "dropout")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json over today's base config (so keys added since are present)."""
  path = os.path.join(workdir, "config.json")
  try:
    saved = json.loads(files.read_text(path))
  except FileNotFoundError:
    raise errors.UserError(f"{path} does not exist: {workdir} is not an lmssl run directory; "
                           "name the --workdir of a run") from None
  except ValueError as e:  # cut short or overwritten: not JSON, or not UTF-8 text
    raise errors.UserError(f"{path} is damaged (not JSON: {e}); restore it from a copy, or "
                           "start over in a new --workdir") from None
  if not isinstance(saved, dict):
    raise errors.UserError(f"{path} is damaged (not a JSON object); restore it from a copy, "
                           "or start over in a new --workdir")
  c = base_config()
  _update(c, saved, path)
  return c


def _update(c: ml_collections.ConfigDict, values: dict, path: str) -> None:
  for key, value in values.items():
    if key not in c:
      raise errors.UserError(f"{path} has an unknown key {key!r}; was it written by a newer "
                             "lmssl?")
    if isinstance(value, dict):
      _update(c[key], value, path)
    else:
      c[key] = value


def to_json(c: ml_collections.ConfigDict) -> str:
  """A run's config.json: every setting, in the order `base_config` declares them (a frozen
  config keeps its keys sorted)."""
  def ordered(values: dict, template: dict) -> dict:
    return {k: ordered(values[k], template[k]) if isinstance(template[k], dict) else values[k]
            for k in template}
  # to_json writes a ConfigDict's keys in the order they were set; to_dict sorts them.
  return json.dumps(ordered(c.to_dict(), json.loads(base_config().to_json())), indent=2)


def source_changes(source: ml_collections.ConfigDict, source_workdir: str) -> dict:
  """The architecture, objective and tokenizer of the run whose parameters a run starts from,
  as changes for `resolved`; the run keeps its own runtime fields (dtypes, remat, dropout),
  data, task and training."""
  changes = {"objective": source.objective,
             "data.tokenizer": tokenizer_path(source, source_workdir)}
  changes.update({f"model.{key}": value for key, value in source.model.items()
                  if key not in RUNTIME_MODEL_FIELDS})
  return changes


# Settings a resumed run may change, being about where and how it runs, what it logs and
# keeps, not what it computes. Any other difference from the workdir's config.json is refused
# unless checkpoint.allow_config_change.
RESUMABLE = ("mesh", "eval", "checkpoint", "train.log_every", "train.peak_flops_per_device",
             "train.nonfinite", "train.microbatches", "train.loss_chunks", "data.cache_dir",
             "model.remat", "model.attention", "model.max_segments")
# Values a run fills in itself (from the tokenizer, the task's labels) when left at these.
DERIVED = {"model.vocab_size": 0, "task.labels": ""}


def run_changes(saved: ml_collections.ConfigDict, c: ml_collections.ConfigDict,
                prefix: str = "") -> list[str]:
  """"key: saved -> now" for each run-defining setting of `c` that differs from `saved`."""
  out = []
  for key, value in c.items():
    name = prefix + key
    if any(name == r or name.startswith(r + ".") for r in RESUMABLE):
      continue
    if isinstance(value, ml_collections.ConfigDict):
      out += run_changes(saved[key], value, name + ".")
    elif value != saved[key] and DERIVED.get(name, object()) != value:
      out.append(f"{name}: {saved[key]!r} -> {value!r}")
  return out


def tokenizer_path(c: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer a run in `workdir` used: the configured one, else the one it trained there."""
  return c.data.tokenizer or os.path.join(workdir, "tokenizer.model")


def apply_run(c: ml_collections.ConfigDict, steps: int, batch: int, seq_len: int,
              lr: float) -> None:
  """A run length for a size: warmup 10% (capped at 10k), eval and checkpoint 10 times."""
  c.train.steps, c.train.batch_size, c.data.seq_len, c.train.lr = steps, batch, seq_len, lr
  c.train.warmup_steps = min(steps // 10, 10_000)
  c.train.log_every = max(1, min(steps // 30, 100))
  c.eval.every_steps = c.checkpoint.every_steps = max(1, min(steps // 3, 10_000))
  c.eval.batch_size = batch


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds, not minutes: every piece runs (tokenizer, prepare, train, eval, checkpoint)."""
  c.model.size = "smoke"
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 64, 2, 128
  c.model.num_kv_heads = min(c.model.num_kv_heads, 1)  # grouped stays grouped: 2 heads on 1
  c.model.attention_window = min(c.model.attention_window, 16)  # to matter in 64-token rows
  c.data.builtin_max_chars = 200_000
  c.data.vocab_size = 500
  c.data.seq_len = 64
  c.data.max_predictions = 10
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 8, 1
  c.train.log_every = c.eval.every_steps = c.checkpoint.every_steps = 2
  c.eval.steps, c.eval.batch_size = 2, 8


def apply_variants(c: ml_collections.ConfigDict, arg: str, runs: dict,
                   sizes: dict = SIZES) -> ml_collections.ConfigDict:
  """Applies "size=NAME[,smoke]": the `sizes` row, that size's run settings from `runs`
  ({size: (steps, batch, seq_len, lr)}), then the smoke shrink."""
  v = parse_arg(arg, size="base", smoke=False)
  apply_size(c, v.size, sizes)
  apply_run(c, *runs[v.size])
  if v.smoke:
    apply_smoke(c)
  return c

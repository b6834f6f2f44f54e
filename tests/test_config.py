"""Configs: variants parse, every knob is validated at start with a message naming the fix."""

import re

import pytest

from conftest import load_config
from lmssl import config as config_lib
from lmssl import model as model_lib
from lmssl import optimizer
from lmssl import sharding
from lmssl import validation


def _preset_sizes(name):
  import importlib
  return getattr(importlib.import_module(f"lmssl.configs.{name}"), "SIZES", config_lib.SIZES)


@pytest.mark.parametrize("name,size", [
    (name, size) for name in ("mlm_base", "clm_base", "llama_base", "modernbert_base")
    for size in _preset_sizes(name)])
def test_every_size_variant_is_valid(name, size):
  cfg = load_config(name, f"size={size}")
  row = _preset_sizes(name)[size]
  assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads,
          cfg.model.mlp_dim) == row[:4]
  assert cfg.model.num_kv_heads == (row[4] if len(row) > 4 else 0)
  validation.validate(cfg, batch_shards=8)


def test_llama_1b_and_modernbert_presets_are_shaped_as_named():
  llama = load_config("llama_base", "size=1b").model
  assert (llama.num_layers, llama.d_model, llama.num_heads, llama.num_kv_heads,
          llama.mlp_dim) == (16, 2048, 32, 8, 8192)
  assert (llama.norm, llama.norm_type, llama.ln_eps, llama.mlp, llama.use_bias,
          llama.position, llama.rope_theta, llama.tie_embeddings) == (
              "pre", "rmsnorm", 1e-5, "swiglu", False, "rope", 500_000.0, False)
  modern = load_config("modernbert_base", "size=base").model
  assert (modern.norm, modern.norm_type, modern.embed_norm, modern.mlp, modern.use_bias,
          modern.rope_theta, modern.local_rope_theta, modern.attention_window,
          modern.global_every) == ("pre", "layernorm", True, "geglu", False, 160_000.0,
                                   10_000.0, 128, 3)
  for name in ("llama_base", "modernbert_base"):  # the smoke runs keep their shape's features
    smoke = load_config(name, "smoke")
    validation.validate(smoke, batch_shards=8)
  assert load_config("llama_base", "smoke").model.num_kv_heads == 1


def test_base_sizes_are_bert_and_gpt2_shaped():
  bert_base = load_config("mlm_base", "size=base").model
  gpt2_medium = load_config("clm_base", "size=large").model
  assert (bert_base.num_layers, bert_base.d_model, bert_base.norm, bert_base.gelu) == (
      12, 768, "post", "erf")
  assert (gpt2_medium.num_layers, gpt2_medium.d_model, gpt2_medium.norm, gpt2_medium.gelu) == (
      24, 1024, "pre", "tanh")


@pytest.mark.parametrize("arg,message", [
    ("size=huge", "unknown model size 'huge'; known: ['tiny', 'mini', 'small', 'base', 'large']"),
    ("smoke,colour=red", "unknown config variant 'colour'"),
])
def test_bad_variants_name_the_known_ones(arg, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    load_config("mlm_base", arg)


@pytest.mark.parametrize("arg,smoke,lora", [
    ("smoke", True, False), ("smoke=False", False, False), ("smoke=false,lora=no", False, False),
    ("smoke=true,lora", True, True), ("lora=1", False, True), ("", False, False),
])
def test_boolean_variants_parse_as_booleans(arg, smoke, lora):
  v = config_lib.parse_arg(arg, lora=False, smoke=False, glue="")
  assert (v.smoke, v.lora, v.glue) == (smoke, lora, "")
  assert load_config("cls_finetune", arg).lora.rank == (8 if lora else 0)


def test_smoke_false_is_the_full_run():
  assert load_config("mlm_base", "smoke=False").to_dict() == load_config("mlm_base", "").to_dict()
  smoke = load_config("mlm_base", "smoke").to_dict()
  assert load_config("mlm_base", "smoke=True").to_dict() == smoke


@pytest.mark.parametrize("arg,message", [
    ("smoke=maybe", "config variant smoke='maybe' is not a boolean; write smoke (on), or "
     "smoke=true / smoke=false"),
    ("size", "config variant size needs a value; write size=VALUE"),
])
def test_variant_values_of_the_wrong_type_are_refused(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    load_config("mlm_base", arg)


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.train, "batch_size", 30),
     "train.batch_size=30 is not divisible by 8 data shards .* use a multiple of 8"),
    (lambda c: setattr(c.model, "norm", "sandwich"),
     r"model.norm='sandwich' is not known; use one of \['post', 'pre'\]"),
    (lambda c: setattr(c.data, "vocab_size", 4), "data.vocab_size=4 is too small"),
    (lambda c: setattr(c.data, "seq_len", 1024), "raise --config.model.max_len to at least 1024"),
    (lambda c: setattr(c.model, "num_heads", 3), "not divisible by model.num_heads=3"),
    (lambda c: setattr(c.train, "microbatches", 3), "split into train.microbatches=3"),
    (lambda c: (setattr(c, "objective", "clm"), setattr(c.train, "loss_chunks", 129)),
     r"train.loss_chunks=129 must be 0 \(all logits at once\) or a number of pieces of the "
     r"sequence, at most data.seq_len=128"),
    (lambda c: setattr(c.model, "remat", "some"),
     r"model.remat='some' is not known; use one of \['none', 'full', 'dots', 'dots_no_batch'\]"),
    (lambda c: setattr(c.train, "schedule", "constant"),
     r"train.schedule='constant' is not known; use one of \['linear', 'cosine'\]"),
    (lambda c: setattr(c.data, "mask_rate", 1.5), r"mask_rate=1.5, .* need 0 < mask_rate <= 1"),
    (lambda c: setattr(c.data, "random_token_frac", -0.1), "fractions non-negative"),
    (lambda c: setattr(c.model, "norm_type", "batchnorm"),
     r"model.norm_type='batchnorm' is not known; use one of \['layernorm', 'rmsnorm'\]"),
    (lambda c: setattr(c.model, "mlp", "relu"),
     r"model.mlp='relu' is not known; use one of \['gelu', 'swiglu', 'geglu'\]"),
    (lambda c: setattr(c.model, "rope_scaling", "yarn"),
     r"model.rope_scaling='yarn' is not known; use one of \['', 'linear', 'llama3'\]"),
    (lambda c: setattr(c.model, "num_kv_heads", 3),
     r"model.num_kv_heads=3 must be in \[0, model.num_heads=2\] \(0: one per query head\)"),
    (lambda c: setattr(c.model, "num_kv_heads", -1), r"model.num_kv_heads=-1 must be in \[0,"),
    (lambda c: (setattr(c.model, "num_heads", 4), setattr(c.model, "num_kv_heads", 3)),
     "model.num_heads=4 is not divisible by model.num_kv_heads=3; .* use a divisor of "
     "num_heads"),
    (lambda c: setattr(c.model, "qkv_bias", True),
     "with model.use_bias every projection has one already: set use_bias=False or "
     "qkv_bias=False"),
    (lambda c: setattr(c.model, "embed_norm", True),
     "a post-norm model .* always has one: leave embed_norm False"),
    (lambda c: setattr(c.model, "skip_first_attn_norm", True),
     "model.skip_first_attn_norm drops layer 0's attention norm .* it needs model.norm='pre' "
     "and model.embed_norm=True"),
    (lambda c: setattr(c.model, "global_every", 3),
     "model.global_every=3 picks the global layers among windowed ones, but "
     "model.attention_window=0 makes every layer global"),
    (lambda c: (setattr(c.model, "attention_window", 8), setattr(c.model, "global_every", 1)),
     "model.global_every=1 makes every layer global"),
    (lambda c: setattr(c.model, "attention_window", -8),
     "model.attention_window=-8 and model.global_every=0 must be 0 .off. or positive"),
    (lambda c: setattr(c.model, "attention_window", 1022),
     "model.attention_window=1022 has no effect within data.seq_len=128 or model.max_len=512: "
     "every bidirectional query already sees its whole row within it; use a window below "
     "1022, or 0 for global attention"),
    (lambda c: setattr(c.model, "rope_scaling", "llama3"),
     r"model.rope_scaling='llama3' set RoPE options, but model.position='learned'; set "
     r"--config.model.position=rope"),
    (lambda c: (setattr(c.model, "position", "rope"), setattr(c.model, "local_rope_theta", 1e4)),
     "model.local_rope_theta=10000.0 is the windowed layers' theta, and "
     "model.attention_window=0 leaves no layer windowed"),
    (lambda c: (setattr(c.model, "position", "rope"), setattr(c.model, "rope_theta", 0.0)),
     "model.rope_theta=0.0 must be above 0"),
    (lambda c: (setattr(c.model, "position", "rope"), setattr(c.model, "rope_scaling", "llama3"),
                setattr(c.model, "rope_low_freq_factor", 4.0)),
     r"llama3 RoPE scaling needs .* 0 < rope_low_freq_factor \(got 4.0\) < "
     r"rope_high_freq_factor \(got 4.0\)"),
    (lambda c: (setattr(c.lora, "rank", 4), setattr(c.task, "kind", "classification"),
                setattr(c.task, "train_source", "tsv:a"), setattr(c.task, "eval_source", "tsv:b"),
                setattr(c.model, "mlp", "swiglu"), setattr(c.lora, "targets", "wi")),
     r"lora.targets='wi' must name projections among \['query', 'key', 'value', 'out', "
     r"'wi_gate', 'wi_up', 'wo'\] \(model.mlp='swiglu'\)"),
])
def test_invalid_values_fail_with_the_fix(change, message):
  cfg = load_config("mlm_base", "size=tiny")
  change(cfg)
  with pytest.raises(ValueError, match=message):
    validation.validate(cfg, batch_shards=8)


_LR = ("must be a finite number above 0 (the peak learning rate that warmup reaches); use "
       "e.g. 1e-4")
_SHORT = "is too short: {} needs at least {} positions; use a longer seq_len (128 is typical)"


@pytest.mark.parametrize("name,key,value,message", [
    # Settings that used to train (to exit 0) or fail deep inside, now refused at start.
    ("mlm_base", "train.lr", -1.0, f"train.lr=-1.0 {_LR}"),
    ("mlm_base", "train.lr", 0.0, f"train.lr=0.0 {_LR}"),
    ("clm_base", "train.lr", float("nan"), f"train.lr=nan {_LR}"),
    ("clm_base", "train.lr", float("inf"), f"train.lr=inf {_LR}"),
    ("mlm_base", "train.batch_size", 0, "train.batch_size=0 must be at least 1 (sequences per "
     "step, over all devices); use a multiple of 8"),
    ("mlm_base", "train.batch_size", -8, "train.batch_size=-8 must be at least 1 (sequences per "
     "step, over all devices); use a multiple of 8"),
    ("clm_base", "eval.batch_size", 0, "eval.batch_size=0 must be at least 1 (sequences per "
     "step, over all devices); use a multiple of 8"),
    ("mlm_base", "train.microbatches", 0, "train.microbatches=0 must be at least 1 (1: no "
     "gradient accumulation)"),
    ("mlm_base", "data.shard_bytes", 0, "data.shard_bytes=0 must be at least 1 (the size of the "
     "pieces a big input file is read in; default 67108864, 64 MiB)"),
    ("mlm_base", "data.seq_len", 0, "data.seq_len=0 " + _SHORT.format(
        "a masked-LM row ([CLS] token [SEP])", 3)),
    ("mlm_base", "data.seq_len", 2, "data.seq_len=2 " + _SHORT.format(
        "a masked-LM row ([CLS] token [SEP])", 3)),
    ("clm_base", "data.seq_len", 1, "data.seq_len=1 " + _SHORT.format(
        "a causal-LM row (a token and its next)", 2)),
    ("clm_base", "data.seq_len", -5, "data.seq_len=-5 " + _SHORT.format(
        "a causal-LM row (a token and its next)", 2)),
    ("mlm_base", "model.dtype", "float12",
     "model.dtype='float12' is not known; use one of ['float32', 'bfloat16', 'float16']"),
    ("clm_base", "model.param_dtype", "int8",
     "model.param_dtype='int8' is not known; use one of ['float32', 'bfloat16', 'float16']"),
    ("llama_base", "model.attention_window", 512,
     "model.attention_window=512 has no effect within data.seq_len=256 or model.max_len=512: "
     "every causal query already sees its whole row within it; use a window below 512, or 0 "
     "for global attention"),
])
def test_settings_that_cannot_train_are_refused_with_the_rule(name, key, value, message):
  cfg = load_config(name, "size=tiny")
  section, field = key.split(".")
  cfg[section][field] = value
  with pytest.raises(ValueError) as e:
    validation.validate(cfg, batch_shards=8)
  assert str(e.value) == message


def test_sentence_pairs_need_five_positions_and_the_shortest_rows_are_accepted():
  pair = load_config("mlm_base", "size=tiny")
  pair.data.sentence_pair, pair.data.seq_len, pair.data.max_predictions = "nsp", 4, 1
  with pytest.raises(ValueError) as e:
    validation.validate(pair, batch_shards=8)
  assert str(e.value) == "data.seq_len=4 " + _SHORT.format(
      "a sentence pair ([CLS] A [SEP] B [SEP])", 5)
  pair.data.seq_len = 5
  validation.validate(pair, batch_shards=8)
  mlm = load_config("mlm_base", "size=tiny")
  mlm.data.seq_len, mlm.data.max_predictions = 3, 1
  validation.validate(mlm, batch_shards=8)
  clm = load_config("clm_base", "size=tiny")
  clm.data.seq_len = 2  # max_predictions (an MLM setting) does not bound a CLM row
  validation.validate(clm, batch_shards=8)
  for dtype in config_lib.DTYPES:
    clm.model.dtype = clm.model.param_dtype = dtype
    validation.validate(clm, batch_shards=8)


def test_allowed_values_are_the_tables_the_code_dispatches_on(monkeypatch):
  cfg = load_config("clm_base", "size=tiny")
  cfg.train.schedule, cfg.model.remat = "constant", "offload"
  with pytest.raises(ValueError, match="model.remat='offload' is not known"):
    validation.validate(cfg, batch_shards=8)
  monkeypatch.setitem(model_lib.REMAT_POLICIES, "offload", None)
  with pytest.raises(ValueError, match="train.schedule='constant' is not known"):
    validation.validate(cfg, batch_shards=8)
  monkeypatch.setitem(optimizer.SCHEDULES, "constant", lambda t, steps: lambda step: t.lr)
  validation.validate(cfg, batch_shards=8)  # known once the code can run them


def test_mask_rate_one_is_valid_as_the_pipeline_takes_it():
  cfg = load_config("mlm_base", "size=tiny")
  cfg.data.mask_rate = 1.0
  validation.validate(cfg, batch_shards=8)  # tests/test_data.py masks every candidate with it


def test_mesh_takes_the_rest_and_refuses_what_does_not_divide():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)

"""Llama, Mistral, Qwen2 and ModernBERT, proven against transformers: random-init local models
with tokenizers trained here (sentencepiece-style and tiktoken-style tokenizer.json files) give
lmssl the same logits, come back tensor for tensor, generate the same greedy tokens, and warm
start a run whose export transformers loads and computes alike."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import hf_models
from conftest import load_config
from lmssl import config as config_lib
from lmssl import inference
from lmssl import sample
from lmssl import train
from lmssl.hf import convert
from lmssl.hf import tokenizer as tokenizer_lib
from lmssl.hf import weights

TOLERANCE = 1e-4
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
             max_position_embeddings=64)


def _llama(vocab, ids):
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, rope_theta=500_000.0,
      rms_norm_eps=1e-5, **ids, **SHAPE))


def _llama3(vocab, ids):  # multi-query, Llama 3.1 RoPE scaling, biases, tied output
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=1, attention_bias=True,
      mlp_bias=True, tie_word_embeddings=True, rope_scaling=dict(
          rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=16), rope_theta=500_000.0, **ids, **SHAPE))


def _mistral(vocab, ids):  # a 6-token window, short enough that every text crosses it
  return transformers.MistralForCausalLM(transformers.MistralConfig(
      vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, sliding_window=6, **ids,
      **SHAPE))


def _qwen2(vocab, ids):
  return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, **ids, **SHAPE))


def _modernbert(vocab, ids):  # layers 0 and 3 global, 1 and 2 see 4 tokens either side
  return transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
      vocab_size=vocab, num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=8,
      global_rope_theta=160_000.0, local_rope_theta=10_000.0, **ids, **SHAPE))


# name: (model, tokenizer, its special tokens by config.json key)
MODELS = {
    "llama": (_llama, hf_models.sentencepiece_bpe, {"bos": "<s>", "eos": "</s>"}),
    "llama3": (_llama3, hf_models.tiktoken_llama3,
               {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}),
    "mistral": (_mistral, hf_models.sentencepiece_bpe, {"bos": "<s>", "eos": "</s>"}),
    "qwen2": (_qwen2, hf_models.tiktoken_qwen2, {"eos": "<|endoftext|>"}),
    "modernbert": (_modernbert, hf_models.modernbert_bpe,
                   {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "bos": "[CLS]",
                    "eos": "[SEP]"}),
}
DECODERS = ("llama", "llama3", "mistral", "qwen2")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_families")
  dirs = {}
  for seed, (name, (build, tokenizer, specials)) in enumerate(MODELS.items()):
    directory = root / name
    directory.mkdir()
    vocab = tokenizer(directory)
    with open(directory / "tokenizer.json", encoding="utf-8") as f:
      pieces = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    ids = {f"{k}_token_id": pieces[v] for k, v in specials.items()}
    hf_models.randomize(build(vocab, ids), seed).save_pretrained(directory)
    dirs[name] = str(directory)
  return dirs


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(hf_dirs, name):
  report = convert.check(hf_dirs[name], convert.SAMPLE_TEXTS)
  head = "mlm" if name == "modernbert" else "clm"
  diffs = {k: v for k, v in report.items() if k.startswith("max_abs_diff_")}
  assert set(diffs) == {"max_abs_diff_hidden", f"max_abs_diff_{head}_logits"}
  assert max(diffs.values()) < TOLERANCE, report
  assert report["inputs"] == "tokenizer" and report["tokenizer_ids_equal"] is True
  assert report["texts"] == 3 and report["tokens"] > 20


def test_converted_configs_carry_each_family_s_options(hf_dirs):
  m = {name: weights.source_config(hf_dirs[name]).model for name in MODELS}
  assert (m["llama"].num_kv_heads, m["llama"].rope_theta, m["llama"].tie_embeddings,
          m["llama"].use_bias) == (2, 500_000.0, False, False)
  assert (m["llama3"].num_kv_heads, m["llama3"].rope_scaling, m["llama3"].rope_original_max_len,
          m["llama3"].use_bias, m["llama3"].tie_embeddings) == (1, "llama3", 16, True, True)
  assert (m["mistral"].attention_window, m["mistral"].global_every) == (6, 0)
  assert (m["qwen2"].qkv_bias, m["qwen2"].use_bias) == (True, False)
  mb = m["modernbert"]
  assert (mb.attention_window, mb.global_every, mb.rope_theta, mb.local_rope_theta,
          mb.skip_first_attn_norm, mb.mlp, mb.use_bias) == (8, 3, 160_000.0, 10_000.0, True,
                                                            "geglu", False)


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_reproduces_every_tensor(hf_dirs, tmp_path, name):
  convert.from_hf(hf_dirs[name], str(tmp_path / "run"))
  out = convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"))
  with open(os.path.join(hf_dirs[name], "config.json"), encoding="utf-8") as f:
    original_config = json.load(f)
  assert out["architecture"] == original_config["architectures"][0]
  cls = getattr(transformers, out["architecture"])
  back, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  original_model = cls.from_pretrained(hf_dirs[name])
  original = original_model.state_dict()
  exported = back.state_dict()
  assert original.keys() == exported.keys()
  for key in original:
    assert torch.equal(original[key], exported[key]), key
  for key in ("num_key_value_heads", "sliding_window", "rope_parameters", "layer_types",
              "tie_word_embeddings", "rms_norm_eps", "norm_eps", "local_attention",
              "attention_bias", "mlp_bias", "vocab_size", "bos_token_id", "eos_token_id",
              "pad_token_id", "cls_token_id", "sep_token_id"):
    theirs = getattr(original_model.config, key, None)
    if theirs is not None:
      assert getattr(back.config, key, None) == theirs, key
  assert sorted(out["tokenizer"]) == sorted(os.listdir(tmp_path / "run" / "tokenizer"))


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_matches_transformers(hf_dirs, tmp_path, name):
  convert.from_hf(hf_dirs[name], str(tmp_path / "run"))
  cfg, params = inference.load_run(str(tmp_path / "run"))
  tok = tokenizer_lib.load(config_lib.tokenizer_path(cfg, str(tmp_path / "run")))
  prompts = [tok.encode(t) for t in ("The old castle", "Her second album was")]
  ours = sample.generate(cfg.model, params, prompts, max_new_tokens=12, eos_id=-1)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
  for prompt, continuation in zip(prompts, ours):
    ids = torch.tensor([prompt])
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert continuation == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "modernbert"])
def test_warm_start_trains_and_exports(hf_dirs, tmp_path, name):
  """Continued pretraining from a HF folder: the run adopts its architecture and tokenizer,
  trains, and its export computes what lmssl computes."""
  cfg = load_config("mlm_base" if name == "modernbert" else "clm_base", "smoke")
  cfg.init.params_from = f"hf:{hf_dirs[name]}"
  cfg.data.cache_dir = str(tmp_path / "cache")
  run = str(tmp_path / "run")
  final = train.train_and_evaluate(cfg, run)
  assert final["step"] == cfg.train.steps and np.isfinite(final["eval_loss"])
  saved = config_lib.load_run_config(run)
  assert saved.data.tokenizer == hf_dirs[name]
  out = convert.to_hf(run, str(tmp_path / "back"))
  report = convert.check(str(tmp_path / "back"), convert.SAMPLE_TEXTS)
  assert max(v for k, v in report.items() if k.startswith("max_abs_diff_")) < TOLERANCE
  cls = getattr(transformers, out["architecture"])
  start, tuned = (cls.from_pretrained(d).state_dict() for d in (hf_dirs[name],
                                                                 tmp_path / "back"))
  moved = [k for k in start if not torch.equal(start[k], tuned[k])]
  assert len(moved) > len(start) // 2, moved


def test_bare_untied_decoder_exports_bare(hf_dirs, tmp_path):
  """A LlamaModel folder (no lm_head, untied) comes back as LlamaModel, not as a causal LM
  whose output layer transformers would have to invent."""
  bare = tmp_path / "bare"
  transformers.LlamaForCausalLM.from_pretrained(hf_dirs["llama"]).model.save_pretrained(bare)
  convert.from_hf(str(bare), str(tmp_path / "run"))
  out = convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"))
  assert out["architecture"] == "LlamaModel"
  back, info = transformers.LlamaModel.from_pretrained(str(tmp_path / "back"),
                                                       output_loading_info=True)
  assert not any(info.values()), info
  original = transformers.LlamaModel.from_pretrained(bare).state_dict()
  assert all(torch.equal(original[k], back.state_dict()[k]) for k in original)

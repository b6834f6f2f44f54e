"""HuggingFace interop, proven by parity: randomly initialized local transformers models (BERT
post-LN with exact GELU, a MiniLM-shaped BERT, GPT-2 pre-LN with tanh GELU and Conv1D weights)
converted to lmssl give the same hidden states and logits, and come back tensor for tensor."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import hf_models
from conftest import load_config
from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import errors
from lmssl import inference
from lmssl import sample
from lmssl import start
from lmssl import train
from lmssl.hf import convert
from lmssl.hf import folder
from lmssl.hf import tokenizer as tokenizer_lib
from lmssl.hf import weights

TOLERANCE = 1e-4
TEXTS = hf_models.TEXTS


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


_randomize, _wordpiece, _byte_bpe = hf_models.randomize, hf_models.wordpiece, hf_models.byte_bpe


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{name: folder} of saved random-init HF models, with their tokenizer files."""
  root = tmp_path_factory.mktemp("hf")
  dirs = {}
  bert = root / "bert"
  bert.mkdir()
  vocab = _wordpiece(bert)
  _randomize(transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=96, max_position_embeddings=64, layer_norm_eps=1e-12,
      hidden_act="gelu")), 0).save_pretrained(bert)
  dirs["bert"] = bert
  minilm = root / "minilm"  # MiniLM-shaped: narrow, deeper, head dim 16, MLM head only
  _randomize(transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=vocab, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
      intermediate_size=192, max_position_embeddings=64)), 1).save_pretrained(minilm)
  dirs["minilm"] = minilm
  gpt2 = root / "gpt2"
  gpt2.mkdir()
  vocab = _byte_bpe(gpt2)
  _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
      eos_token_id=0)), 2).save_pretrained(gpt2)
  dirs["gpt2"] = gpt2
  untied = root / "gpt2_untied"  # its own output projection, no tokenizer files
  _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=32, n_inner=80,
      tie_word_embeddings=False, activation_function="gelu")), 3).save_pretrained(untied)
  dirs["gpt2_untied"] = untied
  return {k: str(v) for k, v in dirs.items()}


@pytest.mark.parametrize("name,heads", [("bert", ("mlm", "pair")), ("minilm", ("mlm",)),
                                        ("gpt2", ("clm",)), ("gpt2_untied", ("clm",))])
def test_hidden_states_and_logits_match_transformers(hf_dirs, name, heads):
  report = convert.check(hf_dirs[name], convert.SAMPLE_TEXTS)
  diffs = {k: v for k, v in report.items() if k.startswith("max_abs_diff_")}
  assert set(diffs) == {"max_abs_diff_hidden"} | {f"max_abs_diff_{h}_logits" for h in heads}
  assert max(diffs.values()) < TOLERANCE, report
  # Texts of different lengths: padded rows are compared on their real tokens.
  assert report["texts"] == 3 and report["tokens"] > 20
  if name in ("bert", "gpt2"):  # the others carry no tokenizer files: fixed random ids
    assert report["inputs"] == "tokenizer" and report["tokenizer_ids_equal"] is True


@pytest.mark.parametrize("name", ["bert", "minilm", "gpt2", "gpt2_untied"])
def test_round_trip_reproduces_every_tensor(hf_dirs, tmp_path, name):
  summary = convert.from_hf(hf_dirs[name], str(tmp_path / "run"))
  assert summary["objective"] == ("clm" if name.startswith("gpt2") else "mlm")
  out = convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"))
  original_config = _json(os.path.join(hf_dirs[name], "config.json"))
  assert out["architecture"] == original_config["architectures"][0]
  cls = getattr(transformers, out["architecture"])
  back, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  original = cls.from_pretrained(hf_dirs[name]).state_dict()
  exported = back.state_dict()
  assert original.keys() == exported.keys()
  for key in original:
    assert torch.equal(original[key], exported[key]), key
  exported_config = _json(tmp_path / "back" / "config.json")
  for key in ("hidden_act", "activation_function", "layer_norm_eps", "layer_norm_epsilon",
              "intermediate_size", "n_inner", "type_vocab_size", "vocab_size",
              "max_position_embeddings", "n_positions", "tie_word_embeddings"):
    if original_config.get(key) is not None:
      assert exported_config[key] == original_config[key], key
  if name in ("bert", "gpt2"):
    assert sorted(out["tokenizer"]) == sorted(folder.tokenizer_files(hf_dirs[name]))


def test_greedy_generation_matches_transformers(hf_dirs, tmp_path):
  convert.from_hf(hf_dirs["gpt2"], str(tmp_path / "run"))
  cfg, params = inference.load_run(str(tmp_path / "run"))
  tok = tokenizer_lib.load(config_lib.tokenizer_path(cfg, str(tmp_path / "run")))
  prompts = [[tok.bos_id] + tok.encode(t) for t in ("The old castle", "Her second album was")]
  ours = sample.generate(cfg.model, params, prompts, max_new_tokens=12, eos_id=-1)
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_dirs["gpt2"]).eval()
  for prompt, continuation in zip(prompts, ours):
    ids = torch.tensor([prompt])  # the mask is explicit: HF would mask bos (= pad) otherwise
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = theirs[0, len(prompt):].tolist()
    assert continuation == theirs


def test_fine_tune_from_hf_then_export_classifier(hf_dirs, tmp_path):
  rows = ["sentence\tlabel"] + [f"{t}\t{'late' if any(y in t for y in ('1970s', '2004')) else 'early'}"
                                for t in TEXTS]
  (tmp_path / "train.tsv").write_text("\n".join(rows[:300]) + "\n")
  (tmp_path / "dev.tsv").write_text("\n".join(rows[:1] + rows[300:]) + "\n")
  cfg = load_config("cls_finetune", "smoke")
  cfg.init.params_from = f"hf:{hf_dirs['bert']}"
  cfg.task.train_source = f"tsv:{tmp_path / 'train.tsv'}"
  cfg.task.eval_source = f"tsv:{tmp_path / 'dev.tsv'}"
  cfg.data.seq_len = 32
  cfg.train.lr = 1e-3
  run = str(tmp_path / "run")
  final = train.train_and_evaluate(cfg, run)
  assert final["step"] == cfg.train.steps
  saved = config_lib.load_run_config(run)
  assert (saved.model.d_model, saved.model.mlp_dim, saved.task.labels) == (64, 96, "early,late")

  out = convert.to_hf(run, str(tmp_path / "back"))
  assert out["architecture"] == "BertForSequenceClassification"
  back, info = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / "back"), output_loading_info=True)
  assert not any(info.values()), info
  assert back.config.id2label == {0: "early", 1: "late"}
  report = convert.check(str(tmp_path / "back"), convert.SAMPLE_TEXTS)
  assert report["max_abs_diff_hidden"] < TOLERANCE
  assert report["max_abs_diff_classification_logits"] < TOLERANCE
  # Training moved the imported backbone, and the export carries the moved weights.
  start = transformers.BertModel.from_pretrained(hf_dirs["bert"]).state_dict()
  tuned = back.bert.state_dict()
  assert not torch.equal(start["encoder.layer.0.attention.self.query.weight"],
                         tuned["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("name,objective", [("bert", "mlm"), ("gpt2", "clm"),
                                            ("bert.bin", "mlm")])
def test_hf_warm_start_resolves_the_config_reading_no_tensor(hf_dirs, tmp_path, monkeypatch,
                                                             name, objective):
  """A warm start adopts the folder's architecture from config.json and the tensor names; the
  weights are read only once the run is valid (phase 4)."""
  if name == "bert.bin":  # the same model as a pickled pytorch_model.bin
    pickled = shutil.copytree(hf_dirs["bert"], tmp_path / "bert")
    tensors = {n: torch.from_numpy(t) for n, t in folder.read_dir(pickled)[1].items()}
    torch.save(tensors, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    hf_dirs = {name: str(pickled)}
  def refuse(path):
    raise AssertionError(f"{path} was read while resolving the config")
  monkeypatch.setattr(folder, "_read_shard", refuse)
  cfg = load_config("cls_finetune", "smoke")
  cfg.init.params_from = f"hf:{hf_dirs[name]}"
  resolved, source = start.resolve(cfg)
  assert source == cfg.init.params_from and cfg.model.d_model != 64
  assert (resolved.objective, resolved.model.d_model, resolved.data.tokenizer) == (
      objective, 64, hf_dirs[name])
  monkeypatch.undo()  # the config from names alone is the one the full conversion gives
  assert weights.source_config(hf_dirs[name]).to_dict() == weights.load(hf_dirs[name])[0].to_dict()


def test_unknown_tensors_and_models_are_named_and_nothing_is_written(hf_dirs, tmp_path):
  import safetensors.numpy
  broken = tmp_path / "broken"
  broken.mkdir()
  tensors = safetensors.numpy.load_file(os.path.join(hf_dirs["minilm"], "model.safetensors"))
  tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(tensors, str(broken / "model.safetensors"),
                              metadata={"format": "pt"})
  config = _json(os.path.join(hf_dirs["minilm"], "config.json"))
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.UserError, match=r"attention\.self\.rotary\.weight"):
    convert.from_hf(str(broken), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary left behind

  (broken / "config.json").write_text(json.dumps(dict(config, model_type="roberta")))
  with pytest.raises(errors.UserError, match="model_type 'roberta' is not supported"):
    weights.load(str(broken))

  del tensors["bert.encoder.layer.0.attention.self.rotary.weight"]
  del tensors["bert.encoder.layer.2.output.dense.weight"]
  safetensors.numpy.save_file(tensors, str(broken / "model.safetensors"),
                              metadata={"format": "pt"})
  (broken / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.UserError, match=r"output\.dense\.weight: layers \[2\] are missing"):
    weights.load(str(broken))


def test_converted_run_is_not_resumed_and_outputs_are_not_overwritten(hf_dirs, tmp_path):
  run = str(tmp_path / "run")
  convert.from_hf(hf_dirs["minilm"], run)
  with pytest.raises(errors.UserError, match="already exists and is not empty"):
    convert.from_hf(hf_dirs["minilm"], run)
  with pytest.raises(errors.UserError, match="parameters only"):
    checkpoint.restore(checkpoint.manager(run, load_config("mlm_base").checkpoint), object())
  cfg = config_lib.load_run_config(run)
  cfg.model.position = "rope"
  (tmp_path / "run" / "config.json").write_text(cfg.to_json())
  with pytest.raises(errors.UserError, match="rope"):
    convert.to_hf(run, str(tmp_path / "back"))
  assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("name,options,model_type", [
    ("llama_base", {}, "llama"),
    ("llama_base", {"qkv_bias": True}, "qwen2"),
    ("llama_base", {"attention_window": 16}, "mistral"),
    ("modernbert_base", {}, "modernbert"),
    ("clm_base", {}, "gpt2"),
    ("mlm_base", {}, "bert"),
])
def test_each_preset_exports_as_its_family(name, options, model_type):
  from lmssl.hf import families
  c = load_config(name)
  c.model.update(options)
  assert families.check_exportable(c).model_type == model_type


def test_a_model_of_no_family_is_refused_naming_the_closest():
  from lmssl.hf import families
  gqa = load_config("clm_base")
  gqa.model.num_kv_heads = 1
  with pytest.raises(errors.UserError) as e:
    families.check_exportable(gqa)
  assert str(e.value).startswith("this model matches no HuggingFace family lmssl exports (bert, "
                                 "gpt2, llama, mistral, modernbert, qwen2); the closest: as "
                                 "gpt2, model.num_kv_heads=1 do not fit")


@pytest.mark.parametrize("config_name,architecture", [("mlm_base", "BertForMaskedLM"),
                                                      ("clm_base", "GPT2LMHeadModel")])
def test_lmssl_run_exports_with_its_tokenizer(tokenizer_path, paragraphs, tmp_path, config_name,
                                              architecture):
  """A run lmssl trained (here: its config and random parameters) loads in transformers,
  computes the same outputs, and its sentencepiece tokenizer becomes a transformers one with
  the same ids."""
  cfg = load_config(config_name)
  cfg.data.tokenizer = tokenizer_path
  cfg.model.vocab_size = tokenizer_lib.load(tokenizer_path).vocab_size
  cfg.model.max_len = 128
  shapes = weights.lmssl_shapes(cfg, (cfg.objective,), pooler=False)
  rng = np.random.default_rng(0)
  params = {}
  for path, shape in shapes.items():
    weights._set(params, path, (rng.normal(size=shape) * 0.1 + path.endswith("scale")).astype(
        np.float32))
  run = tmp_path / "run"
  mngr = checkpoint.manager(str(run), cfg.checkpoint)
  checkpoint.save(mngr, 5, {"params": params}, {"seed": 0})
  mngr.wait_until_finished()
  (run / "config.json").write_text(cfg.to_json())

  out = convert.to_hf(str(run), str(tmp_path / "hf"))
  assert out["architecture"] == architecture and "tokenizer.json" in out["tokenizer"]
  _, info = getattr(transformers, architecture).from_pretrained(str(tmp_path / "hf"),
                                                               output_loading_info=True)
  assert not any(info.values()), info
  report = convert.check(str(tmp_path / "hf"), paragraphs[:3])
  diffs = [v for k, v in report.items() if k.startswith("max_abs_diff_")]
  assert len(diffs) == 2 and max(diffs) < TOLERANCE, report
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ours = tokenizer_lib.load(tokenizer_path)
  for text in paragraphs[:300]:
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
  assert (theirs.pad_token_id, theirs.cls_token_id, theirs.sep_token_id,
          theirs.mask_token_id) == (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id)

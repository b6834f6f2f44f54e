"""From a pretrained checkpoint to a useful model: warm start on another mesh, LoRA, a real
fine-tune that learns, fill-mask, sentence-pair pretraining, eval and sample."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import errors
from lmssl import evaluate
from lmssl import heads
from lmssl import inference
from lmssl import sample
from lmssl import sharding
from lmssl import start
from lmssl import steps
from lmssl import train
from lmssl.data import derive
from lmssl.data import prepare
from lmssl.data import tokenizer as tok


def _pretrain_config(tokenizer_path, wikitext_dir, cache_dir, objective="mlm", steps_=150):
  cfg = load_config("mlm_base" if objective == "mlm" else "clm_base", "smoke")
  cfg.data.source = f"text:{wikitext_dir}/valid.txt"
  cfg.data.tokenizer, cfg.data.cache_dir = tokenizer_path, cache_dir
  cfg.train.steps, cfg.train.batch_size, cfg.train.lr = steps_, 16, 3e-3
  cfg.train.warmup_steps = 10
  cfg.eval.every_steps = cfg.checkpoint.every_steps = steps_
  return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_path, wikitext_dir):
  """An MLM trained for 150 steps on WikiText-2 validation text (mesh: 8-way data)."""
  root = tmp_path_factory.mktemp("finetune")
  workdir = str(root / "pre")
  train.train_and_evaluate(_pretrain_config(tokenizer_path, wikitext_dir, str(root / "cache")),
                           workdir)
  return workdir


@pytest.fixture(scope="module")
def order_task(tmp_path_factory, wikitext_dir):
  """Original vs reversed word order, derived from WikiText-2 test text (train/dev by document)."""
  out = str(tmp_path_factory.mktemp("order"))
  return derive.write("order", f"text:{wikitext_dir}/test.txt", out, max_train=6000, max_dev=400)


def _finetune_config(pretrained, task, arg="smoke", **overrides):
  cfg = load_config("cls_finetune", arg)
  cfg.init.params_from = pretrained
  cfg.task.train_source, cfg.task.eval_source = task["train"], task["dev"]
  for key, value in overrides.items():
    section, field = key.split("__")
    setattr(cfg[section], field, value)
  return cfg


def _leaves(params, under="transformer"):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if jax.tree_util.keystr(p).startswith(f"['{under}']")}


def test_warm_start_on_another_mesh_restores_backbone_and_inits_heads(pretrained):
  _, source = inference.load_run(pretrained)
  cfg = load_config("cls_finetune", "smoke")
  cfg.init.params_from = pretrained
  cfg.task.labels = "original,shuffled"
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg, init = start.resolve(cfg)  # adopts the source's architecture and tokenizer
  assert cfg.model.d_model == 64 and cfg.data.tokenizer.endswith("wiki.model")
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    fresh, _ = steps.create_state(cfg, mesh)
    fresh_heads = _leaves(fresh.params, "task_head")
    state = start.warm_start(fresh, init)
  want, got = _leaves(source), _leaves(state.params)
  assert got.keys() == want.keys() and len(got) > 10
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for key, value in _leaves(state.params, "task_head").items():
    np.testing.assert_array_equal(value, fresh_heads[key])
  kernel = state.params["transformer"]["layers"]["mlp"]["wi"]["kernel"]
  assert kernel.addressable_shards[0].data.size * 4 == kernel.size  # fsdp x tensor split
  assert int(state.step) == 0


def test_checkpoint_of_another_shape_fails_naming_parameters(pretrained):
  cfg = config_lib.load_run_config(pretrained)
  cfg.model.mlp_dim = 96
  mesh = inference.inference_mesh()
  with pytest.raises(errors.UserError, match=r"shape differs: .*\['mlp'\]\['wi'\]\['kernel'\] "
                     r"\(2, 64, 128\) in the checkpoint vs \(2, 64, 96\)"):
    checkpoint.load_params(pretrained, steps.abstract_params(cfg, mesh), lambda key: False)
  with pytest.raises(errors.UserError, match="holds no checkpoint"):
    checkpoint.load_params(os.path.dirname(pretrained), None, lambda key: False)


def test_lora_freezes_backbone_bitwise_and_merged_adapters_match(pretrained, order_task,
                                                                 tmp_path):
  cfg = _finetune_config(pretrained, order_task, "smoke,lora", lora__rank=4,
                         lora__targets="query,value,out,wi")
  final = train.train_and_evaluate(cfg, str(tmp_path))
  _, source = inference.load_run(pretrained)
  run_cfg, tuned = inference.load_run(str(tmp_path))
  backbone = {k: v for k, v in _leaves(tuned).items() if "lora_" not in k}
  for key, value in _leaves(source).items():
    np.testing.assert_array_equal(backbone[key], value, err_msg=key)
  adapters = {k: v for k, v in _leaves(tuned).items() if "lora_b" in k}
  assert len(adapters) == 4 and all(np.abs(v).max() > 0 for v in adapters.values())
  # Trainable: adapters, pooler and head; counted here from the shapes independently.
  d, f, r, n = 64, 128, 4, 2
  adapter_size = n * r * ((d + d) * 2 + (d + d) + (d + f))
  heads_size = d * d + d + d * 2 + 2
  assert final["trainable_params"] == adapter_size + heads_size

  merged_cfg, merged = inference.merged(run_cfg, tuned)
  assert not any("lora_" in k for k in _leaves(merged))
  batch = steps.example_batch(run_cfg, 4)
  rng = np.random.default_rng(0)
  batch["input_ids"] = rng.integers(5, run_cfg.model.vocab_size, batch["input_ids"].shape)
  batch["segment_ids"][:] = 1
  batch["positions"][:] = np.arange(batch["positions"].shape[1])
  unmerged_out = heads.build_model(run_cfg).apply({"params": tuned}, batch)
  merged_out = heads.build_model(merged_cfg).apply({"params": merged}, batch)
  np.testing.assert_allclose(merged_out["classification"], unmerged_out["classification"],
                             atol=1e-5)
  assert np.abs(np.asarray(unmerged_out["classification"])).max() > 1e-3


def test_finetune_on_real_text_beats_majority_class(pretrained, order_task, tmp_path):
  cfg = _finetune_config(pretrained, order_task, "", train__steps=300, train__batch_size=32,
                         train__lr=1e-3, train__warmup_steps=30, eval__every_steps=300,
                         checkpoint__every_steps=300, train__log_every=100)
  final = train.train_and_evaluate(cfg, str(tmp_path))
  with open(order_task["dev"][4:], encoding="utf-8") as f:
    labels = [line.rstrip("\n").split("\t")[1] for line in f.readlines()[1:]]
  majority = max(labels.count("original"), labels.count("reversed")) / len(labels)
  assert final["eval_accuracy"] > majority + 0.15, (final, majority)
  assert final["best"]["metric"] == "eval_accuracy"
  assert final["best"]["value"] >= final["eval_accuracy"]
  evals = evaluate.evaluate_run(str(tmp_path), best=True)
  assert evals["eval_accuracy"] == pytest.approx(final["best"]["value"])


def test_fill_mask_of_trained_model_ranks_true_token_above_chance(pretrained, wikitext_dir):
  cfg, params = inference.load_run(pretrained)
  tokenizer = inference.tokenizer(cfg, pretrained)
  text = (wikitext_dir / "test.txt").read_text(encoding="utf-8")
  sentences = [s for s in text.split(" . ") if 10 < len(s.split()) < 30][:40]
  rng = np.random.default_rng(0)
  ranks = []
  for sentence in sentences:
    ids = [tokenizer.cls_id] + tokenizer.encode(sentence)[:60] + [tokenizer.sep_id]
    at = int(rng.integers(1, len(ids) - 1))
    true_id, ids[at] = ids[at], tokenizer.mask_id
    found = sample.fill_mask(cfg.model, params, ids, mask_id=tokenizer.mask_id,
                             top_k=cfg.model.vocab_size)[0]
    ranks.append([i for i, _ in found].index(true_id))
  # Chance puts the true token at rank ~V/2 = 500; unigram statistics alone do far better.
  assert np.median(ranks) < cfg.model.vocab_size / 10, ranks


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_sentence_pair_objective_trains_with_mlm(kind, tokenizer_path, wikitext_dir, tmp_path):
  cfg = _pretrain_config(tokenizer_path, wikitext_dir, str(tmp_path / "cache"), steps_=4)
  cfg.data.sentence_pair = kind
  final = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  for key in ("mlm_loss", "pair_loss", "eval_pair_accuracy", "eval_mlm_accuracy"):
    assert key in final
  assert final["loss"] == pytest.approx(final["mlm_loss"] + final["pair_loss"], rel=1e-5)
  assert 0.4 < final["pair_loss"] < 1.2  # ~ln 2 at the start: the head sees the labels


def test_eval_reports_perplexity_and_bits_per_byte(tokenizer_path, wikitext_dir, tmp_path):
  cfg = _pretrain_config(tokenizer_path, wikitext_dir, str(tmp_path / "cache"), "clm", 4)
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  evals = evaluate.evaluate_run(str(tmp_path / "run"))
  assert evals["eval_perplexity"] == pytest.approx(math.exp(evals["eval_loss"]), rel=1e-5)
  # Recompute bits per byte from the validation rows: every token predicted within its
  # document, and the bytes of the predicted pieces.
  _, prepared_dir = prepare.prepare(cfg.data, tok.Tokenizer.load(tokenizer_path),
                                   str(tmp_path / "run"))
  rows = prepare.load_prepared(prepared_dir, "validation").to_arrays()
  segments = np.asarray(rows["segment_ids"])
  targets = np.asarray(rows["tokens"])[:, 1:]
  counted = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
  piece_bytes = tok.Tokenizer.load(tokenizer_path).piece_bytes()
  nats = evals["eval_loss"] * counted.sum()
  want = nats / math.log(2) / piece_bytes[targets][counted].sum()
  assert evals["eval_bits_per_byte"] == pytest.approx(want, rel=1e-4)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lmssl.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": str(REPO)})


def test_sample_cli_continues_prompts_and_fills_masks(pretrained, tokenizer_path, wikitext_dir,
                                                      tmp_path):
  cfg = _pretrain_config(tokenizer_path, wikitext_dir, str(tmp_path / "cache"), "clm", 2)
  train.train_and_evaluate(cfg, str(tmp_path / "clm"))
  out = _cli("sample", "--workdir", str(tmp_path / "clm"), "--prompt", "The city",
             "--prompt", "In 1990 the", "--max_new_tokens", "6", "--temperature", "0.8",
             "--top_k", "20")
  assert out.returncode == 0, out.stderr
  lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [x["prompt"] for x in lines] == ["The city", "In 1990 the"]
  assert all(isinstance(x["continuation"], str) for x in lines)
  out = _cli("sample", "--workdir", pretrained, "--prompt", "The [MASK] of the city",
             "--top_k", "3")
  assert out.returncode == 0, out.stderr
  masks = json.loads(out.stdout)["masks"]
  assert len(masks) == 1 and len(masks[0]) == 3
  assert masks[0][0]["prob"] >= masks[0][1]["prob"] >= masks[0][2]["prob"]


def test_bad_task_file_is_one_line_naming_the_column(pretrained, tmp_path):
  bad = tmp_path / "bad.tsv"
  bad.write_text("text\tlabel\nsome words here\tx\n", encoding="utf-8")
  out = _cli("--config", "configs/cls_finetune.py:smoke", "--workdir", str(tmp_path / "run"),
             f"--config.init.params_from={pretrained}",
             f"--config.task.train_source=tsv:{bad}", f"--config.task.eval_source=tsv:{bad}")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("lmssl: error: ") and "'sentence'" in last and "text_fields" in last
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_tagging_and_regression_heads_train_and_report_their_metrics(pretrained, wikitext_dir,
                                                                     tmp_path):
  tagged = derive.write("truecase", f"text:{wikitext_dir}/test.txt", str(tmp_path / "tc"),
                        max_train=200, max_dev=40)
  cfg = load_config("ner_finetune", "smoke")
  cfg.init.params_from = pretrained
  cfg.task.train_source, cfg.task.eval_source = tagged["train"], tagged["dev"]
  final = train.train_and_evaluate(cfg, str(tmp_path / "ner"))
  # The labels, in order, are the run's (config.json); the config given stays as it was.
  assert config_lib.load_run_config(str(tmp_path / "ner")).task.labels == "O,B-CAP,I-CAP"
  assert cfg.task.labels == ""
  for key in ("eval_entity_f1", "eval_entity_precision", "eval_token_accuracy"):
    assert 0.0 <= final[key] <= 1.0
  # Word-level accuracy from host-side predictions equals the head's weighted accuracy.
  assert final["eval_token_accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-6)
  assert final["best"]["metric"] == "eval_entity_f1"

  # Regression on the same text: a passage's length in words, as JSONL.
  lines = [s for s in (wikitext_dir / "test.txt").read_text(encoding="utf-8").split(" . ")
           if 3 < len(s.split()) < 40][:120]
  path = tmp_path / "length.jsonl"
  path.write_text("".join(json.dumps({"sentence": s, "label": len(s.split()) / 10}) + "\n"
                          for s in lines), encoding="utf-8")
  cfg = _finetune_config(pretrained, {"train": f"jsonl:{path}", "dev": f"jsonl:{path}"},
                         task__kind="regression")
  final = train.train_and_evaluate(cfg, str(tmp_path / "reg"))
  assert final["best"]["metric"] == "eval_pearson"
  for key in ("eval_pearson", "eval_spearman"):
    assert -1.0 <= final[key] <= 1.0
  assert final["eval_mse"] == pytest.approx(final["eval_loss"], rel=1e-4)


def test_finetune_resumes_from_its_own_workdir_exactly(pretrained, order_task, tmp_path):
  whole = train.train_and_evaluate(_finetune_config(pretrained, order_task),
                                   str(tmp_path / "whole"))
  train.train_and_evaluate(_finetune_config(pretrained, order_task), str(tmp_path / "split"),
                           until_step=2)
  resumed = train.train_and_evaluate(_finetune_config(pretrained, order_task),
                                     str(tmp_path / "split"))
  assert resumed["loss"] == whole["loss"] and resumed["eval_loss"] == whole["eval_loss"]
  _, a = inference.load_run(str(tmp_path / "whole"))
  _, b = inference.load_run(str(tmp_path / "split"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

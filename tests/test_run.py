"""End to end: configs' smoke variants run, a resumed run equals an uninterrupted one, and the
loss falls on real text."""

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import load_config
from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import steps
from lmssl import train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("prepared"))


def _smoke(name, cache_dir, **overrides):
  cfg = load_config(name, "smoke")
  cfg.data.cache_dir = cache_dir
  for key, value in overrides.items():
    section, field = key.split("__")
    setattr(cfg[section], field, value)
  return cfg


def _metrics(workdir):
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", ["mlm_base", "clm_base"])
def test_smoke_variant_runs_and_writes_its_outputs(name, cache_dir, tmp_path):
  given = _smoke(name, cache_dir)
  final = train.train_and_evaluate(given, str(tmp_path))
  # The run resolved a copy of its config (vocabulary from the tokenizer) and left `given`.
  assert given.to_dict() == _smoke(name, cache_dir).to_dict()
  cfg = config_lib.load_run_config(str(tmp_path))
  assert given.model.vocab_size == 0 and cfg.model.vocab_size == given.data.vocab_size
  assert final["step"] == cfg.train.steps
  rows = _metrics(tmp_path)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == list(range(2, cfg.train.steps + 1, 2))
  assert [r["step"] for r in eval_rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
  assert 0 < eval_rows[-1]["eval_loss"] < np.log(cfg.model.vocab_size) + 1
  if name == "clm_base":
    assert eval_rows[-1]["eval_perplexity"] == pytest.approx(np.exp(eval_rows[-1]["eval_loss"]))
  assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "config.json").is_file()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def _final_params(workdir, cfg):
  mngr = checkpoint.manager(str(workdir), cfg.checkpoint)
  state, _ = checkpoint.restore(mngr, None)
  return mngr.latest_step(), state["params"]


@pytest.mark.parametrize("name", ["mlm_base", "clm_base"])
def test_two_plus_two_steps_equal_four(name, cache_dir, tmp_path, monkeypatch):
  kw = dict(train__log_every=1, checkpoint__every_steps=2, eval__every_steps=100)
  inits = []  # a resumed run reads its checkpoint into the abstract state: no fresh init first
  real_create = steps.create_state
  monkeypatch.setattr(steps, "create_state", lambda *a: inits.append(1) or real_create(*a))
  train.train_and_evaluate(_smoke(name, cache_dir, **kw), str(tmp_path / "whole"))
  # The split run gets to step 3 but "dies" before its step-3 checkpoint commits: it must
  # resume from step 2, and its log must not keep the lost step 3 twice.
  train.train_and_evaluate(_smoke(name, cache_dir, **kw), str(tmp_path / "split"), until_step=3)
  shutil.rmtree(tmp_path / "split" / "checkpoints" / "3")
  assert _final_params(tmp_path / "split", _smoke(name, cache_dir))[0] == 2
  assert len(inits) == 2
  train.train_and_evaluate(_smoke(name, cache_dir, **kw), str(tmp_path / "split"))
  assert len(inits) == 2
  whole = [(r["step"], r["loss"]) for r in _metrics(tmp_path / "whole") if "loss" in r]
  split = [(r["step"], r["loss"]) for r in _metrics(tmp_path / "split") if "loss" in r]
  assert [s for s, _ in whole] == [1, 2, 3, 4]
  assert split == whole  # bitwise: same mesh, same batches, same updates
  step_a, params_a = _final_params(tmp_path / "whole", _smoke(name, cache_dir))
  step_b, params_b = _final_params(tmp_path / "split", _smoke(name, cache_dir))
  assert step_a == step_b == 4
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_falls_on_real_text(wikitext_dir, cache_dir, tmp_path):
  cfg = _smoke("clm_base", cache_dir, train__steps=60, train__lr=3e-3, train__warmup_steps=5,
               train__log_every=1, eval__every_steps=60, data__vocab_size=1000)
  cfg.data.source = f"text:{wikitext_dir}/valid.txt"
  cfg.data.val_source = f"text:{wikitext_dir}/test.txt"
  final = train.train_and_evaluate(cfg, str(tmp_path))
  losses = [r["loss"] for r in _metrics(tmp_path) if "loss" in r]
  assert losses[0] > np.log(1000) - 0.5  # starts near uniform over the vocabulary
  assert np.mean(losses[-10:]) < losses[0] - 1.0, losses
  assert final["eval_loss"] < losses[0] - 1.0

"""A NaN/Inf loss or gradient never updates the state: train.nonfinite=stop ends the run with
its checkpoints (all finite) kept; skip goes on with the next batch."""

import json
import math

import numpy as np
import pytest

from conftest import load_config
from lmssl import checkpoint
from lmssl import errors
from lmssl import sharding
from lmssl import train


def _config(tmp_path, **train_overrides):
  cfg = load_config("mlm_base", "smoke")
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.eval.every_steps = 100  # one evaluation, after the last step
  cfg.train.log_every = 1
  cfg.checkpoint.keep = 10
  cfg.train.update(train_overrides)
  return cfg


def _poison_step(monkeypatch, step):
  """Step `step`'s batch gets NaN MLM weights, as corrupt data would give: a NaN loss."""
  calls, assemble = [], sharding.global_batch

  def poisoned(local, mesh):
    calls.append(1)
    if len(calls) == step:
      local = dict(local, masked_weights=np.full_like(local["masked_weights"], np.nan))
    return assemble(local, mesh)

  monkeypatch.setattr(sharding, "global_batch", poisoned)


def _saved(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return {s: checkpoint.read_params(str(workdir / "checkpoints" / str(s))) for s in steps}


def _leaves(params):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_stop_ends_the_run_naming_the_step_and_keeps_only_finite_checkpoints(
    tmp_path, monkeypatch):
  _poison_step(monkeypatch, 3)
  workdir = tmp_path / "run"
  cfg = _config(tmp_path)
  cfg.checkpoint.every_steps = 2
  with pytest.raises(errors.UserError, match=(
      r"^step 3: the loss or gradients are not finite \(loss nan, grad_norm nan\); the update "
      r"was not applied and the run stopped, its checkpoints \(all from finite steps\) kept\. "
      r"Lower train.lr .* or set --config.train.nonfinite=skip to skip such steps$")):
    train.train_and_evaluate(cfg, str(workdir))
  saved = _saved(workdir)
  assert list(saved) == [2]
  assert all(np.isfinite(x).all() for x in _leaves(saved[2]))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]  # nothing after the bad step


def test_skip_leaves_the_bad_step_without_effect_and_goes_on(tmp_path, monkeypatch):
  _poison_step(monkeypatch, 3)
  workdir = tmp_path / "run"
  cfg = _config(tmp_path, nonfinite="skip")
  cfg.checkpoint.every_steps = 1
  final = train.train_and_evaluate(cfg, str(workdir))
  assert final["step"] == 4 and math.isfinite(final["loss"])
  saved = _saved(workdir)
  assert list(saved) == [1, 2, 3, 4]
  for before, after in zip(_leaves(saved[2]), _leaves(saved[3])):
    np.testing.assert_array_equal(before, after)  # step 3 changed nothing
  assert any((a != b).any() for a, b in zip(_leaves(saved[3]), _leaves(saved[4])))
  assert all(np.isfinite(x).all() for x in _leaves(saved[4]))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  assert math.isnan(losses[3]) and all(math.isfinite(losses[s]) for s in (1, 2, 4))


def test_an_unknown_policy_is_refused_at_start(tmp_path):
  with pytest.raises(errors.UserError, match=r"train.nonfinite='ignore' is not known; use one "
                     r"of \['stop', 'skip'\]"):
    train.train_and_evaluate(_config(tmp_path, nonfinite="ignore"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()

"""A NaN/Inf loss, gradient or update never updates the state: train.nonfinite=stop ends the run
with its checkpoints (all finite) kept; skip goes on with the next batch."""

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


def _strict_json(line):
  """json.loads refusing the NaN/Infinity that Python's json writes but JSON does not have."""
  def refuse(name):
    raise ValueError(f"not JSON: {name} in {line!r}")
  return json.loads(line, parse_constant=refuse)


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
      r"^step 3: the loss, gradients or update are not finite \(loss nan, grad_norm nan\); the "
      r"update was not applied and the run stopped, its checkpoints \(all from finite steps\) kept\. "
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
    rows = {r["step"]: r for r in map(_strict_json, f) if "loss" in r}
  assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None  # NaN, as strict JSON
  assert rows[3]["nonfinite_keys"] == ["accuracy", "grad_norm", "loss"]  # NaN weights: all three
  assert all(math.isfinite(rows[s]["loss"]) and "nonfinite_keys" not in rows[s]
             for s in (1, 2, 4))


def test_an_unknown_policy_is_refused_at_start(tmp_path):
  with pytest.raises(errors.UserError, match=r"train.nonfinite='ignore' is not known; use one "
                     r"of \['stop', 'skip'\]"):
    train.train_and_evaluate(_config(tmp_path, nonfinite="ignore"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_non_finite_update_from_finite_gradients_leaves_the_state_bit_identical():
  """A NaN learning rate (set here past validation, which refuses it) turns finite gradients
  into a NaN update, as an overflow inside the optimizer would: the step is caught all the
  same."""
  import flax.linen as nn
  import jax
  from lmssl import steps

  def run(lr):
    cfg = load_config("mlm_base", "smoke")
    cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size = 96, 16, 8
    cfg.train.lr, cfg.train.warmup_steps = lr, 0
    cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = steps.example_batch(cfg, 8)
    batch["input_ids"] = rng.integers(5, 96, (8, 16), dtype=np.int32)
    batch["segment_ids"][:] = 1
    batch["positions"][:] = np.arange(16)
    batch["masked_positions"][:] = np.arange(1, 11)
    batch["masked_ids"] = np.take_along_axis(batch["input_ids"], batch["masked_positions"], 1)
    batch["masked_weights"][:] = 1.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      state, shardings = steps.create_state(cfg, mesh)
      before = [np.array(x) for x in jax.tree.leaves(state)]  # the step donates `state`
      step_fn, _ = steps.compile_steps(cfg, shardings, mesh)
      new, metrics = step_fn(state, sharding.global_batch(batch, mesh))
      return before, [np.array(x) for x in jax.tree.leaves(new)], jax.device_get(metrics)

  before, after, metrics = run(float("nan"))
  assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
  assert int(metrics["nonfinite"]) == 1
  assert int(after[0]) == int(before[0]) + 1  # the step counts; nothing else moved
  assert len(before) == len(after)
  for b, a in zip(before[1:], after[1:]):
    np.testing.assert_array_equal(a, b, strict=True)
  before, after, metrics = run(1e-3)  # the same step with a real learning rate updates
  assert int(metrics["nonfinite"]) == 0
  assert any((a != b).any() for a, b in zip(before[1:], after[1:]))


def test_metrics_jsonl_stays_strict_json_with_nan_and_inf(tmp_path):
  from lmssl import metrics
  writer = metrics.Writer(str(tmp_path))
  writer.write(1, {"loss": 2.5, "grad_norm": 1.0})
  writer.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "accuracy": 0.5,
                   "lr": float("-inf")})
  writer.close()
  text = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
  assert "NaN" not in text and "Infinity" not in text
  assert [_strict_json(line) for line in text.splitlines()] == [
      {"step": 1, "loss": 2.5, "grad_norm": 1.0},
      {"step": 2, "loss": None, "grad_norm": None, "accuracy": 0.5, "lr": None,
       "nonfinite_keys": ["loss", "grad_norm", "lr"]}]
  # A resumed writer rewrites the rows it keeps, and a row written as bare NaN by an older
  # lmssl comes back strict.
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 3, "loss": NaN}\n'
                                          '{"step": 4, "loss": 1.0}\n', encoding="utf-8")
  metrics.Writer(str(tmp_path), start_step=3).close()
  assert [_strict_json(line) for line in
          (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()][1:] == [
      {"step": 2, "loss": None, "grad_norm": None, "accuracy": 0.5, "lr": None,
       "nonfinite_keys": ["loss", "grad_norm", "lr"]},
      {"step": 3, "loss": None, "nonfinite_keys": ["loss"]}]

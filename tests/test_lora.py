"""LoRA invariants: a step moves adapters and heads and leaves every frozen parameter bit for
bit, with no optimizer state for it; merged adapters compute what unmerged ones do."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from lmssl import heads
from lmssl import lora
from lmssl import sharding
from lmssl import steps


def _config():
  cfg = load_config("cls_finetune", "smoke,lora")
  cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size = 96, 16, 8
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 0.1, 0, 0.1
  cfg.task.labels, cfg.lora.rank, cfg.lora.targets = "a,b,c", 4, "query,value,out,wi"
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 1, 1
  return cfg


def _batch(cfg, seed):
  rng = np.random.default_rng(seed)
  batch = steps.example_batch(cfg, cfg.train.batch_size)
  batch["input_ids"] = rng.integers(5, cfg.model.vocab_size, batch["input_ids"].shape)
  batch["segment_ids"][:] = 1
  batch["positions"][:] = np.arange(cfg.data.seq_len)
  batch["labels"] = rng.integers(0, 3, batch["labels"].shape).astype(np.int32)
  batch["label_weights"][:] = 1.0
  return batch


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stepped():
  cfg = _config()
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, shardings = steps.create_state(cfg, mesh)
    before = _leaves(state.params)  # read now: the step donates the state
    step_fn, _ = steps.compile_steps(cfg, shardings, mesh)
    for i in range(2):
      state, metrics = step_fn(state, sharding.global_batch(_batch(cfg, i), mesh))
  return cfg, before, state, metrics


def test_lora_step_leaves_frozen_parameters_bitwise_and_trains_the_rest(stepped):
  """Weight decay and a large learning rate would move any backbone kernel that leaked in."""
  _, before, state, metrics = stepped
  after = _leaves(state.params)
  frozen = [k for k in after if k.startswith("['transformer']") and not lora.is_adapter(k)]
  assert len(frozen) > 10
  for key in frozen:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  moved = [k for k in after if k not in frozen and not np.array_equal(after[k], before[k])]
  assert sum(lora.is_adapter(k) for k in moved) == 8  # A and B of 4 targets
  assert any("task_head" in k for k in moved) and any("pooler" in k for k in moved)
  assert float(metrics["nonfinite"]) == 0 and float(metrics["grad_norm"]) > 0


def test_optimizer_state_exists_only_for_trainable_parameters(stepped):
  _, _, state, _ = stepped
  trainable, total = lora.count(state.params, True)
  assert trainable < total // 4
  moments = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(moments) == 2 * trainable  # AdamW's mu and nu, nothing for the backbone


def test_split_and_join_are_inverse_and_mark_adapters_and_heads():
  params = {"transformer": {"layers": {"attn": {"query": {"kernel": 1, "lora_a": 2,
                                                          "lora_b": 3}}}},
            "task_head": {"kernel": 4}}
  trainable, frozen = lora.split(params, True)
  assert trainable == {"transformer": {"layers": {"attn": {"query": {
      "kernel": None, "lora_a": 2, "lora_b": 3}}}}, "task_head": {"kernel": 4}}
  assert jax.tree.leaves(frozen) == [1]
  assert lora.join(trainable, frozen) == params
  assert lora.split(params, False) == (params, None)


def test_merged_adapters_compute_what_unmerged_ones_do(stepped):
  cfg, _, state, _ = stepped
  params = jax.device_get(state.params)
  merged = lora.merge(params, cfg.lora.alpha, cfg.lora.rank)
  assert not any(lora.is_adapter(k) for k in _leaves(merged))
  plain = _config()
  plain.lora.rank = 0
  batch = _batch(cfg, 7)
  want = heads.build_model(cfg).apply({"params": params}, batch)["classification"]
  got = heads.build_model(plain).apply({"params": merged}, batch)["classification"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Not vacuous: without the adapters' product (alpha 0) the outputs differ.
  bare = lora.merge(params, 0.0, cfg.lora.rank)
  unadapted = heads.build_model(plain).apply({"params": bare}, batch)["classification"]
  assert not np.allclose(unadapted, want, atol=1e-3)

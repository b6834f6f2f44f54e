"""Train-step invariants: sharded == single device, k microbatches == full batch."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from lmssl import optimizer as optimizer_lib
from lmssl import sharding
from lmssl import steps


def _config(objective):
  cfg = load_config("mlm_base" if objective == "mlm" else "clm_base")
  cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size = 96, 32, 8
  cfg.train.lr, cfg.train.warmup_steps = 1e-2, 0
  return cfg


def _batch(cfg, seed=0):
  """A random packed batch: two documents per row, MLM slots at random non-first positions."""
  rng = np.random.default_rng(seed)
  b, length, p = cfg.train.batch_size, cfg.data.seq_len, cfg.data.max_predictions
  batch = steps.example_batch(cfg, b)
  batch["input_ids"] = rng.integers(5, cfg.model.vocab_size, (b, length), dtype=np.int32)
  cut = rng.integers(4, length - 4, b)
  idx = np.arange(length)
  batch["segment_ids"] = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
  batch["positions"] = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
  if cfg.objective == "mlm":
    batch["masked_positions"] = np.sort(rng.choice(np.arange(1, length), (b, p)), axis=1)
    batch["masked_ids"] = np.take_along_axis(batch["input_ids"], batch["masked_positions"], 1)
    batch["masked_weights"] = (rng.random((b, p)) < 0.8).astype(np.float32)
  return batch


def _run(cfg, mesh_shape, num_steps=2):
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, shardings = steps.create_state(cfg, mesh)
    step_fn, _ = steps.compile_steps(cfg, shardings, mesh)
    losses = []
    for i in range(num_steps):
      state, m = step_fn(state, sharding.global_batch(_batch(cfg, i), mesh))
      losses.append(float(m["loss"]))
  return state, losses


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_sharded_step_matches_single_device_and_splits_params(objective):
  single, single_losses = _run(_config(objective), (1, 1, 1))
  sharded, sharded_losses = _run(_config(objective), (2, 2, 2))
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  # Adam turns near-zero gradients into lr-sized steps, so fp noise there moves a parameter by
  # up to a few 1e-4 at lr 1e-2; a wrong update moves it by ~lr.
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)
  kernel = sharded.params["transformer"]["layers"]["mlp"]["wi"]["kernel"]  # [N, D, F]
  shard = kernel.addressable_shards[0].data
  assert shard.shape == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 2)
  assert len({s.device for s in kernel.addressable_shards}) == 8


def test_gradient_accumulation_matches_full_batch():
  full, full_losses = _run(_config("mlm"), (2, 1, 1))
  cfg = _config("mlm")
  cfg.train.microbatches = 4
  accumulated, acc_losses = _run(cfg, (2, 1, 1))
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)
  assert full_losses[1] < full_losses[0]


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_clm_loss_matches_whole_logits(tied):
  """Logits made a piece of the sequence at a time, with their gradient taken at once, give
  the whole-logits losses and updates (a missing gradient would move parameters by ~lr less),
  sharded and not."""
  whole_cfg, chunked_cfg = _config("clm"), _config("clm")
  for cfg in (whole_cfg, chunked_cfg):
    cfg.model.tie_embeddings = cfg.model.output_bias = tied
  chunked_cfg.train.loss_chunks = 4
  whole, whole_losses = _run(whole_cfg, (1, 1, 1))
  chunked, chunked_losses = _run(chunked_cfg, (2, 2, 2))
  np.testing.assert_allclose(chunked_losses, whole_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(chunked.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)


def test_weight_decay_skips_biases_and_norms():
  params = {"layers": {"attn": {"query": {"kernel": 1, "bias": 1}}, "attn_norm": {"scale": 1}},
            "embedder": {"tokens": {"embedding": 1}}}
  mask = optimizer_lib.decay_mask(params)
  assert mask["layers"]["attn"]["query"] == {"kernel": True, "bias": False}
  assert mask["layers"]["attn_norm"]["scale"] is False
  assert mask["embedder"]["tokens"]["embedding"] is True


def test_remat_changes_memory_not_results():
  _, plain = _run(_config("clm"), (1, 1, 1))
  cfg = _config("clm")
  cfg.model.remat = "full"
  _, remat = _run(cfg, (1, 1, 1))
  np.testing.assert_allclose(remat, plain, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  _, fp32 = _run(_config("mlm"), (1, 1, 1), num_steps=1)
  cfg = _config("mlm")
  cfg.model.dtype = "bfloat16"
  state, bf16 = _run(cfg, (1, 1, 1), num_steps=1)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
  assert abs(bf16[0] - fp32[0]) < 0.05 and bf16[0] != fp32[0]

"""Training parity with HuggingFace PyTorch, step by step: a tiny model trained 50 steps by
lmssl's train step (on the 8-device test mesh) and, from the same weights exported by
`to_hf`, by transformers on the same pipeline batches, gives the same loss at every step and
the same final parameters; clipping and weight decay both act within the run."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from lmssl.bench import parity

ARCHITECTURES = list(parity.ARCHITECTURES)  # bert, gpt2, llama, modernbert


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One tokenizer and prepared-data cache for every architecture."""
  return str(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def result(request, workdir):
  """The parity run of one architecture, read by each test below."""
  return parity.run(parity.Settings(arch=request.param, workdir=workdir))


def test_training_matches_hf_step_by_step(result):
  r = result
  assert len(r["lmssl_loss"]) == len(r["hf_loss"]) == r["steps"] == 50
  far = [(step, d) for step, d in enumerate(r["rel_diff"], 1) if not d <= parity.LOSS_RTOL]
  assert not far, f"steps whose losses differ by more than {parity.LOSS_RTOL}: {far}"
  p = r["params"]
  assert p["max_rel_diff"] <= parity.PARAM_RTOL, (p["worst_tensor"], p["max_rel_diff"])
  # Training moved the parameters by far more than the two sides differ.
  assert p["max_abs_moved"] > 1000 * p["max_abs_diff"]


def test_clipping_and_weight_decay_act(result):
  r = result
  # Clipping on some steps, not all, and on the same steps on both sides.
  assert 0 < r["clipped_steps"] < r["steps"]
  assert r["hf_clipped_steps"] == r["clipped_steps"]
  # Both AdamW groups are populated from lmssl's mask, which spares every bias and norm.
  assert r["decayed"] and r["undecayed"]
  spared = [n for n in r["decayed"] if n.endswith("bias") or "norm" in n.lower() or ".ln_" in n]
  assert not spared
  # Decay moves a decaying tensor further than the parameter tolerance: a tensor decayed on
  # one side only would fail the final comparison.
  assert r["decay_rel_shift"] > 2 * parity.PARAM_RTOL

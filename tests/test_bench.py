"""The benchmark at tiny shapes: its figures agree with each other and with what they are made
of. No timing is asserted: these machines are shared."""

import importlib.util
import json
import math
import statistics
import types

import jax
import pytest

from conftest import CORPORA
from conftest import REPO
from lmssl import errors
from lmssl import sharding
from lmssl import steps
from lmssl.bench import __main__ as cli
from lmssl.bench import parts
from lmssl.bench import step as bench_step

TINY = ["--size", "tiny", "--vocab", "300", "--batch", "8", "--seq", "32", "--steps", "2",
        "--rounds", "2", "--warmup", "1"]
# Train FLOPs of one step at the TINY shapes (2 layers, d_model 128, MLP 512, vocabulary 300,
# 8 rows of 32 tokens), counted by hand as 3 x the forward's matmuls. Per token and layer:
# projections 2 * (4 * 128^2 + 2 * 128 * 512) = 393,216, attention 2 * 2 * 32 * 128 = 16,384.
# CLM, every position to the vocabulary: 3 * 256 * (2 * 409,600 + 2 * 128 * 300).
CLM_FLOPS = 688_128_000
# MLM, 5 predictions a row (15% of 32), each a 128^2 transform and a 128 x 300 projection:
# 3 * 8 * (32 * 2 * 409,600 + 2 * 5 * (128^2 + 128 * 300)); the HuggingFace head predicts at
# all 32 positions: 3 * 8 * (32 * 2 * 409,600 + 2 * 32 * (128^2 + 128 * 300)).
MLM_FLOPS, HF_MLM_FLOPS = 642_293_760, 713_293_824


def _run(capsys, *extra):
  rows = cli.run(cli.parse_args(["--json", *TINY, *extra]))
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert printed == rows
  return rows


def _check_step_row(row, flops_per_step, peak):
  """The row's rates against what one step holds: 8 x 32 tokens and `flops_per_step`, counted
  by hand; its MFU against the peak row's figure."""
  step_s = statistics.median(row["rounds_step_time_s"])
  assert len(row["rounds_step_time_s"]) == 2 and row["step_time_s"] == step_s
  assert row["tokens_per_s"] * step_s == pytest.approx(8 * 32)
  assert row["flops_per_s"] * step_s == pytest.approx(flops_per_step)
  assert row["mfu"] * peak == pytest.approx(row["flops_per_s"])
  assert row["peak_memory_bytes"] > 0


def _per_device_bytes(tree) -> int:
  return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
             for x in jax.tree.leaves(tree))


def test_step_compile_and_memory_rows(capsys):
  rows = _run(capsys, "--task", "clm", "--compile_layers", "1,3")
  peak, step, first, second = rows
  assert peak["measurement"] == "peak" and peak["peak_flops_per_s"] > 0
  cfg = bench_step.bench_config("clm", size="tiny", vocab=300, batch=8, seq=32)
  assert {k: step[k] for k in ("impl", "task", "batch", "seq", "layers")} == dict(
      impl="lmssl", task="clm", batch=8, seq=32, layers=2)
  _check_step_row(step, CLM_FLOPS, peak["peak_flops_per_s"])
  assert step["compile_s"] > 0
  # The step holds the state (parameters and AdamW's two moments) and, for the clip's global
  # norm, every gradient at once: its memory is at least both, on each device.
  state, _ = parts.abstract_state(cfg, parts.mesh_for(cfg))
  assert cfg.train.grad_clip > 0
  assert step["peak_memory_bytes"] >= _per_device_bytes(state) + _per_device_bytes(state.params)
  assert [first["layers"], second["layers"]] == [1, 3]
  assert second["vs_first"] == pytest.approx(second["compile_s"] / first["compile_s"])


@pytest.mark.parametrize("budget", [0, 99, 100, 101, 5_000, 77_777])
def test_largest_batch_is_the_boundary_of_the_budget(budget):
  """Memory that is not a line (buffers come in sizes), as XLA's is not quite."""
  def memory(k):
    calls.append(k)
    return 100 + 37 * k + 64 * (k // 16) + (k * k) // 50

  calls = []
  k = parts.largest_batch(memory, budget, start=8)
  searched = set(calls)
  assert k == max((j for j in range(1, 2000) if memory(j) <= budget), default=0)
  assert len(searched) <= 2 * max(k, 1).bit_length() + 4


def test_step_memory_grows_with_the_batch_and_shrinks_with_loss_chunks():
  used = {}
  for chunks, batch in ((0, 8), (8, 8), (0, 16)):
    cfg = bench_step.bench_config("clm", size="tiny", vocab=8000, batch=batch, seq=256,
                                  loss_chunks=chunks)
    used[chunks, batch] = parts.step_memory(parts.compile_step(cfg, parts.mesh_for(cfg))[0])
  # A second row on each device brings its own [1, 256, 8000] float32 logits (8 MiB), which
  # the unchunked loss keeps for the backward.
  assert used[0, 16] - used[0, 8] > 7 * 2 ** 20
  # Per device (one row of 8 each): the whole [1, 256, 8000] float32 logits are 8 MiB, and
  # the loss keeps them, or their gradient, for the backward; a piece is 1/8 of that, so the
  # pieces save at least the other 7/8 (measured: 7.7 MiB).
  assert used[0, 8] - used[8, 8] > 7 * 2 ** 20


@pytest.mark.parametrize("task, predictions, flops", [
    ("clm", None, CLM_FLOPS), ("mlm", None, MLM_FLOPS), ("mlm", 32, HF_MLM_FLOPS)])
def test_flops_per_step_as_counted_by_hand(task, predictions, flops):
  cfg = bench_step.bench_config(task, size="tiny", vocab=300, batch=8, seq=32)
  assert bench_step.flops_per_step(cfg, predictions) == flops


@pytest.mark.parametrize("task, arch", [("clm", ""), ("mlm", ""), ("clm", "llama")])
def test_flops_per_step_as_xla_counts_them(task, arch):
  """XLA's count for the step's program before optimization: the matmuls, and a little more
  for the elementwise work and the update. One layer, as XLA counts a scan's body once."""
  cfg = bench_step.bench_config(task, arch=arch, size="tiny", layers=1, vocab=300, batch=8,
                                seq=32)
  mesh = parts.mesh_for(cfg)
  with jax.set_mesh(mesh):
    state, shardings = parts.abstract_state(cfg, mesh)
    step, _ = steps.compile_steps(cfg, shardings, mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         steps.example_batch(cfg, cfg.train.batch_size))
    xla = step.lower(state, batch).cost_analysis()["flops"]
  assert 1.0 <= xla / bench_step.flops_per_step(cfg) <= 1.1


def test_pipeline_row(capsys, tokenizer_path, tmp_path, monkeypatch):
  """On a clock on which each batch put on the device takes 0.25 s, the row's rate is one
  batch's tokens per 0.25 s, and its count is the batches timed."""
  now, shapes = [0.0], []
  global_batch = sharding.global_batch

  def put(batch, mesh):
    now[0] += 0.25
    shapes.append(batch["input_ids"].shape)
    return global_batch(batch, mesh)

  monkeypatch.setattr(sharding, "global_batch", put)
  monkeypatch.setattr(parts, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  flags = ["--task", "mlm", "--no_step", "--pipeline", "--data_source",
           f"text:{CORPORA / 'wikitext-2' / 'valid.txt'}", "--tokenizer", tokenizer_path,
           "--workdir", str(tmp_path)]
  rows = _run(capsys, *flags)
  row = rows[-1]
  assert {k: row[k] for k in ("measurement", "task", "batch", "seq", "batches")} == dict(
      measurement="pipeline", task="mlm", batch=8, seq=32, batches=16)
  assert set(shapes) == {(8, 32)} and len(shapes) == 16 + 3  # after 1 + 2 warm-up batches
  assert row["tokens_per_s"] == pytest.approx(8 * 32 / 0.25) and row["step_ratio"] is None
  # Beside a step that takes 512 tokens a second, the pipeline is twice as fast.
  cfg = bench_step.bench_config("mlm", size="tiny", vocab=300, batch=8, seq=32)
  again = parts.pipeline_row(cfg, cli.parse_args([*TINY, *flags]), 512.0)
  assert again["step_ratio"] == pytest.approx(2.0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="the HuggingFace peer needs the hf extra (torch, transformers)")
def test_hf_peer_side_by_side(capsys):
  rows = _run(capsys, "--task", "mlm", "--peer", "hf")
  peak, ours, theirs, ratio = rows
  assert (ours["impl"], theirs["impl"]) == ("lmssl", "hf")
  assert theirs["device"] == "cpu" and theirs["memory_source"] == "peak RSS growth"
  # The HuggingFace head projects every position to the vocabulary; lmssl's the masked ones.
  _check_step_row(ours, MLM_FLOPS, peak["peak_flops_per_s"])
  _check_step_row(theirs, HF_MLM_FLOPS, peak["peak_flops_per_s"])
  assert ratio["tokens_per_s_ratio"] == pytest.approx(
      ours["tokens_per_s"] / theirs["tokens_per_s"])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="the HuggingFace peer needs the hf extra (torch, transformers)")
def test_llama_beside_hf_llama_of_the_same_shape(capsys):
  """`--arch llama`: configs/llama_base.py's decoder (tiny: 2 x 128, 4 heads on 2 key/value
  heads, SwiGLU 384) beside LlamaForCausalLM, the same parameters counted on both sides."""
  peak, ours, theirs, ratio = _run(capsys, "--task", "clm", "--arch", "llama", "--peer", "hf")
  assert [r["arch"] for r in (ours, theirs, ratio)] == ["llama"] * 3
  # Embedding and output 2 x 300 x 128; per layer q, o 128^2 each, k, v 128 x 64 each,
  # SwiGLU 3 x 128 x 384, two RMSNorm scales; the final norm.
  params = 2 * 300 * 128 + 2 * (2 * 128 ** 2 + 2 * 128 * 64 + 3 * 128 * 384 + 2 * 128) + 128
  assert ours["params"] == theirs["params"] == params
  assert theirs["attention"] == "sdpa"
  flops = 3 * 256 * (2 * (2 * 2 * 128 ** 2 + 2 * 2 * 128 * 64 + 2 * 3 * 128 * 384
                          + 2 * 2 * 32 * 128) + 2 * 128 * 300)
  _check_step_row(ours, flops, peak["peak_flops_per_s"])
  _check_step_row(theirs, flops, peak["peak_flops_per_s"])


def test_bad_arguments_are_refused(capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(["--task", "mlm", "--rounds", "0"])
  assert "--rounds=0 must be positive" in capsys.readouterr().err
  with pytest.raises(errors.UserError, match="--arch llama trains clm, not --task "
                     "mlm; use --task clm, or --arch bert for mlm"):
    bench_step.bench_config("mlm", arch="llama")


def test_parity_arguments(capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(["--parity", "hf"])
  assert "--parity needs --arch" in capsys.readouterr().err
  assert cli.parse_args(["--parity", "hf", "--arch", "gpt2"]).steps == 50
  assert cli.parse_args(["--task", "mlm"]).steps == 5
  assert cli.parse_args(["--parity", "hf", "--arch", "modernbert"]).arch == "modernbert"
  with pytest.raises(SystemExit):
    cli.parse_args(["--task", "mlm", "--arch", "modernbert"])
  assert "--arch 'modernbert' is not known with --task; known: bert, gpt2, llama" in (
      capsys.readouterr().err)
  from lmssl.bench import parity
  with pytest.raises(errors.UserError, match="known: \\['bert', 'gpt2', 'llama', 'modernbert'\\]"):
    parity.parity_config(parity.Settings(arch="t5"))


def test_parity_masks_are_lmssl_masks_per_hf_layer_type():
  """A windowed model (ModernBERT's config) hands HF one mask per layer type: the global
  layers' sees the whole document, the windowed layers' only keys within window // 2."""
  import numpy as np
  from lmssl.bench import parity
  from lmssl.configs import modernbert_base
  cfg = modernbert_base.get_config("size=tiny,smoke")
  segments = np.array([[1] * 40 + [2] * 20 + [0] * 4])
  masks = parity.hf_mask(cfg, segments, causal=False)
  full, local = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
  half = cfg.model.attention_window // 2
  assert full[0, 39] and not full[0, 40] and not full[0, 63]
  assert local[0, half] and not local[0, half + 1] and local[20, 20 - half]
  assert not (local & ~full).any()
  causal = parity.hf_mask(parity.parity_config(parity.Settings(arch="gpt2")), segments, True)
  assert causal[0, 0, 6, 5] and not causal[0, 0, 5, 6] and not causal[0, 0, 45, 35]


def test_accelerator_suite_at_tiny_scale_without_tensorflow(tmp_path):
  """`--suite accelerator --scale tiny` on the CPU, as an accelerator host runs it: in a
  process where importing TensorFlow fails, with the peer, writing one JSON file."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import os
  import subprocess
  import sys
  blocker = tmp_path / "blocker"
  for name in ("tensorflow", "tensorflow_datasets"):
    (blocker / name).mkdir(parents=True)
    (blocker / name / "__init__.py").write_text(
        f"raise ImportError('the accelerator suite imported {name}')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))
  env.pop("XLA_FLAGS", None)  # one CPU device, as one accelerator
  out = tmp_path / "suite.json"
  result = subprocess.run(
      [sys.executable, "-m", "lmssl.bench", "--suite", "accelerator", "--scale", "tiny",
       "--peer", "hf", "--steps", "1", "--rounds", "1", "--warmup", "1", "--out", str(out)],
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  document = json.loads(out.read_text())
  assert document["errors"] == [], document["errors"]
  assert document["meta"]["platform"] == "cpu" and document["scale"] == "tiny"
  rows = document["rows"]
  kinds = [r["measurement"] for r in rows]
  assert kinds.count("peak") == 1 and kinds.count("max_batch") == 2
  # Attention: xla and splash (interpret mode), causal and not, splash equal to xla and fused.
  attention_rows = [r for r in rows if r["measurement"] == "attention"]
  assert sorted((r["impl"], r["causal"]) for r in attention_rows) == [
      ("splash", False), ("splash", True), ("xla", False), ("xla", True)]
  for r in attention_rows:
    if r["impl"] == "splash":
      assert r["fused"] is True and r["segments"] > 1
      assert r["max_abs_diff_out"] < 1e-5 and r["max_abs_diff_grad"] < 1e-4
  # Every model: lmssl on packed rows beside the peer, and their ratio.
  steps = [r for r in rows if r["measurement"] == "train_step"]
  assert sorted({r["model"] for r in steps}) == sorted(bench_suite_models())
  for name in bench_suite_models():
    lmssl_row, hf_row = [r for r in steps if r["model"] == name]
    assert lmssl_row["impl"] == "lmssl" and lmssl_row["packed"]
    assert lmssl_row["dtype"] == "bfloat16" and lmssl_row["attention"] == "xla"
    assert hf_row["impl"] == "hf" and not hf_row["packed"] and hf_row["attention"] == "sdpa"
    [ratio] = [r for r in rows if r["measurement"] == "ratio" and r["model"] == name]
    assert ratio["tokens_per_s_ratio"] == pytest.approx(
        lmssl_row["tokens_per_s"] / hf_row["tokens_per_s"])
  none, full = [r for r in rows if r["measurement"] == "max_batch"]
  assert (none["remat"], full["remat"]) == ("none", "full") and full["batch"] > none["batch"] > 0
  # The tables went to stdout as well.
  assert "tokens_per_s_ratio" in result.stdout and f"wrote {out}" in result.stdout


def bench_suite_models():
  from lmssl.bench import suite
  return list(suite.MODELS)


def test_installed_copy_runs_from_any_directory(tmp_path):
  """After a non-editable `pip install .`, `python -m lmssl.bench` run from elsewhere, with
  only the installed copy on the path, finds the task's config and times its step."""
  import os
  import shutil
  import subprocess
  import sys
  src, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
  # From a copy, so the build leaves nothing in the working tree.
  shutil.copytree(REPO / "lmssl", src / "lmssl", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                 check=True, capture_output=True, timeout=120)
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-c", "import lmssl, runpy; print(lmssl.__file__, flush=True); "
       "runpy.run_module('lmssl.bench', run_name='__main__')", "--json", "--task", "clm",
       "--size", "tiny", "--layers", "1", "--vocab", "300", "--batch", "2", "--seq", "32",
       "--steps", "1", "--rounds", "1", "--warmup", "0"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  where, *lines = result.stdout.splitlines()
  assert where == str(site / "lmssl" / "__init__.py")
  step = [json.loads(line) for line in lines][-1]
  assert (step["measurement"], step["task"], step["layers"], step["seq"]) == (
      "train_step", "clm", 1, 32)

"""The benchmark at tiny shapes: its figures agree with each other and with what they are made
of. No timing is asserted: these machines are shared."""

import importlib.util
import json
import statistics

import pytest

from conftest import CORPORA
from conftest import REPO
from lmssl.bench import __main__ as cli
from lmssl.bench import parts
from lmssl.bench import step as bench_step

TINY = ["--size", "tiny", "--vocab", "300", "--batch", "8", "--seq", "32", "--steps", "2",
        "--rounds", "2", "--warmup", "1"]


def _run(capsys, *extra):
  rows = cli.run(cli.parse_args(["--json", *TINY, *extra]))
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert printed == rows
  return rows


def _check_step_row(row, cfg, peak, predictions):
  step_s = statistics.median(row["rounds_step_time_s"])
  assert len(row["rounds_step_time_s"]) == 2 and row["step_time_s"] == step_s
  assert row["tokens_per_s"] == pytest.approx(cfg.train.batch_size * cfg.data.seq_len / step_s)
  flops = bench_step.flops_per_step(cfg, predictions)
  assert row["flops_per_s"] == pytest.approx(flops / step_s)
  assert row["mfu"] == pytest.approx(flops / step_s / peak)
  assert row["peak_memory_bytes"] > 0


def test_step_compile_and_memory_rows(capsys):
  rows = _run(capsys, "--task", "clm", "--compile_layers", "1,3")
  peak, step, first, second = rows
  assert peak["measurement"] == "peak" and peak["peak_flops_per_s"] > 0
  cfg = bench_step.bench_config("clm", size="tiny", vocab=300, batch=8, seq=32)
  assert {k: step[k] for k in ("impl", "task", "batch", "seq", "layers")} == dict(
      impl="lmssl", task="clm", batch=8, seq=32, layers=2)
  _check_step_row(step, cfg, peak["peak_flops_per_s"], None)
  assert step["compile_s"] > 0
  # On CPU the memory is XLA's figure for the compiled step: the same step compiled again.
  compiled, _ = parts.compile_step(cfg, parts.mesh_for(cfg))
  assert step["peak_memory_bytes"] == parts.step_memory(compiled)
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


def test_chunked_clm_loss_needs_less_memory():
  used = {}
  for chunks in (0, 8):
    cfg = bench_step.bench_config("clm", size="tiny", vocab=8000, batch=8, seq=256,
                             loss_chunks=chunks)
    used[chunks] = parts.step_memory(parts.compile_step(cfg, parts.mesh_for(cfg))[0])
  # Per device (one row of 8 each): the whole [1, 256, 8000] float32 logits are 8 MiB, and
  # the loss keeps them, or their gradient, for the backward; a piece is 1/8 of that, so the
  # pieces save at least the other 7/8 (measured: 7.7 MiB).
  assert used[0] - used[8] > 7 * 2 ** 20


def test_pipeline_row(capsys, tokenizer_path, tmp_path):
  rows = _run(capsys, "--task", "mlm", "--no_step", "--pipeline", "--data_source",
              f"text:{CORPORA / 'wikitext-2' / 'valid.txt'}", "--tokenizer", tokenizer_path,
              "--workdir", str(tmp_path))
  row = rows[-1]
  assert {k: row[k] for k in ("measurement", "task", "batch", "seq", "batches")} == dict(
      measurement="pipeline", task="mlm", batch=8, seq=32, batches=16)
  assert row["tokens_per_s"] > 0 and row["step_ratio"] is None


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="the HuggingFace peer needs the hf extra (torch, transformers)")
def test_hf_peer_side_by_side(capsys):
  rows = _run(capsys, "--task", "mlm", "--peer", "hf")
  peak, ours, theirs, ratio = rows
  cfg = bench_step.bench_config("mlm", size="tiny", vocab=300, batch=8, seq=32)
  assert (ours["impl"], theirs["impl"]) == ("lmssl", "hf")
  assert theirs["device"] == "cpu" and theirs["memory_source"] == "peak RSS growth"
  # The HuggingFace head projects every position to the vocabulary; lmssl's the masked ones.
  _check_step_row(ours, cfg, peak["peak_flops_per_s"], None)
  _check_step_row(theirs, cfg, peak["peak_flops_per_s"], cfg.data.seq_len)
  assert ratio["tokens_per_s_ratio"] == pytest.approx(
      ours["tokens_per_s"] / theirs["tokens_per_s"])


def test_bad_arguments_are_refused(capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(["--task", "mlm", "--rounds", "0"])
  assert "--rounds=0 must be positive" in capsys.readouterr().err


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

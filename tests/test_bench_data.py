"""The data benchmark on a 1.5 MB corpus: its figures agree with what they are made of, and the
corpus generator makes the same bytes from the same request. No timing is asserted: these
machines are shared."""

import glob
import json
import os
import pathlib
import sys

import pytest

from lmssl.bench import __main__ as cli
from lmssl.bench import corpus
from lmssl.bench import data
from lmssl.bench import process
from lmssl.data import readers


def _documents(directory, fmt: str) -> list[str]:
  paths = sorted(glob.glob(str(directory / f"*{corpus.FORMATS[fmt][0]}")))
  if fmt == "text":
    return [d for p in paths for d in readers.text_documents(p)]
  return [d for p in paths for d in readers.jsonl_documents(p, "text")]


def test_corpus_is_its_request_and_reads_back_as_shuffled_paragraphs(tmp_path, wikitext_dir):
  paragraphs = corpus.paragraphs(wikitext_dir)
  made = {}
  for name, fmt, seed in (("a", "text", 0), ("b", "text", 0), ("c", "text", 1),
                          ("gz", "jsonl.gz", 0)):
    made[name] = corpus.generate(tmp_path / name, 0.006, fmt, files=3, seed=seed,
                                 wikitext=wikitext_dir)
    assert not made[name]["reused"]
  read = lambda name: [(tmp_path / name / f["name"]).read_bytes() for f in made[name]["files"]]
  assert read("a") == read("b") and read("a") != read("c")
  assert corpus.generate(tmp_path / "a", 0.006, "text", 3, 0, wikitext_dir)["reused"]
  docs = _documents(tmp_path / "a", "text")
  sizes = [len(x) for x in read("a")]
  # 6 MB of ~2.4 MB copies: two whole copies, each all the paragraphs in its own order, and
  # part of a third; the files share the bytes evenly, each ending on a whole paragraph.
  assert made["a"]["bytes"] == sum(sizes) and 6_000_000 <= sum(sizes) < 6_000_000 + 2 ** 16
  assert max(sizes) - min(sizes) < 2 ** 16 and len(docs) == made["a"]["documents"]
  n = len(paragraphs)
  assert sorted(docs[:n]) == sorted(paragraphs) == sorted(docs[n:2 * n])
  assert docs[:n] != docs[n:2 * n] != paragraphs
  # The same order in JSONL (gzipped): more bytes per paragraph, so fewer of them.
  gz_docs = _documents(tmp_path / "gz", "jsonl.gz")
  assert gz_docs == docs[:len(gz_docs)] and made["gz"]["documents"] == len(gz_docs)


def test_data_benchmark_figures_agree_with_the_files(tmp_path, wikitext_dir, capsys,
                                                     monkeypatch):
  """Corpus, tokenizer, and prepare by one process and by two, on a 1.5 MB corpus in two files
  (two shards); no training run, whose start `test_train_row_...` covers."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  out = tmp_path / "data.json"
  args = cli.parse_args(["--json", "--data", "0.0015", "--data_dir", str(tmp_path), "--data_files",
                         "2", "--data_config", "size=tiny,smoke", "--data_workers", "2",
                         "--data_runners", "one,all", "--data_steps", "0", "--out", str(out)])
  rows = cli.run(args)
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
  document = json.loads(out.read_text())
  assert printed == rows == document["rows"] + document["targets"]
  made, tokenizer, one, every = rows[:4]
  root = tmp_path / "0.0015gb-text"
  assert [r["what"] for r in rows[:4]] == ["corpus", "tokenizer", "prepare", "prepare"]
  assert (one["runner"], every["runner"]) == ("one core", "all cores")
  record = json.loads((root / "corpus" / "corpus.json").read_text())
  assert f"{record['bytes']:,} bytes" in made["note"] and len(record["files"]) == 2
  assert (root / "tokenizer" / "tokenizer.model").is_file() and "vocab 500" in tokenizer["note"]

  shards = {}
  for row, name in ((one, "one"), (every, "all")):
    cache = root / f"cache-{name}"
    [manifest] = glob.glob(str(cache / "prepared" / "*" / "meta.json"))
    manifest = json.loads(pathlib.Path(manifest).read_text())
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert row["tokens"] == tokens and row["shards"] == len(manifest["shards"]) == 2
    assert row["bytes_per_token"] == pytest.approx(sum(p.stat().st_size for p in files) / tokens)
    # uint16 ids: two bytes a token, plus eight bytes a document for its end, plus metadata.
    assert 2.0 < row["bytes_per_token"] < 2.2
    assert row["tokens_per_s"] == pytest.approx(tokens / row["seconds"])
    assert 0 < row["cores"] <= os.cpu_count() + 0.1  # CPU seconds over wall seconds
    # Each process holds Python, numpy and sentencepiece: tens of MB at the least, and a
    # 1.5 MB corpus adds little. The processes together hold at least the largest.
    assert 25e6 < row["peak_rss_bytes"] <= row["tree_rss_bytes"] < 1e9
    assert 0 < row["anon_bytes"] <= row["tree_rss_bytes"]
    shards[name] = {p.relative_to(cache / "shards"): p.read_bytes()
                    for p in (cache / "shards").rglob("*") if p.is_file()}
  assert (one["workers"], every["workers"]) == (0, 2)
  assert shards["one"] == shards["all"]  # the same bytes, whichever runner wrote them

  targets = {r["target"]: r for r in rows[4:]}
  assert all(r["measurement"] == "data_target" for r in targets.values())
  speedup = targets["all-cores prepare >= 1.6x one process on one core"]
  assert speedup["figures"] == (
      f"0.0015 GB: {every['tokens_per_s'] / one['tokens_per_s']:.2f}x")
  assert targets["bytes per token on disk <= 2.2"]["result"] == "met"
  assert targets["prepare peak RSS <= 1.5 GB"]["figures"] == (
      f"0.0015 GB: {max(one['tree_rss_bytes'], every['tree_rss_bytes']) / 1e6:,.0f} MB "
      f"(anonymous {max(one['anon_bytes'], every['anon_bytes']) / 1e6:,.0f} MB)")
  assert targets["training peak RSS <= 2.5 GB"]["result"] == "n/a"  # no training run


def test_train_row_reads_its_first_step_and_rate(tmp_path, monkeypatch):
  """The training run's row from its console lines and metrics.jsonl (the run itself faked):
  time to the `step 1/` line, and the median rate over the second half of the steps."""
  prepared = str(tmp_path / "cache" / "prepared" / "abc")
  lines = [(4.0, "process 0/1: 1 local / 1 global devices"), (5.5, "model: tiny mlm backbone"),
           (9.5, "step 1/4 | loss 6.2"),
           (9.9, "step 2/4 | loss 6.1"), (11.0, f"outputs in W: metrics.jsonl; data {prepared}")]
  seen = []

  def spawn(argv, log, env):
    seen.append(argv)
    workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
    workdir.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens_per_s": rate}) + "\n"
        for s, rate in enumerate([10.0, 200.0, 300.0, 500.0], start=1)))
    return process.Spawned(12.0, lines, 2 ** 30, 20.0)

  monkeypatch.setattr(process, "spawn", spawn)
  settings = data.Settings(sizes=(1,), data_dir=str(tmp_path), train_steps=4)
  row = data.train_row(settings, tmp_path, {"data.cache_dir": str(tmp_path / "cache")}, prepared)
  assert (row["data_ready_s"], row["first_step_s"]) == (5.5, 9.5)
  assert (row["seconds"], row["peak_rss_bytes"]) == (12.0, 2 ** 30)
  assert row["tokens_per_s"] == 400.0
  [argv] = seen
  assert f"--config.data.cache_dir={tmp_path / 'cache'}" in argv
  assert "--config.train.steps=4" in argv and "--config.train.log_every=1" in argv
  lines[-1] = (11.0, "outputs in W: metrics.jsonl; data /elsewhere/prepared/def")
  with pytest.raises(RuntimeError, match="did not read"):  # it prepared again: not measured
    data.train_row(settings, tmp_path, {"data.cache_dir": str(tmp_path / "cache")}, prepared)


def test_targets_judge_every_size_and_the_ends():
  """Two sizes: limits hold at each, "flat" and the first step compare the largest corpus with
  the smallest, and the speedup is all cores over one process at each size."""
  def prepare(size, runner, tokens_per_s, rss, bytes_per_token):
    return dict(measurement="data", corpus_gb=size, what="prepare", runner=runner,
                tokens_per_s=tokens_per_s, tree_rss_bytes=rss, bytes_per_token=bytes_per_token)

  rows = [prepare(0.1, "one core", 100.0, 0.6e9, 2.05),
          prepare(0.1, "all cores", 180.0, 1.4e9, 2.05),
          prepare(0.1, "beam direct", None, None, None),
          prepare(3, "one core", 100.0, 0.7e9, 2.07),
          prepare(3, "all cores", 150.0, 1.6e9, 2.07),
          dict(measurement="data", corpus_gb=0.1, what="train", runner="r",
               tree_rss_bytes=1.0e9, anon_bytes=0.7e9, first_step_s=20.0),
          dict(measurement="data", corpus_gb=3, what="train", runner="r",
               tree_rss_bytes=1.1e9, anon_bytes=0.8e9, first_step_s=31.0)]
  got = {r["target"]: (r["result"], r["figures"]) for r in data.targets(rows)}
  assert got == {
      "prepare peak RSS <= 1.5 GB": ("not met", "0.1 GB: 1,400 MB, 3 GB: 1,600 MB"),
      "prepare peak RSS flat (largest corpus <= 1.2x smallest)": (
          "met", "0.1 GB: 1,400 MB, 3 GB: 1,600 MB"),
      "training peak RSS <= 2.5 GB": (
          "met", "0.1 GB: 1,000 MB (anonymous 700 MB), 3 GB: 1,100 MB (anonymous 800 MB)"),
      "training peak RSS flat (largest corpus <= 1.2x smallest)": (
          "met", "0.1 GB: 1,000 MB (anonymous 700 MB), 3 GB: 1,100 MB (anonymous 800 MB)"),
      "bytes per token on disk <= 2.2": ("met", "0.1 GB: 2.050, 3 GB: 2.070"),
      "all-cores prepare >= 1.6x one process on one core": ("not met", "0.1 GB: 1.80x, 3 GB: 1.50x"),
      "time to first step, largest corpus <= 1.5x smallest": ("not met", "0.1 GB: 20.0 s, "
                                                               "3 GB: 31.0 s"),
  }


def test_the_sampled_process_tree_is_the_spawned_one_and_never_a_reused_pid():
  """The benchmark's memory of a command sums /proc over it and its descendants. A pid read
  from a children list counts only while it is that parent's process: the pid of a child
  that exited may already be another process's, or a thread's (threads share the numbers)."""
  import subprocess
  import threading
  import time
  import signal
  shell = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
  try:
    for _ in range(200):  # until both sleeps are there (forked, then exec'd)
      tree = process.tree_status(shell.pid, os.getpid())
      if sorted(s["Name"].strip() for s in tree) == ["bash", "sleep", "sleep"]:
        break
      time.sleep(0.05)
    assert sorted(s["Name"].strip() for s in tree) == ["bash", "sleep", "sleep"]
    assert all(int(s["VmRSS"].split()[0]) > 0 for s in tree)
    # The same pid as another parent's child is not this tree (a pid reused elsewhere).
    assert process.tree_status(shell.pid, 1) == []
  finally:
    os.killpg(shell.pid, signal.SIGKILL)
    shell.wait()
  # A thread's id names a /proc entry with its process's memory, but it is no child process.
  seen, release = threading.Event(), threading.Event()
  tid = []
  worker = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), seen.set(),
                                            release.wait()))
  worker.start()
  seen.wait()
  try:
    assert process.tree_status(os.getpid(), os.getppid()) != []
    assert process.tree_status(tid[0], os.getppid()) == []
  finally:
    release.set()
    worker.join()


def test_a_commands_peak_memory_is_its_own_not_that_of_the_process_that_started_it(tmp_path):
  """Linux keeps a process's RSS high-water mark across exec, so a command forked straight from
  a large process would report that process's RSS as its own peak."""
  import numpy as np
  ballast = np.ones(2 ** 30 // 8)  # 1 GiB, touched: this process is large
  done = process.spawn([sys.executable, "-c", "import numpy; print(numpy.ones(10 ** 7).sum())"],
                       tmp_path / "log", dict(os.environ))
  assert done.lines[-1][1] == "10000000.0"
  # Python and numpy plus the 80 MB array: well under the GiB of the process that spawned it.
  assert 80e6 < done.peak_rss_bytes < 400e6 and ballast[-1] == 1
  with pytest.raises(RuntimeError, match="exited with 3"):
    process.spawn([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log", {})

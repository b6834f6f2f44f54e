"""Shard-by-shard preparation and rows cut at read time (lmssl/data/shards.py, packed.py)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from lmssl import config
from lmssl.data import packed
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import shards
from lmssl.data import sources
from lmssl.data import tokenizer as tok


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
  return tok.Tokenizer.load(tokenizer_path)


def corpus(tmp_path, paragraphs, files=3, per_file=400):
  """WikiText paragraphs in `files` text files, documents separated by blank lines."""
  directory = tmp_path / "corpus"
  directory.mkdir(exist_ok=True)
  for i in range(files):
    part = paragraphs[i * per_file:(i + 1) * per_file]
    (directory / f"part{i}.txt").write_text("\n\n".join(part) + "\n", encoding="utf-8")
  return directory


def data_cfg(directory, cache, **overrides):
  cfg = config.base_config().data
  cfg.source = f"text:{directory}/*.txt"
  cfg.cache_dir = str(cache)
  cfg.seq_len = 64
  cfg.shard_bytes = 40_000  # several shards per file
  cfg.prepare_workers = 1
  cfg.update(overrides)
  return cfg


def tree_digest(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_rows_cut_from_shards_equal_packing_in_memory(tmp_path, paragraphs, tokenizer):
  cfg = data_cfg(corpus(tmp_path, paragraphs), tmp_path / "cache")
  _, out = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  meta = prepare.read_meta(out)
  assert len(meta["shards"]) >= 6  # the files were cut into byte-range shards
  docs = sources.read_documents(cfg.source, cfg)
  for split in ("train", "validation"):
    in_split = [d for d in docs if (sources.hash_fraction(d) < cfg.val_fraction)
                == (split == "validation")]
    want = packed.pack(tokenizer.encode_batch(in_split), cfg.seq_len, tokenizer)
    rows = prepare.load_prepared(out, split)
    assert rows.shape == want["tokens"].shape == (meta["splits"][split]["num_examples"], 64)
    order = np.random.default_rng(0).permutation(rows.num_rows)
    tokens, segments = rows.read(order)
    np.testing.assert_array_equal(tokens, want["tokens"][order])
    np.testing.assert_array_equal(segments, want["segment_ids"][order])
  # uint16 ids (a 1000-piece vocabulary) and 8 bytes of boundary per document, nothing else.
  stored = sum(p.stat().st_size for p in (tmp_path / "cache" / "shards").rglob("*.tokens"))
  total = sum(meta["splits"][s]["num_tokens"] for s in ("train", "validation"))
  assert stored == 2 * total


def test_token_width_follows_the_vocabulary():
  assert shards.token_dtype(8000) == np.uint16 and shards.token_dtype(65_536) == np.uint16
  assert shards.token_dtype(65_537) == np.uint32 and shards.token_dtype(151_936) == np.uint32


def test_batches_from_shards_equal_batches_from_memory(tmp_path, paragraphs, tokenizer):
  """The pipeline's order and masks do not depend on where rows come from."""
  cfg = data_cfg(corpus(tmp_path, paragraphs, files=2), tmp_path / "cache")
  _, out = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  rows = prepare.load_prepared(out, "train")
  tokens, segment_ids = rows.read(np.arange(rows.num_rows))
  common = dict(objective="mlm", global_batch=8, seed=3, start_step=5, data_cfg=cfg,
                tokenizer=tokenizer, host_rows=[1, 4, 6], num_steps=4)
  from_disk = list(pipeline.iterate(pipeline.make_dataset(rows, **common)))
  in_memory = list(pipeline.iterate(pipeline.make_dataset(
      dict(tokens=tokens, segment_ids=segment_ids), **common)))
  assert len(from_disk) == 4
  for a, b in zip(from_disk, in_memory):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _prepare_command(cfg, workdir):
  overrides = [f"--config.data.{k}={v}" for k, v in
               dict(source=cfg.source, cache_dir=cfg.cache_dir, seq_len=cfg.seq_len,
                    shard_bytes=cfg.shard_bytes, vocab_size=400, prepare_workers=1).items()]
  return [sys.executable, "-m", "lmssl.data.prepare",
          f"--config={REPO}/configs/mlm_base.py:smoke", f"--workdir={workdir}", *overrides]


def test_killed_prepare_resumes_and_matches_an_uninterrupted_one(tmp_path, paragraphs):
  directory = corpus(tmp_path, paragraphs, files=3, per_file=500)
  cfg = data_cfg(directory, tmp_path / "killed", shard_bytes=20_000)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(_prepare_command(cfg, tmp_path / "work"), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  shard_root = tmp_path / "killed" / "shards"
  deadline = time.monotonic() + 120
  while len(list(shard_root.glob("*/shard.json"))) < 2 and proc.poll() is None:
    assert time.monotonic() < deadline, "no shard finished in 120 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
  finished = len(list(shard_root.glob("*/shard.json")))
  assert not list((tmp_path / "killed" / "prepared").glob("*/meta.json"))  # no manifest yet

  again = subprocess.run(_prepare_command(cfg, tmp_path / "work"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"({finished} already prepared)" in again.stderr
  assert "prepare: " in again.stderr and "shards," in again.stderr  # the progress line

  cfg.cache_dir = str(tmp_path / "whole")
  whole = subprocess.run(_prepare_command(cfg, tmp_path / "work"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert whole.returncode == 0, whole.stderr[-2000:]
  resumed = {k: v for k, v in tree_digest(tmp_path / "killed").items() if ".tmp-" not in k}
  assert resumed == tree_digest(tmp_path / "whole")


def test_a_changed_or_damaged_shard_is_prepared_again(tmp_path, paragraphs, tokenizer):
  directory = corpus(tmp_path, paragraphs, files=2)
  cfg = data_cfg(directory, tmp_path / "cache")
  _, out = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  before = {s["key"]: s["input"] for s in prepare.read_meta(out)["shards"]}

  text = (directory / "part1.txt").read_text(encoding="utf-8")
  (directory / "part1.txt").write_text(text.replace(" the ", " a "), encoding="utf-8")
  _, changed = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  after = {s["key"]: s["input"] for s in prepare.read_meta(changed)["shards"]}
  assert changed != out
  kept = set(before) & set(after)
  assert kept and all("part0.txt" in before[k] for k in kept)  # part0's shards reused
  assert all("part1.txt" in after[k] for k in set(after) - kept)

  key = next(iter(kept))
  tokens = Path(shards.shard_directory(cfg.cache_dir, key)) / "train.tokens"
  tokens.write_bytes(tokens.read_bytes()[:-6])  # a truncated file: the shard is redone
  assert shards.read_shard(str(tokens.parent)) is None
  _, again = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  assert again == changed and shards.read_shard(str(tokens.parent)) is not None
  assert json.loads((Path(again) / "meta.json").read_text())["shards"] == (
      prepare.read_meta(changed)["shards"])


def test_a_bad_file_stops_prepare_in_one_line_and_leaves_nothing_half_written(
    tmp_path, paragraphs, tokenizer_path):
  directory = tmp_path / "corpus"
  directory.mkdir()
  for i in range(3):
    lines = [json.dumps({"text": p}) for p in paragraphs[i * 200:(i + 1) * 200]]
    (directory / f"part{i}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  good = (directory / "part2.jsonl").read_bytes()
  (directory / "part3.jsonl").write_bytes(good[:5000] + b"\xff\xfe" + good[5000:])
  cfg = data_cfg(directory, tmp_path / "cache", shard_bytes=30_000)
  cfg.source = f"jsonl:{directory}/*.jsonl:text"
  tokenizer_dir = tmp_path / "work"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  # A given tokenizer: the bad bytes are met by a prepare worker, not the tokenizer's sample.
  command = _prepare_command(cfg, tokenizer_dir) + [
      "--config.data.prepare_workers=2", f"--config.data.tokenizer={tokenizer_path}"]
  command.remove("--config.data.prepare_workers=1")
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"lmssl: error: {directory}/part3.jsonl") and "UTF-8" in last, last
  cache = tmp_path / "cache"
  assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]  # no half-written file
  assert not list(cache.glob("prepared/*/meta.json"))  # and no manifest


def test_a_stopped_writes_temporary_files_are_all_discarded(tmp_path):
  """A worker stopped mid-shard leaves its splits' `*.tmp-*` files, or, stopped while writing
  shard.json, `.shard.json.tmp-PID` (files.write_atomically): both go; finished files stay."""
  directory = tmp_path / "shard"
  directory.mkdir()
  for name in ("train.tokens.tmp-0a1b", "train.ends.tmp-0a1b", ".shard.json.tmp-4242"):
    (directory / name).write_bytes(b"partial")
  (directory / "validation.tokens").write_bytes(b"done")
  shards.discard_unfinished(str(directory))
  assert sorted(p.name for p in directory.iterdir()) == ["validation.tokens"]
  (directory / "validation.tokens").unlink()
  (directory / ".shard.json.tmp-4242").write_bytes(b"partial")
  shards.discard_unfinished(str(directory))  # nothing else in it: the directory goes too
  assert not directory.exists()


def test_tokenizer_sample_is_seeded_and_drawn_from_every_shard(tmp_path, paragraphs):
  cfg = data_cfg(corpus(tmp_path, paragraphs), tmp_path / "cache")
  inputs = sources.list_shards(cfg.source, cfg)
  sample = list(prepare.tokenizer_sample(inputs, 30_000, seed=0))
  assert sample == list(prepare.tokenizer_sample(inputs, 30_000, seed=0))
  assert sample != list(prepare.tokenizer_sample(inputs, 30_000, seed=1))
  longest = max(len(d) for shard in inputs for d in shard.documents())
  assert 30_000 <= sum(map(len, sample)) <= 30_000 + len(inputs) * longest
  taken = set(sample)
  assert all(taken & set(shard.documents()) for shard in inputs)  # a share of every shard
  starts = [next(shard.documents()) for shard in inputs]
  assert sum(d in taken for d in starts) < len(inputs) / 2  # windows at seeded offsets
  assert len(taken) == len(sample)  # each document once

  twice = tmp_path / "twice"
  twice.mkdir()
  for name in ("a.txt", "b.txt"):  # the same text twice: the sample takes it once
    (twice / name).write_text((tmp_path / "corpus" / "part0.txt").read_text(encoding="utf-8"),
                              encoding="utf-8")
  cfg.source = f"text:{twice}/*.txt"
  inputs = sources.list_shards(cfg.source, cfg)
  sample = list(prepare.tokenizer_sample(inputs, 10**9, seed=0))
  assert sorted(sample) == sorted(set(sources.read_documents(f"text:{twice}/a.txt", cfg)))


def test_rows_read_by_byte_ranges_equal_mapped_rows(tmp_path, paragraphs, tokenizer,
                                                     monkeypatch):
  """On Cloud Storage a shard is read by ranges; the rows are those a local map gives."""
  cfg = data_cfg(corpus(tmp_path, paragraphs, files=2), tmp_path / "cache")
  _, out = prepare.prepare(cfg, tokenizer, str(tmp_path / "work"))
  order = np.random.default_rng(1).permutation(prepare.load_prepared(out, "train").num_rows)
  mapped = prepare.load_prepared(out, "train").read(order)
  from lmssl import files
  monkeypatch.setattr(files, "is_url", lambda path: True)  # local paths, read as URLs are
  ranged = prepare.load_prepared(out, "train").read(order)
  for a, b in zip(mapped, ranged):
    np.testing.assert_array_equal(a, b)

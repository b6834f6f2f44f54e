"""One input shard in, one prepared shard out: the unit of work every prepare runner runs.

A prepared shard is a directory `{cache}/shards/{key}/` holding, per split it has:
  SPLIT.tokens  the documents' token ids end to end, little-endian uint16 when the vocabulary
                has at most 65,536 ids, else uint32 (no special tokens: framing is read-time);
  SPLIT.ends    little-endian int64 [documents]: where each document's tokens end;
and `shard.json`, written last: the input it came from, the tokenizer's sha256, the dtype,
per split the documents and tokens, and a coarse index of the packed stream (`index`, every
INDEX_EVERY-th document's framed end) so a reader finds a position with one small read.

The key hashes the input's identity (path, range, size, mtime: see sources.InputShard), the
tokenizer's fingerprint and the split rule, so a rerun finds finished shards and skips them,
a changed input gets a new key (the stale shard is left and unused), and a shard's bytes are
the same whichever runner wrote it. Every file goes under a temporary name and is renamed into
place; `shard.json` last, so a shard without it is unfinished and is redone. `run_local` runs
jobs on this machine's cores; lmssl/data/beam_prepare.py runs them on Apache Beam.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import time
import uuid
from typing import Iterator, Sequence

from absl import logging
import numpy as np

from lmssl import files
from lmssl.data import sources
from lmssl.data import tokenizer as tok

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
INDEX_EVERY = 1024  # documents per coarse-index entry: one read of 8 KiB of ends finds a row
_ENCODE_DOCS = 512  # documents per tokenizer call
_FLUSH_TOKENS = 1 << 20  # tokens buffered per split before a write


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclasses.dataclass(frozen=True)
class Job:
  """One shard to prepare. `rule` sends documents to splits: "train", "validation", or
  "holdout:F" (a document goes to validation when its text's hash, as a fraction, is below F,
  as sources.split_documents decides)."""

  shard: sources.InputShard
  rule: str
  cache_dir: str
  tokenizer_sha256: str

  @property
  def key(self) -> str:
    spec = dict(format=FORMAT_VERSION, input=self.shard.to_json(), rule=self.rule,
                tokenizer=self.tokenizer_sha256)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

  @property
  def directory(self) -> str:
    return shard_directory(self.cache_dir, self.key)


def shard_directory(cache_dir: str, key: str) -> str:
  return os.path.join(cache_dir, "shards", key)


def rule_for(val_fraction: float, has_val_source: bool, split: str) -> str:
  return split if has_val_source else f"holdout:{float(val_fraction)!r}"


def _split_of(rule: str):
  if not rule.startswith("holdout:"):
    return lambda text: rule
  fraction = float(rule.partition(":")[2])
  return lambda text: "validation" if sources.hash_fraction(text) < fraction else "train"


def fingerprint_sha256(tokenizer: tok.AnyTokenizer) -> str:
  return hashlib.sha256(tokenizer.fingerprint).hexdigest()


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == _ENCODE_DOCS:
      yield batch
      batch = []
  if batch:
    yield batch


class _SplitWriter:
  """Appends one split's documents to its two files, under temporary names until `commit`."""

  def __init__(self, directory: str, split: str, dtype: np.dtype):
    self.split, self.dtype, self.directory = split, dtype, directory
    suffix = f".tmp-{uuid.uuid4().hex[:12]}"
    self.paths = {name: os.path.join(directory, f"{split}.{name}") for name in ("tokens", "ends")}
    self.tmp = {name: path + suffix for name, path in self.paths.items()}
    self.out = {name: files.at(path).open("wb") for name, path in self.tmp.items()}
    self.tokens, self.documents, self.index = 0, 0, []
    self.pending_ids, self.pending_ends, self.pending_tokens = [], [], 0

  def add(self, ids: list[int]) -> None:
    self.pending_ids.append(np.asarray(ids, dtype=self.dtype))
    self.tokens += len(ids)
    self.documents += 1
    self.pending_ends.append(self.tokens)
    if self.documents % INDEX_EVERY == 0:  # the framed end: [CLS] ids [SEP] per document
      self.index.append(self.tokens + 2 * self.documents)
    self.pending_tokens += len(ids)
    if self.pending_tokens >= _FLUSH_TOKENS:
      self.flush()

  def flush(self) -> None:
    if self.pending_ids:
      self.out["tokens"].write(np.concatenate(self.pending_ids).tobytes())
      self.out["ends"].write(np.asarray(self.pending_ends, dtype="<i8").tobytes())
    self.pending_ids, self.pending_ends, self.pending_tokens = [], [], 0

  def commit(self) -> dict:
    self.flush()
    for name, f in self.out.items():
      f.close()
      files.at(self.tmp[name]).replace(self.paths[name])
    return dict(documents=self.documents, tokens=self.tokens, index=self.index)

  def abandon(self) -> None:
    for name, f in self.out.items():
      f.close()
      files.at(self.tmp[name]).unlink(missing_ok=True)


def prepare_shard(job: Job, tokenizer: tok.AnyTokenizer) -> dict:
  """Tokenizes `job.shard` into its prepared shard (unless one is finished); returns its
  shard.json content. Memory stays at one batch of documents plus a write buffer."""
  done = read_shard(job.directory)
  if done is not None:  # the key names the input, so a finished shard is this one
    return done
  if fingerprint_sha256(tokenizer) != job.tokenizer_sha256:
    raise ValueError(f"job {job.key} was planned for another tokenizer")
  discard_unfinished(job.directory)  # what a killed run of this shard left
  files.at(job.directory).mkdir(parents=True, exist_ok=True)
  dtype = token_dtype(tokenizer.vocab_size)
  split_of = _split_of(job.rule)
  writers = {}
  try:
    for batch in _batches(job.shard.documents()):
      for text, ids in zip(batch, tokenizer.encode_batch(batch)):
        split = split_of(text)
        if split not in writers:
          writers[split] = _SplitWriter(job.directory, split, dtype)
        writers[split].add(ids)
    splits = {name: writers[name].commit() for name in SPLITS if name in writers}
  except BaseException:
    for writer in writers.values():
      writer.abandon()
    raise
  meta = dict(format_version=FORMAT_VERSION, input=job.shard.to_json(), rule=job.rule,
              tokenizer_sha256=job.tokenizer_sha256, dtype=dtype.name, splits=splits)
  files.write_atomically(os.path.join(job.directory, "shard.json"),
                         json.dumps(meta, sort_keys=True, indent=1))
  return meta


def discard_unfinished(directory: str) -> None:
  """Removes the temporary files of an unfinished write in `directory`, and the directory
  itself when nothing else is in it. Only for shards no live process is writing."""
  path = files.at(directory)
  if not path.exists():
    return
  # The splits' files are `SPLIT.NAME.tmp-*`; shard.json's (files.write_atomically) is
  # `.shard.json.tmp-*`, which a `*` glob does not match.
  for stale in [*path.glob("*.tmp-*"), *path.glob(".*.tmp-*")]:
    stale.unlink(missing_ok=True)
  if not any(path.iterdir()):
    path.rmdir()


def read_shard(directory: str) -> dict | None:
  """A finished shard's shard.json content, or None when it is missing, unfinished or damaged
  (its files are not the sizes shard.json gives), so that it is prepared again."""
  meta_path = files.at(os.path.join(directory, "shard.json"))
  try:
    meta = json.loads(meta_path.read_text())
    if meta["format_version"] != FORMAT_VERSION:
      return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, counts in meta["splits"].items():
      sizes = dict(tokens=counts["tokens"] * itemsize, ends=counts["documents"] * 8)
      for name, size in sizes.items():
        if files.at(os.path.join(directory, f"{split}.{name}")).stat().length != size:
          return None
  except (FileNotFoundError, ValueError, KeyError, TypeError):
    return None
  return meta


# Local runner: a process per core, each with its own tokenizer.

_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer
  # One core per worker: the pool already has one worker per core.
  tokenizer.threads = 1
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _run_job(numbered: tuple[int, Job]) -> tuple[int, dict]:
  return numbered[0], prepare_shard(numbered[1], _worker_tokenizer)


class Progress:
  """Shards done of total, tokens/s and time left, logged as shards finish (at most every
  `every` seconds, and at the end)."""

  def __init__(self, total: int, every: float = 5.0):
    self.total, self.every, self.done, self.tokens = total, every, 0, 0
    self.start = self.last = time.monotonic()

  def shard_done(self, meta: dict) -> None:
    self.done += 1
    self.tokens += sum(s["tokens"] for s in meta["splits"].values())
    now = time.monotonic()
    if now - self.last >= self.every or self.done == self.total:
      self.last, elapsed = now, now - self.start
      left = elapsed / self.done * (self.total - self.done)
      logging.info("prepare: %d/%d shards, %.0f tokens/s, %d s left", self.done, self.total,
                   self.tokens / max(elapsed, 1e-9), round(left))


def run_local(jobs: Sequence[Job], tokenizer: tok.AnyTokenizer,
              workers: int = 0) -> list[dict]:
  """Runs `jobs` on `workers` processes (0: one per core; in this process when one is enough)."""
  workers = min(workers or os.cpu_count() or 1, len(jobs))
  progress, metas = Progress(len(jobs)), [None] * len(jobs)
  if workers <= 1:
    for i, job in enumerate(jobs):
      metas[i] = prepare_shard(job, tokenizer)
      progress.shard_done(metas[i])
    return metas
  # Spawned, not forked: the caller may have TensorFlow's threads running.
  pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
  try:
    for i, meta in pool.imap_unordered(_run_job, enumerate(jobs)):
      metas[i] = meta
      progress.shard_done(meta)
    pool.close()
  except BaseException:
    pool.terminate()  # a failed shard or a signal stops the others now, not after their shards
    pool.join()
    for job in jobs:  # the stopped workers' temporary files
      discard_unfinished(job.directory)
    raise
  pool.join()
  return metas

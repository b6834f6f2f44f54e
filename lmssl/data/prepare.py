"""Offline preparation: a corpus's shards -> tokenizer -> prepared shards -> one manifest.

Packed data (the default) is prepared shard by shard (lmssl/data/shards.py): each input shard
becomes a token stream with document boundaries in `{cache}/shards/KEY/`, and
`{cache}/prepared/KEY/meta.json` lists the shards of a run's data in order, with seq_len and
the tokenizer's special ids, from which rows are cut at read time (lmssl/data/packed.py).
The manifest's key hashes the shard keys (input identities and the tokenizer) and seq_len, so
any host finds it from the config and a listing of the input files, without reading them.
Finished shards are kept across runs: a rerun, a resumed kill, a longer corpus or another
seq_len prepares only what is missing. Sentence-pair data (data.sentence_pair) is built in
memory and stored whole as `SPLIT/NAME.npy` arrays (pairs.ARRAYS), format "pairs".

Runners of the same per-shard function, with the same bytes as output:
  python -m lmssl.data.prepare --config C --workdir W              all cores of this machine
  ... --num_shards N --shard_index I                                one part (SLURM arrays, hosts)
  ... --runner beam -- --runner=DataflowRunner --project=...        Apache Beam (the beam extra)
A training run prepares what is missing itself, every process a part, before its first step.
"""

import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from typing import Callable, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from lmssl import config_file
from lmssl import errors
from lmssl import files
from lmssl.data import packed
from lmssl.data import pairs
from lmssl.data import shards
from lmssl.data import sources
from lmssl.data import tokenizer as tok

FORMAT_VERSION = 2
SPLITS = shards.SPLITS
FORMATS = ("packed", "pairs")  # meta.json "format"


def cache_root(data_cfg: ml_collections.ConfigDict) -> str:
  return files.absolute(data_cfg.cache_dir or "~/.cache/lmssl")


def plan(data_cfg: ml_collections.ConfigDict, tokenizer: tok.AnyTokenizer) -> list[shards.Job]:
  """The shard jobs of config.data's corpus, in stream order: `source` (documents held out
  for validation by hash), or `source` then `val_source`. Lists files; reads no text."""
  cache, sha = cache_root(data_cfg), shards.fingerprint_sha256(tokenizer)
  named = [(data_cfg.source, "train")] + ([(data_cfg.val_source, "validation")]
                                          if data_cfg.val_source else [])
  if not data_cfg.val_source and not 0.0 < data_cfg.val_fraction < 1.0:
    raise sources.DataError(f"val_fraction {data_cfg.val_fraction} must be in (0, 1); use e.g. "
                            f"0.05, or set --config.data.val_source")
  return [shards.Job(shard, shards.rule_for(data_cfg.val_fraction, bool(data_cfg.val_source),
                                            split), cache, sha)
          for source, split in named for shard in sources.list_shards(source, data_cfg)]


def tokenizer_for(data_cfg: ml_collections.ConfigDict, given: Optional[tok.AnyTokenizer],
                  workdir: str) -> tok.AnyTokenizer:
  """`given` (the caller loaded it, perhaps a HuggingFace one), else the sentencepiece model
  data_cfg.tokenizer, else `{workdir}/tokenizer.model`, trained on a sample of the corpus when
  it does not exist yet."""
  if given is not None:
    return given
  path = data_cfg.tokenizer
  if path:
    if files.at(path).is_dir() or os.path.basename(path) == "tokenizer.json":
      raise errors.UserError(
          f"tokenizer {path} is a HuggingFace tokenizer, which prepare does not load itself; "
          "run training (python -m lmssl.main), which loads it and prepares the data, or pass "
          "it in loaded by lmssl.hf.tokenizer.load")
    return tok.Tokenizer.load(path)
  path = os.path.join(files.absolute(workdir), "tokenizer.model")
  if files.at(path).exists():
    logging.info("Reusing tokenizer %s", path)
    return tok.Tokenizer.load(path)
  inputs = sources.list_shards(data_cfg.source, data_cfg)
  logging.info("Training a %s tokenizer (vocab %d) on a %d-character sample of %d shards into %s",
               data_cfg.tokenizer_type, data_cfg.vocab_size, data_cfg.tokenizer_sample_chars,
               len(inputs), path)
  # Read whole before training: sentencepiece would swallow a reader's error into its own.
  sample = list(tokenizer_sample(inputs, data_cfg.tokenizer_sample_chars,
                                 data_cfg.tokenizer_sample_seed))
  tok.train(sample, path, data_cfg.vocab_size, data_cfg.tokenizer_type,
            data_cfg.tokenizer_max_sentences)
  return tok.Tokenizer.load(path)


def tokenizer_sample(inputs: Sequence[sources.InputShard], chars: int, seed: int):
  """Distinct documents of about `chars` characters from all of `inputs`, an equal share from
  each: read from a seeded offset where a shard is a byte range (from its start when that
  offset falls in its last document), else from its start. A repeated document is taken
  once: it would only weigh its pieces up (and sentencepiece's substring search slows down
  badly on many repeats)."""
  share = -(-chars // max(len(inputs), 1))
  rng, seen = random.Random(seed), set()
  for shard in inputs:
    starts = [shard]
    if shard.kind in ("text", "jsonl") and shard.stop > 0:
      # Characters are at least a byte each: from 2 * share bytes before the end on, a
      # share may not fit, so offsets stop there.
      offset = shard.start + rng.randrange(max(shard.stop - shard.start - 2 * share, 0) + 1)
      starts.insert(0, dataclasses.replace(shard, start=offset))
    for start in starts:
      taken = 0
      for doc in start.documents():
        digest = hashlib.sha1(doc.encode("utf-8")).digest()
        if digest in seen:
          continue
        seen.add(digest)
        yield doc
        taken += len(doc)
        if taken >= share:
          break
      if taken:
        break


def prepare(data_cfg: ml_collections.ConfigDict, tokenizer: Optional[tok.AnyTokenizer],
            workdir: str, *, workers: int = 0, part: tuple[int, int] | None = None,
            runner: Callable | None = None) -> tuple[str, str | None]:
  """Prepares what config.data's corpus is missing; returns (tokenizer path, prepared dir).

  The tokenizer is `tokenizer_for(data_cfg, tokenizer, workdir)`. `part=(i, n)` prepares only
  jobs i, i + n, ... and writes no manifest (the directory returned is None): the other parts
  run elsewhere, and a later call without `part` finds them. `runner(jobs, tokenizer)` runs
  jobs and returns their shard.json contents (default: `shards.run_local` on `workers`
  processes,
  0 meaning one per core).
  """
  tokenizer = tokenizer_for(data_cfg, tokenizer, workdir)
  return tokenizer.path, _prepare(data_cfg, tokenizer, workers, part, runner)


def _prepare(data_cfg, tokenizer, workers, part, runner) -> str | None:
  pairs.check_settings(data_cfg.sentence_pair, data_cfg.short_seq_prob, data_cfg.seq_len)
  if data_cfg.sentence_pair:
    return _prepare_pairs(data_cfg, tokenizer)
  jobs = plan(data_cfg, tokenizer)
  key = _manifest_key(jobs, data_cfg.seq_len)
  prepared_dir = os.path.join(cache_root(data_cfg), "prepared", key)
  if part is None and _manifest_ok(prepared_dir):
    logging.info("Reusing prepared data %s", prepared_dir)
    return prepared_dir
  mine = jobs if part is None else jobs[part[0]::part[1]]
  done = {job.key: shards.read_shard(job.directory) for job in mine}
  todo = [job for job in mine if done[job.key] is None]
  for job in todo:
    if files.at(job.directory).exists():
      logging.warning("shard %s is unfinished or damaged; preparing it again", job.directory)
  logging.info("Preparing %d of %d shards (%d already prepared)", len(todo), len(mine),
               len(mine) - len(todo))
  if todo:  # a runner returns each job's shard.json content: nothing to read back
    made = (runner or functools.partial(shards.run_local, workers=workers))(todo, tokenizer)
    done.update(zip((job.key for job in todo), made))
  if part is not None:
    return None
  _write_manifest(prepared_dir, data_cfg, tokenizer, jobs, [done[job.key] for job in jobs])
  return prepared_dir


def _manifest_key(jobs: Sequence[shards.Job], seq_len: int) -> str:
  h = hashlib.sha256(f"lmssl-prepared-v{FORMAT_VERSION}:packed:seq_len={seq_len}:".encode())
  for job in jobs:
    h.update(job.key.encode())
  return h.hexdigest()[:16]


def _manifest_ok(prepared_dir: str) -> bool:
  try:
    meta = read_meta(prepared_dir)
  except _Corrupt as e:
    if files.at(prepared_dir).exists():
      logging.warning("prepared data %s is unusable (%s); rebuilding it now", prepared_dir,
                      e.problem)
    return False
  root = os.path.dirname(os.path.dirname(prepared_dir))
  return all(shards.read_shard(shards.shard_directory(root, s["key"])) is not None
             for s in meta["shards"])


def _write_manifest(prepared_dir, data_cfg, tokenizer, jobs, metas) -> None:
  totals = {}
  for split in SPLITS:
    counts = [m["splits"].get(split, dict(documents=0, tokens=0)) for m in metas]
    documents, tokens = sum(c["documents"] for c in counts), sum(c["tokens"] for c in counts)
    if not documents:
      why = ("no document's hash fell below val_fraction "
             f"{data_cfg.val_fraction}; raise it or set --config.data.val_source"
             if split == "validation" and not data_cfg.val_source else
             "point the source at non-empty text")
      raise sources.DataError(f"data source {data_cfg.source!r} gave no {split} documents; "
                              f"{why}")
    framed = tokens + 2 * documents
    totals[split] = dict(num_documents=documents, num_tokens=tokens,
                         num_examples=-(-framed // data_cfg.seq_len))
  meta = dict(format_version=FORMAT_VERSION, format="packed", seq_len=data_cfg.seq_len,
              vocab_size=tokenizer.vocab_size, cls_id=tokenizer.cls_id,
              sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id, source=data_cfg.source,
              val_source=data_cfg.val_source, tokenizer_sha256=jobs[0].tokenizer_sha256,
              splits=totals,
              shards=[dict(key=job.key, input=job.shard.describe(),
                           **{split: dict(documents=c["documents"], tokens=c["tokens"])
                              for split, c in m["splits"].items()})
                      for job, m in zip(jobs, metas)])
  files.write_atomically(os.path.join(prepared_dir, "meta.json"), json.dumps(meta, indent=1))
  logging.info("Prepared %s into %s", json.dumps(totals), prepared_dir)


# Sentence pairs: built in memory from all documents, stored whole.

def _prepare_pairs(data_cfg: ml_collections.ConfigDict, tokenizer: tok.AnyTokenizer) -> str:
  train_docs, val_docs = sources.train_and_val_documents(data_cfg)
  splits = dict(train=train_docs, validation=val_docs)
  layout = f"pairs-v{pairs.VERSION}:short_seq_prob={float(data_cfg.short_seq_prob)!r}:"
  h = hashlib.sha256(f"lmssl-prepared-v{FORMAT_VERSION}:seq_len={data_cfg.seq_len}:".encode())
  h.update(layout.encode())
  h.update(hashlib.sha256(tokenizer.fingerprint).digest())
  for name, docs in splits.items():
    h.update(f"{name}:{len(docs)}:".encode())
    for doc in docs:
      data = doc.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))  # Length prefixes keep boundaries unambiguous.
      h.update(data)
  key = h.hexdigest()
  prepared_dir = os.path.join(cache_root(data_cfg), "prepared", key[:16])
  if os.path.isdir(prepared_dir):
    try:
      for split in SPLITS:
        load_prepared(prepared_dir, split)
      logging.info("Reusing prepared data %s", prepared_dir)
      return prepared_dir
    except _Corrupt as e:
      logging.warning("prepared data %s is unusable (%s); rebuilding it now", prepared_dir,
                      e.problem)
      shutil.rmtree(prepared_dir)
  meta = dict(format_version=FORMAT_VERSION, format="pairs", seq_len=data_cfg.seq_len,
              vocab_size=tokenizer.vocab_size, source=data_cfg.source,
              val_source=data_cfg.val_source, short_seq_prob=data_cfg.short_seq_prob,
              tokenizer_sha256=hashlib.sha256(tokenizer.fingerprint).hexdigest(), splits={})
  encode = lambda texts: [i for b in range(0, len(texts), 2048)
                          for i in tokenizer.encode_batch(texts[b:b + 2048])]
  arrays = {}
  for index, (name, docs) in enumerate(splits.items()):
    # Pair building draws from a generator fixed by the content hash: prepare is deterministic.
    arrays[name], num_tokens = pairs.prepare_split(
        docs, encode, data_cfg.seq_len, data_cfg.short_seq_prob,
        np.random.default_rng((int(key[:16], 16), index)))
    meta["splits"][name] = dict(num_documents=len(docs), num_examples=len(arrays[name]["doc"]),
                                num_tokens=num_tokens)
  _write_arrays(prepared_dir, arrays, meta)
  logging.info("Prepared %s into %s", json.dumps(meta["splits"]), prepared_dir)
  return prepared_dir


def _write_arrays(prepared_dir: str, arrays: dict, meta: dict) -> None:
  """Builds the directory under a temporary name next to it, then renames it into place."""
  parent = os.path.dirname(prepared_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(prepared_dir)}.tmp-")
  try:
    for split, split_arrays in arrays.items():
      os.makedirs(os.path.join(tmp, split))
      for name, array in split_arrays.items():
        np.save(os.path.join(tmp, split, f"{name}.npy"), array)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    os.rename(tmp, prepared_dir)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(prepared_dir):  # Else another process won the race with the same data.
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# Reading prepared data.

class _Corrupt(sources.DataError):
  """A prepared directory that cannot be used; `problem` says which file and why."""

  def __init__(self, message: str, problem: str):
    super().__init__(message)
    self.problem = problem


def _corrupt(path: str, problem: str, prepared_dir: str) -> sources.DataError:
  return _Corrupt(f"prepared data file {path} {problem}; run the prepare (or the training run) "
                  f"again, which rebuilds it", f"{path} {problem}")


def read_meta(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, "meta.json")
  try:
    meta = json.loads(files.at(path).read_text())
  except FileNotFoundError:
    raise _corrupt(path, "is missing", prepared_dir) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _corrupt(path, f"is not valid JSON ({e})", prepared_dir) from None
  try:
    ok = (meta["format_version"] == FORMAT_VERSION and meta["seq_len"] > 0
          and meta.get("format") in FORMATS
          and all(meta["splits"][s]["num_examples"] >= 0 for s in SPLITS))
  except (KeyError, TypeError):
    ok = False
  if not ok:
    raise _corrupt(path, f"is not a format-{FORMAT_VERSION} lmssl meta file", prepared_dir)
  return meta


def load_prepared(prepared_dir: str, split: str):
  """One split of prepared data: packed data as `packed.PackedRows` (rows read on demand),
  pairs as memory-mapped int32 arrays `a_ids`, `b_ids` [N, seq_len - 3] and `a_len`,
  `b_len`, `doc` [N]."""
  if split not in SPLITS:
    raise errors.UserError(f"unknown split {split!r}; known: {list(SPLITS)}")
  meta = read_meta(prepared_dir)
  if meta["format"] == "packed":
    root = os.path.dirname(os.path.dirname(prepared_dir))
    # The manifest is written once every shard it names is complete, so the shards are not
    # checked again here: at thousands of shards on Cloud Storage that would delay every start.
    entries = [(shards.shard_directory(root, s["key"]), s[split]["documents"], s[split]["tokens"])
               for s in meta["shards"] if split in s]
    return packed.PackedRows(entries, split, meta["seq_len"],
                             (meta["cls_id"], meta["sep_id"], meta["pad_id"]))
  n = meta["splits"][split]["num_examples"]
  arrays = {}
  for name in pairs.ARRAYS:
    shape = (n, meta["seq_len"] - pairs.NUM_SPECIAL) if name.endswith("_ids") else (n,)
    path = os.path.join(prepared_dir, split, f"{name}.npy")
    try:
      arrays[name] = np.load(path, mmap_mode="r")
    except FileNotFoundError:
      raise _corrupt(path, "is missing", prepared_dir) from None
    except ValueError as e:
      raise _corrupt(path, f"cannot be read ({e})", prepared_dir) from None
    if arrays[name].shape != shape or arrays[name].dtype != np.int32:
      raise _corrupt(path, f"has shape {arrays[name].shape} {arrays[name].dtype}, meta.json says "
                     f"{shape} int32", prepared_dir)
  return arrays


def _main() -> None:
  # Flags live here, not at import, so importing this module from the trainer adds none.
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file("config", None, "Run config file (data section used).")
  workdir = flags.DEFINE_string("workdir", None, "Where a trained tokenizer.model goes.")
  num_shards = flags.DEFINE_integer("num_shards", 1, "Split the jobs into this many parts...")
  shard_index = flags.DEFINE_integer("shard_index", 0, "...and prepare only this one (0-based).")
  workers = flags.DEFINE_integer("workers", None, "Processes; default config.data.prepare_workers.")
  runner = flags.DEFINE_enum("runner", "local", ["local", "beam"],
                             "local processes, or Apache Beam (flags after -- go to Beam).")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    data_cfg = config.value.data
    try:
      in_the_way = files.file_in_the_way(workdir.value)
      if in_the_way is not None:
        raise errors.UserError(f"--workdir {workdir.value} cannot be used: {in_the_way} is a "
                               "file, not a directory; give --workdir a new or existing "
                               "directory, or move the file away")
      if not 0 <= shard_index.value < num_shards.value:
        raise errors.UserError(f"--shard_index {shard_index.value} must be in [0, --num_shards "
                               f"{num_shards.value})")
      if len(argv) > 1 and runner.value != "beam":
        raise errors.UserError(f"unexpected arguments {argv[1:]}; only --runner beam takes "
                               "flags after --")
      run_jobs = None
      if runner.value == "beam":
        from lmssl.data import beam_prepare  # pylint: disable=g-import-not-at-top
        run_jobs = functools.partial(beam_prepare.run, pipeline_args=argv[1:])
      part = None if num_shards.value == 1 else (shard_index.value, num_shards.value)
      tokenizer_path, prepared_dir = prepare(
          data_cfg, None, workdir.value, part=part, runner=run_jobs,
          workers=data_cfg.prepare_workers if workers.value is None else workers.value)
    except errors.UserError as e:
      raise SystemExit(f"lmssl: error: {e}") from None
    print(f"tokenizer: {tokenizer_path}")
    print(f"prepared: {prepared_dir}" if prepared_dir else
          f"prepared part {shard_index.value} of {num_shards.value}; run without --num_shards "
          "(or start training) once all parts are done, to write the manifest")

  def parse(argv):  # a config file that cannot be loaded, or a bad flag: one line
    try:
      return config_file.parse_flags(argv)
    except flags.Error as e:
      raise SystemExit(f"lmssl: error: {e}") from None

  app.run(run, flags_parser=parse)


if __name__ == "__main__":
  _main()

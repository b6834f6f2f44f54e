"""Offline preparation: documents -> tokenizer -> int32 rows in a content-addressed cache.

A prepared directory holds `meta.json` and, per split ("train", "validation"), the arrays of its
format (meta.json "format"):
  packed: `SPLIT/tokens.npy` and `SPLIT/segment_ids.npy` (int32 [N, seq_len]), documents
      packed end to end;
  pairs (config.data.sentence_pair set): `a_ids`, `b_ids` (int32 [N, seq_len - 3]) and
      `a_len`, `b_len`, `doc` (int32 [N]), sentence pairs of one document (see pairs.py).
Its name is a hash of everything that determines its content, so a second run with the same
inputs reuses it and changing any input (text, tokenizer, seq_len, pair settings) builds a new
one next to it.

Usage:
  python -m lmssl.data.prepare --config configs/mlm_base.py:size=tiny --workdir /tmp/run \
      [--config.data.source=text:corpus/*.txt]
"""

import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from lmssl import errors
from lmssl import files
from lmssl.data import pairs
from lmssl.data import sources
from lmssl.data import tokenizer as tok

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
ARRAYS = ("tokens", "segment_ids")
FORMATS = ("packed", "pairs")  # meta.json "format"
_ENCODE_BATCH = 2048  # documents per tokenizer call


def pack(docs_token_ids: Iterable[Sequence[int]], seq_len: int,
         tokenizer: tok.AnyTokenizer) -> dict[str, np.ndarray]:
  """Frames each document as `[CLS] ids [SEP]`, concatenates them and cuts rows of seq_len.

  [CLS], [SEP] and padding are the tokenizer's cls_id, sep_id and pad_id. A document crossing
  a row boundary continues in the next row as a new segment. Segment ids count 1, 2, 3...
  within each row; padding (only at the end of the last row) has segment 0.
  """
  docs = [np.asarray(d, dtype=np.int32) for d in docs_token_ids]
  if not docs:
    raise sources.DataError("pack got no documents; the source must yield at least one")
  framed = np.array([len(d) + 2 for d in docs], dtype=np.int64)
  ends = np.cumsum(framed)
  starts = ends - framed
  total = int(ends[-1])
  num_rows = -(-total // seq_len)
  flat = np.full(num_rows * seq_len, tokenizer.pad_id, dtype=np.int32)
  doc_of = np.full(num_rows * seq_len, -1, dtype=np.int64)
  doc_of[:total] = np.repeat(np.arange(len(docs)), framed)
  is_body = np.ones(total, dtype=bool)
  is_body[starts] = False
  is_body[ends - 1] = False
  flat[:total][is_body] = np.concatenate(docs)
  flat[starts] = tokenizer.cls_id
  flat[ends - 1] = tokenizer.sep_id
  doc_of = doc_of.reshape(num_rows, seq_len)
  new_segment = np.ones_like(doc_of, dtype=bool)
  new_segment[:, 1:] = doc_of[:, 1:] != doc_of[:, :-1]
  segment_ids = np.cumsum(new_segment, axis=1, dtype=np.int32)
  segment_ids[doc_of < 0] = 0
  return dict(tokens=flat.reshape(num_rows, seq_len), segment_ids=segment_ids)


def _cache_key(fingerprint: bytes, seq_len: int, splits: dict[str, list[str]],
               layout: str = "") -> str:
  h = hashlib.sha256()
  h.update(f"lmssl-prepared-v{FORMAT_VERSION}:seq_len={seq_len}:".encode())
  h.update(layout.encode())  # empty for packed rows
  h.update(hashlib.sha256(fingerprint).digest())
  for name, docs in splits.items():
    h.update(f"{name}:{len(docs)}:".encode())
    for doc in docs:
      data = doc.encode("utf-8")
      h.update(len(data).to_bytes(8, "little"))  # Length prefixes keep boundaries unambiguous.
      h.update(data)
  return h.hexdigest()


def _own_tokenizer(data_cfg, workdir: str, train_docs: list[str]) -> tok.Tokenizer:
  """The sentencepiece tokenizer prepare finds or makes when the caller passes none."""
  # 1. config.data.tokenizer, 2. one trained earlier into the workdir (resume), 3. train one
  # there now.
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
  logging.info("Training a %s tokenizer (vocab %d) on %d documents into %s",
               data_cfg.tokenizer_type, data_cfg.vocab_size, len(train_docs), path)
  tok.train(train_docs, path, data_cfg.vocab_size, data_cfg.tokenizer_type,
            data_cfg.tokenizer_max_sentences)
  return tok.Tokenizer.load(path)


def prepare(data_cfg: ml_collections.ConfigDict, tokenizer: Optional[tok.AnyTokenizer],
            workdir: str) -> tuple[str, str]:
  """Reads and tokenizes config.data's corpus into rows; returns (tokenizer path, prepared_dir).

  The tokenizer is `tokenizer` if given (the caller loaded it, perhaps a HuggingFace one),
  else the sentencepiece model data_cfg.tokenizer, else `{workdir}/tokenizer.model` (trained from
  the training documents when it does not exist yet). With data_cfg.sentence_pair set the rows are
  sentence pairs, the same for "nsp" and "sop".
  """
  pairs.check_settings(data_cfg.sentence_pair, data_cfg.short_seq_prob, data_cfg.seq_len)
  train_docs, val_docs = sources.train_and_val_documents(data_cfg)
  if tokenizer is None:
    tokenizer = _own_tokenizer(data_cfg, workdir, train_docs)
  tokenizer_path = tokenizer.path
  splits = dict(train=train_docs, validation=val_docs)
  layout = ""
  if data_cfg.sentence_pair:
    layout = f"pairs-v{pairs.VERSION}:short_seq_prob={float(data_cfg.short_seq_prob)!r}:"
  key = _cache_key(tokenizer.fingerprint, data_cfg.seq_len, splits, layout)
  cache_dir = os.path.expanduser(data_cfg.cache_dir or "~/.cache/lmssl")
  prepared_dir = os.path.join(cache_dir, "prepared", key[:16])
  if os.path.isdir(prepared_dir):
    try:
      for split in SPLITS:
        load_prepared(prepared_dir, split)
      logging.info("Reusing prepared data %s", prepared_dir)
      return tokenizer_path, prepared_dir
    except _Corrupt as e:
      logging.warning("prepared data %s is unusable (%s); rebuilding it now", prepared_dir,
                      e.problem)
      shutil.rmtree(prepared_dir)
  meta = dict(format_version=FORMAT_VERSION, format="pairs" if layout else "packed",
              seq_len=data_cfg.seq_len, vocab_size=tokenizer.vocab_size, source=data_cfg.source,
              val_source=data_cfg.val_source,
              tokenizer_sha256=hashlib.sha256(tokenizer.fingerprint).hexdigest(), splits={})
  if layout:
    meta["short_seq_prob"] = data_cfg.short_seq_prob
  arrays = {}
  for index, (name, docs) in enumerate(splits.items()):
    # Pair building draws from a generator fixed by the content hash: prepare is deterministic.
    arrays[name], num_tokens = _build_split(docs, tokenizer, data_cfg,
                                            seed=(int(key[:16], 16), index))
    num_examples = len(arrays[name]["doc" if layout else "tokens"])
    meta["splits"][name] = dict(num_documents=len(docs), num_examples=num_examples,
                                num_tokens=num_tokens)
  _write_atomically(prepared_dir, arrays, meta)
  logging.info("Prepared %s into %s", json.dumps(meta["splits"]), prepared_dir)
  return tokenizer_path, prepared_dir


def _encode(tokenizer: tok.AnyTokenizer, texts: Sequence[str]) -> list[list[int]]:
  return [i for b in range(0, len(texts), _ENCODE_BATCH)
          for i in tokenizer.encode_batch(texts[b:b + _ENCODE_BATCH])]


def _build_split(docs: list[str], tokenizer: tok.AnyTokenizer, data_cfg: ml_collections.ConfigDict,
                 seed: tuple[int, int]) -> tuple[dict[str, np.ndarray], int]:
  """One split's arrays in data_cfg's format, and its number of document tokens."""
  if not data_cfg.sentence_pair:
    ids = _encode(tokenizer, docs)
    return pack(ids, data_cfg.seq_len, tokenizer), int(sum(map(len, ids)))
  return pairs.prepare_split(docs, functools.partial(_encode, tokenizer), data_cfg.seq_len,
                             data_cfg.short_seq_prob, np.random.default_rng(seed))


def _write_atomically(prepared_dir: str, arrays: dict, meta: dict) -> None:
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


class _Corrupt(sources.DataError):
  """A prepared directory that cannot be used; `problem` says which file and why."""

  def __init__(self, message: str, problem: str):
    super().__init__(message)
    self.problem = problem


def _corrupt(path: str, problem: str, prepared_dir: str) -> sources.DataError:
  return _Corrupt(f"prepared data file {path} {problem}; delete {prepared_dir} and run again to "
                  "rebuild it", f"{path} {problem}")


def read_meta(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, "meta.json")
  try:
    with open(path) as f:
      meta = json.load(f)
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


def _shapes(meta: dict, split: str) -> dict[str, tuple]:
  n, seq_len = meta["splits"][split]["num_examples"], meta["seq_len"]
  if meta["format"] == "packed":
    return {name: (n, seq_len) for name in ARRAYS}
  return {name: (n, seq_len - pairs.NUM_SPECIAL) if name.endswith("_ids") else (n,)
          for name in pairs.ARRAYS}


def load_prepared(prepared_dir: str, split: str) -> dict[str, np.ndarray]:
  """Memory-mapped int32 arrays of one split, those the module docstring lists for its format.

  Packed: `tokens`, `segment_ids` [N, seq_len]. Pairs: `a_ids`, `b_ids` [N, seq_len - 3] and
  `a_len`, `b_len`, `doc` [N].
  """
  if split not in SPLITS:
    raise errors.UserError(f"unknown split {split!r}; known: {list(SPLITS)}")
  meta = read_meta(prepared_dir)
  arrays = {}
  for name, shape in _shapes(meta, split).items():
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
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
      tokenizer_path, prepared_dir = prepare(config.value.data, None, workdir.value)
    except errors.UserError as e:
      raise SystemExit(f"lmssl: error: {e}") from None
    print(f"tokenizer: {tokenizer_path}\nprepared: {prepared_dir}")

  app.run(run)


if __name__ == "__main__":
  _main()

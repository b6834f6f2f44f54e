"""Packed rows, cut at read time from prepared shards: memory does not grow with the corpus.

A split's documents, each framed `[CLS] ids [SEP]` and taken in shard order, form one stream
that is cut into rows of seq_len; the last row is padded. Segment ids count the pieces of
documents within a row 1, 2, 3...; padding has segment 0. `pack` builds the same rows in
memory from token lists (small inputs and tests); `PackedRows` reads any row of a prepared
split with a few small reads: memory-mapped files on a local disk, ranged reads elsewhere
(gs://), so a host holds nothing per document and reads only the rows it is asked for.
"""

import bisect
import copy
import json
import os
from typing import Iterable, Sequence

import numpy as np

from lmssl import files
from lmssl.data import shards

_ENDS_CHUNK = 256  # document ends read at once while walking a row


def pack(docs_token_ids: Iterable[Sequence[int]], seq_len: int, tokenizer) -> dict[str, np.ndarray]:
  """{"tokens", "segment_ids"} int32 [N, seq_len] of the framed documents, all in memory."""
  docs = [np.asarray(d, dtype=np.int32) for d in docs_token_ids]
  if not docs:
    raise ValueError("pack got no documents")
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


class _Array:
  """A little-endian array file read by element ranges: mapped when local, ranged reads when
  the path is a URL."""

  def __init__(self, path: str, dtype: str):
    self.path, self.dtype = path, np.dtype(dtype)
    self._map = None

  def get(self, start: int, stop: int) -> np.ndarray:
    if not files.is_url(self.path):
      if self._map is None:
        self._map = np.memmap(self.path, dtype=self.dtype, mode="r")
      return self._map[start:stop]
    with files.at(self.path).open("rb") as f:
      f.seek(start * self.dtype.itemsize)
      return np.frombuffer(f.read((stop - start) * self.dtype.itemsize), dtype=self.dtype)


class _Shard:
  """One shard's split: its token and ends files, and the coarse index from its shard.json."""

  def __init__(self, directory: str, split: str, documents: int):
    self.directory, self.split, self.documents = directory, split, documents
    self._opened = None

  def _open(self):
    if self._opened is None:
      meta = json.loads(files.at(os.path.join(self.directory, "shard.json")).read_text())
      path = lambda name: os.path.join(self.directory, f"{self.split}.{name}")
      self._opened = (_Array(path("tokens"), meta["dtype"]), _Array(path("ends"), "<i8"),
                      meta["splits"][self.split]["index"])
    return self._opened

  def tokens(self, start: int, stop: int) -> np.ndarray:
    return self._open()[0].get(start, stop)

  def ends(self, start: int, stop: int) -> np.ndarray:
    return self._open()[1].get(start, min(stop, self.documents))

  def document_at(self, q: int) -> int:
    """The document whose framed span holds position q of this shard's framed stream."""
    index = self._open()[2]  # index[k]: framed end of document (k + 1) * INDEX_EVERY - 1
    first = bisect.bisect_right(index, q) * shards.INDEX_EVERY
    ends = self.ends(first, first + shards.INDEX_EVERY)
    framed_ends = ends + 2 * np.arange(first + 1, first + 1 + len(ends))
    return first + int(np.searchsorted(framed_ends, q, side="right"))


class PackedRows:
  """Rows [seq_len] of one prepared split. `entries`: (shard directory, documents, tokens)
  of `split` per shard in order; `ids`: the tokenizer's (cls, sep, pad) ids."""

  def __init__(self, entries: Sequence[tuple[str, int, int]], split: str, seq_len: int,
               ids: tuple[int, int, int]):
    entries = [e for e in entries if e[1] > 0]
    self.seq_len = seq_len
    self.cls_id, self.sep_id, self.pad_id = ids
    self._shards = [_Shard(d, split, n) for d, n, _ in entries]
    framed = [tokens + 2 * documents for _, documents, tokens in entries]
    self._starts = np.concatenate([[0], np.cumsum(framed, dtype=np.int64)])
    self.total = int(self._starts[-1])
    self.num_rows = -(-self.total // seq_len)

  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_rows, self.seq_len)

  def padded(self, multiple: int) -> "PackedRows":
    """These rows, then rows of padding only (segment 0: they weigh nothing) up to a multiple
    of `multiple` rows, so that whole batches cover every row: a full evaluation."""
    out = copy.copy(self)
    out.num_rows = -(-self.num_rows // multiple) * multiple
    return out

  def to_arrays(self) -> dict[str, np.ndarray]:
    """{"tokens", "segment_ids"} of every row, in memory: for small splits only."""
    tokens, segment_ids = self.read(np.arange(self.num_rows))
    return dict(tokens=tokens, segment_ids=segment_ids)

  def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids) int32 [len(rows), seq_len] of the given row numbers."""
    rows = np.asarray(rows, dtype=np.int64)
    tokens = np.full((len(rows), self.seq_len), self.pad_id, dtype=np.int32)
    segments = np.zeros((len(rows), self.seq_len), dtype=np.int32)
    for i, row in enumerate(rows):
      if row * self.seq_len < self.total:  # else a row of `padded`'s padding
        self._fill(int(row) * self.seq_len, tokens[i], segments[i])
    return tokens, segments

  def _fill(self, position: int, tokens_L: np.ndarray, segments_L: np.ndarray) -> None:
    stop = min(position + self.seq_len, self.total)
    s = int(np.searchsorted(self._starts, position, side="right")) - 1
    shard = self._shards[s]
    q = position - int(self._starts[s])
    j = shard.document_at(q)
    col, segment = 0, 0
    while position < stop:
      base = max(j - 1, 0)
      ends = shard.ends(base, j + _ENDS_CHUNK)
      for k in range(j, base + len(ends)):
        begin = int(ends[k - 1 - base]) if k else 0
        length = int(ends[k - base]) - begin + 2
        framed_start = begin + 2 * k
        offset, take = q - framed_start, min(length - (q - framed_start), stop - position)
        segment += 1
        segments_L[col:col + take] = segment
        body_from, body_to = max(offset, 1), min(offset + take, length - 1)
        if body_to > body_from:
          tokens_L[col + body_from - offset:col + body_to - offset] = shard.tokens(
              begin + body_from - 1, begin + body_to - 1)
        if offset == 0:
          tokens_L[col] = self.cls_id
        if offset + take == length:
          tokens_L[col + take - 1] = self.sep_id
        col, q, position = col + take, q + take, position + take
        if position >= stop:
          return
      j = base + len(ends)
      if j >= shard.documents:  # on to the next shard with documents of this split
        s += 1
        shard, q, j = self._shards[s], 0, 0

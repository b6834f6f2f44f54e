"""Reading one piece of one input at a time: text and JSONL byte ranges (plain, .gz or .zst),
parquet row groups and TFDS shards, each streamed document by document.

Offsets are bytes of the uncompressed stream. A byte range [start, stop) of a text file owns
the documents whose first line starts inside it; of a JSONL file, the lines that start inside
it. So the ranges of a file, read one after another, give exactly the documents of the whole.
"""

import gzip
import json
import re
import zlib
from typing import Iterator

from lmssl import errors

_CHUNK = 1 << 20  # bytes read at a time; with one line or document, all a reader holds
_ZSTD_CHUNK = 1 << 16  # compressed bytes fed to zstd at a time (its output is ~10x larger)
_PARQUET_ROWS = 1024  # rows decoded at a time
_BLANK = b" \t\r\v\f"  # with "\n", what a blank line holds (bytes.strip's set)


class DataError(errors.UserError):
  """A data source or prepared file that cannot be used as given."""


def decode(path: str, data: bytes, at: int = 0) -> str:
  """`data`, which starts at byte `at` of `path`, as UTF-8 text."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 text (byte {at + e.start}: "
                    f"{data[e.start:e.start + 4]!r}); convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8`") from None


def empty(path: str, if_empty: str = "remove it or narrow the glob") -> DataError:
  return DataError(f"{path} is empty; {if_empty}")


def read_text(path: str, if_empty: str = "remove it or narrow the glob") -> str:
  """A small file's whole text, which must be non-empty UTF-8; `if_empty` says what to do
  otherwise."""
  with open(path, "rb") as f:
    text = decode(path, f.read())
  if not text.strip():
    raise empty(path, if_empty)
  return text


def jsonl_records(path: str, text: str):
  """(line number, object) for each non-blank line of a JSONL file's `text`."""
  for lineno, line in enumerate(text.split("\n"), start=1):
    if line.strip():
      yield lineno, _record(f"{path}:{lineno}", line)


def _record(where: str, line: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{where} is not valid JSON ({e.msg}); fix or drop that line") from None
  if not isinstance(record, dict):
    raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; each line must "
                    f"be one object holding the fields")
  return record


# ---------------------------------------------------------------------------- lines of a file


def is_compressed(path: str) -> bool:
  return path.endswith((".gz", ".zst"))


def _lines(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
  """(offset, line with its "\\n") of each line of `path` from the first one that starts at
  or after byte `start` (0 for a compressed file)."""
  at = max(start - 1, 0)  # the rest of the line holding byte start-1 belongs to the range before
  skip, pos, head = start > 0, at, []
  for chunk in _chunks(path, at):
    pieces = chunk.split(b"\n")
    for piece in pieces[:-1]:
      line = b"".join(head) + piece + b"\n" if head else piece + b"\n"
      head = []
      if not skip:
        yield pos, line
      skip, pos = False, pos + len(line)
    if pieces[-1]:
      head.append(pieces[-1])
  if head and not skip:
    yield pos, b"".join(head)


def _chunks(path: str, at: int) -> Iterator[bytes]:
  with open(path, "rb") as f:
    if path.endswith(".gz"):
      yield from _gzip_chunks(path, f)
    elif path.endswith(".zst"):
      yield from _zstd_chunks(path, f)
    else:
      f.seek(at)
      while chunk := f.read(_CHUNK):
        yield chunk


def _damaged(path: str, kind: str, reason, fix: str = "re-compress") -> DataError:
  return DataError(f"{path} is truncated or not valid {kind} ({reason}); re-download or "
                   f"{fix} it")


def _gzip_chunks(path: str, f) -> Iterator[bytes]:
  try:
    with gzip.open(f) as g:
      while chunk := g.read(_CHUNK):
        yield chunk
  except (EOFError, OSError, zlib.error) as e:
    raise _damaged(path, "gzip", e) from None


def _zstd_chunks(path: str, f) -> Iterator[bytes]:
  # One decompressor per frame: zstandard's stream readers end quietly at a cut-off frame,
  # so a truncated file would pass for a shorter one.
  import zstandard  # Lazy: only .zst inputs need it.
  dctx = zstandard.ZstdDecompressor()
  frame, in_frame = dctx.decompressobj(), False
  try:
    while data := f.read(_ZSTD_CHUNK):
      while data:
        out, data, in_frame = frame.decompress(data), b"", True
        if frame.eof:  # what is left over starts the next frame
          data, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
        if out:
          yield out
  except zstandard.ZstdError as e:
    raise _damaged(path, "zstd", e) from None
  if in_frame:
    raise _damaged(path, "zstd", "the last frame is cut short")


# ---------------------------------------------------------------------------- text and JSONL


def text_documents(path: str, start: int = 0, stop: int = -1) -> Iterator[str]:
  """The stripped, non-empty documents (runs of lines between blank lines) of `path` whose
  first line starts in bytes [start, stop); stop -1: to the end of the file."""
  found = False
  for doc in _text_range(path, start, stop):
    found = True
    yield doc
  # Only a whole file without documents is an error; a range inside a long document has none.
  if not found and ((start == 0 and stop < 0) or next(_text_range(path), None) is None):
    raise empty(path)


def _text_range(path: str, start: int = 0, stop: int = -1) -> Iterator[str]:
  doc, doc_at, after_blank = [], 0, None
  for pos, line in _lines(path, start):
    if 0 <= stop <= pos and not doc:
      return  # any document from here on starts at or after `stop`
    if after_blank is None:  # the first line read: does a document start on it?
      after_blank = pos == 0 or _blank_line_ends_at(path, pos)
    if not line.strip():
      if doc:
        yield from _finished(path, doc, doc_at)
      doc, after_blank = [], True
      continue
    if after_blank:
      doc_at = pos
    if after_blank or doc:  # else: the tail of a document the range before owns
      doc.append(line)
    after_blank = False
  yield from _finished(path, doc, doc_at)


def _finished(path: str, lines: list[bytes], at: int) -> Iterator[str]:
  text = decode(path, b"".join(lines), at).replace("\r\n", "\n").strip()
  if text:
    yield text


def _blank_line_ends_at(path: str, end: int) -> bool:
  """Whether the line ending just before byte `end` (its "\\n" at end-1) is blank: scans
  backwards over whitespace only, so it reads a few bytes, not the line."""
  with open(path, "rb") as f:
    at = end - 1
    while at > 0:
      size = min(at, 4096)
      f.seek(at - size)
      rest = f.read(size).rstrip(_BLANK)
      if rest:
        return rest.endswith(b"\n")
      at -= size
  return True  # whitespace back to the start of the file


def jsonl_documents(path: str, field: str, start: int = 0, stop: int = -1) -> Iterator[str]:
  """The non-blank `field` strings of the JSONL lines of `path` that start in [start, stop)."""
  found = False
  for where, record in _jsonl_range(path, start, stop):
    found = True
    if field not in record:
      raise DataError(f"{where} has no field {field!r} (found {sorted(record)}); name the text "
                      f"field in the source, e.g. jsonl:GLOB:text")
    value = record[field]
    if not isinstance(value, str):
      raise DataError(f"{where} field {field!r} is a {type(value).__name__}, not a string; "
                      f"name a text field")
    if value.strip():
      yield value
  if not found and next(_jsonl_range(path), None) is None:
    raise empty(path)


def _jsonl_range(path: str, start: int = 0, stop: int = -1) -> Iterator[tuple[str, dict]]:
  """(where, object) of the non-blank lines; `where` is path:LINE, or path byte OFFSET in a
  range that starts past 0 (where line numbers are unknown)."""
  for lineno, (pos, raw) in enumerate(_lines(path, start), start=1):
    if 0 <= stop <= pos:
      return
    line = decode(path, raw, pos)
    if line.strip():
      where = f"{path}:{lineno}" if start == 0 else f"{path} byte {pos}"
      yield where, _record(where, line)


# ---------------------------------------------------------------------------- parquet


def parquet_row_groups(path: str, column: str, group_bytes: int | None) -> list[tuple[int, int]]:
  """[start, stop) row-group ranges of about `group_bytes` uncompressed (None: one range),
  from the file's footer alone."""
  meta = _parquet(path, column).metadata
  if meta.num_rows == 0:
    raise empty(path)
  ranges, first, size = [], 0, 0
  for i in range(meta.num_row_groups):
    size += meta.row_group(i).total_byte_size
    if i == meta.num_row_groups - 1 or (group_bytes is not None and size >= group_bytes):
      ranges.append((first, i + 1))
      first, size = i + 1, 0
  return ranges


def parquet_documents(path: str, column: str, start: int, stop: int) -> Iterator[str]:
  """The non-blank strings of `column` in row groups [start, stop), a batch of rows at a time."""
  import pyarrow  # Lazy: only parquet inputs need it.
  batches = _parquet(path, column).iter_batches(
      batch_size=_PARQUET_ROWS, row_groups=list(range(start, stop)), columns=[column])
  try:
    for batch in batches:
      for text in batch.column(0).to_pylist():
        if text and text.strip():
          yield text
  except (pyarrow.ArrowException, OSError) as e:
    raise _damaged(path, "parquet", e, "re-write") from None


def _parquet(path: str, column: str):
  """The open ParquetFile, once its footer is read and `column` is known to hold strings."""
  import pyarrow
  import pyarrow.parquet as pq
  try:
    file = pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise _damaged(path, "parquet", e, "re-write") from None
  schema = file.schema_arrow
  if column not in schema.names:
    raise DataError(f"{path} has no column {column!r} (found {schema.names}); name the text "
                    f"column in the source, e.g. parquet:GLOB:text")
  kind = schema.field(column).type
  if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
    raise DataError(f"{path} column {column!r} is {kind}, not a string; name a text column")
  return file


# ---------------------------------------------------------------------------- TFDS


def tfds_shards(name: str, split: str, feature: str) -> list[tuple[int, int, dict]]:
  """(first shard, stop shard, identity) for each TFDS shard of `split`, from its metadata.

  A split without shard lengths (a slice like train[:10%], a sum like train+test, or a
  mocked dataset, which has no metadata) is one range (0, -1): the whole split.
  """
  import tensorflow_datasets as tfds  # Lazy: slow to import and only this form needs it.
  try:
    info = tfds.builder(name).info
  except Exception as e:  # TFDS raises several types for "unknown" or "unreadable".
    raise _not_loaded(name, split, e) from e
  if feature not in info.features:
    raise _no_feature(name, feature, info.features)
  version = str(info.version)
  if not (re.fullmatch(r"[\w-]+", split) and split in info.splits):
    _load(name, split, feature)  # the errors of a missing or unprepared split, now
    return [(0, -1, {"version": version, "split": split})]
  shard_lengths = info.splits[split].shard_lengths
  try:
    files = info.splits[split].filenames
  except ValueError:  # no file name template recorded
    files = [""] * len(shard_lengths)
  return [(i, i + 1, {"version": version, "file": file, "examples": n})
          for i, (file, n) in enumerate(zip(files, shard_lengths))]


def tfds_documents(name: str, split: str, feature: str, start: int, stop: int) -> Iterator[str]:
  """The non-blank `feature` texts of shards [start, stop) of `split` (stop -1: all of it)."""
  import tensorflow_datasets as tfds
  ds = _load(name, split if stop < 0 else f"{split}[{start}shard:{stop}shard]", feature)
  for value in tfds.as_numpy(ds.map(lambda x: x[feature])):
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if text.strip():
      yield text


def _load(name: str, split: str, feature: str):
  import tensorflow_datasets as tfds
  try:
    ds = tfds.load(name, split=split, download=False)
  except Exception as e:  # TFDS raises several types for "not prepared"; all mean the same here.
    raise _not_loaded(name, split, e) from e
  if feature not in ds.element_spec:
    raise _no_feature(name, feature, ds.element_spec)
  return ds


def _not_loaded(name: str, split: str, e: Exception) -> DataError:
  reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]  # not all datasets
  return DataError(f"TFDS dataset {name!r} split {split!r} could not be loaded ({reason}); it "
                   f"must be prepared first (`tfds build {name}` on a machine with internet, "
                   f"with TFDS_DATA_DIR pointing at the same directory)")


def _no_feature(name: str, feature: str, known) -> DataError:
  return DataError(f"TFDS dataset {name!r} has no feature {feature!r}; known: {sorted(known)}")

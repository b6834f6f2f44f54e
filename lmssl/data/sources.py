"""Where documents come from: a source string names a corpus, made of input shards that each
stream their documents one at a time.

Source forms (config.data.source / val_source):
  builtin                          docstrings of the installed Python (no network needed)
  text:GLOB                        UTF-8 text files; each file splits into documents at blank lines
  jsonl:GLOB:FIELD                 one JSON object per line; FIELD holds the document text
  parquet:GLOB:COLUMN              parquet files; COLUMN holds the document text
  tfds:NAME[/CONFIG]:SPLIT:FEATURE an already prepared TFDS dataset (never downloads)
Text and JSONL files may be gzip (.gz) or zstd (.zst) compressed.

`list_shards` cuts a source into `InputShard`s from file sizes and footers alone: an
uncompressed text or JSONL file larger than data.shard_bytes into byte ranges, a parquet file
into runs of row groups, a TFDS split into its shards. Order is deterministic: files sorted,
shards in file order, documents in shard order. `read_documents` is all of it as one list, for
callers whose corpora are small.
"""

import ast
import dataclasses
import glob
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
from typing import Iterator, Sequence

import ml_collections

from lmssl.data import readers

SOURCE_FORMS = ("builtin", "text:GLOB", "jsonl:GLOB:FIELD", "parquet:GLOB:COLUMN",
                "tfds:NAME[/CONFIG]:SPLIT:FEATURE")
MIN_DOCSTRING_CHARS = 40
_TEST_DIRS = frozenset({"test", "tests", "testing", "idle_test", "__pycache__"})
_SKIP_DIRS = frozenset({"site-packages", "dist-packages"})
# Pieces of the docstring finder (see _docstrings): blank/comment lines, a string literal
# standing alone as a statement, a def/class header and the colon that ends it.
_GAP = r"(?:[ \t]*(?:\#[^\n]*)?\n)*[ \t]*"
_LITERAL = (r"(?P<lit>[rRuU]?(?:" r'"""[\s\S]*?(?<!\\)"""' r"|'''[\s\S]*?(?<!\\)'''"
            r'|"(?:[^"\\\n]|\\.)*"' r"|'(?:[^'\\\n]|\\.)*'" r"))[ \t]*(?:\#[^\n]*)?(?:\n|\Z)")
_MODULE_DOC = re.compile(r"\A\ufeff?" + _GAP + _LITERAL)
_HEADER = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+\w+", re.M)
_HEADER_END = re.compile(r":[ \t]*(?:\#[^\n]*)?\n")
_FIRST_STRING = re.compile(_GAP + _LITERAL)


# Named here too: the task readers, derive and the tests know them as sources.X.
DataError = readers.DataError
read_text = readers.read_text
jsonl_records = readers.jsonl_records


@dataclasses.dataclass(frozen=True)
class InputShard:
  """One piece of a source, read on its own: a byte range of a text or JSONL file, a run of
  row groups of a parquet file, a TFDS shard, or the whole builtin corpus.

  Plain data (`to_json`), so a worker process can be sent it and read it alone.
  """
  kind: str  # "builtin" | "text" | "jsonl" | "parquet" | "tfds"
  path: str  # the file; tfds: "NAME[/CONFIG]:SPLIT"; builtin: ""
  # text/jsonl: [start, stop) in uncompressed bytes ((0, -1) for a compressed file); parquet:
  # row groups; tfds: shards ((0, -1): the whole split); builtin: (0, -1).
  start: int
  stop: int
  field: str  # the JSONL field, parquet column or TFDS feature; "" for text and builtin
  # JSON of what changes when the input does: a file's size and mtime; the TFDS version and
  # shard file; the builtin corpus's Python, stdlib and cap. A cache keyed on it goes stale
  # exactly when the input changes.
  identity: str

  def documents(self) -> Iterator[str]:
    """The non-empty documents of this shard, in order, one at a time."""
    if self.kind == "text":
      return readers.text_documents(self.path, self.start, self.stop)
    if self.kind == "jsonl":
      return readers.jsonl_documents(self.path, self.field, self.start, self.stop)
    if self.kind == "parquet":
      return readers.parquet_documents(self.path, self.field, self.start, self.stop)
    if self.kind == "tfds":
      name, _, split = self.path.partition(":")
      return readers.tfds_documents(name, split, self.field, self.start, self.stop)
    if self.kind == "builtin":  # the cap is part of what the corpus is, so its identity holds it
      return iter(builtin_documents(json.loads(self.identity)["builtin_max_chars"]))
    raise DataError(f"input shard kind {self.kind!r} is not one of "
                    f"['builtin', 'text', 'jsonl', 'parquet', 'tfds']")

  def describe(self) -> str:
    """The shard for messages: "corpus/a.txt bytes 0-67108864", "c4.parquet row groups 3-4"."""
    if self.kind == "builtin":
      return "the builtin corpus"
    if self.stop < 0:
      return f"{self.kind} {self.path}" if self.kind == "tfds" else self.path
    if self.kind == "parquet":
      last = self.stop - 1
      return (f"{self.path} row group {last}" if last == self.start else
              f"{self.path} row groups {self.start}-{last}")
    if self.kind == "tfds":
      return f"tfds {self.path} shard {self.start}"
    return f"{self.path} bytes {self.start}-{self.stop}"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "InputShard":
    return cls(**d)


def list_shards(source: str, data_cfg: ml_collections.ConfigDict) -> list[InputShard]:
  """The shards of `source`, in order; data.shard_bytes sizes the byte ranges and row-group
  runs. Cheap: globs, stats and footers, never the text."""
  return _shards(source, data_cfg, data_cfg.shard_bytes)


def read_documents(source: str, data_cfg: ml_collections.ConfigDict) -> list[str]:
  """Returns the non-empty documents of `source`, in a deterministic order."""
  # One shard per file: read in order the pieces are the whole, so cutting buys nothing here.
  docs = [d for shard in _shards(source, data_cfg, None) for d in shard.documents()]
  if not docs:
    raise DataError(f"data source {source!r} yielded no documents; point it at non-empty text")
  return docs


def _shards(source: str, data_cfg: ml_collections.ConfigDict,
            shard_bytes: int | None) -> list[InputShard]:
  scheme, _, rest = source.partition(":")
  if source == "builtin":
    return [_builtin_shard(data_cfg.builtin_max_chars)]
  if scheme == "text" and rest:
    return [s for path in _glob(rest, source) for s in _file_shards("text", path, "", shard_bytes)]
  if scheme in ("jsonl", "parquet") and ":" in rest:
    pattern, _, field = rest.rpartition(":")
    return [s for path in _glob(pattern, source)
            for s in _file_shards(scheme, path, field, shard_bytes)]
  if scheme == "tfds" and rest.count(":") == 2:
    name, split, feature = rest.split(":")
    return [InputShard("tfds", f"{name}:{split}", start, stop, feature, _json(identity))
            for start, stop, identity in readers.tfds_shards(name, split, feature)]
  raise DataError(f"data source {source!r} is not one of the known forms {list(SOURCE_FORMS)}; "
                  f"set --config.data.source to one of them")


def _file_shards(kind: str, path: str, field: str, shard_bytes: int | None) -> list[InputShard]:
  stat = os.stat(path)
  identity = _json({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
  if kind == "parquet":
    ranges = readers.parquet_row_groups(path, field, shard_bytes)
  elif readers.is_compressed(path):
    ranges = [(0, -1)]  # a compressed stream is read from its start
  else:
    parts = 1 if shard_bytes is None else max(1, -(-stat.st_size // shard_bytes))
    bounds = [stat.st_size * i // parts for i in range(parts + 1)]
    ranges = list(zip(bounds, bounds[1:]))
  return [InputShard(kind, path, start, stop, field, identity) for start, stop in ranges]


def _builtin_shard(max_chars: int) -> InputShard:
  identity = {"python": sys.version, "builtin_max_chars": max_chars,
              "stdlib": sysconfig.get_paths()["stdlib"]}
  return InputShard("builtin", "", 0, -1, "", _json(identity))


def _json(value: dict) -> str:
  return json.dumps(value, sort_keys=True)


def _glob(pattern: str, source: str) -> list[str]:
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths and os.path.isdir(os.path.expanduser(pattern)):
    scheme, _, rest = source.partition(":")
    example = f"{pattern.rstrip('/')}/*.{scheme if scheme in ('jsonl', 'parquet') else 'txt'}"
    raise DataError(f"data source {source!r}: {pattern} is a directory; name its files with a "
                    f"glob, e.g. {scheme}:{example}{rest[len(pattern):]}")
  if not paths:
    raise DataError(f"data source {source!r}: no files match {pattern!r} (relative to "
                    f"{os.getcwd()}); check the path or quote the glob")
  return paths


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Holds out documents by a hash of their text, so the split ignores order and duplicates.

  A document goes to validation when sha1(text), read as a fraction in [0, 1), is below
  `val_fraction`. With 2+ documents both splits are non-empty: if one is empty, the document
  with the lowest (or highest) hash moves over.
  """
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"val_fraction {val_fraction} must be in (0, 1); use e.g. 0.05, or set "
                    f"--config.data.val_source")
  if len(docs) < 2:
    raise DataError(f"need at least 2 documents to hold out validation, got {len(docs)}; add "
                    f"text or set --config.data.val_source")
  keys = [hash_fraction(d) for d in docs]
  is_val = [k < val_fraction for k in keys]
  if not any(is_val):
    is_val[min(range(len(docs)), key=keys.__getitem__)] = True
  if all(is_val):
    is_val[max(range(len(docs)), key=keys.__getitem__)] = False
  train = [d for d, v in zip(docs, is_val) if not v]
  val = [d for d, v in zip(docs, is_val) if v]
  return train, val


def hash_fraction(text: str) -> float:
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def train_and_val_documents(data_cfg: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(train, val) documents: `val_source` when set, else a hash hold-out of `source`."""
  if data_cfg.val_source:
    return read_documents(data_cfg.source, data_cfg), read_documents(data_cfg.val_source, data_cfg)
  return split_documents(read_documents(data_cfg.source, data_cfg), data_cfg.val_fraction)


def builtin_documents(max_chars: int) -> list[str]:
  """Docstrings of the standard library, then of site-packages, up to `max_chars` in total.

  Read as text (never imported), walked in sorted order, exact duplicates dropped: the
  corpus is a pure function of the installed files. The first docstring that would pass
  `max_chars` ends the harvest.
  """
  docs, seen, total = [], set(), 0
  for path in _python_files():
    for doc in _docstrings(path):
      if len(doc) < MIN_DOCSTRING_CHARS or doc in seen:
        continue
      if total + len(doc) > max_chars:
        return docs
      seen.add(doc)
      docs.append(doc)
      total += len(doc)
  return docs


def _python_files() -> Iterator[str]:
  paths = sysconfig.get_paths()
  roots = [paths["stdlib"]]
  roots += sorted({paths["purelib"], paths["platlib"]} - set(roots))
  for root in roots:
    # site-packages inside the stdlib dir belongs to the base interpreter, not this run.
    skip = _TEST_DIRS | (_SKIP_DIRS if root == paths["stdlib"] else frozenset())
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
      for name in sorted(filenames):
        if name.endswith(".py") and not name.startswith("test_"):
          yield os.path.join(dirpath, name)


def _docstrings(path: str) -> list[str]:
  """Module, class and function docstrings of one file; [] when it cannot be read.

  `ast.parse` of every file costs ~15 s for a 6M-char corpus, so docstrings are located with
  regexes instead: the first statement of the file, or the first statement after a `def` /
  `class` header, when it is a plain string literal. The literal itself is decoded by
  `ast.literal_eval` and cleaned like `ast.get_docstring`. On a sample of 150 library files
  this found exactly the docstrings `ast` finds.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError):
    return []  # A corpus harvest: an unreadable file just contributes nothing.
  literals = []
  module_doc = _MODULE_DOC.match(text)
  if module_doc:
    literals.append(module_doc.group("lit"))
  for header in _HEADER.finditer(text):
    colon = _HEADER_END.search(text, header.end())
    if colon is None:
      break
    body = _FIRST_STRING.match(text, colon.end())
    if body:
      literals.append(body.group("lit"))
  docs = []
  for literal in literals:
    try:
      value = ast.literal_eval(literal)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
      continue
    doc = inspect.cleandoc(value).strip()
    if doc:
      docs.append(doc)
  return docs


if __name__ == "__main__":  # Quick look: python -m lmssl.data.sources [max_chars]
  found = builtin_documents(int(sys.argv[1]) if len(sys.argv) > 1 else 6_000_000)
  print(f"{len(found)} docstrings, {sum(map(len, found))} chars")

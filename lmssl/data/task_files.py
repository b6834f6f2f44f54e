"""Reading fine-tuning task files: labelled examples from TSV, CSV, JSONL, TFDS or CoNLL.

Task kinds (config.task.kind):
  classification  one label per example, out of a set of names
  regression      one number per example
  tokens          one tag per word (e.g. named entities), out of a set of names

Source forms (config.task.train_source / eval_source):
  tsv:PATH, csv:PATH        a header row of column names; TSV is unquoted, as GLUE ships it
  jsonl:PATH                one JSON object per line
  tfds:NAME[/CONFIG]:SPLIT  an already prepared TFDS dataset (never downloads)
  conll:PATH                tokens only: "word ... tag" lines, blank lines between sentences

Encoding the examples into arrays is `tasks.py`'s. Nothing here writes to disk.
"""

from collections.abc import Iterable, Iterator
import csv
import dataclasses
import io
import math
import os

import ml_collections
import numpy as np

from lmssl.data import sources

KINDS = ("classification", "regression", "tokens")
SOURCE_FORMS = ("tsv:PATH", "csv:PATH", "jsonl:PATH", "tfds:NAME[/CONFIG]:SPLIT", "conll:PATH")
_TABLE_SCHEMES = ("tsv", "csv", "jsonl", "tfds")
_DOCSTART = "-DOCSTART-"

DataError = sources.DataError
Record = tuple[str, dict]  # (where, column -> value)


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled example.

  texts: one text, or two for a sentence pair; for kind "tokens", the words.
  label: a label name; a float for regression; for kind "tokens", one tag per word.
  where: "path:line" (or the TFDS split and index), for error messages.
  """
  texts: tuple[str, ...]
  label: str | float | tuple[str, ...]
  where: str


def task_kind(task_cfg: ml_collections.ConfigDict) -> str:
  if task_cfg.kind not in KINDS:
    raise DataError(f"task.kind={task_cfg.kind!r} is not known; set --config.task.kind to one "
                    f"of {list(KINDS)}")
  return task_cfg.kind


def _flag(source: str, task_cfg: ml_collections.ConfigDict) -> str:
  """The config flag(s) that set `source`, so a message can name the one to change."""
  fields = [f for f in ("train_source", "eval_source") if task_cfg.get(f) == source]
  return " or ".join(f"--config.task.{f}" for f in fields or ("train_source", "eval_source"))


def read_examples(source: str, task_cfg: ml_collections.ConfigDict) -> list[Example]:
  """The examples of `source`, in file (or dataset) order; forms in the module docstring."""
  kind = task_kind(task_cfg)
  scheme, _, rest = source.partition(":")
  flag = _flag(source, task_cfg)
  if scheme == "conll" and rest:
    if kind != "tokens":
      raise DataError(f"task source {source!r} holds word tags, which only task kind 'tokens' "
                      f"reads (task.kind is {kind!r}); set --config.task.kind=tokens or point "
                      f"{flag} at a tsv/csv/jsonl/tfds source")
    examples = _conll_examples(rest, flag)
  elif kind == "tokens" and scheme in _TABLE_SCHEMES:
    raise DataError(f"task kind 'tokens' reads CoNLL word/tag files, not {source!r}; set {flag}"
                    f"=conll:PATH, or --config.task.kind to classification or regression")
  elif scheme in ("tsv", "csv") and rest:
    examples = _examples(_table_records(rest, scheme, flag), task_cfg)
  elif scheme == "jsonl" and rest:
    examples = _examples(_jsonl_records(rest, flag), task_cfg)
  elif scheme == "tfds" and rest.count(":") == 1:
    examples = _examples(_tfds_records(*rest.split(":"), task_cfg), task_cfg)
  else:
    raise DataError(f"task source {source!r} is not one of the known forms {list(SOURCE_FORMS)}; "
                    f"set {flag} to one of them")
  if not examples:
    raise DataError(f"task source {source!r} holds no examples; point {flag} at labelled data")
  return examples


def _read_file(path: str, flag: str) -> str:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise DataError(f"task file {path} does not exist (relative to {os.getcwd()}); check the "
                    f"path in {flag}")
  text = sources.read_text(path, f"point {flag} at a file with examples")
  # Spreadsheet exports often start with a BOM, which would glue onto the first column name.
  return text.removeprefix("\ufeff")


def _table_records(path: str, scheme: str, flag: str) -> Iterator[Record]:
  """Rows of a TSV/CSV file with a header row, as (path:line, column -> text)."""
  tsv = scheme == "tsv"
  # GLUE's TSVs contain stray quote characters that are part of the text, so TSV is unquoted.
  dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
  reader = csv.reader(io.StringIO(_read_file(path, flag), newline=""), **dialect)
  header, header_line = None, 0
  try:
    while True:
      line = reader.line_num + 1  # A quoted CSV field may span lines: name the row's first.
      row = next(reader, None)
      if row is None:
        return
      if not row:
        continue  # a blank line
      if header is None:
        header, header_line = [name.strip() for name in row], line
        continue
      if len(row) != len(header):
        hint = " (a tab inside a text splits it)" if tsv else ""
        raise DataError(f"{path}:{line} has {len(row)} columns but the header "
                        f"({path}:{header_line}) has {len(header)}{hint}; fix that line")
      yield f"{path}:{line}", dict(zip(header, row))
  except csv.Error as e:
    raise DataError(f"{path}:{reader.line_num} cannot be read as {scheme.upper()} ({e}); fix "
                    f"that line") from None


def _jsonl_records(path: str, flag: str) -> Iterator[Record]:
  for lineno, record in sources.jsonl_records(path, _read_file(path, flag)):
    yield f"{path}:{lineno}", record


def _tfds_records(name: str, split: str, task_cfg: ml_collections.ConfigDict) -> list[Record]:
  import tensorflow_datasets as tfds  # Lazy: slow to import and only this form needs it.
  try:
    ds, info = tfds.load(name, split=split, download=False, with_info=True)
  except Exception as e:  # TFDS raises several types for "not prepared"; all mean the same here.
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise DataError(f"TFDS dataset {name!r} split {split!r} could not be loaded ({reason}); it "
                    f"must be prepared first (`tfds build {name}` on a machine with internet, with "
                    f"TFDS_DATA_DIR pointing at the same directory)") from e
  label_field = task_cfg.label_field
  columns = list(dict.fromkeys([*_text_fields(task_cfg), label_field]))
  where = f"tfds:{name}:{split}"
  for column in columns:
    if column not in ds.element_spec:
      raise _missing_column(where, column, ds.element_spec, task_cfg)
  feature = info.features[label_field]
  class_names = feature.names if isinstance(feature, tfds.features.ClassLabel) else None
  records = []
  for i, values in enumerate(tfds.as_numpy(ds.map(lambda x: {c: x[c] for c in columns}))):
    record = {c: _from_numpy(v) for c, v in values.items()}
    if class_names is not None:
      label = record[label_field]
      if label < 0:
        raise _unlabelled(f"{where} example {i}", label, name)
      if task_cfg.kind != "regression":
        record[label_field] = class_names[label]
    records.append((f"{where} example {i}", record))
  # GLUE marks withheld regression labels (STS-B test) with -1 too, on every example.
  if (records and class_names is None and task_cfg.kind == "regression"
      and all(r[label_field] == -1 for _, r in records)):
    raise _unlabelled(f"{where} (all {len(records)} examples)", -1, name)
  return records


def _unlabelled(where: str, label, name: str) -> DataError:
  return DataError(f"{where} has label {label}, which marks an unlabelled example (GLUE withholds "
                   f"its test labels); train and evaluate on labelled splits, e.g. "
                   f"tfds:{name}:validation")


def _from_numpy(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  return value


def _text_fields(task_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  fields = tuple(f.strip() for f in task_cfg.text_fields.split(","))
  if not 1 <= len(fields) <= 2 or not all(fields):
    raise DataError(f"task.text_fields={task_cfg.text_fields!r} must name one text column (e.g. "
                    f"sentence) or two, comma-separated, for sentence pairs (e.g. "
                    f"sentence1,sentence2); set --config.task.text_fields")
  return fields


def _missing_column(where: str, column: str, found: Iterable[str],
                    task_cfg: ml_collections.ConfigDict) -> DataError:
  is_label = column == task_cfg.label_field
  field, holds = ("label_field", "label") if is_label else ("text_fields", "text")
  return DataError(f"{where} has no column {column!r} (columns found: {list(found)}); set "
                   f"--config.task.{field} to the column that holds the {holds}")


def _examples(records: Iterable[Record], task_cfg: ml_collections.ConfigDict) -> list[Example]:
  fields = _text_fields(task_cfg)
  label_field = task_cfg.label_field
  examples = []
  for where, record in records:
    for column in (*fields, label_field):
      if column not in record:
        raise _missing_column(where, column, record, task_cfg)
    texts = tuple(_text(record[f], f, where) for f in fields)
    label = _label(record[label_field], label_field, where, task_cfg.kind == "regression")
    examples.append(Example(texts, label, where))
  return examples


def _text(value, column: str, where: str) -> str:
  if not isinstance(value, str):
    raise DataError(f"{where}: column {column!r} holds a {type(value).__name__}, not text; set "
                    f"--config.task.text_fields to the text columns")
  return value


def _label(value, column: str, where: str, regression: bool) -> str | float:
  if value is None or (isinstance(value, str) and not value.strip()):
    raise DataError(f"{where}: the label (column {column!r}) is empty; every example needs one "
                    f"(unlabelled test files cannot be used), so fill it in or drop the example")
  if not isinstance(value, (str, int, float)):
    raise DataError(f"{where}: the label (column {column!r}) is a {type(value).__name__}, not a "
                    f"single value; set --config.task.label_field to the label column")
  if not regression:
    return str(value).strip()
  try:
    number = float(value)
  except ValueError:
    number = math.nan
  if not math.isfinite(number):
    raise DataError(f"{where}: label {value!r} (column {column!r}) is not a finite number, but "
                    f"task.kind is 'regression'; fix the data or set "
                    f"--config.task.kind=classification")
  return number


def _conll_examples(path: str, flag: str) -> list[Example]:
  """Sentences of a CoNLL-2003 style file: the word is the first column, the tag the last."""
  examples, words, tags, start = [], [], [], 0
  lines = _read_file(path, flag).split("\n")
  for lineno, line in enumerate([*lines, ""], start=1):  # The extra "" ends the last sentence.
    columns = line.split()
    if not columns or columns[0] == _DOCSTART:
      if words:
        examples.append(Example(tuple(words), tuple(tags), f"{path}:{start}"))
        words, tags = [], []
      continue
    if len(columns) < 2:
      raise DataError(f"{path}:{lineno} has one column ({line.strip()!r}), but a CoNLL line needs "
                      f"the word first and its tag last, whitespace-separated; fix that line")
    if not words:
      start = lineno
    words.append(columns[0])
    tags.append(columns[-1])
  return examples

"""Fine-tuning task data: labelled examples from files or TFDS -> fixed-length numpy arrays.

Task kinds (config.task.kind):
  classification  one label per example, out of a set of names
  regression      one number per example
  tokens          one tag per word (e.g. named entities), out of a set of names

Source forms (config.task.train_source / eval_source):
  tsv:PATH, csv:PATH        a header row of column names; TSV is unquoted, as GLUE ships it
  jsonl:PATH                one JSON object per line
  tfds:NAME[/CONFIG]:SPLIT  an already prepared TFDS dataset (never downloads)
  conll:PATH                tokens only: "word ... tag" lines, blank lines between sentences

Shape letters: N examples, L = seq_len. Arrays returned by `encode`:
  input_ids, token_types, segment_ids, positions  int32 [N, L]
  labels          int32 [N] (index into the label names); float32 [N] for regression;
                  int32 [N, L] for tokens (the tag index at the first piece of each word)
  label_weights   float32 [N]; float32 [N, L] for tokens (1 where a label counts)

Padding is 0 in every array (PAD id, segment 0, weight 0). Nothing here writes to disk.
"""

from collections.abc import Iterable, Iterator, Sequence
import csv
import dataclasses
import io
import itertools
import math
import os

from absl import logging
import ml_collections
import numpy as np

from lmssl.data import sources
from lmssl.data import tokenizer as tok

KINDS = ("classification", "regression", "tokens")
SOURCE_FORMS = ("tsv:PATH", "csv:PATH", "jsonl:PATH", "tfds:NAME[/CONFIG]:SPLIT", "conll:PATH")
_TABLE_SCHEMES = ("tsv", "csv", "jsonl", "tfds")
_DOCSTART = "-DOCSTART-"

DataError = sources.DataError
Record = tuple[str, dict]  # (where, column -> value)
Arrays = dict[str, np.ndarray]


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


def _kind(task_cfg: ml_collections.ConfigDict) -> str:
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
  kind = _kind(task_cfg)
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


def label_names(train_examples: Sequence[Example],
                task_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The label set in index order: `task.labels` when set, else sorted from the train labels.

  Inferred labels sort numerically when all are integers ("2" before "10"). For tokens "O"
  (outside any entity) comes first when present. Regression has no label names: ().
  """
  kind = _kind(task_cfg)
  if kind == "regression":
    return ()
  if task_cfg.labels:
    names = tuple(n.strip() for n in task_cfg.labels.split(","))
    if not all(names) or len(set(names)) != len(names):
      raise DataError(f"task.labels={task_cfg.labels!r} must be distinct, non-empty names "
                      f"separated by commas; set e.g. --config.task.labels=negative,positive")
    return names
  if kind == "tokens":
    found = {tag for e in train_examples for tag in e.label}
    return tuple(sorted(found, key=lambda n: (n != "O", n)))
  found = {e.label for e in train_examples}
  try:
    return tuple(sorted(found, key=lambda n: (int(n), n)))
  except ValueError:
    return tuple(sorted(found))


class _LabelIndex:
  """Label name -> index, failing with the fix when a label is outside the set."""

  def __init__(self, names: Sequence[str], configured: bool):
    self.names = tuple(names)
    self.index = {n: i for i, n in enumerate(self.names)}
    self.origin = "--config.task.labels" if configured else "the labels found in the train data"

  def __call__(self, label: str, where: str) -> int:
    if label in self.index:
      return self.index[label]
    fixed = ",".join((*self.names, label))
    raise DataError(f"{where}: label {label!r} is not one of the task's labels {list(self.names)} "
                    f"(from {self.origin}); fix the data or list every label, in index order, "
                    f"with --config.task.labels={fixed}")


def encode(examples: Sequence[Example], tokenizer: tok.Tokenizer, seq_len: int,
           task_cfg: ml_collections.ConfigDict, names: Sequence[str]) -> Arrays:
  """N examples -> fixed-length arrays (keys, shapes and dtypes in the module docstring).

  Texts are framed BERT-style: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, token type 1 on b
  and its [SEP]. A pair too long loses pieces from the end of its longer text, one at a time;
  a single text is cut at the end. Kind "tokens" encodes each word on its own and labels its
  first piece.
  """
  kind = _kind(task_cfg)
  label_index = _LabelIndex(names, bool(task_cfg.labels))
  if kind == "tokens":
    return _encode_words(examples, tokenizer, seq_len, label_index)
  arrays = _encode_texts(examples, tokenizer, seq_len)
  if kind == "regression":
    arrays["labels"] = np.array([e.label for e in examples], dtype=np.float32)
  else:
    arrays["labels"] = np.array([label_index(e.label, e.where) for e in examples], dtype=np.int32)
  arrays["label_weights"] = np.ones(len(examples), dtype=np.float32)
  return arrays


def _check_room(seq_len: int, needed: int, what: str) -> None:
  if seq_len < needed:
    raise DataError(f"seq_len {seq_len} leaves no room for {what}, which needs at least "
                    f"{needed} positions; use a longer seq_len (128 is typical)")


def _truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths of a pair after BERT's truncation to `budget` pieces, in closed form.

  BERT drops the last piece of the longer text (of b on a tie) until the pair fits; a loop
  doing that one piece at a time gives the same lengths.
  """
  excess = len_a + len_b - budget
  if excess <= 0:
    return len_a, len_b
  cut = min(excess, abs(len_a - len_b))  # First the longer one down to the shorter one's length,
  if len_a > len_b:
    len_a -= cut
  else:
    len_b -= cut
  excess -= cut  # then both in turns, b first.
  return len_a - excess // 2, len_b - (excess + 1) // 2


def _encode_texts(examples: Sequence[Example], tokenizer: tok.Tokenizer,
                  seq_len: int) -> Arrays:
  num_texts = len(examples[0].texts) if examples else 1
  if any(len(e.texts) != num_texts for e in examples):
    raise ValueError("encode got single texts and sentence pairs mixed; read them from one source")
  _check_room(seq_len, 2 * num_texts + 1, "[CLS], [SEP]s and one piece per text")
  pieces = [tokenizer.encode_batch([e.texts[k] for e in examples]) for k in range(num_texts)]
  budget = seq_len - num_texts - 1
  rows, first_lengths = [], []
  for i in range(len(examples)):
    if num_texts == 1:
      rows.append([tok.CLS_ID, *pieces[0][i][:budget], tok.SEP_ID])
      first_lengths.append(len(rows[-1]))
    else:
      a, b = pieces[0][i], pieces[1][i]
      len_a, len_b = _truncate_longest_first(len(a), len(b), budget)
      rows.append([tok.CLS_ID, *a[:len_a], tok.SEP_ID, *b[:len_b], tok.SEP_ID])
      first_lengths.append(len_a + 2)
  return _layout(rows, first_lengths, seq_len)


def _layout(rows: Sequence[Sequence[int]], first_lengths: Sequence[int],
            seq_len: int) -> Arrays:
  """Rows of ids (each at most seq_len) -> padded arrays; type 1 from first_lengths[i] on."""
  lengths = np.array([len(r) for r in rows], dtype=np.int64).reshape(-1, 1)
  columns = np.arange(seq_len)
  real = columns < lengths
  input_ids = np.full(real.shape, tok.PAD_ID, dtype=np.int32)
  # Row-major boolean assignment fills row by row, in order: the rows laid end to end.
  input_ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32,
                                count=int(lengths.sum()))
  second = columns >= np.array(first_lengths, dtype=np.int64).reshape(-1, 1)
  return {"input_ids": input_ids, "token_types": (real & second).astype(np.int32),
          "segment_ids": real.astype(np.int32),
          "positions": np.where(real, columns, 0).astype(np.int32)}


def _encode_words(examples: Sequence[Example], tokenizer: tok.Tokenizer, seq_len: int,
                  label_index: _LabelIndex) -> Arrays:
  _check_room(seq_len, 3, "[CLS], [SEP] and one word")
  budget = seq_len - 2
  words = [w for e in examples for w in e.texts]
  # A word of only e.g. zero-width characters encodes to nothing; [UNK] keeps its label a place.
  pieces = [p or [tok.UNK_ID] for p in (tokenizer.encode_batch(words) if words else [])]
  rows, label_rows, label_cols, label_ids = [], [], [], []
  dropped_words = dropped_sentences = offset = 0
  for row, example in enumerate(examples):
    word_pieces = pieces[offset:offset + len(example.texts)]
    offset += len(example.texts)
    tags = [label_index(tag, example.where) for tag in example.label]
    ends = np.cumsum([len(p) for p in word_pieces], dtype=np.int64)
    keep = int(np.searchsorted(ends, budget, side="right"))  # whole words that fit
    if keep < len(word_pieces):
      dropped_words += len(word_pieces) - keep
      dropped_sentences += 1
    rows.append([tok.CLS_ID, *itertools.chain.from_iterable(word_pieces[:keep]), tok.SEP_ID])
    label_rows += [row] * keep
    label_cols += [1, *(ends[:keep - 1] + 1)] if keep else []
    label_ids += tags[:keep]
  if dropped_words:
    logging.warning("%d words in %d of %d sentences did not fit seq_len=%d and were dropped "
                    "(each sentence is cut at a word boundary)", dropped_words,
                    dropped_sentences, len(examples), seq_len)
  arrays = _layout(rows, [seq_len] * len(rows), seq_len)
  labels = np.zeros((len(rows), seq_len), dtype=np.int32)
  weights = np.zeros((len(rows), seq_len), dtype=np.float32)
  labels[label_rows, label_cols] = label_ids
  weights[label_rows, label_cols] = 1.0
  arrays.update(labels=labels, label_weights=weights)
  return arrays


def pad_rows(arrays: Arrays, multiple: int) -> Arrays:
  """Appends all-zero rows up to a multiple of `multiple` rows, so full batches cover every row.

  Zero is padding in every array (PAD id, segment 0, label weight 0), so an added row is an
  all-padding example that contributes nothing to losses or metrics.
  """
  if multiple < 1:
    raise ValueError(f"pad_rows needs a positive multiple, got {multiple}")
  sizes = {len(a) for a in arrays.values()}
  if len(sizes) != 1:
    raise ValueError(f"pad_rows needs arrays with one number of rows, got {sorted(sizes)}")
  extra = -sizes.pop() % multiple
  return {k: np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])
          for k, a in arrays.items()}



def load(task_cfg: ml_collections.ConfigDict, tokenizer: tok.Tokenizer,
         seq_len: int) -> tuple[Arrays, Arrays, tuple[str, ...]]:
  """(train arrays, eval arrays, label names) of config.task; names come from the train data."""
  train = read_examples(task_cfg.train_source, task_cfg)
  evals = read_examples(task_cfg.eval_source, task_cfg)
  names = label_names(train, task_cfg)
  logging.info("Task %s: %d train and %d eval examples, labels %s", task_cfg.kind, len(train),
               len(evals), list(names) or "(regression)")
  return (encode(train, tokenizer, seq_len, task_cfg, names),
          encode(evals, tokenizer, seq_len, task_cfg, names), names)

"""Fine-tuning task data: labelled examples (read by `task_files`) -> fixed-length arrays.

Shape letters: N examples, L = seq_len. Arrays returned by `encode`:
  input_ids, token_types, segment_ids, positions  int32 [N, L]
  labels          int32 [N] (index into the label names); float32 [N] for regression;
                  int32 [N, L] for tokens (the tag index at the first piece of each word)
  label_weights   float32 [N]; float32 [N, L] for tokens (1 where a label counts)

[CLS], [SEP], [UNK] and the padding of input_ids are the tokenizer's ids; padding is 0 in every
other array (segment 0, weight 0). Nothing here writes to disk.
"""

from collections.abc import Sequence
import itertools

from absl import logging
import ml_collections
import numpy as np

from lmssl.data import sources
from lmssl.data import task_files
from lmssl.data import tokenizer as tok

DataError = sources.DataError
Arrays = dict[str, np.ndarray]


def label_names(train_examples: Sequence[task_files.Example],
                task_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The label set in index order: `task.labels` when set, else sorted from the train labels.

  Inferred labels sort numerically when all are integers ("2" before "10"). For tokens "O"
  (outside any entity) comes first when present. Regression has no label names: ().
  """
  kind = task_files.task_kind(task_cfg)
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


def encode(examples: Sequence[task_files.Example], tokenizer: tok.AnyTokenizer, seq_len: int,
           task_cfg: ml_collections.ConfigDict, names: Sequence[str]) -> Arrays:
  """N examples -> fixed-length arrays (keys, shapes and dtypes in the module docstring).

  Texts are framed BERT-style: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, token type 1 on b
  and its [SEP]. A pair too long loses pieces from the end of its longer text, one at a time;
  a single text is cut at the end. Kind "tokens" encodes each word on its own and labels its
  first piece.
  """
  kind = task_files.task_kind(task_cfg)
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


def _encode_texts(examples: Sequence[task_files.Example], tokenizer: tok.AnyTokenizer,
                  seq_len: int) -> Arrays:
  num_texts = len(examples[0].texts) if examples else 1
  if any(len(e.texts) != num_texts for e in examples):
    raise ValueError("encode got single texts and sentence pairs mixed; read them from one source")
  _check_room(seq_len, 2 * num_texts + 1, "[CLS], [SEP]s and one piece per text")
  pieces = [tokenizer.encode_batch([e.texts[k] for e in examples]) for k in range(num_texts)]
  budget = seq_len - num_texts - 1
  cls, sep = tokenizer.cls_id, tokenizer.sep_id
  rows, first_lengths = [], []
  for i in range(len(examples)):
    if num_texts == 1:
      rows.append([cls, *pieces[0][i][:budget], sep])
      first_lengths.append(len(rows[-1]))
    else:
      a, b = pieces[0][i], pieces[1][i]
      len_a, len_b = _truncate_longest_first(len(a), len(b), budget)
      rows.append([cls, *a[:len_a], sep, *b[:len_b], sep])
      first_lengths.append(len_a + 2)
  return _layout(rows, first_lengths, seq_len, tokenizer.pad_id)


def _layout(rows: Sequence[Sequence[int]], first_lengths: Sequence[int], seq_len: int,
            pad_id: int) -> Arrays:
  """Rows of ids (each at most seq_len) -> padded arrays; type 1 from first_lengths[i] on."""
  lengths = np.array([len(r) for r in rows], dtype=np.int64).reshape(-1, 1)
  columns = np.arange(seq_len)
  real = columns < lengths
  input_ids = np.full(real.shape, pad_id, dtype=np.int32)
  # Row-major boolean assignment fills row by row, in order: the rows laid end to end.
  input_ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32,
                                count=int(lengths.sum()))
  second = columns >= np.array(first_lengths, dtype=np.int64).reshape(-1, 1)
  return {"input_ids": input_ids, "token_types": (real & second).astype(np.int32),
          "segment_ids": real.astype(np.int32),
          "positions": np.where(real, columns, 0).astype(np.int32)}


def _encode_words(examples: Sequence[task_files.Example], tokenizer: tok.AnyTokenizer,
                  seq_len: int, label_index: _LabelIndex) -> Arrays:
  _check_room(seq_len, 3, "[CLS], [SEP] and one word")
  budget = seq_len - 2
  words = [w for e in examples for w in e.texts]
  # A word of only e.g. zero-width characters encodes to nothing; [UNK] keeps its label a place
  # (a tokenizer without one is byte-level, where every word has bytes: padding never shows).
  unk = tokenizer.unk_id if tokenizer.unk_id is not None else tokenizer.pad_id
  pieces = [p or [unk] for p in (tokenizer.encode_batch(words) if words else [])]
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
    rows.append([tokenizer.cls_id, *itertools.chain.from_iterable(word_pieces[:keep]),
                 tokenizer.sep_id])
    label_rows += [row] * keep
    label_cols += [1, *(ends[:keep - 1] + 1)] if keep else []
    label_ids += tags[:keep]
  if dropped_words:
    logging.warning("%d words in %d of %d sentences did not fit seq_len=%d and were dropped "
                    "(each sentence is cut at a word boundary)", dropped_words,
                    dropped_sentences, len(examples), seq_len)
  arrays = _layout(rows, [seq_len] * len(rows), seq_len, tokenizer.pad_id)
  labels = np.zeros((len(rows), seq_len), dtype=np.int32)
  weights = np.zeros((len(rows), seq_len), dtype=np.float32)
  labels[label_rows, label_cols] = label_ids
  weights[label_rows, label_cols] = 1.0
  arrays.update(labels=labels, label_weights=weights)
  return arrays


def pad_rows(arrays: Arrays, multiple: int) -> Arrays:
  """Appends all-zero rows up to a multiple of `multiple` rows, so full batches cover every row.

  Segment 0 and label weight 0 make an added row an all-padding example that contributes
  nothing to losses or metrics; nothing attends to segment-0 positions, so their input ids (0)
  need not be the tokenizer's pad id.
  """
  if multiple < 1:
    raise ValueError(f"pad_rows needs a positive multiple, got {multiple}")
  sizes = {len(a) for a in arrays.values()}
  if len(sizes) != 1:
    raise ValueError(f"pad_rows needs arrays with one number of rows, got {sorted(sizes)}")
  extra = -sizes.pop() % multiple
  return {k: np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])
          for k, a in arrays.items()}



def load(task_cfg: ml_collections.ConfigDict, tokenizer: tok.AnyTokenizer,
         seq_len: int) -> tuple[Arrays, Arrays, tuple[str, ...]]:
  """(train arrays, eval arrays, label names) of config.task; names come from the train data."""
  train = task_files.read_examples(task_cfg.train_source, task_cfg)
  evals = task_files.read_examples(task_cfg.eval_source, task_cfg)
  names = label_names(train, task_cfg)
  logging.info("Task %s: %d train and %d eval examples, labels %s", task_cfg.kind, len(train),
               len(evals), list(names) or "(regression)")
  return (encode(train, tokenizer, seq_len, task_cfg, names),
          encode(evals, tokenizer, seq_len, task_cfg, names), names)

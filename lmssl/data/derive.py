"""Labelled tasks derived from plain text, so fine-tuning can be tried and tested anywhere.

  order     classification: is a passage in its original word order, or corrupted?
            (TSV, columns sentence/label, half each). corruption "reverse" (labels
            original/reversed) reads the words backwards; "shuffle" (original/shuffled)
            permutes them, a harder task that small models learn slowly.
  truecase  tagging: which words of a lowercased sentence were capitalized? (CoNLL, tags
            B-CAP/I-CAP for each run of capitalized words, O elsewhere)

Both are a pure function of the text and the seed; train and dev come from different
documents (the same hash split as pretraining data).

Usage:
  python -m lmssl.data.derive --task order --source builtin --out /tmp/order
  -> /tmp/order/train.tsv, /tmp/order/dev.tsv   (truecase: train.conll, dev.conll)
"""

import os

import ml_collections
import numpy as np

from lmssl import errors
from lmssl.data import pairs
from lmssl.data import sources

TASKS = ("order", "truecase")
CORRUPTIONS = {"reverse": "reversed", "shuffle": "shuffled"}
_MIN_WORDS, _MAX_WORDS = 8, 40


def order_examples(docs, seed: int, corruption: str = "reverse") -> list[tuple[str, str]]:
  """(passage, label) from each sentence of 8+ words (cut at 40), half of them corrupted; a
  shuffle that happens to keep the order is redrawn."""
  if corruption not in CORRUPTIONS:
    raise errors.UserError(f"unknown corruption {corruption!r}; known: {list(CORRUPTIONS)}")
  rng = np.random.default_rng(seed)
  out = []
  for words in _passages(docs):
    if rng.random() < 0.5:
      out.append((" ".join(words), "original"))
      continue
    identity = np.arange(len(words))
    order = identity[::-1]
    if corruption == "shuffle":
      order = rng.permutation(len(words))
      while (order == identity).all():
        order = rng.permutation(len(words))
    out.append((" ".join(words[i] for i in order), CORRUPTIONS[corruption]))
  return out


def _passages(docs):
  """The words of every sentence of 8+ words, cut at 40."""
  for doc in docs:
    for sentence in pairs.split_sentences(doc):
      words = sentence.split()[:_MAX_WORDS]
      if len(words) >= _MIN_WORDS:
        yield words


def truecase_examples(docs) -> list[list[tuple[str, str]]]:
  """Sentences of 8+ words as (lowercased word, tag) lists; tags mark capitalized runs."""
  out = []
  for words in _passages(docs):
    tags, previous = [], "O"
    for word in words:
      cap = word[:1].isupper()
      tags.append(("I-CAP" if previous != "O" else "B-CAP") if cap else "O")
      previous = tags[-1]
    out.append([(w.lower(), t) for w, t in zip(words, tags)])
  return out


def write(task: str, source: str, out_dir: str, seed: int = 0, max_chars: int = 2_000_000,
          val_fraction: float = 0.1, max_train: int = 20_000, max_dev: int = 1_000,
          corruption: str = "reverse") -> dict[str, str]:
  """Writes the task's train and dev files into `out_dir` (at most max_train / max_dev
  examples, the first ones in document order); returns {split: task source}."""
  if task not in TASKS:
    raise errors.UserError(f"unknown derived task {task!r}; known: {list(TASKS)}")
  _check_out_dir(out_dir)
  data_cfg = ml_collections.ConfigDict(dict(builtin_max_chars=max_chars))
  train_docs, dev_docs = sources.split_documents(sources.read_documents(source, data_cfg),
                                                 val_fraction)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for split, docs in (("train", train_docs), ("dev", dev_docs)):
    cap = max_train if split == "train" else max_dev
    if task == "order":
      rows = order_examples(docs, seed + (split == "dev"), corruption)[:cap]
      path = os.path.join(out_dir, f"{split}.tsv")
      text = "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows)
      written[split] = f"tsv:{path}"
    else:
      rows = truecase_examples(docs)[:cap]
      path = os.path.join(out_dir, f"{split}.conll")
      text = "".join("".join(f"{w} {t}\n" for w, t in s) + "\n" for s in rows)
      written[split] = f"conll:{path}"
    if not rows:
      raise errors.UserError(f"{source!r} has no sentences of {_MIN_WORDS}+ words for the "
                             f"{split} split; use more text")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  return written


def _check_out_dir(out_dir: str) -> None:
  """Refuses an output directory that is, or lies under, a file, before any text is read."""
  path = os.path.abspath(os.path.expanduser(out_dir))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    what = "is a file" if path == os.path.abspath(os.path.expanduser(out_dir)) else (
        f"is under {path}, which is a file")
    raise errors.UserError(f"--out {out_dir} {what}; it must be a directory (new or existing) "
                           "for the train and dev files: choose another path, or move the file "
                           "away")


def _main() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  task = flags.DEFINE_enum("task", None, TASKS, "Which task to derive.")
  source = flags.DEFINE_string("source", "builtin", "Text source (same forms as data.source).")
  out = flags.DEFINE_string("out", None, "Output directory.")
  seed = flags.DEFINE_integer("seed", 0, "Seed of the corruptions.")
  corruption = flags.DEFINE_enum("corruption", "reverse", list(CORRUPTIONS), "order: how.")
  flags.mark_flags_as_required(["task", "out"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
      written = write(task.value, source.value, out.value, seed.value,
                      corruption=corruption.value)
    except errors.UserError as e:
      raise SystemExit(f"lmssl: error: {e}") from None
    for split, where in written.items():
      print(f"{split}: {where}")

  app.run(run)


if __name__ == "__main__":
  _main()

"""Fine-tuning task data: files -> examples -> arrays, on real WikiText-2 sentences and words.

Each test writes its small task files (TSV, CSV, JSONL, CoNLL) into tmp_path. Shape letters:
N examples, L = seq_len.
"""

import csv
import json
import logging
import os
import re

import ml_collections
import numpy as np
import pytest

from lmssl.data import task_files
from lmssl.data import tasks
from lmssl.data import tokenizer as tok
from lmssl.data.sources import DataError

SEQ_LEN = 64
PAIR_LABELS = ("contradiction", "entailment", "neutral")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
  return tok.Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="session")
def sentences(paragraphs):
  """Sentences of the first 300 WikiText-2 paragraphs, whitespace normalised, headings left out."""
  found = []
  for paragraph in paragraphs[:300]:
    if not paragraph.startswith("="):
      found += [" ".join(s.split()) for s in paragraph.split(" . ") if s.strip()]
  return found


def task_cfg(**overrides):
  cfg = ml_collections.ConfigDict({
      "kind": "classification", "train_source": "", "eval_source": "",
      "text_fields": "sentence", "label_field": "label", "labels": ""})
  cfg.update(overrides)
  return cfg


def write_tsv(path, rows):
  path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
  return path


def write_csv(path, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  return path


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def word_tags(words):
  """Made-up but deterministic entity tags: numbers, and runs of capitalised words."""
  tags = []
  for word in words:
    if any(c.isdigit() for c in word):
      tags.append("B-NUM")
    elif word[:1].isupper():
      tags.append("I-CAP" if tags and tags[-1].endswith("-CAP") else "B-CAP")
    else:
      tags.append("O")
  return tags


def write_conll(path, sentences):
  lines = ["-DOCSTART- -X- -X- O", ""]
  for words in sentences:
    lines += [f"{w} X O {t}" for w, t in zip(words, word_tags(words))] + [""]
  path.write_text("\n".join(lines), encoding="utf-8")
  return path


def real_length(row):
  return int((row > 0).sum())


# ---------------------------------------------------------------------------- single texts


def test_single_text_layout_decodes_back(sentences, tokenizer, tmp_path):
  chosen = sentences[:120]
  labels = ["long" if len(s.split()) > 20 else "short" for s in chosen]
  path = write_tsv(tmp_path / "train.tsv", [("sentence", "label")]
                   + list(zip(chosen, labels)))
  cfg = task_cfg()
  examples = task_files.read_examples(f"tsv:{path}", cfg)
  assert [e.texts for e in examples] == [(s,) for s in chosen]
  assert examples[2].where == f"{path}:4"  # line 1 is the header
  names = tasks.label_names(examples, cfg)
  assert names == ("long", "short")
  arrays = tasks.encode(examples, tokenizer, SEQ_LEN, cfg, names)
  assert {k: (v.dtype, v.shape) for k, v in arrays.items()} == {
      "input_ids": (np.int32, (120, SEQ_LEN)), "token_types": (np.int32, (120, SEQ_LEN)),
      "segment_ids": (np.int32, (120, SEQ_LEN)), "positions": (np.int32, (120, SEQ_LEN)),
      "labels": (np.int32, (120,)), "label_weights": (np.float32, (120,))}
  assert [names[i] for i in arrays["labels"]] == labels
  assert (arrays["label_weights"] == 1).all() and not arrays["token_types"].any()
  checked = 0
  for i, sentence in enumerate(chosen):
    ids, segs = arrays["input_ids"][i], arrays["segment_ids"][i]
    n = real_length(segs)
    pieces = tokenizer.encode(sentence)
    assert ids[0] == tokenizer.cls_id and ids[n - 1] == tokenizer.sep_id
    assert (ids[n:] == tokenizer.pad_id).all()
    assert (segs[:n] == 1).all() and (segs[n:] == 0).all()
    np.testing.assert_array_equal(arrays["positions"][i], np.r_[np.arange(n), [0] * (64 - n)])
    np.testing.assert_array_equal(ids[1:n - 1], pieces[:SEQ_LEN - 2])  # cut at the end
    if len(pieces) <= SEQ_LEN - 2 and tokenizer.unk_id not in pieces:
      assert tokenizer.decode(ids[1:n - 1]) == sentence
      checked += 1
  assert checked > 60 and (arrays["segment_ids"].sum(1) == SEQ_LEN).any()  # some were cut


def test_label_sets_configured_inferred_and_numeric(sentences, tokenizer, tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", [
      {"sentence": s, "label": i % 12} for i, s in enumerate(sentences[:48])])
  examples = task_files.read_examples(f"jsonl:{path}", task_cfg())
  assert examples[0].label == "0"  # JSON integers become label names
  names = tasks.label_names(examples, task_cfg())
  assert names == tuple(str(i) for i in range(12))  # numeric order: "2" before "10"
  cfg = task_cfg(labels=",".join(reversed(names)))
  assert tasks.label_names(examples, cfg) == tuple(reversed(names))
  arrays = tasks.encode(examples, tokenizer, 32, cfg, tasks.label_names(examples, cfg))
  np.testing.assert_array_equal(arrays["labels"], [11 - i % 12 for i in range(48)])


# ---------------------------------------------------------------------------- sentence pairs


def test_pair_layout_csv(sentences, tokenizer, tmp_path):
  firsts, seconds = sentences[200:260], sentences[260:320]
  labels = [PAIR_LABELS[i % 3] for i in range(60)]
  # Commas, quotes and apostrophes of the real text go through CSV quoting.
  rows = [(str(i), a, b, y) for i, (a, b, y) in enumerate(zip(firsts, seconds, labels))]
  path = write_csv(tmp_path / "pairs.csv", [("id", "premise", "hypothesis", "gold"), *rows])
  cfg = task_cfg(text_fields="premise,hypothesis", label_field="gold")
  examples = task_files.read_examples(f"csv:{path}", cfg)
  assert [e.texts for e in examples] == list(zip(firsts, seconds))
  names = tasks.label_names(examples, cfg)
  arrays = tasks.encode(examples, tokenizer, 128, cfg, names)
  assert names == PAIR_LABELS and [names[i] for i in arrays["labels"]] == labels
  for i, (a, b) in enumerate(zip(firsts, seconds)):
    ids, types = arrays["input_ids"][i], arrays["token_types"][i]
    pieces_a, pieces_b = tokenizer.encode(a), tokenizer.encode(b)
    if len(pieces_a) + len(pieces_b) > 125:
      continue
    n = len(pieces_a) + len(pieces_b) + 3
    sep_a = 1 + len(pieces_a)
    assert ids[0] == tokenizer.cls_id
    assert np.flatnonzero(ids == tokenizer.sep_id).tolist() == [sep_a, n - 1]
    np.testing.assert_array_equal(ids[1:sep_a], pieces_a)
    np.testing.assert_array_equal(ids[sep_a + 1:n - 1], pieces_b)
    np.testing.assert_array_equal(types, [0] * (sep_a + 1) + [1] * (n - sep_a - 1)
                                  + [0] * (128 - n))  # switches right after the first [SEP]
    np.testing.assert_array_equal(arrays["segment_ids"][i], [1] * n + [0] * (128 - n))
    np.testing.assert_array_equal(arrays["positions"][i], [*range(n)] + [0] * (128 - n))
    assert (ids[n:] == tokenizer.pad_id).all()


def bert_truncate(a, b, budget):
  a, b = list(a), list(b)
  while len(a) + len(b) > budget:
    (a if len(a) > len(b) else b).pop()
  return a, b


def test_truncation_matches_bert_longest_first(sentences, paragraphs, tokenizer, tmp_path):
  for len_a in range(12):  # the closed form against the one-piece-at-a-time loop
    for len_b in range(12):
      for budget in range(1, 20):
        want = bert_truncate(range(len_a), range(len_b), budget)
        assert tasks._truncate_longest_first(len_a, len_b, budget) == tuple(map(len, want))
  # Long with long (both cut), short with long (only the long one cut), long with short.
  longs = [p for p in paragraphs[:200] if len(p) > 400][:20]
  shorts = [s for s in sentences if 5 <= len(tokenizer.encode(s)) <= 15][:20]
  pairs = list(zip(longs[:10], longs[10:])) + list(zip(shorts, longs)) + list(zip(longs, shorts))
  path = write_jsonl(tmp_path / "pairs.jsonl", [
      {"a": a, "b": b, "y": 0.5 * i} for i, (a, b) in enumerate(pairs)])
  cfg = task_cfg(kind="regression", text_fields="a,b", label_field="y")
  examples = task_files.read_examples(f"jsonl:{path}", cfg)
  arrays = tasks.encode(examples, tokenizer, 48, cfg, tasks.label_names(examples, cfg))
  assert arrays["labels"].dtype == np.float32 and arrays["labels"][3] == 1.5
  cut_only_one = 0
  for i, (a, b) in enumerate(pairs):
    want_a, want_b = bert_truncate(tokenizer.encode(a), tokenizer.encode(b), 48 - 3)
    ids = arrays["input_ids"][i]
    assert (arrays["segment_ids"][i] == 1).all()  # a truncated pair fills the row exactly
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    np.testing.assert_array_equal(ids, [cls, *want_a, sep, *want_b, sep])
    assert arrays["token_types"][i].sum() == len(want_b) + 1
    cut_only_one += len(want_a) == len(tokenizer.encode(a)) or len(want_b) == len(
        tokenizer.encode(b))
  assert cut_only_one == 40


# ---------------------------------------------------------------------------- tokens


def conll_sentences(sentences, count):
  chosen = [s.split() for s in sentences if 4 <= len(s.split()) <= 25][:count]
  chosen[3] = chosen[3][:2] + ["\u200b"] + chosen[3][2:]  # encodes to no pieces at all
  return chosen


def test_tokens_label_the_first_piece_of_each_word(sentences, tokenizer, tmp_path):
  words = conll_sentences(sentences, 40)
  path = write_conll(tmp_path / "train.conll", words)
  cfg = task_cfg(kind="tokens", text_fields="ignored", label_field="ignored")
  examples = task_files.read_examples(f"conll:{path}", cfg)
  assert [list(e.texts) for e in examples] == words
  assert examples[0].where == f"{path}:3" and examples[1].where == f"{path}:{4 + len(words[0])}"
  names = tasks.label_names(examples, cfg)
  assert names == ("O", "B-CAP", "B-NUM", "I-CAP")
  arrays = tasks.encode(examples, tokenizer, 128, cfg, names)
  assert arrays["labels"].shape == arrays["label_weights"].shape == (40, 128)
  assert arrays["labels"].dtype == np.int32 and arrays["label_weights"].dtype == np.float32
  assert not arrays["token_types"].any()
  for i, sentence in enumerate(words):
    ids, weights = arrays["input_ids"][i], arrays["label_weights"][i]
    n = real_length(arrays["segment_ids"][i])
    firsts = np.flatnonzero(weights)
    assert len(firsts) == len(sentence)
    assert ids[0] == tokenizer.cls_id and ids[n - 1] == tokenizer.sep_id
    for first, end, word in zip(firsts, [*firsts[1:], n - 1], sentence):
      assert ids[first:end].tolist() == (tokenizer.encode(word) or [tokenizer.unk_id])
    np.testing.assert_array_equal(arrays["labels"][i][firsts],
                                  [names.index(t) for t in word_tags(sentence)])
    assert not arrays["labels"][i][weights == 0].any()
  assert arrays["input_ids"][3][np.flatnonzero(arrays["label_weights"][3])[2]] == tokenizer.unk_id


def test_tokens_truncate_at_a_word_boundary(sentences, tokenizer, tmp_path, caplog):
  words = conll_sentences(sentences, 30)
  cfg = task_cfg(kind="tokens")
  examples = task_files.read_examples(f"conll:{write_conll(tmp_path / 'a.conll', words)}", cfg)
  seq_len = 20
  with caplog.at_level(logging.WARNING):
    arrays = tasks.encode(examples, tokenizer, seq_len, cfg, tasks.label_names(examples, cfg))
  dropped = cut = 0
  for i, sentence in enumerate(words):
    ends = np.cumsum([len(tokenizer.encode(w) or [0]) for w in sentence])
    keep = int((ends <= seq_len - 2).sum())
    dropped, cut = dropped + len(sentence) - keep, cut + (keep < len(sentence))
    sep = 1 + (ends[keep - 1] if keep else 0)
    assert arrays["label_weights"][i].sum() == keep
    assert arrays["input_ids"][i][sep] == tokenizer.sep_id and real_length(
        arrays["segment_ids"][i]) == sep + 1
  assert cut > 10
  assert f"{dropped} words in {cut} of 30 sentences did not fit seq_len=20" in caplog.text


# ---------------------------------------------------------------------------- pad_rows, load


def test_pad_rows_adds_inert_rows(sentences, tokenizer, tmp_path):
  cfg = task_cfg(kind="tokens")
  path = write_conll(tmp_path / "t.conll", conll_sentences(sentences, 13))
  examples = task_files.read_examples(f"conll:{path}", cfg)
  arrays = tasks.encode(examples, tokenizer, 32, cfg, tasks.label_names(examples, cfg))
  padded = tasks.pad_rows(arrays, 8)
  for key, value in padded.items():
    assert value.shape == (16, 32) and value.dtype == arrays[key].dtype
    np.testing.assert_array_equal(value[:13], arrays[key])
    assert not value[13:].any()
  assert tasks.pad_rows(padded, 8)["input_ids"].shape == (16, 32)
  classes = {"labels": np.arange(5, dtype=np.int32), "label_weights": np.ones(5, np.float32)}
  padded = tasks.pad_rows(classes, 4)
  assert padded["labels"].shape == (8,) and padded["label_weights"].tolist() == [1] * 5 + [0] * 3


def test_load_reads_derives_and_writes_nothing(sentences, tokenizer, tmp_path):
  train = write_tsv(tmp_path / "train.tsv", [("sentence1", "sentence2", "label")] + [
      (a, b, PAIR_LABELS[i % 2]) for i, (a, b) in enumerate(zip(sentences[:40], sentences[40:80]))])
  evals = write_tsv(tmp_path / "dev.tsv", [("sentence1", "sentence2", "label")] + [
      (a, b, "entailment") for a, b in zip(sentences[80:90], sentences[90:100])])
  before = sorted(os.listdir(tmp_path))
  cfg = task_cfg(train_source=f"tsv:{train}", eval_source=f"tsv:{evals}",
                 text_fields="sentence1,sentence2")
  train_arrays, eval_arrays, names = tasks.load(cfg, tokenizer, SEQ_LEN)
  assert names == ("contradiction", "entailment")
  assert train_arrays["input_ids"].shape == (40, SEQ_LEN) and len(eval_arrays["labels"]) == 10
  assert (eval_arrays["labels"] == 1).all() and eval_arrays["token_types"].any()
  assert sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------------------- errors


@pytest.fixture
def small_tsv(sentences, tmp_path):
  return write_tsv(tmp_path / "small.tsv", [("sentence", "label")] + [
      (s, "yes" if i % 2 else "no") for i, s in enumerate(sentences[:6])])


def test_file_errors(small_tsv, tmp_path):
  cfg = task_cfg(train_source=f"tsv:{tmp_path}/missing.tsv")
  with pytest.raises(DataError, match=r"missing\.tsv does not exist .*--config\.task\.train_s"):
    task_files.read_examples(cfg.train_source, cfg)
  latin = tmp_path / "latin.tsv"
  latin.write_bytes("sentence\tlabel\ncaf\u00e9\tyes\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin\.tsv is not UTF-8 text .*iconv"):
    task_files.read_examples(f"tsv:{latin}", task_cfg())
  (tmp_path / "empty.csv").write_text(" \n\n")
  with pytest.raises(DataError, match=r"empty\.csv is empty"):
    task_files.read_examples(f"csv:{tmp_path / 'empty.csv'}", task_cfg())
  header_only = write_tsv(tmp_path / "header.tsv", [("sentence", "label")])
  with pytest.raises(DataError, match=r"header\.tsv' holds no examples"):
    task_files.read_examples(f"tsv:{header_only}", task_cfg(eval_source=f"tsv:{header_only}"))
  with pytest.raises(DataError, match=re.escape(
      "is not one of the known forms ['tsv:PATH', 'csv:PATH', 'jsonl:PATH', "
      "'tfds:NAME[/CONFIG]:SPLIT', 'conll:PATH']; set --config.task.eval_source")):
    task_files.read_examples(f"text:{small_tsv}", task_cfg(eval_source=f"text:{small_tsv}"))
  lines = small_tsv.read_text().splitlines()
  write_tsv(tmp_path / "ragged.tsv", [lines[0].split("\t"), lines[1].split("\t") + ["x"]])
  with pytest.raises(DataError, match=r"ragged\.tsv:2 has 3 columns but the header .* has 2"):
    task_files.read_examples(f"tsv:{tmp_path / 'ragged.tsv'}", task_cfg())
  (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n\n{"sentence": \n')
  with pytest.raises(DataError, match=r"bad\.jsonl:3 is not valid JSON"):
    task_files.read_examples(f"jsonl:{tmp_path / 'bad.jsonl'}", task_cfg())


def test_column_and_config_errors(small_tsv):
  source = f"tsv:{small_tsv}"
  with pytest.raises(DataError, match=re.escape(
      f"{small_tsv}:2 has no column 'sentence2' (columns found: ['sentence', 'label']); set "
      f"--config.task.text_fields")):
    task_files.read_examples(source, task_cfg(text_fields="sentence,sentence2"))
  with pytest.raises(DataError, match=r"no column 'gold' .*--config\.task\.label_field"):
    task_files.read_examples(source, task_cfg(label_field="gold"))
  with pytest.raises(DataError, match=r"text_fields='a,b,c' must name one text column .* or two"):
    task_files.read_examples(source, task_cfg(text_fields="a,b,c"))
  with pytest.raises(DataError, match=re.escape(
      "task.kind='ner' is not known; set --config.task.kind to one of ['classification', "
      "'regression', 'tokens']")):
    task_files.read_examples(source, task_cfg(kind="ner"))
  with pytest.raises(DataError, match=r"kind 'tokens' reads CoNLL .*=conll:PATH"):
    task_files.read_examples(source, task_cfg(kind="tokens"))
  with pytest.raises(DataError, match=r"holds word tags, which only task kind 'tokens' reads"):
    task_files.read_examples(f"conll:{small_tsv}", task_cfg())
  with pytest.raises(DataError, match=r"task.labels='no,,yes' must be distinct, non-empty"):
    tasks.label_names([], task_cfg(labels="no,,yes"))


def test_label_errors(sentences, small_tsv, tokenizer, tmp_path):
  lines = small_tsv.read_text().splitlines()
  empty = tmp_path / "empty_label.tsv"
  empty.write_text("\n".join(lines[:3] + [lines[3].split("\t")[0] + "\t "]) + "\n")
  with pytest.raises(DataError, match=r"empty_label\.tsv:4: the label \(column 'label'\) is emp"):
    task_files.read_examples(f"tsv:{empty}", task_cfg())
  with pytest.raises(DataError, match=r"small\.tsv:2: label 'no' .* is not a finite number, but "
                     r"task.kind is 'regression'"):
    task_files.read_examples(f"tsv:{small_tsv}", task_cfg(kind="regression"))
  nan = write_jsonl(tmp_path / "nan.jsonl", [{"sentence": sentences[0], "label": "nan"}])
  with pytest.raises(DataError, match=r"nan\.jsonl:1: label 'nan' .* not a finite number"):
    task_files.read_examples(f"jsonl:{nan}", task_cfg(kind="regression"))
  cfg = task_cfg()
  names = tasks.label_names(task_files.read_examples(f"tsv:{small_tsv}", cfg), cfg)
  evals = write_tsv(tmp_path / "dev.tsv", [("sentence", "label"), (sentences[9], "yes"),
                                           (sentences[10], "maybe")])
  eval_examples = task_files.read_examples(f"tsv:{evals}", cfg)
  with pytest.raises(DataError, match=re.escape(
      f"{evals}:3: label 'maybe' is not one of the task's labels ['no', 'yes'] (from the labels "
      f"found in the train data); fix the data or list every label, in index order, with "
      f"--config.task.labels=no,yes,maybe")):
    tasks.encode(eval_examples, tokenizer, SEQ_LEN, cfg, names)
  # A configured label set binds the train file too.
  with pytest.raises(DataError, match=r"small\.tsv:2: label 'no' .*from --config\.task\.labels.*"
                     r"labels=yes,maybe,no"):
    tasks.load(task_cfg(train_source=f"tsv:{small_tsv}", eval_source=f"tsv:{evals}",
                        labels="yes,maybe"), tokenizer, SEQ_LEN)


def test_conll_errors(tmp_path):
  path = tmp_path / "bad.conll"
  path.write_text("-DOCSTART- -X- O O\n\nThe DT O\nwrong\n")
  with pytest.raises(DataError, match=r"bad\.conll:4 has one column \('wrong'\), but a CoNLL"):
    task_files.read_examples(f"conll:{path}", task_cfg(kind="tokens"))
  path.write_text("-DOCSTART- -X- O O\n\n")
  with pytest.raises(DataError, match=r"bad\.conll' holds no examples"):
    task_files.read_examples(f"conll:{path}", task_cfg(kind="tokens"))


# ---------------------------------------------------------------------------- TFDS


def test_tfds_not_prepared(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))  # read once at import
  with pytest.raises(DataError, match=r"TFDS dataset 'glue/sst2' split 'validation' could not be "
                     r"loaded .*must be prepared first \(`tfds build glue/sst2`"):
    task_files.read_examples("tfds:glue/sst2:validation", task_cfg())
  assert not os.listdir(tmp_path)


def test_tfds_class_label_names(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    examples = task_files.read_examples("tfds:glue/sst2:validation", task_cfg())
    with pytest.raises(DataError, match=re.escape(
        "tfds:glue/sst2:validation has no column 'sentence1' (columns found: ")):
      task_files.read_examples("tfds:glue/sst2:validation", task_cfg(text_fields="sentence1"))
  assert len(examples) == 6 and {e.label for e in examples} <= {"negative", "positive"}
  assert examples[1].where == "tfds:glue/sst2:validation example 1"

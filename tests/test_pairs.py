"""Sentence-pair rows (nsp / sop): prepared pairs, their train-time layout and negatives.

Checked on WikiText-2 paragraphs, one line each, so sentences come from the sentence-end rule.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmssl import config
from lmssl import errors
from lmssl.data import pairs
from lmssl.data import packed as packed_lib
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import sources
from lmssl.data import tokenizer as tok

SEQ_LEN = 64
MAX_TOKENS = SEQ_LEN - pairs.NUM_SPECIAL


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
  return tok.Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="module")
def corpus(paragraphs, tmp_path_factory):
  path = tmp_path_factory.mktemp("pairs") / "corpus.txt"
  path.write_text("\n\n".join(" ".join(p.split()) for p in paragraphs[:600]), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def pair_cfg(corpus, tokenizer_path, cache_dir, **overrides):
  cfg = config.base_config().data
  cfg.update(source=f"text:{corpus}", tokenizer=tokenizer_path, seq_len=SEQ_LEN,
             cache_dir=str(cache_dir), sentence_pair="nsp")
  cfg.update(overrides)
  return cfg


def prepare_pairs(corpus, tokenizer_path, cache_dir, **overrides):
  cfg = pair_cfg(corpus, tokenizer_path, cache_dir, **overrides)
  return cfg, prepare.prepare(cfg, None, str(cache_dir / "work"))[1]


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_path, cache_dir):
  cfg, out = prepare_pairs(corpus, tokenizer_path, cache_dir)
  return cfg, out, {k: np.asarray(v) for k, v in prepare.load_prepared(out, "train").items()}


def with_kind(cfg, kind):
  cfg = cfg.copy_and_resolve_references()
  cfg.sentence_pair = kind
  return cfg


def batches(arrays, tokenizer, cfg, *, steps, **kwargs):
  args = dict(objective="mlm", global_batch=8, seed=0, start_step=0, data_cfg=cfg,
              tokenizer=tokenizer, num_steps=steps)
  args.update(kwargs)
  got = list(pipeline.make_dataset(arrays, **args).as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in got]) for k in got[0]}


def test_split_sentences_and_truncation():
  assert pairs.split_sentences(" first line. still one\n\n second line \n") == [
      "first line. still one", "second line"]
  assert pairs.split_sentences("It rains . Does it ? Yes!  Fine... 0 @.@ 7 ok") == [
      "It rains .", "Does it ?", "Yes!", "Fine...", "0 @.@ 7 ok"]
  for a in range(1, 12):
    for b in range(1, 12):
      la, lb = a, b
      while la + lb > 9:  # BERT's loop: drop a token off the longer side, B on ties
        la, lb = (la - 1, lb) if la > lb else (la, lb - 1)
      assert pairs.truncate_lengths(a, b, 9) == (la, lb), (a, b)


def test_prepared_pairs_are_consecutive_sentences(prepared, tokenizer):
  cfg, out, arrays = prepared
  meta = json.loads((Path(out) / "meta.json").read_text())
  assert meta["format"] == "pairs" and meta["short_seq_prob"] == 0.1
  assert arrays["a_ids"].shape == arrays["b_ids"].shape == (len(arrays["doc"]), MAX_TOKENS)
  a_len, b_len, doc = arrays["a_len"], arrays["b_len"], arrays["doc"]
  assert (a_len >= 1).all() and (b_len >= 1).all() and (a_len + b_len <= MAX_TOKENS).all()
  for name, lens in (("a_ids", a_len), ("b_ids", b_len)):
    real = np.arange(MAX_TOKENS) < lens[:, None]
    assert (arrays[name][~real] == 0).all()  # stored zero-padded
    assert not np.isin(arrays[name][real], [tokenizer.pad_id, tokenizer.cls_id,
                                            tokenizer.sep_id]).any()
  assert (np.diff(doc) >= 0).all()  # documents in order, each walked front to back
  train_docs = sources.train_and_val_documents(cfg)[0]
  contiguous, end = 0, 0
  for r in range(len(doc)):
    if r == 0 or doc[r] != doc[r - 1]:
      sentences = tokenizer.encode_batch(pairs.split_sentences(train_docs[doc[r]]))
      stream = np.concatenate(sentences)
      bounds = np.cumsum([0] + [len(s) for s in sentences])
      end = 0  # where the document's next chunk may begin
    a, b = arrays["a_ids"][r, :a_len[r]], arrays["b_ids"][r, :b_len[r]]
    # A begins at a sentence boundary past the document's previous pair; B comes after A.
    a_at = next((s for s in bounds if s >= end and np.array_equal(stream[s:s + len(a)], a)), -1)
    assert a_at >= 0, r
    if len(a) + len(b) < MAX_TOKENS:  # Not truncated: A + B is exactly that stretch of text.
      np.testing.assert_array_equal(stream[a_at + len(a):a_at + len(a) + len(b)], b)
      contiguous += 1
    b_at = next((s for s in range(a_at + len(a), len(stream))
                 if np.array_equal(stream[s:s + len(b)], b)), -1)
    assert b_at >= 0, r
    end = b_at + len(b)
  assert contiguous > 0.15 * len(doc)  # the rest were truncated, checked as prefixes above


def _check_layout(got, tokenizer):
  ids, segs, pos, types = (got[k] for k in ("input_ids", "segment_ids", "positions",
                                             "token_types"))
  assert all(got[k].dtype == np.int32 for k in ("input_ids", "segment_ids", "positions",
                                                "token_types", "pair_labels"))
  assert ids.shape[1] == SEQ_LEN and got["pair_labels"].shape == (len(ids),)
  cols = np.arange(SEQ_LEN)
  n = segs.sum(1)
  cls, sep = tokenizer.cls_id, tokenizer.sep_id
  assert (ids[:, 0] == cls).all() and ((ids == sep).sum(1) == 2).all()
  sep1 = np.argmax(ids == sep, axis=1)
  assert (ids[np.arange(len(ids)), n - 1] == sep).all() and (sep1 < n - 2).all()
  real = cols < n[:, None]
  np.testing.assert_array_equal(segs, real)
  np.testing.assert_array_equal(pos, np.where(real, cols, 0))
  np.testing.assert_array_equal(types, real & (cols > sep1[:, None]))
  assert (ids[~real] == tokenizer.pad_id).all()
  return sep1, n


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_pair_rows_layout_and_negatives(prepared, tokenizer, kind):
  cfg, _, arrays = prepared
  cfg = with_kind(cfg, kind)
  got = batches(arrays, tokenizer, cfg, steps=8, global_batch=64, objective="clm",
                shuffle=False)
  sep1, n = _check_layout(got, tokenizer)
  _check_layout(batches(arrays, tokenizer, cfg, steps=2, global_batch=64), tokenizer)  # masked
  labels = got["pair_labels"]
  assert 0.4 < labels.mean() < 0.6 and set(np.unique(labels)) == {0, 1}
  a_ids, a_len, b_ids, b_len = (arrays[k] for k in ("a_ids", "a_len", "b_ids", "b_len"))
  unrelated = 0
  for g, row in enumerate(got["input_ids"]):  # unshuffled: global row g reads example g
    first, second = row[1:sep1[g]], row[sep1[g] + 1:n[g] - 1]
    a, b = a_ids[g, :a_len[g]], b_ids[g, :b_len[g]]
    if not labels[g]:
      np.testing.assert_array_equal(np.concatenate([first, second]), np.concatenate([a, b]))
      assert len(first) == len(a)
    elif kind == "sop":
      np.testing.assert_array_equal(first, b)
      np.testing.assert_array_equal(second, a)
    else:
      np.testing.assert_array_equal(first, a)
      assert 0 < len(second) <= MAX_TOKENS - len(a)
      sources_of_b = np.flatnonzero((b_ids[:, :len(second)] == second).all(1))
      assert len(sources_of_b)  # a prefix of some row's B, cut to fit
      unrelated += (arrays["doc"][sources_of_b] != arrays["doc"][g]).any()
  if kind == "nsp":
    assert unrelated >= 0.95 * labels.sum()


def test_short_seq_prob_shortens_rows(corpus, tokenizer_path, cache_dir):
  # Sentences here average ~46 pieces and a chunk always takes whole sentences, so a short
  # target shows at 128 tokens, less so at 64.
  mean, full = {}, {}
  for prob in (0.0, 1.0):
    _, out = prepare_pairs(corpus, tokenizer_path, cache_dir, short_seq_prob=prob, seq_len=128)
    train = prepare.load_prepared(out, "train")
    lengths = train["a_len"] + train["b_len"]
    mean[prob], full[prob] = lengths.mean(), (lengths == 128 - pairs.NUM_SPECIAL).mean()
  assert mean[1.0] < 0.85 * mean[0.0] and full[1.0] < 0.5 * full[0.0], (mean, full)


def test_batches_are_pure_functions_of_seed_and_step(prepared, tokenizer):
  cfg, _, arrays = prepared
  one = batches(arrays, tokenizer, cfg, steps=3, seed=1, start_step=2)
  halves = [batches(arrays, tokenizer, cfg, steps=3, seed=1, start_step=2,
                    host_rows=range(4 * p, 4 * p + 4)) for p in range(2)]
  for key in one:  # row order: step 2 host 0, step 2 host 1, step 3 host 0, ...
    joined = np.stack([np.split(h[key], 3) for h in halves], axis=1).reshape(one[key].shape)
    np.testing.assert_array_equal(joined, one[key], err_msg=key)
  other = batches(arrays, tokenizer, cfg, steps=3, seed=2, start_step=2)
  assert (other["pair_labels"] != one["pair_labels"]).any()
  assert (other["input_ids"] != one["input_ids"]).mean() > 0.5
  again = batches(arrays, tokenizer, cfg, steps=3, seed=1, start_step=2)
  for key in one:
    np.testing.assert_array_equal(again[key], one[key], err_msg=key)


def test_prepare_is_deterministic_and_cached(prepared, corpus, tokenizer_path, cache_dir):
  _, out, arrays = prepared
  meta_file = Path(out) / "meta.json"
  stamp = meta_file.stat().st_mtime_ns
  _, sop_out = prepare_pairs(corpus, tokenizer_path, cache_dir, sentence_pair="sop")
  assert sop_out == out and meta_file.stat().st_mtime_ns == stamp  # one cache for nsp and sop
  _, packed_out = prepare_pairs(corpus, tokenizer_path, cache_dir, sentence_pair="")
  assert packed_out != out and isinstance(prepare.load_prepared(packed_out, "train"), packed_lib.PackedRows)
  old = Path(out + ".old")
  shutil.move(out, old)
  assert prepare_pairs(corpus, tokenizer_path, cache_dir)[1] == out
  again = prepare.load_prepared(out, "train")
  for key in arrays:
    np.testing.assert_array_equal(again[key], arrays[key], err_msg=key)
  np.save(old / "validation" / "a_len.npy", np.zeros(3, np.int32))
  with pytest.raises(sources.DataError, match=r"a_len\.npy has shape \(3,\) int32, .* run the prepare"):
    prepare.load_prepared(str(old), "validation")
  os.remove(old / "train" / "doc.npy")
  with pytest.raises(sources.DataError, match=r"doc\.npy is missing; run the prepare .* rebuilds it"):
    prepare.load_prepared(str(old), "train")


def test_mismatched_sentence_pair_setting(prepared, tokenizer, corpus, tokenizer_path,
                                          cache_dir):
  cfg, _, arrays = prepared
  flag = r"--config\.data\.sentence_pair"
  with pytest.raises(errors.UserError, match=f"holds sentence pairs, but {flag} is empty"):
    batches(arrays, tokenizer, with_kind(cfg, ""), steps=1)
  packed = packed_lib.pack([[10, 11, 12], [13, 14]], 8, tokenizer)
  with pytest.raises(errors.UserError, match=f"{flag}='sop' needs data prepared as sentence"):
    batches(packed, tokenizer, with_kind(cfg, "sop"), steps=1)
  with pytest.raises(errors.UserError, match=f"{flag}='bert' is not known"):
    batches(arrays, tokenizer, with_kind(cfg, "bert"), steps=1)
  with pytest.raises(errors.UserError, match=r"short_seq_prob=1\.5 must be in \[0, 1\]"):
    prepare_pairs(corpus, tokenizer_path, cache_dir, short_seq_prob=1.5)

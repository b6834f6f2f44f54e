"""Tokenizer: reserved ids, round trips on real text, clear errors for bad model files."""

from pathlib import Path

import pytest

from lmssl import errors
from lmssl.data import tokenizer as tok
from lmssl.hf import tokenizer as hf_tokenizer


def test_reserved_ids(tokenizer_path):
  t = hf_tokenizer.load(tokenizer_path)
  assert isinstance(t, tok.Tokenizer)
  assert [t.id_to_piece(i) for i in range(tok.NUM_RESERVED)] == list(tok.RESERVED_PIECES)
  assert t.vocab_size == 1000
  ids = (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id, t.bos_id, t.eos_id)
  assert ids == (tok.PAD_ID, tok.UNK_ID, tok.CLS_ID, tok.SEP_ID, tok.MASK_ID, 2, 3)
  assert list(t.special) == [i < tok.NUM_RESERVED for i in range(t.vocab_size)]
  assert t.fingerprint == Path(tokenizer_path).read_bytes()  # cache keys as before HF tokenizers
  assert t.word_start[:tok.NUM_RESERVED].all()
  pieces = [t.id_to_piece(i) for i in range(tok.NUM_RESERVED, t.vocab_size)]
  assert list(t.word_start[tok.NUM_RESERVED:]) == [p.startswith("\u2581") for p in pieces]
  assert 0 < t.word_start.sum() < t.vocab_size  # both kinds exist


def test_round_trip_on_real_text(tokenizer_path, paragraphs):
  t = tok.Tokenizer.load(tokenizer_path)
  held_out = paragraphs[2000:2050]  # not seen in training
  exact = 0
  for text, ids in zip(held_out, t.encode_batch(held_out)):
    assert ids == t.encode(text)
    assert min(ids) >= tok.NUM_RESERVED or tok.UNK_ID in ids  # no PAD/CLS/SEP/MASK from text
    if tok.UNK_ID not in ids:  # a character unseen in training cannot come back
      assert t.decode(ids).split() == text.split()  # whitespace folding is the only change
      exact += 1
  assert exact >= 0.8 * len(held_out)


def test_training_is_deterministic(tokenizer_path, paragraphs, tmp_path):
  again = tmp_path / "again.model"
  tok.train(paragraphs[:1500], str(again), 1000, "unigram", 100_000)
  assert again.read_bytes() == Path(tokenizer_path).read_bytes()
  assert not [p for p in tmp_path.iterdir() if p.name != "again.model"]  # no temp files left


def test_bpe_trains(paragraphs, tmp_path):
  path = str(tmp_path / "bpe.model")
  tok.train(paragraphs[:500], path, 300, "bpe", 100_000)
  assert tok.Tokenizer.load(path).vocab_size == 300


def test_missing_tokenizer_path(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
    tok.Tokenizer.load(str(missing))
  with pytest.raises(errors.UserError, match=f"{missing}.*does not exist.*HuggingFace"):
    hf_tokenizer.load(str(missing))
  with pytest.raises(errors.UserError, match=f"{tmp_path}/tokenizer.json does not exist"):
    hf_tokenizer.load(str(tmp_path / "tokenizer.json"))
  with pytest.raises(errors.UserError, match=f"{tmp_path} holds no tokenizer.json, vocab.txt"):
    hf_tokenizer.load(str(tmp_path))  # a directory without HuggingFace tokenizer files


def test_encode_with_masks(tokenizer_path):
  t = hf_tokenizer.load(tokenizer_path)
  ids = t.encode_with_masks("The [MASK] sat on the [MASK].")
  assert ids.count(tok.MASK_ID) == 2
  assert [i for i in ids if i != tok.MASK_ID] == t.encode("The") + t.encode("sat on the") + (
      t.encode("."))


def test_garbage_model_file(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match="not a valid sentencepiece"):
    tok.Tokenizer.load(str(path))


def test_model_without_reserved_ids(paragraphs, tmp_path):
  import sentencepiece as spm  # A foreign model: sentencepiece defaults (unk 0, bos 1, eos 2).
  prefix = str(tmp_path / "foreign")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(paragraphs[:300]), model_prefix=prefix,
                                 vocab_size=200, minloglevel=2)
  with pytest.raises(ValueError, match=r"foreign.model: \[PAD\] has id -1"):
    tok.Tokenizer.load(prefix + ".model")


def test_vocab_too_small(paragraphs, tmp_path):
  with pytest.raises(ValueError, match="vocab_size 10 is below the minimum"):
    tok.train(paragraphs[:10], str(tmp_path / "x.model"), 10, "unigram", 1000)
  with pytest.raises(ValueError, match="unknown tokenizer_type 'word'"):
    tok.train(paragraphs[:10], str(tmp_path / "x.model"), 100, "word", 1000)

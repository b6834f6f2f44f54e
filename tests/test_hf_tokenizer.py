"""HuggingFace tokenizers: the same ids as transformers on real text, saved copies that both load,
and the data path (packing, masking, task rows) on their special ids.

Tokenizers are trained here on WikiText-2 validation text and written as a BERT checkpoint
writes them (vocab.txt) and as GPT-2 does (vocab.json + merges.txt); ids are compared on the
test split. References: transformers' pure-Python BertTokenizerLegacy, a pure-Python GPT-2 BPE
after GPT-2's encoder.py, and AutoTokenizer.
"""

import itertools
import json
import math
import sys

import numpy as np
import pytest

from lmssl import config
from lmssl import errors
from lmssl.data import packed as packed_lib
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import task_files
from lmssl.data import tasks
from lmssl.hf import tokenizer as hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")  # a dependency of transformers

# BERT's layout in miniature: [PAD] 0, [unused0..19] 1-20, then [UNK] [CLS] [SEP] [MASK].
BERT_SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(20)] + ["[UNK]", "[CLS]", "[SEP]",
                                                                    "[MASK]"]
EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _lines(path):
  return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def train_lines(wikitext_dir):
  return _lines(wikitext_dir / "valid.txt")


@pytest.fixture(scope="module")
def lines(wikitext_dir):
  """Held-out lines: the first 300, and up to 100 more with non-ASCII characters."""
  held_out = _lines(wikitext_dir / "test.txt")
  accented = [line for line in held_out[300:] if not line.isascii()][:100]
  assert len(accented) > 20 and any(c.isdigit() for line in held_out[:300] for c in line)
  return held_out[:300] + accented


def _write_json(path, content):
  path.write_text(json.dumps(content), encoding="utf-8")


@pytest.fixture(scope="module")
def bert_dir(train_lines, tmp_path_factory):
  """vocab.txt + configs as a BERT checkpoint has them (lowercasing, 2000 pieces)."""
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(train_lines, vocab_size=2000, special_tokens=BERT_SPECIALS)
  path = tmp_path_factory.mktemp("bert")
  trainer.save_model(str(path))
  _write_json(path / "tokenizer_config.json", {"do_lower_case": True})
  _write_json(path / "config.json", {"model_type": "bert"})
  return path


@pytest.fixture(scope="module")
def gpt2_dir(train_lines, tmp_path_factory):
  """vocab.json + merges.txt with <|endoftext|> as the last id, as GPT-2's 50256 is."""
  trainer = tokenizers.ByteLevelBPETokenizer()
  trainer.train_from_iterator(train_lines, vocab_size=1500, special_tokens=[EOT])
  path = tmp_path_factory.mktemp("gpt2")
  trainer.save_model(str(path))
  vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
  pieces = sorted((i, p) for p, i in vocab.items() if p != EOT)
  vocab = {p: n for n, (_, p) in enumerate(pieces)} | {EOT: len(pieces)}
  _write_json(path / "vocab.json", vocab)
  _write_json(path / "config.json", {"model_type": "gpt2"})
  return path


@pytest.fixture(scope="module")
def llama_dir(train_lines, tmp_path_factory):
  """A sentencepiece tokenizer.model as Llama checkpoints ship it: a unigram model with byte
  fallback (unk 0, bos 1, eos 2, no pad), named LlamaTokenizer in tokenizer_config.json."""
  import io
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(train_lines), model_writer=model, vocab_size=400,
      model_type="unigram", byte_fallback=True, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("llama")
  (path / "tokenizer.model").write_bytes(model.getvalue())
  _write_json(path / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"})
  return path


@pytest.fixture(scope="module")
def bert(bert_dir):
  return hf_tokenizer.load(str(bert_dir))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
  return hf_tokenizer.load(str(gpt2_dir))


def _gpt2_reference(directory):
  """GPT-2's encoder.py: byte -> printable character, then merges by rank, all at once."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
  vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
  merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
  ranks = {tuple(m.split()): r for r, m in enumerate(merges) if m}

  def bpe(word):
    parts = [byte_char[b] for b in word.encode("utf-8")]
    while len(parts) > 1:
      rank, first, second = min((ranks.get(pair, math.inf), *pair)
                                for pair in itertools.pairwise(parts))
      if rank == math.inf:
        break
      merged, i = [], 0
      while i < len(parts):
        if parts[i:i + 2] == [first, second]:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return [vocab[p] for p in parts]

  return lambda text: [i for word in regex.findall(GPT2_PATTERN, text) for i in bpe(word)]


def _slow_bert(directory):
  """transformers' pure-Python BERT tokenizer (no `tokenizers` inside)."""
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
  return BertTokenizerLegacy(str(directory / "vocab.txt"), do_lower_case=True)


def _special_ids(hf):
  """A transformers tokenizer's special ids, by lmssl's role names."""
  return {role: getattr(hf, f"{role}_token_id") for role in hf_tokenizer.ROLES}


def _ids(t):
  return {role: getattr(t, f"{role}_id") for role in hf_tokenizer.ROLES}


# ---------------------------------------------------------------------------- same ids


def test_wordpiece_ids_match_transformers(bert, bert_dir, lines):
  assert isinstance(bert, hf_tokenizer.HFTokenizer) and bert.vocab_size == 2000
  slow = _slow_bert(bert_dir)
  auto = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
  want = [slow.encode(line, add_special_tokens=False) for line in lines]
  assert bert.encode_batch(lines) == want == [bert.encode(line) for line in lines]
  assert auto(lines, add_special_tokens=False)["input_ids"] == want
  assert _ids(bert) == {"pad": 0, "unk": 21, "cls": 22, "sep": 23, "bos": 22, "eos": 23,
                        "mask": 24}
  assert {k: v for k, v in _ids(bert).items() if k not in ("bos", "eos")} == {
      k: v for k, v in _special_ids(auto).items() if k not in ("bos", "eos")}
  assert np.flatnonzero(bert.special).tolist() == list(range(25))  # with the [unusedN]
  found = np.concatenate(want)
  assert not bert.special[found].any()
  unseen = "a snowman \u2603 melts"  # an unseen character: the one special text can yield
  assert bert.encode(unseen) == slow.encode(unseen, add_special_tokens=False)
  assert bert.unk_id in bert.encode(unseen)
  assert [bert.id_to_piece(i) for i in range(25)] == BERT_SPECIALS


def test_byte_level_ids_match_transformers_and_gpt2(gpt2, gpt2_dir, lines):
  assert isinstance(gpt2, hf_tokenizer.HFTokenizer) and gpt2.vocab_size == 1500
  reference = _gpt2_reference(gpt2_dir)
  auto = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir))
  want = [reference(line) for line in lines]
  assert gpt2.encode_batch(lines) == want == [gpt2.encode(line) for line in lines]
  assert auto(lines, add_special_tokens=False)["input_ids"] == want
  assert [gpt2.decode(ids) for ids in want] == lines  # byte-level: lossless
  eot = 1499
  assert gpt2.id_to_piece(eot) == EOT
  assert _ids(gpt2) == dict.fromkeys(("pad", "unk", "cls", "sep", "bos", "eos"), eot) | {
      "mask": None}
  assert _special_ids(auto) == {"pad": None, "unk": eot, "cls": None, "sep": None, "bos": eot,
                                "eos": eot, "mask": None}
  assert np.flatnonzero(gpt2.special).tolist() == [eot]


def test_saved_copies_load_with_the_same_ids(bert, gpt2, lines, tmp_path):
  for name, original in (("bert", bert), ("gpt2", gpt2)):
    original.save(str(tmp_path / name))
    again = hf_tokenizer.load(str(tmp_path / name))
    from_json = hf_tokenizer.load(str(tmp_path / name / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
    want = original.encode_batch(lines)
    assert again.encode_batch(lines) == from_json.encode_batch(lines) == want, name
    assert auto(lines, add_special_tokens=False)["input_ids"] == want, name
    assert _ids(again) == _ids(original) and again.fingerprint == original.fingerprint
    assert (again.special == original.special).all() and again.vocab_size == original.vocab_size
    assert {k: v for k, v in _special_ids(auto).items() if v is not None} == {
        k: v for k, v in _ids(original).items()
        if getattr(auto, f"{k}_token", None) is not None}
  # A BERT copy still frames a text as [CLS] ... [SEP] for transformers.
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
  assert auto(lines[0])["input_ids"] == [bert.cls_id, *bert.encode(lines[0]), bert.sep_id]
  assert bert.fingerprint != gpt2.fingerprint


def test_sentencepiece_folder_loads_as_transformers_reads_it(llama_dir, lines, tmp_path):
  """A folder with a sentencepiece tokenizer.model, and the copy transformers' LlamaTokenizer
  saves of it (tokenizer.json), tokenize and decode as transformers does."""
  try:  # transformers converts a .model through sentencepiece's generated proto code
    from sentencepiece import sentencepiece_model_pb2  # noqa: F401
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"transformers cannot read a sentencepiece .model here: this sentencepiece's "
                f"proto code needs a newer protobuf (the beam extra caps it below 7): {e}"[:300])
  auto = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
  auto.save_pretrained(str(tmp_path / "saved"))
  want = auto(lines, add_special_tokens=False)["input_ids"]
  assert len(set(map(tuple, want))) > 100 and any(i < 259 for ids in want for i in ids[1:])
  loaded = [hf_tokenizer.load(str(llama_dir)), hf_tokenizer.load(str(tmp_path / "saved"))]
  for t in loaded:
    assert isinstance(t, hf_tokenizer.HFTokenizer) and t.vocab_size == 400
    assert t.encode_batch(lines) == want and t.encode(lines[0]) == want[0]
    assert [t.decode(ids) for ids in want] == [auto.decode(ids, skip_special_tokens=True)
                                                for ids in want]
    assert _ids(t) == {"pad": 2, "unk": 0, "cls": 1, "sep": 2, "bos": 1, "eos": 2, "mask": None}
    assert np.flatnonzero(t.special).tolist() == [0, 1, 2]
    sizes = t.piece_bytes()
    for line, ids in zip(lines, want):  # "▁" is a space; transformers prepends one
      if "<unk>" not in line:  # WikiText's literal <unk> is the special token, zero bytes
        assert sizes[ids].sum() == len(line.encode("utf-8")) + 1, line
  assert loaded[0].fingerprint == loaded[1].fingerprint


# ---------------------------------------------------------------------------- pieces


def _plain(line):
  """ASCII words and lone punctuation, single-spaced: WordPiece keeps every byte but spaces."""
  return line.isascii() and all(w.isalnum() or len(w) == 1 for w in line.split(" "))


def test_word_start_and_piece_bytes_follow_the_text(bert, gpt2, lines):
  sizes = gpt2.piece_bytes()
  assert sizes.dtype == np.int32 and sizes[gpt2.eos_id] == 0
  for line, ids in zip(lines, gpt2.encode_batch(lines)):
    assert sizes[ids].sum() == len(line.encode("utf-8")), line  # "Ġ" is the space's byte
    if "  " not in line:
      assert gpt2.word_start[ids].sum() == line.count(" "), line  # a word after each space
  sizes = bert.piece_bytes()
  assert (sizes[bert.special] == 0).all() and bert.word_start[bert.special].all()
  plain = [line for line in lines if _plain(line)]
  assert len(plain) > 20
  for line, ids in zip(plain, bert.encode_batch(plain)):
    if bert.unk_id not in ids:
      assert sizes[ids].sum() == len(line) + 1, line  # every word counts its space
      assert bert.word_start[ids].sum() == len(line.split()), line


def test_fill_mask_queries(bert, gpt2, bert_dir):
  slow = _slow_bert(bert_dir)
  text = "The [MASK] of the river , and the [MASK] ."
  ids = bert.encode_with_masks(text)
  assert ids == slow.encode(text, add_special_tokens=False) and ids.count(bert.mask_id) == 2
  with pytest.raises(errors.UserError, match=f"tokenizer {gpt2.path} has no mask token"):
    gpt2.encode_with_masks(text)


# ---------------------------------------------------------------------------- data path


def test_mlm_batches_use_its_special_ids(bert, lines):
  packed = packed_lib.pack(bert.encode_batch(lines), 64, bert)
  assert packed["tokens"][0, 0] == bert.cls_id and (packed["tokens"] == bert.sep_id).sum() == len(
      lines)
  cfg = config.base_config().data
  cfg.update(max_predictions=16, mask_token_frac=0.4, random_token_frac=0.5,
             whole_word_mask=True)
  got = list(pipeline.make_dataset(
      packed, objective="mlm", global_batch=16, seed=0, start_step=0, data_cfg=cfg, tokenizer=bert,
      shuffle=False, num_steps=8).as_numpy_iterator())
  inputs = np.concatenate([b["input_ids"] for b in got])
  pos = np.concatenate([b["masked_positions"] for b in got])
  w = np.concatenate([b["masked_weights"] for b in got]) > 0
  orig = packed["tokens"][np.arange(len(inputs)) % len(packed["tokens"])]
  rows = np.broadcast_to(np.arange(len(inputs))[:, None], pos.shape)
  chosen = np.zeros(orig.shape, dtype=bool)
  chosen[rows[w], pos[w]] = True
  assert not bert.special[orig[chosen]].any()  # never [CLS]/[SEP]/[PAD]/[UNK]
  np.testing.assert_array_equal(inputs[~chosen], orig[~chosen])
  assert (inputs[chosen] == bert.mask_id).mean() > 0.3
  drawn = inputs[chosen & (inputs != orig) & (inputs != bert.mask_id)]
  assert len(drawn) > 200 and not bert.special[drawn].any()  # no [unusedN], no specials


def test_prepare_with_a_tokenizer_directory(bert, gpt2, train_lines, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(train_lines[:400]), encoding="utf-8")
  cfg = config.base_config().data
  cfg.update(source=f"text:{corpus}", seq_len=64, cache_dir=str(tmp_path / "cache"))
  found = {}
  for t in (bert, gpt2):
    cfg.tokenizer = t.path
    path, out = prepare.prepare(cfg, t, str(tmp_path / "work"))
    tokens = prepare.load_prepared(out, "train").to_arrays()["tokens"]
    assert path == t.path and tokens[0, 0] == t.cls_id and tokens.max() < t.vocab_size
    assert prepare.read_meta(out)["vocab_size"] == t.vocab_size
    found[t.path] = out
  assert len(set(found.values())) == 2  # the cache key follows the tokenizer


def test_mlm_needs_a_mask_token_and_clm_does_not(gpt2, lines):
  packed = packed_lib.pack(gpt2.encode_batch(lines), 64, gpt2)
  eot = gpt2.eos_id
  assert packed["tokens"][0, 0] == eot and packed["tokens"][-1, -1] == eot  # framing, padding
  args = {"global_batch": 8, "seed": 0, "start_step": 0, "data_cfg": config.base_config().data,
          "tokenizer": gpt2, "num_steps": 1}
  with pytest.raises(errors.UserError, match=f"tokenizer {gpt2.path} has no mask token, but "
                     "masked-LM"):
    pipeline.make_dataset(packed, objective="mlm", **args)
  batch = next(pipeline.make_dataset(packed, objective="clm", **args).as_numpy_iterator())
  assert batch["input_ids"].shape == (8, 64)


def test_task_rows_use_its_special_ids(bert, gpt2, lines):
  cfg = config.base_config().task
  cfg.update(kind="classification", text_fields="a,b")
  examples = [task_files.Example(texts=(a, b), label="x", where=f"line {i}")
              for i, (a, b) in enumerate(zip(lines[:40], lines[40:80]))]
  for t in (bert, gpt2):
    arrays = tasks.encode(examples, t, 48, cfg, ("x",))
    for e, ids, segs, types in zip(examples, arrays["input_ids"], arrays["segment_ids"],
                                   arrays["token_types"]):
      n = int(segs.sum())
      a, b = t.encode(e.texts[0]), t.encode(e.texts[1])
      len_a = int(np.flatnonzero(ids[1:n] == t.sep_id)[0])
      assert ids[0] == t.cls_id and ids[len_a + 1] == t.sep_id and ids[n - 1] == t.sep_id
      assert ids[1:len_a + 1].tolist() == a[:len_a] and ids[len_a + 2:n - 1].tolist() == b[
          :n - len_a - 3]
      assert (ids[n:] == t.pad_id).all()
      assert types[len_a + 2:n].all() and not types[:len_a + 2].any()
  assert gpt2.pad_id != 0 and (arrays["input_ids"] == gpt2.pad_id).any()  # a non-zero pad id


# ---------------------------------------------------------------------------- errors


def test_load_errors(tmp_path, bert_dir, monkeypatch):
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
  with pytest.raises(errors.UserError, match=f"tokenizer {broken} cannot be read"):
    hf_tokenizer.load(str(broken))
  renamed = tmp_path / "renamed"
  renamed.mkdir()
  (renamed / "vocab.txt").write_text((bert_dir / "vocab.txt").read_text(encoding="utf-8"),
                                     encoding="utf-8")
  _write_json(renamed / "tokenizer_config.json", {"cls_token": "[BOS]"})
  with pytest.raises(errors.UserError, match=r"its cls token '\[BOS\]' is not in the vocab"):
    hf_tokenizer.load(str(renamed))
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the hf extra were not installed
  with pytest.raises(errors.UserError, match=r"pip install 'lmssl\[hf\]'"):
    hf_tokenizer.load(str(bert_dir))

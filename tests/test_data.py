"""Data package: sources and their errors, packing, the prepare cache and the tf.data pipeline.

Masking and packing are checked on real text (WikiText-2 validation split) with a small
tokenizer trained once per session.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from lmssl import config
from lmssl.data import packed as packed_lib
from lmssl.data import pipeline
from lmssl.data import prepare
from lmssl.data import sources
from lmssl.data import tokenizer as tok

SEQ_LEN = 128


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
  return tok.Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="session")
def doc_ids(paragraphs, tokenizer):
  return tokenizer.encode_batch(paragraphs[:1200])


@pytest.fixture(scope="session")
def packed(doc_ids, tokenizer):
  return packed_lib.pack(doc_ids, SEQ_LEN, tokenizer)


def data_cfg(**overrides):
  cfg = config.base_config().data
  cfg.update(overrides)
  return cfg


def batches(arrays, tokenizer, *, steps, cfg=None, **kwargs):
  args = dict(objective="mlm", global_batch=8, seed=0, start_step=0, data_cfg=cfg or data_cfg(),
              tokenizer=tokenizer, num_steps=steps)
  args.update(kwargs)
  return list(pipeline.make_dataset(arrays, **args).as_numpy_iterator())


# ---------------------------------------------------------------------------- packing


def test_pack_reproduces_documents_in_order(packed, doc_ids, tokenizer):
  tokens, segs = packed["tokens"], packed["segment_ids"]
  assert tokens.dtype == segs.dtype == np.int32 and tokens.shape[1] == SEQ_LEN
  expected = np.concatenate([[tokenizer.cls_id, *ids, tokenizer.sep_id] for ids in doc_ids])
  np.testing.assert_array_equal(tokens[segs > 0], expected)  # row-major = row by row
  # Padding: only in the last row, only at its end, always segment 0 and PAD.
  is_pad = segs == 0
  assert not is_pad[:-1].any()
  assert (np.diff(is_pad[-1].astype(int)) >= 0).all()
  assert (tokens[is_pad] == tokenizer.pad_id).all()


def _positions(segment_ids):
  return pipeline.positions_from_segments(segment_ids).numpy()


def test_pack_segments_restart_per_row_and_step_at_documents(packed, tokenizer):
  tokens, segs = packed["tokens"], packed["segment_ids"]
  assert (segs[:, 0] == 1).all()
  real = segs[:, 1:] > 0
  step = np.diff(segs, axis=1)[real]
  assert (step == (tokens[:, 1:] == tokenizer.cls_id)[real]).all()  # +1 exactly where a doc starts
  positions = _positions(segs)
  starts = np.ones_like(segs, dtype=bool)
  starts[:, 1:] = segs[:, 1:] != segs[:, :-1]
  assert (positions[starts & (segs > 0)] == 0).all()
  inner = ~starts[:, 1:] & real
  assert (np.diff(positions, axis=1)[inner] == 1).all()
  assert (positions[segs == 0] == 0).all()


def test_pack_long_document_spans_rows():
  docs = [list(range(10, 20)), list(range(30, 33))]  # 12 + 5 framed tokens, rows of 4
  ids = SimpleNamespace(cls_id=101, sep_id=102, pad_id=7)  # a tokenizer's ids, BERT-like
  out = packed_lib.pack(docs, 4, ids)
  np.testing.assert_array_equal(out["tokens"], [[101, 10, 11, 12], [13, 14, 15, 16],
                                                [17, 18, 19, 102], [101, 30, 31, 32],
                                                [102, 7, 7, 7]])
  np.testing.assert_array_equal(out["segment_ids"], [[1] * 4, [1] * 4, [1] * 4, [1] * 4,
                                                     [1, 0, 0, 0]])
  out = packed_lib.pack([[7], [8, 9], [5]], 5, ids)  # [C 7 S C 8 | 9 S C 5 S]
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(_positions(out["segment_ids"]),
                                [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])


# ---------------------------------------------------------------------------- masking


def _original_rows(packed, batch_list, global_batch):
  """Rows read by an unshuffled pipeline: row g of the stream is example g % N."""
  n = len(packed["tokens"])
  index = np.arange(len(batch_list) * global_batch) % n
  return packed["tokens"][index]


def test_mask_statistics_on_real_text(packed, tokenizer):
  cfg = data_cfg(max_predictions=64)  # above 0.15 * 128: never caps k
  got = batches(packed, tokenizer, steps=40, global_batch=32, shuffle=False, cfg=cfg)
  orig = _original_rows(packed, got, 32)
  inputs = np.concatenate([b["input_ids"] for b in got])
  pos = np.concatenate([b["masked_positions"] for b in got])
  ids = np.concatenate([b["masked_ids"] for b in got])
  w = np.concatenate([b["masked_weights"] for b in got])
  assert w.dtype == np.float32 and set(np.unique(w)) <= {0.0, 1.0}
  rows = np.arange(len(orig))[:, None]
  real = w > 0
  np.testing.assert_array_equal(ids[real], orig[rows, pos][real])  # targets are the originals
  assert not tokenizer.special[ids[real]].any()  # never PAD/UNK/CLS/SEP/MASK
  assert (ids[~real] == 0).all() and (pos[~real] == 0).all()
  chosen = np.zeros(orig.shape, dtype=bool)
  chosen[np.broadcast_to(rows, pos.shape)[real], pos[real]] = True
  assert chosen.sum() == real.sum()  # no position listed twice
  np.testing.assert_array_equal(inputs[~chosen], orig[~chosen])  # only chosen ones change
  # k = round(0.15 * candidates) per row, exactly.
  cand = ~tokenizer.special[orig]
  num_cand = cand.sum(1)
  np.testing.assert_array_equal(real.sum(1), np.maximum(1, np.floor(0.15 * num_cand + 0.5)))
  # 80/10/10 over n ~ 24k predictions: binomial sd <= 0.0026, so 0.015 is > 5 sd.
  n = chosen.sum()
  assert n > 20_000
  as_mask = (inputs[chosen] == tokenizer.mask_id).mean()
  kept = (inputs[chosen] == orig[chosen]).mean()
  assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.015
  assert abs(1 - as_mask - kept - 0.1) < 0.015
  replaced = inputs[chosen & (inputs != orig) & (inputs != tokenizer.mask_id)]
  assert replaced.max() < tokenizer.vocab_size and not tokenizer.special[replaced].any()
  # Uniform over candidates: chosen ones sit in the first half of a row's candidates half the time.
  rank = np.cumsum(cand, axis=1) / num_cand[:, None]
  assert abs((rank[chosen] <= 0.5).mean() - 0.5) < 0.02


def test_random_replacements_are_the_former_draw(packed, tokenizer):
  # SentencePiece runs keep their batches: a random replacement is the id that
  # `stateless_uniform(minval=NUM_RESERVED, maxval=vocab_size)` drew before HF tokenizers.
  cfg = data_cfg(max_predictions=64, mask_token_frac=0.0, random_token_frac=1.0)
  got = batches(packed, tokenizer, steps=2, seed=11, shuffle=False, cfg=cfg)
  inputs = np.concatenate([b["input_ids"] for b in got])
  pos = np.concatenate([b["masked_positions"] for b in got])
  w = np.concatenate([b["masked_weights"] for b in got])
  for g in range(len(inputs)):  # mask_row's seeds of global row g
    random_seed = tf.random.experimental.stateless_split(tf.constant([11, g], tf.int64), 3)[2]
    former = tf.random.stateless_uniform([SEQ_LEN], random_seed, minval=tok.NUM_RESERVED,
                                         maxval=tokenizer.vocab_size, dtype=tf.int32).numpy()
    chosen = pos[g][w[g] > 0]
    assert len(chosen) > 5
    np.testing.assert_array_equal(inputs[g][chosen], former[chosen])


def test_mask_rate_one_predicts_every_candidate(packed, tokenizer):
  cfg = data_cfg(mask_rate=1.0, max_predictions=128)
  got = batches(packed, tokenizer, steps=2, shuffle=False, cfg=cfg)
  orig = _original_rows(packed, got, 8)
  weights = np.concatenate([b["masked_weights"] for b in got])
  np.testing.assert_array_equal((weights > 0).sum(1), (~tokenizer.special[orig]).sum(1))


def test_max_predictions_caps_and_pads(packed, tokenizer):
  got = batches(packed, tokenizer, steps=4, shuffle=False, cfg=data_cfg(max_predictions=5))
  w = np.concatenate([b["masked_weights"] for b in got])
  assert w.shape == (32, 5) and (w.sum(1) == 5).all()


def test_whole_word_mask_never_splits_a_word(packed, tokenizer):
  cfg = data_cfg(whole_word_mask=True, max_predictions=64)
  got = batches(packed, tokenizer, steps=20, global_batch=32, shuffle=False, cfg=cfg)
  orig = _original_rows(packed, got, 32)
  pos = np.concatenate([b["masked_positions"] for b in got])
  w = np.concatenate([b["masked_weights"] for b in got])
  rows = np.broadcast_to(np.arange(len(orig))[:, None], pos.shape)
  chosen = np.zeros(orig.shape, dtype=bool)
  chosen[rows[w > 0], pos[w > 0]] = True
  cand = ~tokenizer.special[orig]
  continues = cand[:, 1:] & cand[:, :-1] & ~tokenizer.word_start[orig[:, 1:]]
  assert continues[chosen[:, 1:]].sum() > 1000  # multi-piece words do get chosen
  np.testing.assert_array_equal(chosen[:, 1:][continues], chosen[:, :-1][continues])
  k = np.minimum(64, np.maximum(1, np.floor(0.15 * cand.sum(1) + 0.5)))
  assert (chosen.sum(1) <= k).all()
  assert chosen.sum() > 0.9 * k.sum()  # whole words still fill most of the budget


def test_clm_batches_are_the_rows(packed, tokenizer):
  got = batches(packed, tokenizer, steps=8, objective="clm", shuffle=False)
  assert sorted(got[0]) == ["input_ids", "positions", "segment_ids"]
  for key, name in [("input_ids", "tokens"), ("segment_ids", "segment_ids")]:
    np.testing.assert_array_equal(np.concatenate([b[key] for b in got]), packed[name][:64])
  np.testing.assert_array_equal(np.concatenate([b["positions"] for b in got]),
                                _positions(packed["segment_ids"][:64]))


# ---------------------------------------------------------------------------- order


def _stack(batch_list):
  return {k: np.stack([b[k] for b in batch_list]) for k in batch_list[0]}


def test_resumed_equals_uninterrupted(packed, tokenizer):
  full = _stack(batches(packed, tokenizer, steps=8, seed=3))
  resumed = _stack(batches(packed, tokenizer, steps=3, seed=3, start_step=5))
  for key in full:
    np.testing.assert_array_equal(resumed[key], full[key][5:], err_msg=key)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_independent_of_process_count(packed, tokenizer, process_count):
  one = _stack(batches(packed, tokenizer, steps=3, seed=1, start_step=2))
  b = 8 // process_count
  parts = [_stack(batches(packed, tokenizer, steps=3, seed=1, start_step=2,
                          host_rows=range(p * b, (p + 1) * b))) for p in range(process_count)]
  for key in one:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), one[key],
                                  err_msg=key)


def test_a_host_reads_exactly_the_rows_its_devices_hold(packed, tokenizer):
  # A mesh may give a host rows that are not one block (e.g. data inner, hosts outer on fsdp).
  one = _stack(batches(packed, tokenizer, steps=2, seed=1))
  odd = _stack(batches(packed, tokenizer, steps=2, seed=1, host_rows=[1, 3, 6, 7]))
  for key in one:
    np.testing.assert_array_equal(odd[key], one[key][:, [1, 3, 6, 7]], err_msg=key)


def test_seeds_change_order_and_masks(packed, tokenizer):
  a = _stack(batches(packed, tokenizer, steps=2, seed=0))
  b = _stack(batches(packed, tokenizer, steps=2, seed=1))
  a_again = _stack(batches(packed, tokenizer, steps=2, seed=0))
  assert (a["segment_ids"] != b["segment_ids"]).any()
  assert (a["input_ids"] != b["input_ids"]).mean() > 0.5
  for key in a:
    np.testing.assert_array_equal(a[key], a_again[key])


@pytest.mark.parametrize("num_rows", [40, 37])
def test_each_epoch_visits_every_example_once(tokenizer, num_rows):
  # Row i holds token NUM_RESERVED + i, so the token says which example was read.
  arrays = dict(tokens=np.repeat(np.arange(num_rows, dtype=np.int32)[:, None] + tok.NUM_RESERVED,
                                 4, axis=1),
                segment_ids=np.ones((num_rows, 4), dtype=np.int32))
  got = batches(arrays, tokenizer, steps=10, objective="clm", seed=7)
  seen = np.concatenate([b["input_ids"][:, 0] for b in got]) - tok.NUM_RESERVED
  epoch0, epoch1 = seen[:num_rows], seen[num_rows:2 * num_rows]
  assert sorted(epoch0) == list(range(num_rows)) == sorted(epoch1)
  assert list(epoch0) != list(range(num_rows)) and list(epoch0) != list(epoch1)


def test_bad_pipeline_arguments(packed, tokenizer):
  with pytest.raises(ValueError, match=r"host rows \[2, 1\] must be distinct ascending rows of "
                     r"the global batch of 8; take them from sharding.host_rows"):
    batches(packed, tokenizer, steps=1, host_rows=[2, 1])
  with pytest.raises(ValueError, match=r"host rows \[6, 8\] must be distinct ascending"):
    batches(packed, tokenizer, steps=1, host_rows=[6, 8])
  with pytest.raises(ValueError, match="unknown objective 'xlm'"):
    batches(packed, tokenizer, steps=1, objective="xlm")
  no_mask = SimpleNamespace(**{k: getattr(tokenizer, k) for k in (
      "path", "vocab_size", "pad_id", "cls_id", "sep_id", "special", "word_start")}, mask_id=None)
  with pytest.raises(ValueError, match=f"tokenizer {tokenizer.path} has no mask token, but "
                     "masked-LM"):
    batches(packed, no_mask, steps=1)
  assert batches(packed, no_mask, steps=1, objective="clm")  # a causal LM needs none


# ---------------------------------------------------------------------------- sources


def write(path, data):
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return path


def test_text_and_jsonl_sources(tmp_path):
  write(tmp_path / "b.txt", "third doc\n\n  \nfourth\nstill fourth\n")
  write(tmp_path / "a.txt", "first doc\nline two\n\nsecond doc\n")
  docs = sources.read_documents(f"text:{tmp_path}/*.txt", data_cfg())
  assert docs == ["first doc\nline two", "second doc", "third doc", "fourth\nstill fourth"]
  write(tmp_path / "c.jsonl", '{"text": "one", "id": 1}\n\n{"text": "two"}\n')
  assert sources.read_documents(f"jsonl:{tmp_path}/c.jsonl:text", data_cfg()) == ["one", "two"]


@pytest.mark.parametrize("source, files, message", [
    ("text:{d}/none/*.txt", {}, r"no files match '.*/none/\*\.txt'"),
    ("text:{d}/*.txt", {"e.txt": " \n\n"}, r"e\.txt is empty"),
    ("text:{d}/*.txt", {"l.txt": b"caf\xe9 au lait"}, r"l\.txt is not UTF-8 text \(byte 3"),
    ("jsonl:{d}/*.jsonl:text", {"x.jsonl": '{"text": "ok"}\n{"text": oops}\n'},
     r"x\.jsonl:2 is not valid JSON"),
    ("jsonl:{d}/*.jsonl:body", {"x.jsonl": '{"text": "ok"}\n'},
     r"x\.jsonl:1 has no field 'body' \(found \['text'\]\)"),
    ("jsonl:{d}/*.jsonl:n", {"x.jsonl": '{"n": 3}\n'}, r"field 'n' is a int, not a string"),
    ("csv:{d}/*.csv", {}, r"not one of the known forms \['builtin', 'text:GLOB'"),
    ("text", {}, r"'text' is not one of the known forms"),
])
def test_source_errors(tmp_path, source, files, message):
  for name, data in files.items():
    write(tmp_path / name, data)
  with pytest.raises(sources.DataError, match=message):
    sources.read_documents(source.format(d=tmp_path), data_cfg())


def test_split_is_by_content_not_order(paragraphs):
  docs = paragraphs[:400]
  train, val = sources.split_documents(docs, 0.1)
  train_r, val_r = sources.split_documents(docs[::-1], 0.1)
  assert sorted(val) == sorted(val_r) and sorted(train) == sorted(train_r)
  assert len(train) + len(val) == 400 and 15 < len(val) < 70
  assert [d for d in docs if d in set(val)] == val  # order kept within the split
  assert sources.split_documents(["a", "b"], 0.01)[1]  # never an empty validation split
  with pytest.raises(sources.DataError, match="at least 2 documents"):
    sources.split_documents(["only"], 0.1)


def test_builtin_corpus_is_deterministic():
  cfg = data_cfg(builtin_max_chars=150_000)
  docs = sources.read_documents("builtin", cfg)
  assert docs == sources.read_documents("builtin", cfg)
  assert 100_000 < sum(map(len, docs)) <= 150_000
  assert len(set(docs)) == len(docs) and min(map(len, docs)) >= sources.MIN_DOCSTRING_CHARS
  train, val = sources.train_and_val_documents(cfg)
  assert train and val and sorted(train + val) == sorted(docs)


# ---------------------------------------------------------------------------- prepare


def test_prepare_caches_by_content(paragraphs, tmp_path):
  corpus = write(tmp_path / "corpus.txt", "\n\n".join(paragraphs[:300]))
  cfg = data_cfg(source=f"text:{corpus}", vocab_size=400, seq_len=64,
                 cache_dir=str(tmp_path / "cache"))
  workdir = str(tmp_path / "work")
  tok_path, out = prepare.prepare(cfg, None, workdir)
  assert tok_path == os.path.join(workdir, "tokenizer.model")
  meta_file = Path(out) / "meta.json"
  stamp = (meta_file.stat().st_mtime_ns, Path(tok_path).stat().st_mtime_ns)
  meta = json.loads(meta_file.read_text())
  train = prepare.load_prepared(out, "train")
  assert isinstance(train, packed_lib.PackedRows) and train.shape[1] == 64
  assert meta["splits"]["train"]["num_examples"] == train.num_rows
  assert meta["splits"]["validation"]["num_documents"] > 0 and meta["vocab_size"] == 400

  assert prepare.prepare(cfg, None, workdir) == (tok_path, out)  # reused, not rewritten
  assert (meta_file.stat().st_mtime_ns, Path(tok_path).stat().st_mtime_ns) == stamp
  shard_files = sorted(p.name for p in (tmp_path / "cache" / "shards").rglob("*"))
  cfg.seq_len = 32
  _, out32 = prepare.prepare(cfg, None, workdir)
  assert out32 != out and prepare.load_prepared(out32, "validation").shape[1] == 32
  assert sorted(os.listdir(tmp_path / "cache" / "prepared")) == sorted(
      [os.path.basename(out), os.path.basename(out32)])
  # Another seq_len is another manifest over the same shards; no temporary files are left.
  assert sorted(p.name for p in (tmp_path / "cache" / "shards").rglob("*")) == shard_files
  assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]

  cfg.seq_len = 64
  edited = paragraphs[0].replace("a", "o")  # same documents, same lengths, other text
  write(corpus, "\n\n".join([edited] + paragraphs[1:300]))
  assert prepare.prepare(cfg, None, workdir)[1] not in (out, out32)

  meta_file.write_text(meta_file.read_text()[:50])
  with pytest.raises(sources.DataError, match=r"meta\.json is not valid JSON .* rebuilds it"):
    prepare.load_prepared(out, "validation")


def test_a_full_pass_over_prepared_rows_streams_what_padding_in_memory_gives(paragraphs,
                                                                            tmp_path):
  """The `eval` command's pass over a whole prepared split reads its rows from the shards, with
  rows of padding up to whole batches: the same batches and masks as the split read into
  memory and padded there, on every host, without holding the split."""
  from lmssl.data import tasks
  corpus = write(tmp_path / "corpus.txt", "\n\n".join(paragraphs[:600]))
  cfg = data_cfg(source=f"text:{corpus}", vocab_size=400, seq_len=64, val_fraction=0.2,
                 cache_dir=str(tmp_path / "cache"))
  tokenizer_path, out = prepare.prepare(cfg, None, str(tmp_path / "work"))
  tokenizer = tok.Tokenizer.load(tokenizer_path)
  rows = prepare.load_prepared(out, "validation")
  batch = 8 if rows.num_rows % 8 else 6  # some padding, whatever the split's size
  padded = rows.padded(batch)
  assert padded.num_rows % batch == 0 and rows.num_rows < padded.num_rows < rows.num_rows + batch
  tokens, segments = padded.read(np.arange(rows.num_rows, padded.num_rows))
  assert not segments.any() and (tokens == tokenizer.pad_id).all()  # weigh nothing
  in_memory = tasks.pad_rows(rows.to_arrays(), batch)
  steps = padded.num_rows // batch
  for host_rows in (None, [1, 3, 5]):
    for objective in ("mlm", "clm"):
      args = dict(steps=steps, cfg=cfg, objective=objective, shuffle=False, global_batch=batch,
                  host_rows=host_rows)
      streamed = _stack(batches(padded, tokenizer, **args))
      kept = _stack(batches(in_memory, tokenizer, **args))
      assert sorted(streamed) == sorted(kept)
      for key in kept:
        if key != "input_ids":  # in memory, padding rows hold id 0, not the pad id
          np.testing.assert_array_equal(streamed[key], kept[key], err_msg=key)
      np.testing.assert_array_equal(
          np.where(streamed["segment_ids"] > 0, streamed["input_ids"], 0), kept["input_ids"])


def test_tfds_source_reads_the_named_feature():
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = config.base_config().data
  with tfds.testing.mock_data(num_examples=12):
    docs = sources.read_documents("tfds:imdb_reviews:train:text", cfg)
    with pytest.raises(sources.DataError, match="has no feature 'body'; known: .*'text'"):
      sources.read_documents("tfds:imdb_reviews:train:body", cfg)
  assert 0 < len(docs) <= 12 and all(isinstance(d, str) and d.strip() for d in docs)

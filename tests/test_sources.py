"""Input shards: however a source is cut (byte ranges, row groups, TFDS shards), its pieces read
one after another give exactly the documents of the whole, one document at a time."""

import gzip
import json
import os
import re
import tracemalloc

import pytest

from lmssl import config
from lmssl.data import sources

# Everything a text file's documents can trip on: "\r\n", multi-byte characters, runs of blank
# lines holding whitespace, a leading blank line, a document of a no-break space only (stripped
# away), a long document spanning many ranges, and no final newline.
TEXT = ("\n  \nfirst doc\r\nline two é\r\n\r\n\r\n"
        "日本語の文書\nsecond line 🙂\n \t \n\n \r\n\n"
        "\u00a0\n\n"
        + "long " * 60 + "\nstill long ✓\n"
        + "\f\v\n" + "x\n\ny\nlast without newline")


def cfg(shard_bytes=64 * 2**20):
  data = config.base_config().data
  data.shard_bytes = shard_bytes
  return data


def whole_text(text):
  """A text file's documents as they were defined before sources streamed: the whole file
  split at blank lines."""
  docs = (d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n")))
  return [d for d in docs if d]


def read(shards):
  return [d for shard in shards for d in shard.documents()]


def ranged(shard, start, stop):
  return sources.InputShard(shard.kind, shard.path, start, stop, shard.field, shard.identity)


def assert_tiles(shards, size):
  """Byte ranges that cover [0, size) in order, none of them empty."""
  assert shards[0].start == 0 and shards[-1].stop == size
  assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
  assert all(s.start < s.stop for s in shards)


# ---------------------------------------------------------------------------- text


def test_text_ranges_cut_anywhere_give_the_whole_file(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(TEXT.encode())
  size = path.stat().st_size
  expected = whole_text(TEXT)
  assert len(expected) == 5 and expected[1].startswith("日本語")
  (whole,) = sources.list_shards(f"text:{path}", cfg())
  assert (whole.start, whole.stop) == (0, size) and read([whole]) == expected
  # Every cut point: inside "\r\n", inside a multi-byte character, inside blank runs.
  for cut in range(size + 1):
    assert read([ranged(whole, 0, cut), ranged(whole, cut, size)]) == expected, cut
  for shard_bytes in (1, 2, 3, 7, 50, 64, 100, 173, 200):
    shards = sources.list_shards(f"text:{path}", cfg(shard_bytes))
    assert len(shards) == -(-size // shard_bytes)
    assert_tiles(shards, size)
    assert read(shards) == expected, shard_bytes


def test_text_files_in_order_and_errors_name_the_byte(tmp_path):
  (tmp_path / "b.txt").write_bytes(b"b one\n\nb two\n")
  (tmp_path / "a.txt").write_bytes(b"a one\n\n" + b"good\n" * 30 + b"\ncaf\xe9\n")
  shards = sources.list_shards(f"text:{tmp_path}/*.txt", cfg(40))
  assert [os.path.basename(s.path) for s in shards][0] == "a.txt"
  assert shards[-1].path.endswith("b.txt") and shards[-1].describe().endswith("b.txt bytes 0-13")
  bad = 7 + 5 * 30 + 1 + 3  # the offset of \xe9 in the whole file, not in its range
  with pytest.raises(sources.DataError, match=rf"a\.txt is not UTF-8 text \(byte {bad}: "):
    read(shards)


def test_only_a_whole_file_without_documents_is_empty(tmp_path):
  long_doc = tmp_path / "long.txt"
  long_doc.write_text("word " * 100)  # one document: the later ranges own none, and that is fine
  shards = sources.list_shards(f"text:{long_doc}", cfg(50))
  assert len(shards) == 10 and [list(s.documents()) for s in shards[1:]] == [[]] * 9
  assert read(shards) == [("word " * 100).strip()]
  blank = tmp_path / "blank.txt"
  blank.write_text(" \n\n\t\n" * 40)
  for shard in sources.list_shards(f"text:{blank}", cfg(50)):
    with pytest.raises(sources.DataError, match=r"blank\.txt is empty; remove it or narrow"):
      list(shard.documents())


def test_a_big_file_streams_in_bounded_memory(tmp_path):
  path = tmp_path / "big.txt"
  paragraph = ("lorem ipsum dolor sit amet " * 40 + "\n") * 10 + "\n"  # ~11 kB
  with open(path, "w") as f:
    for _ in range(50 * 2**20 // len(paragraph)):
      f.write(paragraph)
  (shard,) = sources.list_shards(f"text:{path}", cfg())  # 50 MB: one range of the 64 MiB default
  tracemalloc.start()
  try:
    count = sum(1 for _ in shard.documents())
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert count == 50 * 2**20 // len(paragraph)
  assert peak < 5 * 2**20, f"reading held {peak} bytes at once"


# ---------------------------------------------------------------------------- JSONL


JSONL_RECORDS = [{"text": "one é"}, {"text": "  "}, {"text": "日本 🙂", "id": 2}, {"text": "four"}]


def jsonl_bytes():
  lines = [json.dumps(r, ensure_ascii=False) for r in JSONL_RECORDS]
  return ("\n".join(lines[:2]) + "\r\n\n  \n" + "\n".join(lines[2:]) + "\n").encode()


def test_jsonl_ranges_cut_anywhere_give_the_whole_file(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_bytes(jsonl_bytes())
  size = path.stat().st_size
  expected = ["one é", "日本 🙂", "four"]
  (whole,) = sources.list_shards(f"jsonl:{path}:text", cfg())
  assert read([whole]) == expected
  for cut in range(size + 1):
    assert read([ranged(whole, 0, cut), ranged(whole, cut, size)]) == expected, cut
  for shard_bytes in (1, 5, 17, 30, 64):
    shards = sources.list_shards(f"jsonl:{path}:text", cfg(shard_bytes))
    assert_tiles(shards, size)
    assert read(shards) == expected, shard_bytes


def test_jsonl_errors_past_the_first_range_name_the_byte(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"text": "ok"}\n' * 10 + b'{"text": oops}\n')
  with pytest.raises(sources.DataError, match=r"x\.jsonl:11 is not valid JSON"):
    sources.read_documents(f"jsonl:{path}:text", cfg())
  with pytest.raises(sources.DataError, match=r"x\.jsonl byte 150 is not valid JSON"):
    read(sources.list_shards(f"jsonl:{path}:text", cfg(100)))


# ---------------------------------------------------------------------------- compressed


def zstd_frames(data, frames):
  zstandard = pytest.importorskip("zstandard")
  step = -(-len(data) // frames)
  return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step])
                  for i in range(0, len(data), step))


@pytest.mark.parametrize("form, name, data, expected", [
    ("text:{}", "t.txt", TEXT.encode(), whole_text(TEXT)),
    ("jsonl:{}:text", "c.jsonl", jsonl_bytes(), ["one é", "日本 🙂", "four"]),
])
def test_compressed_files_give_the_plain_documents(tmp_path, form, name, data, expected):
  packed = {".gz": gzip.compress(data), ".zst": zstd_frames(data, 3)}  # 3 frames, one stream
  for suffix, blob in packed.items():
    path = tmp_path / (name + suffix)
    path.write_bytes(blob)
    shards = sources.list_shards(form.format(path), cfg(10))
    assert [(s.start, s.stop) for s in shards] == [(0, -1)]  # a stream is not cut
    assert shards[0].describe() == str(path)
    assert read(shards) == expected, suffix


@pytest.mark.parametrize("suffix, kind", [(".gz", "gzip"), (".zst", "zstd")])
def test_truncated_compressed_files_are_named(tmp_path, suffix, kind):
  data = TEXT.encode() * 50
  blob = gzip.compress(data) if suffix == ".gz" else zstd_frames(data, 1)
  path = tmp_path / f"cut.txt{suffix}"
  path.write_bytes(blob[:len(blob) // 2])
  message = rf"cut\.txt\{suffix} is truncated or not valid {kind} \(.*\); re-download or"
  with pytest.raises(sources.DataError, match=message):
    sources.read_documents(f"text:{path}", cfg())
  path.write_bytes(b"not compressed at all\n")
  with pytest.raises(sources.DataError, match=message):
    sources.read_documents(f"text:{path}", cfg())


# ---------------------------------------------------------------------------- parquet


def write_parquet(path, texts, row_group_size, **columns):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)


def test_parquet_shards_are_runs_of_row_groups(tmp_path):
  texts = [f"document {i} " + "é" * (i % 5) if i % 4 else ("  " if i % 8 else None)
           for i in range(40)]
  path = str(tmp_path / "c.parquet")
  write_parquet(path, texts, row_group_size=5)  # 8 row groups
  expected = [t for t in texts if t and t.strip()]
  source = f"parquet:{tmp_path}/*.parquet:text"
  assert [(s.start, s.stop) for s in sources.list_shards(source, cfg())] == [(0, 8)]
  assert [(s.start, s.stop) for s in sources.list_shards(source, cfg(1))] == [
      (i, i + 1) for i in range(8)]
  shards = sources.list_shards(source, cfg(250))  # a row group here is ~100-150 bytes
  assert 1 < len(shards) < 8 and shards[0].start == 0 and shards[-1].stop == 8
  assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
  assert shards[0].describe() == f"{path} row groups 0-{shards[0].stop - 1}"
  for shard_bytes in (1, 250, 2**30):
    assert read(sources.list_shards(source, cfg(shard_bytes))) == expected
  assert sources.read_documents(source, cfg()) == expected


def test_parquet_errors_name_the_file_and_column(tmp_path):
  path = tmp_path / "c.parquet"
  write_parquet(str(path), ["a", "b"], row_group_size=1, n=[1, 2])
  with pytest.raises(sources.DataError, match=r"c\.parquet has no column 'body' \(found "
                     r"\['text', 'n'\]\); name the text column .* parquet:GLOB:text"):
    sources.list_shards(f"parquet:{path}:body", cfg())
  with pytest.raises(sources.DataError, match=r"c\.parquet column 'n' is int64, not a string"):
    sources.list_shards(f"parquet:{path}:n", cfg())
  blob = path.read_bytes()
  for damaged in (blob[:len(blob) // 2], b"not parquet"):
    path.write_bytes(damaged)
    with pytest.raises(sources.DataError, match=r"c\.parquet is truncated or not valid parquet"):
      sources.list_shards(f"parquet:{path}:text", cfg())
  with pytest.raises(sources.DataError, match=r"is a directory; .* parquet:.*/\*\.parquet:text"):
    sources.list_shards(f"parquet:{tmp_path}:text", cfg())


# ---------------------------------------------------------------------------- identity


def test_identity_follows_the_content_and_shards_travel_as_json(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("one\n\ntwo\n")
  before = sources.list_shards(f"text:{path}", cfg(4))
  again = sources.list_shards(f"text:{path}", cfg(4))
  assert before == again  # listing is a pure function of the files
  path.write_text("uno\n\ndos\n")  # the same size: the mtime tells
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
  assert {s.identity for s in sources.list_shards(f"text:{path}", cfg(4))}.isdisjoint(
      {s.identity for s in before})
  builtin = sources.list_shards("builtin", cfg())
  assert len(builtin) == 1 and json.loads(builtin[0].identity)["builtin_max_chars"] == 6_000_000
  for shard in before + builtin:
    sent = json.loads(json.dumps(shard.to_json()))
    assert sources.InputShard.from_json(sent) == shard


def test_builtin_shard_reads_the_builtin_corpus():
  data = cfg()
  data.builtin_max_chars = 50_000
  (shard,) = sources.list_shards("builtin", data)
  assert list(shard.documents()) == sources.builtin_documents(50_000)


def test_unknown_forms_and_missing_files(tmp_path):
  with pytest.raises(sources.DataError, match=r"not one of the known forms .*'parquet:GLOB"):
    sources.list_shards("csv:x.csv", cfg())
  with pytest.raises(sources.DataError, match=r"no files match '.*/none/\*\.txt'"):
    sources.list_shards(f"text:{tmp_path}/none/*.txt", cfg())
  with pytest.raises(sources.DataError, match=r"is a directory; name its files with a glob, e\.g"
                     r"\. text:.*/\*\.txt"):
    sources.list_shards(f"text:{tmp_path}", cfg())


# ---------------------------------------------------------------------------- TFDS


def test_tfds_shards_are_the_prepared_shards(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core.utils import file_utils
  monkeypatch.setattr(file_utils, "_REGISTERED_DATA_DIRS", set())

  class LmsslShardedText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(60):
        yield i, {"text": f"document {i}" if i % 7 else "  "}

  LmsslShardedText(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=3))
  tfds.core.add_data_dir(str(tmp_path))
  source = "tfds:lmssl_sharded_text:train:text"
  shards = sources.list_shards(source, cfg())
  assert [(s.start, s.stop) for s in shards] == [(0, 1), (1, 2), (2, 3)]
  assert [json.loads(s.identity)["examples"] for s in shards] == [20, 20, 20]
  assert shards[1].describe() == "tfds lmssl_sharded_text:train shard 1"
  docs = read(shards)
  assert sorted(docs) == sorted(f"document {i}" for i in range(60) if i % 7)
  assert sources.read_documents(source, cfg()) == docs
  with pytest.raises(sources.DataError, match="has no feature 'body'; known: .*'text'"):
    sources.list_shards("tfds:lmssl_sharded_text:train:body", cfg())

"""The data benchmark's corpus generator makes the same bytes from the same request."""

import glob
import json
import pathlib

from lmssl.bench import corpus
from lmssl.data import readers


def _documents(directory, fmt: str) -> list[str]:
  paths = sorted(glob.glob(str(directory / f"*{corpus.FORMATS[fmt][0]}")))
  if fmt == "text":
    return [d for p in paths for d in readers.text_documents(p)]
  return [d for p in paths for d in readers.jsonl_documents(p, "text")]


def test_corpus_is_its_request_and_reads_back_as_shuffled_paragraphs(tmp_path, wikitext_dir):
  paragraphs = corpus.paragraphs(wikitext_dir)
  made = {}
  for name, fmt, seed in (("a", "text", 0), ("b", "text", 0), ("c", "text", 1),
                          ("gz", "jsonl.gz", 0)):
    made[name] = corpus.generate(tmp_path / name, 0.006, fmt, files=3, seed=seed,
                                 wikitext=wikitext_dir)
    assert not made[name]["reused"]
  read = lambda name: [(tmp_path / name / f["name"]).read_bytes() for f in made[name]["files"]]
  assert read("a") == read("b") and read("a") != read("c")
  assert corpus.generate(tmp_path / "a", 0.006, "text", 3, 0, wikitext_dir)["reused"]
  docs = _documents(tmp_path / "a", "text")
  sizes = [len(x) for x in read("a")]
  # 6 MB of ~2.4 MB copies: two whole copies, each all the paragraphs in its own order, and
  # part of a third; the files share the bytes evenly, each ending on a whole paragraph.
  assert made["a"]["bytes"] == sum(sizes) and 6_000_000 <= sum(sizes) < 6_000_000 + 2 ** 16
  assert max(sizes) - min(sizes) < 2 ** 16 and len(docs) == made["a"]["documents"]
  n = len(paragraphs)
  assert sorted(docs[:n]) == sorted(paragraphs) == sorted(docs[n:2 * n])
  assert docs[:n] != docs[n:2 * n] != paragraphs
  # The same order in JSONL (gzipped): more bytes per paragraph, so fewer of them.
  gz_docs = _documents(tmp_path / "gz", "jsonl.gz")
  assert gz_docs == docs[:len(gz_docs)] and made["gz"]["documents"] == len(gz_docs)

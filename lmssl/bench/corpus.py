"""A corpus of a given size made of real text, for the data benchmark and tests.

  python -m lmssl.bench.corpus --out DIR --gigabytes 0.1 [--format text|jsonl|jsonl.gz]
      [--files N] [--seed S] [--wikitext DIR]

The text is WikiText-2's validation and test files (`../shared/corpora/wikitext-2` beside the
repository, or --wikitext), cut into paragraphs exactly as a `text:` source cuts a file (runs of
lines between blank lines, lmssl/data/readers.py). Copy c of the paragraph list is shuffled by
a generator seeded with (seed, c), and copies follow each other until the corpus holds
`gigabytes` x 10^9 bytes of uncompressed text (ending on a whole paragraph), spread evenly over
the files. The same (gigabytes, seed, format, files) gives the same bytes; the writing streams,
holding one copy's order and the ~2.4 MB of paragraphs, whatever the size.

`DIR/corpus.json`, written last, records what was asked and what came out; `generate` reuses a
directory whose record matches the request, so a benchmark makes each corpus once.
"""

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import sys
import uuid

import numpy as np

from lmssl.data import readers

WIKITEXT = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "wikitext-2"
WIKITEXT_FILES = ("valid.txt", "test.txt")
# format: (file suffix, the data.source that reads DIR's files)
FORMATS = {
    "text": (".txt", "text:{dir}/*.txt"),
    "jsonl": (".jsonl", "jsonl:{dir}/*.jsonl:text"),
    "jsonl.gz": (".jsonl.gz", "jsonl:{dir}/*.jsonl.gz:text"),
}
RECORD = "corpus.json"
_BUFFER = 1 << 20


def paragraphs(wikitext: str | os.PathLike = WIKITEXT) -> list[str]:
  """WikiText-2's validation and test paragraphs, in file order."""
  paths = [pathlib.Path(wikitext) / name for name in WIKITEXT_FILES]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"WikiText-2 files {missing} are missing; pass --wikitext DIR "
                            f"holding {list(WIKITEXT_FILES)} (the shared corpora: {WIKITEXT})")
  return [doc for p in paths for doc in readers.text_documents(str(p))]


def source(directory: str | os.PathLike, fmt: str) -> str:
  """The data.source string that reads the corpus in `directory`."""
  return FORMATS[fmt][1].format(dir=os.path.abspath(directory))


def _records(docs: list[str], fmt: str) -> list[bytes]:
  """Each paragraph as the bytes it takes in a file of `fmt` (uncompressed)."""
  if fmt == "text":  # a blank line ends a document
    return [doc.encode("utf-8") + b"\n\n" for doc in docs]
  return [json.dumps({"text": doc}, ensure_ascii=False).encode("utf-8") + b"\n" for doc in docs]


def _open(path: str, fmt: str):
  raw = open(path, "wb", buffering=_BUFFER)  # pylint: disable=consider-using-with
  if fmt != "jsonl.gz":
    return raw
  # No name and mtime 0 in the header: the bytes depend on the content alone.
  return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)


def _close(f) -> None:
  raw = getattr(f, "fileobj", None)
  f.close()
  if raw is not None:
    raw.close()


def generate(out: str | os.PathLike, gigabytes: float, fmt: str = "text", files: int = 1,
             seed: int = 0, wikitext: str | os.PathLike = WIKITEXT) -> dict:
  """Writes the corpus into `out`, or finds it there already; returns its record, with
  `reused` saying which."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {list(FORMATS)}")
  if gigabytes <= 0 or files < 1:
    raise ValueError(f"need gigabytes > 0 and files >= 1, got {gigabytes} and {files}")
  out = pathlib.Path(out)
  wiki = [pathlib.Path(wikitext) / name for name in WIKITEXT_FILES]
  request = dict(gigabytes=gigabytes, format=fmt, files=files, seed=seed,
                 wikitext_sha256=hashlib.sha256(
                     b"".join(p.read_bytes() for p in wiki if p.is_file())).hexdigest())
  try:
    record = json.loads((out / RECORD).read_text())
    if record["request"] == request and all((out / f["name"]).is_file()
                                            for f in record["files"]):
      return dict(record, reused=True)
  except (FileNotFoundError, ValueError, KeyError, TypeError):
    pass
  records = _records(paragraphs(wikitext), fmt)
  out.mkdir(parents=True, exist_ok=True)
  (out / RECORD).unlink(missing_ok=True)  # no record while the files are not this corpus
  for old in out.glob("part-*"):
    old.unlink()
  tmp = out / f".tmp-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  try:
    written = _write(tmp, records, fmt, files, seed, int(gigabytes * 1e9))
    for f in written:
      os.replace(tmp / f["name"], out / f["name"])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  record = dict(request=request, source=source(out, fmt), files=written,
                bytes=sum(f["bytes"] for f in written),
                documents=sum(f["documents"] for f in written),
                paragraphs=len(records))
  tmp_record = out / f".{RECORD}.tmp"
  tmp_record.write_text(json.dumps(record, indent=1))
  os.replace(tmp_record, out / RECORD)
  return dict(record, reused=False)


def _write(directory: pathlib.Path, records: list[bytes], fmt: str, files: int, seed: int,
           target: int) -> list[dict]:
  """Shuffled copies of `records` into `files` files, file k closing once the corpus holds
  (k + 1) / files of `target` bytes; [{name, bytes, documents}] per file."""
  suffix = FORMATS[fmt][0]
  bounds = [target * (k + 1) // files for k in range(files)]
  names = [f"part-{k:05d}-of-{files:05d}{suffix}" for k in range(files)]
  written, total, k = [], 0, 0
  f, file_bytes, file_docs = _open(str(directory / names[0]), fmt), 0, 0
  copy = 0
  while total < target:
    for index in np.random.default_rng([seed, copy]).permutation(len(records)):
      data = records[index]
      f.write(data)
      total, file_bytes, file_docs = total + len(data), file_bytes + len(data), file_docs + 1
      if total >= bounds[k]:
        _close(f)
        written.append(dict(name=names[k], bytes=file_bytes, documents=file_docs))
        k += 1
        if k == files:
          return written
        f, file_bytes, file_docs = _open(str(directory / names[k]), fmt), 0, 0
    copy += 1
  raise AssertionError("unreachable: the last bound is the target")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m lmssl.bench.corpus",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="the corpus directory")
  p.add_argument("--gigabytes", type=float, required=True, help="uncompressed size, 10^9 bytes")
  p.add_argument("--format", default="text", choices=list(FORMATS))
  p.add_argument("--files", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--wikitext", default=str(WIKITEXT), help="directory with WikiText-2's "
                 f"{' and '.join(WIKITEXT_FILES)}")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.gigabytes <= 0 or args.files < 1:
    p.error(f"--gigabytes {args.gigabytes} must be positive and --files {args.files} at least 1")
  try:
    record = generate(args.out, args.gigabytes, args.format, args.files, args.seed,
                      args.wikitext)
  except FileNotFoundError as e:
    sys.exit(f"lmssl.bench.corpus: error: {e}")
  print(json.dumps({k: record[k] for k in ("source", "bytes", "documents")}))


if __name__ == "__main__":
  main()

"""Run files at a local path or a cloud URL (gs://bucket/run), through etils.epath: the path
library Orbax uses, so a workdir on Cloud Storage holds the checkpoints and everything beside
them (config.json, metrics.jsonl, best.json, the trained tokenizer; TensorBoard writes its own).
"""

import os

from etils import epath


def is_url(path: str) -> bool:
  return "://" in str(path)


def absolute(path: str) -> str:
  """`path` made absolute; URLs are left as they are."""
  return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


def at(path: str) -> epath.Path:
  """The file or directory at `path`, local or not: `files.at(p).exists()`, `.read_bytes()`..."""
  return epath.Path(absolute(path))


def file_in_the_way(path: str) -> str | None:
  """`path`, or the first of its parents, when it is a file where a directory must be or go;
  None otherwise (and for URLs, where no file stands in a directory's way)."""
  if is_url(path):
    return None
  blocking = absolute(path)
  while not os.path.exists(blocking) and os.path.dirname(blocking) != blocking:
    blocking = os.path.dirname(blocking)
  return blocking if os.path.isfile(blocking) else None


def read_text(path: str) -> str:
  return at(path).read_text(encoding="utf-8")


def write_atomically(path: str, data: str | bytes) -> None:
  """All of `data` or nothing at `path`: a local file is written under a temporary name and
  renamed into place; a cloud object appears only when its upload completes."""
  target = at(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target if is_url(path) else target.with_name(f".{target.name}.tmp-{os.getpid()}")
  try:
    if isinstance(data, bytes):
      tmp.write_bytes(data)
    else:
      tmp.write_text(data, encoding="utf-8")
    if tmp != target:
      os.replace(tmp, target)
  except BaseException:
    if tmp != target:
      tmp.unlink(missing_ok=True)
    raise


def remove(path: str) -> None:
  """Removes the file, or the directory and all it holds, at `path`, if there is one."""
  target = at(path)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()

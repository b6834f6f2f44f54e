"""Run files: written whole or not at all; cloud URLs kept as URLs."""

import os

import pytest

from lmssl import files


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  assert files.absolute("gs://bucket/runs/a") == "gs://bucket/runs/a"
  assert files.is_url("gs://bucket/runs/a") and not files.is_url("runs/a")
  monkeypatch.chdir(tmp_path)
  assert files.absolute("runs/a") == str(tmp_path / "runs" / "a")


def test_write_atomically_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "deep" / "config.json"
  files.write_atomically(str(path), "old")
  files.write_atomically(str(path), b"new")
  assert path.read_bytes() == b"new"

  def fail(self, data, encoding=None):
    with open(self, "w") as f:
      f.write(data[:2])  # a part of it, then the disk fills
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(type(files.at(str(path))), "write_text", fail)
  with pytest.raises(OSError, match="No space left"):
    files.write_atomically(str(path), "newer")
  assert path.read_bytes() == b"new"
  assert os.listdir(path.parent) == ["config.json"]  # no temporary left behind

"""Prepare's runners write the same bytes: local processes, parts run one after another
(--num_shards/--shard_index), and Apache Beam, each into its own cache, from one WikiText-2
corpus cut into ~8 shards and one tokenizer. Beam's tests need the `beam` extra."""

import functools
import hashlib
import pathlib
import pickle
import subprocess
import sys

import pytest

from lmssl import config
from lmssl import errors
from lmssl.data import prepare
from lmssl.data import shards
from lmssl.data import sources
from lmssl.data import tokenizer as tok

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARD_BYTES = 64 * 1024
# Two processes, as a runner spreads shards over workers (in_memory would run them in this one).
BEAM_ARGS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def corpus(paragraphs, tmp_path_factory):
  """Two text files of WikiText-2 paragraphs, ~430 KB in all."""
  root = tmp_path_factory.mktemp("corpus")
  for name, part in (("a.txt", paragraphs[:250]), ("b.txt", paragraphs[250:500])):
    (root / name).write_text("\n\n".join(part), encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
  return tok.Tokenizer.load(tokenizer_path)


def data_cfg(corpus, cache_dir, **overrides):
  cfg = config.base_config().data
  cfg.update(dict(source=f"text:{corpus}/*.txt", shard_bytes=SHARD_BYTES, seq_len=64,
                  cache_dir=str(cache_dir)) | overrides)
  return cfg


def digests(cache_dir) -> dict[str, str]:
  """sha256 of every file under the cache's shards/ and prepared/, by path inside the cache."""
  out = {}
  for sub in ("shards", "prepared"):
    for path in sorted((pathlib.Path(cache_dir) / sub).rglob("*")):
      if path.is_file():
        out[str(path.relative_to(cache_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def local_run(corpus, tokenizer, tmp_path_factory):
  """The reference: the local runner on two processes."""
  cache = tmp_path_factory.mktemp("local")
  cfg = data_cfg(corpus, cache)
  _, prepared_dir = prepare.prepare(cfg, tokenizer, "", workers=2)
  return cfg, cache, prepared_dir


def test_local_runner_prepares_every_shard(local_run, tokenizer):
  cfg, cache, prepared_dir = local_run
  jobs = prepare.plan(cfg, tokenizer)
  assert 6 <= len(jobs) <= 10, f"{len(jobs)} shards; resize SHARD_BYTES"
  meta = prepare.read_meta(prepared_dir)
  assert [s["key"] for s in meta["shards"]] == [job.key for job in jobs]
  assert all(meta["splits"][split]["num_documents"] > 0 for split in shards.SPLITS)
  assert not [name for name in digests(cache) if ".tmp" in name]


def test_parts_one_after_another_equal_the_local_run(local_run, corpus, tokenizer, tmp_path):
  _, local_cache, _ = local_run
  cfg = data_cfg(corpus, tmp_path)
  for index in range(3):
    assert prepare.prepare(cfg, tokenizer, "", workers=1, part=(index, 3))[1] is None

  def nothing_left(jobs, _):
    raise AssertionError(f"the parts left {len(jobs)} shards to the final call")

  _, prepared_dir = prepare.prepare(cfg, tokenizer, "", runner=nothing_left)
  assert prepared_dir.startswith(str(tmp_path))
  assert digests(tmp_path) == digests(local_cache)


def test_beam_direct_runner_equals_the_local_run(local_run, corpus, tokenizer, tmp_path):
  beam_prepare = _beam_prepare()
  _, local_cache, _ = local_run
  runner = functools.partial(beam_prepare.run, pipeline_args=BEAM_ARGS)
  _, prepared_dir = prepare.prepare(data_cfg(corpus, tmp_path), tokenizer, "", runner=runner)
  assert prepared_dir.startswith(str(tmp_path))
  assert digests(tmp_path) == digests(local_cache)


def test_beam_cli_prepares_end_to_end(local_run, corpus, tokenizer_path, tmp_path):
  _beam_prepare()
  _, local_cache, _ = local_run
  cache = tmp_path / "cache"
  out = subprocess.run(
      [sys.executable, "-m", "lmssl.data.prepare", "--config",
       str(REPO / "lmssl" / "configs" / "mlm_base.py") + ":smoke", "--workdir",
       str(tmp_path / "work"), f"--config.data.source=text:{corpus}/*.txt",
       f"--config.data.shard_bytes={SHARD_BYTES}", f"--config.data.cache_dir={cache}",
       f"--config.data.tokenizer={tokenizer_path}", "--runner", "beam", "--",
       "--direct_num_workers=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"prepared: {cache}" in out.stdout
  # The smoke config's seq_len gives another manifest, but the shards are the same.
  shard_files = lambda d: {k: v for k, v in digests(d).items() if k.startswith("shards")}
  assert shard_files(cache) == shard_files(local_cache)


def test_beam_worker_errors_come_back_as_one_line(tokenizer, tmp_path):
  beam_prepare = _beam_prepare()
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
  cfg = data_cfg(tmp_path, tmp_path / "cache", source=f"text:{tmp_path}/bad.txt")
  with pytest.raises(sources.DataError, match=r"bad\.txt.* not UTF-8") as raised:
    beam_prepare.run(prepare.plan(cfg, tokenizer), tokenizer, ["--direct_num_workers=1"])
  assert "\n" not in str(raised.value) and "while running" not in str(raised.value)
  # A remote runner quotes the worker's traceback as text.
  quoted = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                        "lmssl.data.readers.DataError: f.txt is not UTF-8 text "
                        "[while running 'PrepareShard']\n")
  error = beam_prepare._worker_error(quoted)
  assert isinstance(error, sources.DataError) and str(error) == "f.txt is not UTF-8 text"
  assert beam_prepare._worker_error(RuntimeError("ValueError: a bug")) is None


def test_beam_refuses_a_local_cache_for_dataflow(local_run, tokenizer):
  beam_prepare = _beam_prepare()
  cfg, _, _ = local_run
  with pytest.raises(errors.UserError, match="set --config.data.cache_dir to a gs://"):
    beam_prepare.run(prepare.plan(cfg, tokenizer), tokenizer,
                     ["--runner=DataflowRunner", "--project=p", "--region=r"])


def test_hf_tokenizers_pickle_for_workers(tokenizer, paragraphs, tmp_path):
  pytest.importorskip("transformers")
  from lmssl.hf import tokenizer as hf_tokenizer  # pylint: disable=g-import-not-at-top
  exported = hf_tokenizer.HFTokenizer.from_sentencepiece(tokenizer.model_bytes, tokenizer.path)
  exported.save(str(tmp_path / "hf"))
  for original in (exported, hf_tokenizer.HFTokenizer.load(str(tmp_path / "hf"))):
    copy = pickle.loads(pickle.dumps(original))
    assert shards.fingerprint_sha256(copy) == shards.fingerprint_sha256(original)
    assert copy.encode_batch(paragraphs[:20]) == original.encode_batch(paragraphs[:20])


def _beam_prepare():
  pytest.importorskip("apache_beam")
  from lmssl.data import beam_prepare  # pylint: disable=g-import-not-at-top
  return beam_prepare

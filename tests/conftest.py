"""Every test runs on a forced 8-device CPU platform, set before JAX is imported."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the session, its pytest-xdist workers and the runs tests start as
# subprocesses: many tests compile the same small models, and an identical program's
# executable is the same whether compiled again or read back.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmssl-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


def load_config(name: str, arg: str = "smoke"):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def wikitext_dir():
  path = CORPORA / "wikitext-2"
  if not path.is_dir():
    pytest.skip(f"{path} is absent (the shared corpora live beside the project)")
  return path


@pytest.fixture(scope="session")
def paragraphs():
  """WikiText-2 validation paragraphs: real text for tokenizer and masking tests."""
  path = CORPORA / "wikitext-2" / "valid.txt"
  if not path.exists():
    pytest.skip(f"{path} is absent (the shared corpora live beside the project)")
  text = path.read_text(encoding="utf-8")
  return [p.strip() for p in text.split("\n \n") if p.strip()]


@pytest.fixture(scope="session")
def tokenizer_path(paragraphs, tmp_path_factory):
  """A 1000-piece unigram tokenizer trained once per session on the first 1500 paragraphs."""
  from lmssl.data import tokenizer as tok
  path = str(tmp_path_factory.mktemp("tokenizer") / "wiki.model")
  tok.train(paragraphs[:1500], path, 1000, "unigram", 100_000)
  return path

"""Every test runs on a forced 8-device CPU platform, set before JAX is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


def load_config(name: str, arg: str = "smoke"):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def wikitext_dir():
  path = CORPORA / "wikitext-2"
  if not path.is_dir():
    pytest.skip(f"{path} is absent (the shared corpora live beside the project)")
  return path

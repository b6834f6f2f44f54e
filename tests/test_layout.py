"""Imports point one way: leaves -> heads/data -> steps -> evaluate/sample/inference/hf -> train
-> main (and bench, beside main); TF only in lmssl/data; the `hf` extra's packages only lazily,
in the modules that use them, or in a module of the extra's own that is only imported lazily."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmssl"
# Which lmssl modules each module may import (by top-level module name under lmssl).
ALLOWED = {
    "errors": set(),
    "files": set(),
    "config": {"attention", "errors", "files"},
    "sharding": {"errors"},
    "attention": {"errors", "sharding"},
    "optimizer": set(),
    "losses": set(),
    "lora": set(),
    "checkpoint": {"errors", "files"},
    "metrics": {"errors", "files"},
    "distributed": {"errors"},
    "workdir_lock": {"errors", "files"},
    "preemption": {"errors"},
    "scores": set(),
    "model": {"attention", "lora"},
    "heads": {"losses", "model"},
    "data": {"data", "errors", "files"},
    "steps": {"heads", "lora", "losses", "optimizer", "sharding"},
    "evaluate": {"errors", "heads", "scores", "sharding", "steps"},
    "sample": {"attention", "heads", "model"},
    "inference": {"checkpoint", "config", "data", "errors", "files", "lora", "sample",
                  "sharding", "steps"},
    "hf_families": {"config", "errors"},
    "hf": {"errors", "heads", "hf_families", "model"},
    "train": {"attention", "checkpoint", "config", "data", "distributed", "errors", "evaluate",
              "files", "heads", "hf", "inference", "lora", "metrics", "optimizer", "preemption",
              "sharding", "steps", "workdir_lock"},
    "convert": {"checkpoint", "config", "data", "errors", "heads", "hf", "hf_families",
                "inference", "metrics", "model"},
    "main": {"config", "distributed", "errors", "inference", "train"},
    "bench_parts": {"data", "sharding", "steps"},
    # bench_suite builds on bench; bench starts it, lazily, for --suite.
    "bench": {"attention", "bench_hf", "bench_suite", "bench_parts", "config", "errors",
              "metrics", "model", "sharding", "steps"},
    "bench_hf": set(),
    "bench_suite": {"attention", "bench", "bench_parts"},
}
# Files held to less than their module's entry. hf_tokenizer stays a leaf, so tokenizer.py
# imports it without a cycle.
FILE_ALLOWED = {"data/hf_tokenizer.py": {"errors"}}
# Packages of the optional `hf` extra: imported only inside functions, so lmssl imports and
# trains without them, and only by these files.
OPTIONAL = {"tokenizers": {"data/hf_tokenizer.py"},
            "torch": {"hf.py", "convert.py"},
            "transformers": {"convert.py"},
            "safetensors": {"hf.py", "convert.py"}}
# Modules that exist for the extra (the benchmark's PyTorch peer): they import its packages at
# the top, and lmssl imports them only inside functions.
EXTRA_MODULES = {"bench_hf"}


def _imports(path):
  """(module name, whether it is imported inside a function) of each import in `path`."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  lazy = {id(inner) for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          for inner in ast.walk(node) if inner is not node}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = ([f"{node.module}.{a.name}" for a in node.names]
               if node.module == "lmssl" else [node.module])
    else:
      continue
    yield from ((name, id(node) in lazy) for name in names)


def test_imports_point_one_way_and_tensorflow_stays_in_data():
  seen = set()
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    module = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if module == "__init__":
      continue
    seen.add(module)
    for name, lazy in _imports(path):
      top = name.split(".")[0]
      if top == "lmssl":
        target = name.split(".")[1]
        assert target in FILE_ALLOWED.get(str(rel), ALLOWED[module]), f"lmssl/{rel} imports {name}"
        assert lazy or target not in EXTRA_MODULES, f"lmssl/{rel} imports {name} (hf extra)"
      if top == "tensorflow" or top == "tensorflow_datasets":
        assert module == "data", f"lmssl/{rel} imports {name} outside lmssl/data"
      if top in OPTIONAL:
        assert (str(rel) in OPTIONAL[top] and lazy) or module in EXTRA_MODULES, (
            f"lmssl/{rel} imports {name} (hf extra)")
  assert seen == set(ALLOWED), sorted(seen ^ set(ALLOWED))

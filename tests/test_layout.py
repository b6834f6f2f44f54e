"""Imports point one way: leaves -> heads/data -> steps -> evaluate/sample/inference -> train ->
main; TF only in lmssl/data."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmssl"
# Which lmssl modules each module may import (by top-level module name under lmssl).
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "sharding": {"errors"},
    "optimizer": set(),
    "checkpoint": {"errors"},
    "metrics": set(),
    "scores": set(),
    "model": set(),
    "heads": {"model"},
    "lora": {"optimizer"},
    "data": {"data", "errors"},
    "steps": {"heads", "model", "optimizer", "sharding"},
    "evaluate": {"errors", "heads", "scores", "sharding", "steps"},
    "sample": {"heads", "model"},
    "inference": {"checkpoint", "config", "data", "errors", "lora", "sample", "sharding",
                  "steps"},
    "train": {"checkpoint", "config", "data", "errors", "evaluate", "heads", "inference", "lora",
              "metrics", "optimizer", "sharding", "steps"},
    "main": {"config", "errors", "inference", "train"},
}


def _imports(path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield from ([f"{node.module}.{a.name}" for a in node.names]
                  if node.module == "lmssl" else [node.module])


def test_imports_point_one_way_and_tensorflow_stays_in_data():
  seen = set()
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    module = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if module == "__init__":
      continue
    seen.add(module)
    for name in _imports(path):
      top = name.split(".")[0]
      if top == "lmssl":
        target = name.split(".")[1]
        assert target in ALLOWED[module], f"lmssl/{rel} imports {name}"
      if top == "tensorflow" or top == "tensorflow_datasets":
        assert module == "data", f"lmssl/{rel} imports {name} outside lmssl/data"
      assert top not in ("torch", "transformers"), f"lmssl/{rel} imports {name}"
  assert seen == set(ALLOWED), sorted(seen ^ set(ALLOWED))

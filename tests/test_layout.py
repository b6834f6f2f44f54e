"""The package's architecture, held by its imports: layers that import only downwards,
TensorFlow only in lmssl/data, the `hf` extra only under lmssl/hf/, lazily, and the `beam`
extra only in lmssl/data/beam_prepare.py, itself imported lazily."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmssl"
# Bottom to top. A unit (a top-level module, the lmssl/data package as one, or a file of
# lmssl/hf/ or lmssl/bench/) imports only units of lower layers; lmssl/data's files import
# each other.
LAYERS = [
    # Leaves: no lmssl imports.
    {"errors", "files", "losses", "lora", "optimizer", "scores", "masks", "bench/hf_peer",
     "bench/hf_train", "bench/process"},
    # The --config file of every command that takes one (main, and data/prepare's); the `hf`
    # extra's imports, told as missing by module; what a HuggingFace family is.
    {"config_file", "hf/extra", "hf/family"},
    # Services a run uses, and the data package (TensorFlow lives here); RoPE frequencies; the
    # HuggingFace families beyond BERT and GPT-2.
    {"sharding", "distributed", "preemption", "checkpoint_faults", "metrics", "workdir_lock",
     "data", "rope", "hf/decoders", "hf/modernbert"},
    # Attention kernels; tokenizer loading by path (lmssl's own or a HuggingFace folder).
    {"attention", "checkpoint", "hf/tokenizer"},
    {"model"},
    {"config", "heads"},
    # Validation, against the model's and optimizer's own tables.
    {"validation", "configs", "hf/families", "steps", "sample"},
    # HuggingFace folders read and written; their weights mapped in and out.
    {"hf/folder"},
    {"hf/weights"},
    # A run's pieces: its data on a mesh, where it starts from, its trained parameters read
    # back.
    {"datasets", "inference", "start"},
    {"evaluate", "hf/convert", "bench/parts", "bench/corpus"},
    {"train", "convert", "bench/step", "bench/data", "bench/parity"},
    # Entry points.
    {"main", "bench/suite"},
    {"bench/__main__"},
]
PACKAGES = {"hf", "bench"}  # their files are units, and their __init__ imports nothing
# Packages of the optional `hf` extra: imported only under lmssl/hf/, inside functions, so
# lmssl imports and trains without them.
EXTRA = {"torch", "transformers", "safetensors", "tokenizers"}
# The benchmark's PyTorch peers exist for the extra: they may import it at the top (hf_peer
# does; hf_train imports it in its functions), and are themselves imported only inside functions.
EXTRA_FILES = {"bench/hf_peer", "bench/hf_train"}
# Prepare's Apache Beam runner, the one module of the optional `beam` extra.
BEAM_FILE = "data/beam_prepare.py"


def _unit(parts) -> str:
  """The unit of lmssl module path `parts` (("hf", "weights") or ("train",))."""
  return "/".join(parts[:2]) if parts[0] in PACKAGES else parts[0]


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
               if node.module.split(".")[0] == "lmssl" else [node.module])
    else:
      continue
    yield from ((name, id(node) in lazy) for name in names)


def _units():
  """{unit: [(file relative to lmssl/, imports)]} for every lmssl file but lmssl/__init__."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    if rel.parts == ("__init__.py",):
      continue
    out.setdefault(_unit(rel.with_suffix("").parts), []).append((rel, list(_imports(path))))
  return out


def test_every_unit_has_one_layer():
  listed = [u for layer in LAYERS for u in layer]
  assert len(listed) == len(set(listed)), "a unit is in two layers"
  units = set(_units()) - {f"{p}/__init__" for p in PACKAGES}
  assert units == set(listed), sorted(units ^ set(listed))


def test_imports_point_down_the_layers():
  layer = {u: i for i, members in enumerate(LAYERS) for u in members}
  for unit, unit_files in _units().items():
    for rel, imports in unit_files:
      for name, _ in imports:
        if name.split(".")[0] != "lmssl":
          continue
        if unit.endswith("/__init__"):
          raise AssertionError(f"lmssl/{rel} imports {name}: a package's __init__ stays empty")
        target = _unit(name.split(".")[1:])
        assert target not in PACKAGES, f"lmssl/{rel} imports {name}: import its files"
        if target == unit == "data":
          continue
        assert layer[target] < layer[unit], (
            f"lmssl/{rel} imports {name}, which is not in a lower layer (test_layout.LAYERS)")


def test_tensorflow_stays_in_data_and_the_hf_extra_in_hf():
  for unit, unit_files in _units().items():
    for rel, imports in unit_files:
      for name, lazy in imports:
        top = name.split(".")[0]
        if top in ("tensorflow", "tensorflow_datasets"):
          assert unit == "data", f"lmssl/{rel} imports {name} outside lmssl/data"
        if top in EXTRA:
          assert (unit.startswith("hf/") and lazy) or unit in EXTRA_FILES, (
              f"lmssl/{rel} imports {name} (the hf extra) outside lmssl/hf/ or at the top")
        if top == "lmssl" and _unit(name.split(".")[1:]) in EXTRA_FILES:
          assert lazy, f"lmssl/{rel} imports {name} (it needs the hf extra) at the top"


def test_beam_stays_in_beam_prepare():
  for _, unit_files in _units().items():
    for rel, imports in unit_files:
      for name, lazy in imports:
        if name.split(".")[0] == "apache_beam":
          assert rel.as_posix() == BEAM_FILE, f"lmssl/{rel} imports {name} (the beam extra)"
        if name == "lmssl.data.beam_prepare":
          assert lazy, f"lmssl/{rel} imports {name} (it needs the beam extra) at the top"

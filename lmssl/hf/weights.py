"""HuggingFace checkpoints (BERT, GPT-2, Llama, Mistral, Qwen2, ModernBERT) as lmssl configs and
parameters, both ways.

The families' name tables and config translation live in `families`. Every tensor of a
checkpoint is mapped, checked as a tie, or named as a buffer; anything else stops the
conversion with its name. Per-layer tensors (`{i}` in a name) are stacked into lmssl's scanned
layers, and split back, in `_stack`/`_unstack` only.

Reading and writing the folders is `folder`'s; the mapping here is numpy.
"""

import dataclasses
import os
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lmssl import errors
from lmssl import heads as heads_lib
from lmssl import model as model_lib
from lmssl.hf import extra as hf_extra
from lmssl.hf import families
from lmssl.hf import folder

# Old BERT checkpoints name LayerNorm parameters as TF did.
_ALIASES = ((".gamma", ".weight"), (".beta", ".bias"))


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


# --- Tensors ---------------------------------------------------------------------------------

def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _flat_paths(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_paths(v, f"{prefix}/{k}" if prefix else k))
  return out


def _stack(per_layer: dict, num_layers: int, template: str) -> np.ndarray:
  """Per-layer tensors {i: array} -> one [N, ...] array (lmssl's scanned layers)."""
  missing = sorted(set(range(num_layers)) - set(per_layer))
  extra = sorted(set(per_layer) - set(range(num_layers)))
  _check(not missing and not extra, f"{template}: layers {missing or extra} are "
         f"{'missing' if missing else 'beyond num_layers'} ({num_layers} layers)")
  return np.stack([per_layer[i] for i in range(num_layers)])


def _unstack(array: np.ndarray, template: str) -> dict:
  """[N, ...] -> {name of layer i: array [...]}."""
  return {template.format(i=i): array[i] for i in range(array.shape[0])}


def _as_hf_matrix(path: str, x: np.ndarray, layered: bool) -> np.ndarray:
  """An lmssl leaf laid out as HF stores it (before any transpose): kernels [in, out] with the
  heads folded, biases and norms as vectors, embeddings as they are."""
  lead = x.shape[:1] if layered else ()
  body = x.shape[len(lead):]
  if path.endswith("kernel"):
    n_in = 2 if path.endswith("attn/out/kernel") else 1  # [H, K, D] reads heads x head_dim
    return x.reshape(lead + (int(np.prod(body[:n_in])), int(np.prod(body[n_in:]))))
  if path.endswith("embedding"):
    return x
  return x.reshape(lead + (-1,))


def _named(family: families.Family, prefix: str):
  """(full HF name template, table template, lmssl path(s)) for every table entry."""
  for template, paths in family.base.items():
    yield prefix + template, template, paths
  for template, paths in family.heads.items():
    yield template, template, paths


def tied_names(family: families.Family, prefix: str) -> dict:
  """{head tensor: the (base or head) tensor it equals}, base names under `prefix`."""
  return {k: (prefix + v if v in family.base else v) for k, v in family.tied.items()}


def to_lmssl(family: families.Family, tensors: dict, shapes: dict, num_layers: int,
             tied: bool = True) -> tuple[dict, list[str]]:
  """HF tensors -> (lmssl params as nested dicts of numpy, notes on what was not copied).

  `shapes` {lmssl path: shape} says which parameters the lmssl model has; each must be filled.
  """
  prefix = family.base_prefix if any(k.startswith(family.base_prefix) for k in tensors) else ""
  entries = [(_pattern(full), t, p) for full, t, p in _named(family, prefix)]
  ties = tied_names(family, prefix)
  buffers = [_pattern(prefix + b) for b in family.buffers]
  groups, notes, unmapped, tie_checks = {}, [], [], []
  for name, array in tensors.items():
    canonical = name
    for old, new in _ALIASES:
      canonical = canonical[:-len(old)] + new if canonical.endswith(old) else canonical
    if any(b.match(canonical) for b in buffers):
      notes.append(f"{name}: a buffer, not a weight")
      continue
    if canonical in ties and tied:
      tie_checks.append((name, ties[canonical]))
      continue
    for pattern, template, paths in entries:
      found = pattern.match(canonical)
      if found:
        layer = int(found.group(1)) if found.groups() else None
        groups.setdefault(template, {})[layer] = (name, array)
        break
    else:
      unmapped.append(name)
  _check(not unmapped, f"{len(unmapped)} tensors have no place in lmssl's {family.model_type} "
         f"model: {', '.join(sorted(unmapped)[:10])}")
  by_name = {n: a for per_layer in groups.values() for n, a in per_layer.values()}
  for name, target in tie_checks:
    _check(target in by_name and np.array_equal(tensors[name], by_name[target]),
           f"{name} should be tied to (equal) {target}, but it differs; untied output "
           "embeddings do not convert for this family")
    notes.append(f"{name}: tied to {target}")

  params, filled = {}, set()
  for template, per_layer in groups.items():
    paths = (family.base | family.heads)[template]
    layered = "{i}" in template
    arrays = {i: a for i, (_, a) in per_layer.items()}
    for i in family.absent.get(template, ()):  # an identity in HF: ones, which lmssl skips
      arrays.setdefault(i, np.ones_like(next(iter(arrays.values()))))
    array = _stack(arrays, num_layers, template) if layered else arrays[None]
    if template in family.transposed:
      array = np.swapaxes(array, -1, -2)
    parts = paths if isinstance(paths, tuple) else (paths,)
    for path, part in zip(parts, np.split(array, len(parts), axis=-1)):
      if path not in shapes:
        notes.append(f"{template} ({path}): not part of this lmssl model, dropped")
        continue
      _check(part.size == int(np.prod(shapes[path])),
             f"{template}: shape {part.shape} does not fit lmssl's {path} {shapes[path]}; "
             "is config.json the one these weights were saved with?")
      _set(params, path, part.reshape(shapes[path]).astype(np.float32))
      filled.add(path)
  missing = sorted(set(shapes) - filled)
  _check(not missing, f"the checkpoint lacks tensors for {', '.join(missing[:10])}")
  return params, notes


def from_lmssl(family: families.Family, params: dict, base_only: bool) -> dict:
  """lmssl params (nested dicts of arrays, no adapters) -> {HF tensor name: numpy array}."""
  flat = {k: np.asarray(v, np.float32) for k, v in _flat_paths(params).items()}
  prefix = "" if base_only else family.base_prefix
  out, used = {}, set()
  for full, template, paths in _named(family, prefix):
    parts = paths if isinstance(paths, tuple) else (paths,)
    if not all(p in flat for p in parts):
      continue
    layered = "{i}" in template
    array = np.concatenate([_as_hf_matrix(p, flat[p], layered) for p in parts], axis=-1)
    if template in family.transposed:
      array = np.swapaxes(array, -1, -2)
    tensors = _unstack(array, full) if layered else {full: array}
    for i in family.absent.get(template, ()):
      del tensors[full.format(i=i)]
    out.update(tensors)
    used.update(parts)
  left = sorted(set(flat) - used)
  _check(not left, f"lmssl parameters with no {family.model_type} tensor: "
         f"{', '.join(left[:10])}")
  return out


_HEAD_SCOPES = {"mlm": "mlm_head", "clm": "clm_head", "pair": "pair_head",
                "classification": "task_head", "regression": "task_head", "tokens": "task_head"}


def lmssl_shapes(c: ml_collections.ConfigDict, heads: tuple, pooler: bool) -> dict:
  """{lmssl path: shape} of the backbone, `heads` and (when asked) the pooler of model `c`."""
  labels = [n for n in c.task.labels.split(",") if n]
  # "pair" brings the pooler along; unwanted scopes are dropped below.
  model = heads_lib.LanguageModel(model_lib.module_config(c.model), c.objective,
                                  tuple(dict.fromkeys(heads + ("pair",))), len(labels) or 1)
  batch = {k: np.zeros((1, 8), np.int32) for k in ("input_ids", "segment_ids", "positions",
                                                   "token_types")}
  batch["masked_positions"] = np.zeros((1, 2), np.int32)
  abstract = jax.eval_shape(lambda r: nn.meta.unbox(model.init({"params": r}, batch)["params"]),
                            jax.random.key(0))
  scopes = {"transformer"} | {_HEAD_SCOPES[h] for h in heads} | ({"pooler"} if pooler else set())
  return {k: tuple(v.shape) for k, v in _flat_paths(abstract).items()
          if k.split("/")[0] in scopes}


def heads_of(c: ml_collections.ConfigDict, params: dict) -> tuple:
  """The heads an lmssl model with these parameters computes (tied heads have none)."""
  if c.task.kind:
    return (c.task.kind,) if "task_head" in params else ()
  if c.objective == "clm":
    return ("clm",)
  return tuple(h for h in ("mlm", "pair") if _HEAD_SCOPES[h] in params)


@dataclasses.dataclass
class Converted:
  config: ml_collections.ConfigDict
  params: dict
  family: families.Family
  hf_config: dict
  notes: list


def source_config(hf_dir: str) -> ml_collections.ConfigDict:
  """The lmssl config of a HF folder, from its config.json and the names of its tensors (no
  tensor is read): what a warm start from it adopts before it validates."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  # What reads the weights (torch, safetensors) and the folder's tokenizer (transformers,
  # tokenizers) later, before the workdir is touched: without it the run stops here, at its
  # start, naming the module that is missing.
  for module in ("torch", "safetensors", "transformers", "tokenizers"):
    hf_extra.load(module)
  hf_config = folder.read_config(hf_dir)
  names = [n for shard in folder.weight_files(hf_dir) for n in folder.tensor_names(shard)]
  return _lmssl_config(hf_dir, hf_config, names)[0]


def _lmssl_config(hf_dir: str, hf_config: dict, names) -> tuple[ml_collections.ConfigDict,
                                                                 tuple]:
  """(the lmssl config, the heads) of a HF folder whose checkpoint holds tensors `names`."""
  heads = families.family_of(hf_config).present_heads(hf_config, set(names))
  c = families.lmssl_config(hf_config, heads)
  if folder.tokenizer_files(hf_dir):
    c.data.tokenizer = hf_dir
  return c, heads


def convert(hf_dir: str) -> Converted:
  """A HF folder as an lmssl config and parameters, with notes on what was checked but not
  copied (tied tensors, buffers)."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  hf_config, tensors = folder.read_dir(hf_dir)
  family = families.family_of(hf_config)
  c, heads = _lmssl_config(hf_dir, hf_config, tensors)
  pooler = any(n.startswith(("pooler.", "bert.pooler.")) for n in tensors)
  shapes = lmssl_shapes(c, heads, pooler)
  params, notes = to_lmssl(family, tensors, shapes, c.model.num_layers,
                           tied=c.model.tie_embeddings)
  return Converted(c, params, family, hf_config, notes)


def load(hf_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(lmssl config, params as nested dicts of numpy) of a local HF folder of a family lmssl
  converts. The config's tokenizer is the folder's own (read through transformers'
  AutoTokenizer)."""
  converted = convert(hf_dir)
  return converted.config, converted.params

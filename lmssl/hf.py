"""HuggingFace BERT and GPT-2 checkpoints as lmssl configs and parameters, both ways.

Each family is one name table (HF tensor name -> lmssl parameter path), one list of the
tensors HF stores transposed, the tensors tied to another one and the buffers that hold no
weights. Every tensor of a checkpoint is mapped, checked as a tie, or named as a buffer;
anything else stops the conversion with its name. Per-layer tensors (`{i}` in a name) are
stacked into lmssl's scanned layers, and split back, in `_stack`/`_unstack` only.

torch, transformers and safetensors (the `hf` extra) are imported inside the functions that
read and write HF files; the mapping itself is numpy.
"""

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lmssl import config as config_lib
from lmssl import errors
from lmssl import heads as heads_lib
from lmssl import model as model_lib

_L = "transformer/layers/"


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  base_prefix: str  # on the base model's tensors inside a model with heads
  base: dict  # base-model tensor -> lmssl path, or a tuple of paths for a fused tensor
  heads: dict  # head tensor (never prefixed) -> lmssl path
  transposed: frozenset  # tensors stored [out, in] (torch Linear)
  tied: dict  # tensor -> the tensor it must equal (not stored by lmssl)
  buffers: tuple  # tensors that are not weights (masks, position ids)
  base_model: str  # the HF class of the bare model, whose tensors carry no prefix


BERT = Family(
    model_type="bert",
    base_prefix="bert.",
    base={
        "embeddings.word_embeddings.weight": "transformer/embedder/tokens/embedding",
        "embeddings.position_embeddings.weight": "transformer/embedder/positions/embedding",
        "embeddings.token_type_embeddings.weight": "transformer/embedder/token_types/embedding",
        "embeddings.LayerNorm.weight": "transformer/embed_norm/scale",
        "embeddings.LayerNorm.bias": "transformer/embed_norm/bias",
        "encoder.layer.{i}.attention.self.query.weight": _L + "attn/query/kernel",
        "encoder.layer.{i}.attention.self.query.bias": _L + "attn/query/bias",
        "encoder.layer.{i}.attention.self.key.weight": _L + "attn/key/kernel",
        "encoder.layer.{i}.attention.self.key.bias": _L + "attn/key/bias",
        "encoder.layer.{i}.attention.self.value.weight": _L + "attn/value/kernel",
        "encoder.layer.{i}.attention.self.value.bias": _L + "attn/value/bias",
        "encoder.layer.{i}.attention.output.dense.weight": _L + "attn/out/kernel",
        "encoder.layer.{i}.attention.output.dense.bias": _L + "attn/out/bias",
        "encoder.layer.{i}.attention.output.LayerNorm.weight": _L + "attn_norm/scale",
        "encoder.layer.{i}.attention.output.LayerNorm.bias": _L + "attn_norm/bias",
        "encoder.layer.{i}.intermediate.dense.weight": _L + "mlp/wi/kernel",
        "encoder.layer.{i}.intermediate.dense.bias": _L + "mlp/wi/bias",
        "encoder.layer.{i}.output.dense.weight": _L + "mlp/wo/kernel",
        "encoder.layer.{i}.output.dense.bias": _L + "mlp/wo/bias",
        "encoder.layer.{i}.output.LayerNorm.weight": _L + "mlp_norm/scale",
        "encoder.layer.{i}.output.LayerNorm.bias": _L + "mlp_norm/bias",
        "pooler.dense.weight": "pooler/dense/kernel",
        "pooler.dense.bias": "pooler/dense/bias",
    },
    heads={
        "cls.predictions.transform.dense.weight": "mlm_head/transform/kernel",
        "cls.predictions.transform.dense.bias": "mlm_head/transform/bias",
        "cls.predictions.transform.LayerNorm.weight": "mlm_head/transform_norm/scale",
        "cls.predictions.transform.LayerNorm.bias": "mlm_head/transform_norm/bias",
        "cls.predictions.bias": "mlm_head/output/bias",
        "cls.seq_relationship.weight": "pair_head/kernel",
        "cls.seq_relationship.bias": "pair_head/bias",
        "classifier.weight": "task_head/kernel",
        "classifier.bias": "task_head/bias",
    },
    transposed=frozenset({
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder.layer.{i}.attention.self.key.weight",
        "encoder.layer.{i}.attention.self.value.weight",
        "encoder.layer.{i}.attention.output.dense.weight",
        "encoder.layer.{i}.intermediate.dense.weight",
        "encoder.layer.{i}.output.dense.weight",
        "pooler.dense.weight",
        "cls.predictions.transform.dense.weight",
        "cls.seq_relationship.weight",
        "classifier.weight",
    }),
    tied={"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"},
    buffers=("embeddings.position_ids",),
    base_model="BertModel",
)

GPT2 = Family(
    model_type="gpt2",
    base_prefix="transformer.",
    base={
        "wte.weight": "transformer/embedder/tokens/embedding",
        "wpe.weight": "transformer/embedder/positions/embedding",
        "h.{i}.ln_1.weight": _L + "attn_norm/scale",
        "h.{i}.ln_1.bias": _L + "attn_norm/bias",
        # Conv1D stores [in, out]; c_attn is query, key and value side by side.
        "h.{i}.attn.c_attn.weight": (_L + "attn/query/kernel", _L + "attn/key/kernel",
                                     _L + "attn/value/kernel"),
        "h.{i}.attn.c_attn.bias": (_L + "attn/query/bias", _L + "attn/key/bias",
                                   _L + "attn/value/bias"),
        "h.{i}.attn.c_proj.weight": _L + "attn/out/kernel",
        "h.{i}.attn.c_proj.bias": _L + "attn/out/bias",
        "h.{i}.ln_2.weight": _L + "mlp_norm/scale",
        "h.{i}.ln_2.bias": _L + "mlp_norm/bias",
        "h.{i}.mlp.c_fc.weight": _L + "mlp/wi/kernel",
        "h.{i}.mlp.c_fc.bias": _L + "mlp/wi/bias",
        "h.{i}.mlp.c_proj.weight": _L + "mlp/wo/kernel",
        "h.{i}.mlp.c_proj.bias": _L + "mlp/wo/bias",
        "ln_f.weight": "transformer/final_norm/scale",
        "ln_f.bias": "transformer/final_norm/bias",
    },
    heads={"lm_head.weight": "clm_head/kernel/kernel"},  # only when not tied to wte
    transposed=frozenset({"lm_head.weight"}),
    tied={"lm_head.weight": "wte.weight"},
    buffers=("h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
    base_model="GPT2Model",
)

FAMILIES = {f.model_type: f for f in (BERT, GPT2)}
# Old BERT checkpoints name LayerNorm parameters as TF did.
_ALIASES = ((".gamma", ".weight"), (".beta", ".bias"))
_HIDDEN_ACT = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


# --- Reading and writing HF folders -----------------------------------------------------------

def read_dir(hf_dir: str) -> tuple[dict, dict]:
  """(config.json as a dict, {tensor name: float32 numpy array}) of a local HF model folder."""
  path = os.path.join(hf_dir, "config.json")
  _check(os.path.isfile(path), f"{hf_dir} has no config.json: --hf_dir must be a local "
         "HuggingFace model folder (config.json plus model.safetensors or pytorch_model.bin)")
  with open(path, encoding="utf-8") as f:
    hf_config = json.load(f)
  return hf_config, _read_tensors(hf_dir)


def _read_tensors(hf_dir: str) -> dict:
  files = sorted(os.listdir(hf_dir))
  for index, single in (("model.safetensors.index.json", "model.safetensors"),
                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    if index in files:
      with open(os.path.join(hf_dir, index), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    elif single in files:
      shards = [single]
    else:
      continue
    out = {}
    for shard in shards:
      out.update(_read_shard(os.path.join(hf_dir, shard)))
    return out
  raise errors.UserError(f"{hf_dir} holds no weights: expected model.safetensors, "
                         "pytorch_model.bin or a sharded index of either")


def _read_shard(path: str) -> dict:
  # Through torch, which reads every dtype (numpy has no bfloat16); weights_only refuses code.
  import torch
  if path.endswith(".safetensors"):
    import safetensors.torch
    tensors = safetensors.torch.load_file(path)
  else:
    tensors = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.to(torch.float32).numpy() for k, v in tensors.items()}


def write_dir(hf_dir: str, hf_config: dict, tensors: dict) -> None:
  """Writes config.json and model.safetensors (fp32) into `hf_dir`."""
  import safetensors.numpy
  os.makedirs(hf_dir, exist_ok=True)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32)
                               for k, v in tensors.items()},
                              os.path.join(hf_dir, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)


def tokenizer_files(directory: str) -> list[str]:
  return [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]


# --- Configs ---------------------------------------------------------------------------------

def family_of(hf_config: dict) -> Family:
  model_type = hf_config.get("model_type", "")
  _check(model_type in FAMILIES, f"model_type {model_type!r} is not supported; lmssl converts "
         f"{sorted(FAMILIES)} (BERT-family encoders incl. compact and MiniLM sizes, GPT-2)")
  return FAMILIES[model_type]


def _labels(hf_config: dict) -> list[str]:
  id2label = hf_config.get("id2label") or {}
  return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]


def lmssl_config(hf_config: dict, heads: tuple) -> ml_collections.ConfigDict:
  """The lmssl config that computes what the HF model computes, with `heads` on top."""
  family = family_of(hf_config)
  c = config_lib.base_config()
  m = c.model
  m.size = f"hf-{family.model_type}"
  if family is BERT:
    act = hf_config.get("hidden_act", "gelu")
    _check(act in _HIDDEN_ACT, f"hidden_act {act!r} is not supported; lmssl has "
           f"{sorted(_HIDDEN_ACT)}")
    _check(hf_config.get("position_embedding_type", "absolute") == "absolute",
           "only absolute position embeddings convert (position_embedding_type='absolute')")
    _check(not hf_config.get("is_decoder") and not hf_config.get("add_cross_attention"),
           "BERT as a decoder (is_decoder / add_cross_attention) does not convert; lmssl's "
           "causal LM is GPT-2 shaped")
    m.num_layers, m.d_model = hf_config["num_hidden_layers"], hf_config["hidden_size"]
    m.num_heads, m.mlp_dim = hf_config["num_attention_heads"], hf_config["intermediate_size"]
    m.max_len, m.type_vocab_size = hf_config["max_position_embeddings"], hf_config.get(
        "type_vocab_size", 2)
    m.ln_eps, m.gelu = hf_config.get("layer_norm_eps", 1e-12), _HIDDEN_ACT[act]
    m.norm, m.tie_embeddings, m.output_bias = "post", True, True
    c.objective = "mlm"
    c.data.sentence_pair = "nsp" if "pair" in heads else ""
  else:
    act = hf_config.get("activation_function", "gelu_new")
    _check(act in _HIDDEN_ACT, f"activation_function {act!r} is not supported; lmssl has "
           f"{sorted(_HIDDEN_ACT)}")
    _check(hf_config.get("scale_attn_weights", True)
           and not hf_config.get("scale_attn_by_inverse_layer_idx"),
           "GPT-2 attention must be scaled by 1/sqrt(head_dim) only (scale_attn_weights=true, "
           "scale_attn_by_inverse_layer_idx=false)")
    _check(not hf_config.get("add_cross_attention"), "GPT-2 with cross-attention does not "
           "convert")
    m.num_layers, m.d_model, m.num_heads = (hf_config["n_layer"], hf_config["n_embd"],
                                            hf_config["n_head"])
    m.mlp_dim = hf_config.get("n_inner") or 4 * hf_config["n_embd"]
    m.max_len, m.type_vocab_size = hf_config["n_positions"], 0
    m.ln_eps, m.gelu = hf_config.get("layer_norm_epsilon", 1e-5), _HIDDEN_ACT[act]
    m.norm, m.output_bias = "pre", False
    m.tie_embeddings = hf_config.get("tie_word_embeddings", True)
    c.objective = "clm"
  m.vocab_size = hf_config["vocab_size"]
  m.position = "learned"
  _check(m.d_model % m.num_heads == 0, f"hidden size {m.d_model} is not divisible by "
         f"{m.num_heads} heads")
  c.data.seq_len = min(c.data.seq_len, m.max_len)
  task = [h for h in heads if h in ("classification", "regression", "tokens")]
  if task:
    c.task.kind = task[0]
    labels = _labels(hf_config)
    if task[0] != "regression":
      config_lib.set_labels(c, labels)
  return c


def _hf_act(gelu: str, family: Family) -> str:
  return "gelu" if gelu == "erf" else ("gelu_new" if family is GPT2 else "gelu_pytorch_tanh")


def hf_config_for(c: ml_collections.ConfigDict, architecture: str, special_ids: dict) -> dict:
  """config.json for the lmssl config `c` exported as `architecture`."""
  m = c.model
  family = BERT if architecture.startswith("Bert") else GPT2
  common = dict(architectures=[architecture], model_type=family.model_type,
                vocab_size=m.vocab_size, tie_word_embeddings=bool(m.tie_embeddings),
                initializer_range=0.02, dtype="float32", **special_ids)
  if family is BERT:
    out = dict(common, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
               hidden_act=_hf_act(m.gelu, BERT), layer_norm_eps=m.ln_eps,
               max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
               position_embedding_type="absolute", hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1)
    if c.task.kind:
      labels = [n for n in c.task.labels.split(",") if n] or ["LABEL_0"]
      out.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                 problem_type=("regression" if c.task.kind == "regression"
                               else "single_label_classification"))
    return out
  return dict(common, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
              n_inner=m.mlp_dim, n_positions=m.max_len, layer_norm_epsilon=m.ln_eps,
              activation_function=_hf_act(m.gelu, GPT2), scale_attn_weights=True,
              scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def check_exportable(c: ml_collections.ConfigDict) -> Family:
  """The family an lmssl model exports as, or a UserError saying what does not fit."""
  m = c.model
  _check(m.position == "learned", "model.position='rope' has no BERT/GPT-2 counterpart (they "
         "learn absolute positions); only runs with model.position='learned' export")
  if m.norm == "post":
    _check(m.tie_embeddings and m.output_bias and m.type_vocab_size > 0 and c.objective == "mlm",
           "a post-LN model exports as BERT, a bidirectional encoder that ties the output "
           "embedding, has an output bias and token types: objective='mlm', "
           "model.tie_embeddings, model.output_bias and model.type_vocab_size > 0 must hold")
    return BERT
  _check(not m.output_bias and m.type_vocab_size == 0 and c.objective == "clm",
         "a pre-LN model exports as GPT-2, a causal LM with no output bias and no token types: "
         "objective='clm', model.output_bias=False and model.type_vocab_size=0 must hold")
  return GPT2


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


def _named(family: Family, prefix: str):
  """(full HF name template, table template, lmssl path(s)) for every table entry."""
  for template, paths in family.base.items():
    yield prefix + template, template, paths
  for template, paths in family.heads.items():
    yield template, template, paths


def to_lmssl(family: Family, tensors: dict, shapes: dict, num_layers: int,
             tied: bool = True) -> tuple[dict, list[str]]:
  """HF tensors -> (lmssl params as nested dicts of numpy, notes on what was not copied).

  `shapes` {lmssl path: shape} says which parameters the lmssl model has; each must be filled.
  """
  prefix = family.base_prefix if any(k.startswith(family.base_prefix) for k in tensors) else ""
  entries = [(_pattern(full), t, p) for full, t, p in _named(family, prefix)]
  # Tied tensors are head tensors equal to another (base or head) tensor.
  ties = {k: (prefix + v if v in family.base else v) for k, v in family.tied.items()}
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


def from_lmssl(family: Family, params: dict, base_only: bool) -> dict:
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
    out.update(_unstack(array, full) if layered else {full: array})
    used.update(parts)
  left = sorted(set(flat) - used)
  _check(not left, f"lmssl parameters with no {family.model_type} tensor: "
         f"{', '.join(left[:10])}")
  return out


def present_heads(family: Family, hf_config: dict, tensors: dict) -> tuple:
  """The lmssl heads a checkpoint's tensors carry (the config names the classifier kind)."""
  names = set(tensors)
  architecture = (hf_config.get("architectures") or [family.base_model])[0]
  found = []
  if family is BERT:
    if any(n.startswith("cls.predictions.") for n in names):
      found.append("mlm")
    if any(n.startswith("cls.seq_relationship.") for n in names):
      found.append("pair")
    if any(n.startswith("classifier.") for n in names):
      if architecture == "BertForTokenClassification":
        found.append("tokens")
      elif hf_config.get("problem_type") == "regression" or len(_labels(hf_config)) == 1:
        found.append("regression")
      else:
        found.append("classification")
  elif any(n.startswith("lm_head.") for n in names) or architecture == "GPT2LMHeadModel":
    found.append("clm")
  return tuple(found)


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
  family: Family
  hf_config: dict
  notes: list


def convert(hf_dir: str) -> Converted:
  """A HF folder as an lmssl config and parameters, with notes on what was checked but not
  copied (tied tensors, buffers)."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  hf_config, tensors = read_dir(hf_dir)
  family = family_of(hf_config)
  heads = present_heads(family, hf_config, tensors)
  c = lmssl_config(hf_config, heads)
  pooler = any(n.startswith(("pooler.", "bert.pooler.")) for n in tensors)
  shapes = lmssl_shapes(c, heads, pooler)
  params, notes = to_lmssl(family, tensors, shapes, c.model.num_layers,
                           tied=c.model.tie_embeddings)
  if tokenizer_files(hf_dir):
    c.data.tokenizer = hf_dir
  return Converted(c, params, family, hf_config, notes)


def load(hf_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(lmssl config, params as nested dicts of numpy) of a local HF BERT or GPT-2 folder. The
  config's tokenizer is the folder's own (WordPiece or byte-level BPE, read with `tokenizers`)."""
  converted = convert(hf_dir)
  return converted.config, converted.params

"""Local HuggingFace model folders, read and written: config.json, the weights (safetensors or
a pickled pytorch_model.bin, whole or sharded by an index) and which tokenizer files it holds.

torch and safetensors (the `hf` extra) are imported inside the functions that need them.
"""

import json
import os

import numpy as np

from lmssl import errors
from lmssl.hf import extra as hf_extra
from lmssl.hf import families

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


def read_dir(hf_dir: str) -> tuple[dict, dict]:
  """(config.json as a dict, {tensor name: float32 numpy array}) of a local HF model folder."""
  hf_config = read_config(hf_dir)
  out = {}
  for shard in weight_files(hf_dir):
    out.update(_read_shard(shard))
  return hf_config, out


def read_config(hf_dir: str) -> dict:
  """config.json of a local HF model folder, as a dict."""
  path = os.path.join(hf_dir, "config.json")
  _check(os.path.isfile(path), f"{hf_dir} has no config.json, so it is not a local HuggingFace "
         "model folder (config.json plus model.safetensors or pytorch_model.bin, as "
         "save_pretrained writes them); name such a folder")
  try:
    with open(path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"{path} is not valid JSON ({e}); it must be the model's HuggingFace "
                           "config.json, as save_pretrained writes it") from None
  holds = (sorted(hf_config)[:8] if isinstance(hf_config, dict)
           else f"a JSON {type(hf_config).__name__}")
  _check(isinstance(hf_config, dict) and "model_type" in hf_config,
         f"{path} has no model_type (it holds {holds}); it must be the model's HuggingFace "
         f"config.json, with model_type one of {sorted(families.FAMILIES)}")
  return hf_config


def weight_files(hf_dir: str) -> list[str]:
  """The paths of a folder's weight files: its shards (by index), or its one file."""
  files = sorted(os.listdir(hf_dir))
  for index, single in (("model.safetensors.index.json", "model.safetensors"),
                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    if index in files:
      with open(os.path.join(hf_dir, index), encoding="utf-8") as f:
        return [os.path.join(hf_dir, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    if single in files:
      return [os.path.join(hf_dir, single)]
  raise errors.UserError(f"{hf_dir} holds no weights: expected model.safetensors, "
                         "pytorch_model.bin or a sharded index of either")


def tensor_names(path: str) -> list[str]:
  """The tensor names in weight file `path`, without reading the tensors."""
  if not path.endswith(".safetensors"):  # a pickle: mapped, not read
    return list(hf_extra.load("torch").load(path, map_location="cpu", weights_only=True, mmap=True))
  try:  # the header: its length (8 bytes, little-endian), then JSON naming every tensor
    with open(path, "rb") as f:
      header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [name for name in header if name != "__metadata__"]
  except (ValueError, OverflowError, MemoryError) as e:
    raise errors.UserError(f"{path} is not a safetensors file ({type(e).__name__}: {e}); "
                           "replace it with the model's own") from None


def _read_shard(path: str) -> dict:
  # Through torch, which reads every dtype (numpy has no bfloat16); weights_only refuses code.
  torch = hf_extra.load("torch")
  if path.endswith(".safetensors"):
    tensors = hf_extra.load("safetensors.torch").load_file(path)
  else:
    tensors = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.to(torch.float32).numpy() for k, v in tensors.items()}


def write_dir(hf_dir: str, hf_config: dict, tensors: dict) -> None:
  """Writes config.json and model.safetensors (fp32) into `hf_dir`."""
  save_file = hf_extra.load("safetensors.numpy").save_file
  os.makedirs(hf_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)


def tokenizer_files(directory: str) -> list[str]:
  return [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]

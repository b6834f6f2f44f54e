"""What a HuggingFace family is in lmssl's terms: `Family`, one per model_type, defined in
`families` (BERT, GPT-2), `decoders` (Llama, Mistral, Qwen2) and `modernbert`.

A family is a tensor name table (HF tensor name -> lmssl parameter path), the tensors HF stores
transposed, tied to another one, or that hold no weights, and four functions: its config.json as
the lmssl config computing the same model and back, which lmssl configs it can hold, and the HF
class an lmssl model exports as. `lmssl.hf.weights` applies the tables.
"""

import dataclasses
from typing import Callable

from lmssl import errors

LAYER = "transformer/layers/"


def check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  base_prefix: str  # on the base model's tensors inside a model with heads
  base: dict  # base-model tensor -> lmssl path, or a tuple of paths for a fused tensor
  heads: dict  # head tensor (never prefixed) -> lmssl path
  transposed: frozenset  # tensors stored [out, in] (torch Linear)
  tied: dict  # tensor -> the tensor it must equal (not stored by lmssl)
  buffers: tuple  # tensors that are not weights (masks, position ids, RoPE frequencies)
  base_model: str  # the HF class of the bare model, whose tensors carry no prefix
  # (lmssl base config, hf config.json, heads present): sets the model and objective computing
  # that model
  lmssl_config: Callable
  # lmssl config -> this family's own keys of config.json
  hf_config: Callable
  # lmssl config -> the reasons it does not fit this family ([] when it does)
  misfits: Callable
  # lmssl config, heads (module names in params) -> the HF class to export as
  architecture: Callable
  # hf config.json, tensor names -> the lmssl heads those tensors carry
  present_heads: Callable
  # Per-layer tensors some layers lack in HF (an identity there): template -> those layers. lmssl
  # keeps the parameter on every layer (scanned layers share one tree); such layers hold ones.
  absent: dict = dataclasses.field(default_factory=dict)
  # The tokenizer roles config.json names ("pad" -> pad_token_id), where the tokenizer has them.
  special_roles: tuple = ()
  # A bidirectional encoder whose inputs open with [CLS] and close with [SEP] (else a decoder).
  encoder: bool = False


# HF rope_type -> (lmssl model.rope_scaling, {lmssl field: HF key}).
_ROPE_TYPES = {
    "default": ("", {}),
    "linear": ("linear", {"rope_scaling_factor": "factor"}),
    "llama3": ("llama3", {"rope_scaling_factor": "factor", "rope_low_freq_factor":
                          "low_freq_factor", "rope_high_freq_factor": "high_freq_factor",
                          "rope_original_max_len": "original_max_position_embeddings"}),
}


def set_rope(m, hf_config: dict) -> None:
  """Sets lmssl's RoPE fields of model config `m` from a config.json in either form
  transformers writes: `rope_parameters` (transformers 5), or `rope_theta` beside
  `rope_scaling` (before)."""
  params = hf_config.get("rope_parameters")
  if not isinstance(params, dict):
    params = dict(hf_config.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  check(kind in _ROPE_TYPES, f"rope_type {kind!r} is not supported; lmssl computes "
        f"{sorted(_ROPE_TYPES)} RoPE")
  m.position, m.rope_theta = "rope", theta
  m.rope_scaling, fields = _ROPE_TYPES[kind]
  for field, key in fields.items():
    check(key in params, f"rope_type {kind!r} needs {key!r} in its parameters")
    setattr(m, field, type(m[field])(params[key]))


def rope_parameters(m) -> dict:
  """config.json's `rope_parameters` (transformers 5) for lmssl model config `m`."""
  kind = {v[0]: k for k, v in _ROPE_TYPES.items()}[m.rope_scaling]
  return dict({"rope_type": kind, "rope_theta": float(m.rope_theta)},
              **{key: m[field] for field, key in _ROPE_TYPES[kind][1].items()})


def head_dim_fits(hf_config: dict, hidden: int, heads: int) -> None:
  head_dim = hf_config.get("head_dim")
  check(head_dim in (None, hidden // heads), f"head_dim={head_dim} differs from hidden_size / "
        f"num_attention_heads = {hidden // heads}; lmssl's heads split d_model evenly")


def differing(m, wanted: dict) -> list[str]:
  """`model.K=V` for each field of `m` whose value is not `wanted`'s."""
  return [f"model.{k}={m[k]!r}" for k, v in wanted.items() if m[k] != v]


def causal_lm_architecture(name: str, base_model: str):
  """A decoder family's export class: its causal LM, also for a bare model whose output is
  tied (the head adds no weights); an untied bare model stays bare. Fine-tunes do not export:
  the families' HF classification heads have no bias."""
  def architecture(c, heads: set) -> str:
    check(not c.task.kind, f"a {c.task.kind} fine-tune of a causal LM does not export: its "
          "HF classification heads have no bias; export the pretrained causal LM instead")
    return name if "clm_head" in heads or c.model.tie_embeddings else base_model
  return architecture


def causal_lm_heads(hf_config: dict, names: set) -> tuple:
  architecture = (hf_config.get("architectures") or [""])[0]
  return ("clm",) if "lm_head.weight" in names or architecture.endswith(
      ("LMHeadModel", "ForCausalLM")) else ()

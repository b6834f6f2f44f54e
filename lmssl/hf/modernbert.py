"""ModernBERT masked LMs as an lmssl family.

A pre-norm encoder: normalized embeddings, no position table (RoPE), GeGLU, LayerNorms without
biases by default, every `global_attn_every_n_layers`-th layer global with `global_rope_theta`
and the others windowed (`local_attention`, the whole window) with `local_rope_theta`, a final
norm, and a BERT-like prediction head whose decoder is tied to the embeddings. Its layer 0 has
no attention norm (lmssl: `model.skip_first_attn_norm`). `Wqkv` and `Wi` are fused: query, key
and value side by side, and GeGLU's activated input before its gate.
"""

from lmssl.hf import family as family_lib
from lmssl.hf.family import LAYER as _L
from lmssl.hf.family import check as _check

_ACT = {"gelu": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
_BASE = {
    "embeddings.tok_embeddings.weight": "transformer/embedder/tokens/embedding",
    "embeddings.norm.weight": "transformer/embed_norm/scale",
    "embeddings.norm.bias": "transformer/embed_norm/bias",
    "layers.{i}.attn_norm.weight": _L + "attn_norm/scale",
    "layers.{i}.attn_norm.bias": _L + "attn_norm/bias",
    "layers.{i}.attn.Wqkv.weight": (_L + "attn/query/kernel", _L + "attn/key/kernel",
                                    _L + "attn/value/kernel"),
    "layers.{i}.attn.Wqkv.bias": (_L + "attn/query/bias", _L + "attn/key/bias",
                                  _L + "attn/value/bias"),
    "layers.{i}.attn.Wo.weight": _L + "attn/out/kernel",
    "layers.{i}.attn.Wo.bias": _L + "attn/out/bias",
    "layers.{i}.mlp_norm.weight": _L + "mlp_norm/scale",
    "layers.{i}.mlp_norm.bias": _L + "mlp_norm/bias",
    "layers.{i}.mlp.Wi.weight": (_L + "mlp/wi_gate/kernel", _L + "mlp/wi_up/kernel"),
    "layers.{i}.mlp.Wi.bias": (_L + "mlp/wi_gate/bias", _L + "mlp/wi_up/bias"),
    "layers.{i}.mlp.Wo.weight": _L + "mlp/wo/kernel",
    "layers.{i}.mlp.Wo.bias": _L + "mlp/wo/bias",
    "final_norm.weight": "transformer/final_norm/scale",
    "final_norm.bias": "transformer/final_norm/bias",
}
_HEADS = {
    "head.dense.weight": "mlm_head/transform/kernel",
    "head.dense.bias": "mlm_head/transform/bias",
    "head.norm.weight": "mlm_head/transform_norm/scale",
    "head.norm.bias": "mlm_head/transform_norm/bias",
    "decoder.bias": "mlm_head/output/bias",
}
# Every lmssl model option at the value ModernBERT has; the rest is read off the config.
_SHAPE = {"norm": "pre", "norm_type": "layernorm", "embed_norm": True, "mlp": "geglu",
          "position": "rope", "skip_first_attn_norm": True, "qkv_bias": False,
          "type_vocab_size": 0, "tie_embeddings": True, "num_kv_heads": 0, "rope_scaling": ""}


def _thetas(hf_config: dict) -> tuple[float, float]:
  """(global, local) RoPE theta of either config.json form."""
  params = hf_config.get("rope_parameters") or {}
  found = []
  for kind, key, default in (("full_attention", "global_rope_theta", 160_000.0),
                             ("sliding_attention", "local_rope_theta", 10_000.0)):
    p = params.get(kind) or {}
    _check(p.get("rope_type", "default") == "default", f"rope_parameters[{kind!r}] "
           f"rope_type {p.get('rope_type')!r}: lmssl converts ModernBERT's unscaled RoPE only")
    found.append(float(p.get("rope_theta", hf_config.get(key, default))))
  return found[0], found[1]


def _layer_types(hf_config: dict) -> tuple[int, list]:
  every = int(hf_config.get("global_attn_every_n_layers", 3))
  default = ["sliding_attention" if i % every else "full_attention"
             for i in range(hf_config["num_hidden_layers"])]
  return every, hf_config.get("layer_types") or default


def _config(c, hf_config: dict, heads: tuple) -> None:
  m = c.model
  acts = {k: hf_config.get(k, "gelu") for k in ("hidden_activation", "classifier_activation")}
  for key, act in acts.items():
    _check(act in _ACT, f"{key} {act!r} is not supported; lmssl has {sorted(_ACT)}")
  _check(_ACT[acts["hidden_activation"]] == _ACT[acts["classifier_activation"]],
         f"hidden_activation {acts['hidden_activation']!r} with classifier_activation "
         f"{acts['classifier_activation']!r}: lmssl's MLM head uses the model's GELU")
  biases = {k: bool(hf_config.get(k, False)) for k in ("norm_bias", "attention_bias",
                                                        "mlp_bias", "classifier_bias")}
  _check(len(set(biases.values())) == 1, f"{biases}: lmssl has biases on every projection and "
         "norm or on none (model.use_bias); these must all be equal")
  every, layer_types = _layer_types(hf_config)
  _check(layer_types == _layer_types({**hf_config, "layer_types": None})[1],
         f"layer_types {layer_types}: lmssl's windowed layers are all but every "
         f"global_attn_every_n_layers-th ({every}), counting from layer 0")
  m.num_layers, m.d_model = hf_config["num_hidden_layers"], hf_config["hidden_size"]
  m.num_heads, m.mlp_dim = hf_config["num_attention_heads"], hf_config["intermediate_size"]
  m.max_len = hf_config.get("max_position_embeddings", 8192)
  m.ln_eps, m.gelu = hf_config.get("norm_eps", 1e-5), _ACT[acts["hidden_activation"]]
  for key, value in _SHAPE.items():
    m[key] = value
  m.use_bias = biases["norm_bias"]
  m.output_bias = bool(hf_config.get("decoder_bias", True))
  m.rope_theta, m.local_rope_theta = _thetas(hf_config)
  m.attention_window = int(hf_config.get("local_attention", 128)) if every > 1 else 0
  m.global_every = every if every > 1 else 0
  c.objective = "mlm"
  c.data.sentence_pair = ""


def _hf_config(c) -> dict:
  m = c.model
  every = m.global_every if m.attention_window else 1
  return dict(hidden_size=m.d_model, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
              hidden_activation="gelu" if m.gelu == "erf" else "gelu_pytorch_tanh",
              classifier_activation="gelu" if m.gelu == "erf" else "gelu_pytorch_tanh",
              max_position_embeddings=m.max_len, norm_eps=m.ln_eps,
              norm_bias=bool(m.use_bias), attention_bias=bool(m.use_bias),
              mlp_bias=bool(m.use_bias), classifier_bias=bool(m.use_bias),
              decoder_bias=bool(m.output_bias), global_attn_every_n_layers=every,
              local_attention=int(m.attention_window) or 128,
              global_rope_theta=float(m.rope_theta),
              local_rope_theta=float(m.local_rope_theta or m.rope_theta),
              embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0)


def _misfits(c) -> list[str]:
  m = c.model
  out = family_lib.differing(m, _SHAPE)
  out += [f"model.global_every={m.global_every}"] if m.attention_window and (
      m.global_every < 2) else []
  return out + ([f"objective={c.objective!r}"] if c.objective != "mlm" else [])


def _architecture(c, heads: set) -> str:
  _check(not c.task.kind, f"a {c.task.kind} fine-tune of ModernBERT does not export yet; export "
         "the pretrained masked LM instead")
  return "ModernBertForMaskedLM" if "mlm_head" in heads else "ModernBertModel"


def _heads(hf_config: dict, names: set) -> tuple:
  return ("mlm",) if any(n.startswith(("head.", "decoder.")) for n in names) else ()


MODERNBERT = family_lib.Family(
    model_type="modernbert", base_prefix="model.", base=_BASE, heads=_HEADS,
    transposed=frozenset(t for t in (*_BASE, *_HEADS) if t.endswith((
        "Wqkv.weight", "Wo.weight", "Wi.weight", "dense.weight"))),
    tied={"decoder.weight": "embeddings.tok_embeddings.weight"},
    buffers=(), base_model="ModernBertModel", lmssl_config=_config, hf_config=_hf_config,
    misfits=_misfits, architecture=_architecture, present_heads=_heads,
    absent={"layers.{i}.attn_norm.weight": (0,), "layers.{i}.attn_norm.bias": (0,)},
    special_roles=("pad", "cls", "sep", "bos", "eos"), encoder=True)

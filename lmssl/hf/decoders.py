"""Llama, Mistral and Qwen2 causal LMs as lmssl families: one tensor table, three configs.

All three are pre-norm decoders with RMSNorm, a SwiGLU MLP, RoPE and grouped-query attention.
Llama may carry biases on every projection (`attention_bias` with `mlp_bias`), Mistral a
sliding window on every layer, Qwen2 query/key/value biases alone. An lmssl model exports as
Qwen2 when it has q/k/v biases alone, as Mistral when it has a window, else as Llama.
"""

from lmssl import masks
from lmssl.hf import family as family_lib
from lmssl.hf.family import LAYER as _L
from lmssl.hf.family import check as _check

_PROJECTIONS = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "out"}
_MLP = {"gate_proj": "wi_gate", "up_proj": "wi_up", "down_proj": "wo"}
_BASE = {
    "embed_tokens.weight": "transformer/embedder/tokens/embedding",
    "layers.{i}.input_layernorm.weight": _L + "attn_norm/scale",
    "layers.{i}.post_attention_layernorm.weight": _L + "mlp_norm/scale",
    "norm.weight": "transformer/final_norm/scale",
}
_LEAVES = {"weight": "kernel", "bias": "bias"}
for _scope, _names in (("self_attn", _PROJECTIONS), ("mlp", _MLP)):
  for _hf, _ours in _names.items():
    for _kind, _leaf in _LEAVES.items():
      _BASE[f"layers.{{i}}.{_scope}.{_hf}.{_kind}"] = (
          _L + f"{'attn' if _scope == 'self_attn' else 'mlp'}/{_ours}/{_leaf}")

# Every lmssl model option at the value these families have; the rest is read off the config.
_SHAPE = {"norm": "pre", "norm_type": "rmsnorm", "mlp": "swiglu", "position": "rope",
          "embed_norm": False, "type_vocab_size": 0, "output_bias": False, "global_every": 0,
          "local_rope_theta": 0.0, "skip_first_attn_norm": False}


def _config(c, hf_config: dict, heads: tuple) -> None:
  m = c.model
  model_type = hf_config["model_type"]
  act = hf_config.get("hidden_act", "silu")
  _check(act == "silu", f"hidden_act {act!r}: lmssl's gated MLPs are SwiGLU (silu) and GeGLU; "
         f"a {model_type} model with hidden_act='silu' converts")
  m.num_layers, m.d_model = hf_config["num_hidden_layers"], hf_config["hidden_size"]
  m.num_heads, m.mlp_dim = hf_config["num_attention_heads"], hf_config["intermediate_size"]
  family_lib.head_dim_fits(hf_config, m.d_model, m.num_heads)
  m.num_kv_heads = hf_config.get("num_key_value_heads") or m.num_heads
  m.max_len = hf_config.get("max_position_embeddings", 2048)
  m.ln_eps = hf_config.get("rms_norm_eps", 1e-6)
  for key, value in _SHAPE.items():
    m[key] = value
  family_lib.set_rope(m, hf_config)
  m.tie_embeddings = bool(hf_config.get("tie_word_embeddings", False))
  if model_type == "llama":
    attention_bias, mlp_bias = (bool(hf_config.get(k)) for k in ("attention_bias", "mlp_bias"))
    _check(attention_bias == mlp_bias, f"attention_bias={attention_bias} with mlp_bias="
           f"{mlp_bias}: lmssl has biases on every projection or none (model.use_bias), or on "
           "query/key/value alone (model.qkv_bias, as Qwen2)")
    m.use_bias = attention_bias
  else:
    m.use_bias = False
    m.qkv_bias = model_type == "qwen2"
  window = hf_config.get("sliding_window") if model_type == "mistral" else None
  if model_type == "qwen2" and hf_config.get("use_sliding_window"):
    _check(False, "use_sliding_window=true: Qwen2 windows only layers from max_window_layers "
           "on, which lmssl's windows (every layer, or all but every k-th) cannot express")
  # A window as long as the model's context changes nothing (Mistral then is Llama).
  if window and masks.has_effect(window, max(c.data.seq_len, m.max_len), causal=True):
    m.attention_window = window
  c.objective = "clm"


def _hf_config(c) -> dict:
  m = c.model
  model_type = _model_type(m)
  out = dict(hidden_size=m.d_model, num_hidden_layers=m.num_layers,
             num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
             intermediate_size=m.mlp_dim, hidden_act="silu", rms_norm_eps=m.ln_eps,
             max_position_embeddings=m.max_len, head_dim=m.d_model // m.num_heads,
             rope_parameters=family_lib.rope_parameters(m), rope_theta=float(m.rope_theta),
             attention_dropout=0.0)
  if model_type == "llama":
    out.update(attention_bias=bool(m.use_bias), mlp_bias=bool(m.use_bias))
  elif model_type == "mistral":
    out.update(sliding_window=int(m.attention_window))
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def _model_type(m) -> str:
  if m.qkv_bias and not m.use_bias:
    return "qwen2"
  return "mistral" if m.attention_window else "llama"


def _misfits(model_type: str):
  def misfits(c) -> list[str]:
    m = c.model
    out = family_lib.differing(m, _SHAPE)
    out += [f"objective={c.objective!r}"] if c.objective != "clm" else []
    if not out and _model_type(m) != model_type:
      out.append(f"its biases and window, which make it {_model_type(m)}")
    return out
  return misfits


def _family(model_type: str, prefix: str) -> family_lib.Family:
  return family_lib.Family(
      model_type=model_type, base_prefix="model.", base=dict(_BASE),
      heads={"lm_head.weight": "clm_head/kernel/kernel"},  # only when not tied
      # lm_head.weight is [V, D] in both (lmssl's untied output kernel is).
      transposed=frozenset(t for t in _BASE if t.endswith("proj.weight")),
      tied={"lm_head.weight": "embed_tokens.weight"},
      buffers=("layers.{i}.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq"),
      base_model=f"{prefix}Model", lmssl_config=_config, hf_config=_hf_config,
      misfits=_misfits(model_type),
      architecture=family_lib.causal_lm_architecture(f"{prefix}ForCausalLM", f"{prefix}Model"),
      # No pad id: the tokenizers name none, and HF would stop training the row it names.
      present_heads=family_lib.causal_lm_heads, special_roles=("bos", "eos"))


LLAMA, MISTRAL, QWEN2 = (_family(t, p) for t, p in (("llama", "Llama"), ("mistral", "Mistral"),
                                                     ("qwen2", "Qwen2")))
FAMILIES = (LLAMA, MISTRAL, QWEN2)

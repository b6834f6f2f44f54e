"""What each HuggingFace family is in lmssl's terms: its tensor name table, and its config.json.

Each family is one name table (HF tensor name -> lmssl parameter path), one list of the
tensors HF stores transposed, the tensors tied to another one and the buffers that hold no
weights; `lmssl.hf.weights` applies them. The config functions translate config.json to the lmssl
config that computes the same model, and back, refusing what lmssl cannot compute exactly.
"""

import dataclasses

import ml_collections

from lmssl import config as config_lib
from lmssl import errors

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
_HIDDEN_ACT = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.UserError(message)


def family_of(hf_config: dict) -> Family:
  model_type = hf_config.get("model_type", "")
  _check(model_type in FAMILIES, f"model_type {model_type!r} is not supported; lmssl converts "
         f"{sorted(FAMILIES)} (BERT-family encoders incl. compact and MiniLM sizes, GPT-2)")
  return FAMILIES[model_type]


def labels(hf_config: dict) -> list[str]:
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
    if task[0] != "regression":
      c.task.labels = config_lib.joined_labels(labels(hf_config))
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


# The model options whose other values BERT and GPT-2 do not have (both learn absolute
# positions, LayerNorm with biases, a GELU MLP, one key/value head per query head, no windows).
_BERT_GPT2_OPTIONS = {"position": "learned", "norm_type": "layernorm", "embed_norm": False,
                      "mlp": "gelu", "use_bias": True, "qkv_bias": False, "attention_window": 0}


def check_exportable(c: ml_collections.ConfigDict) -> Family:
  """The family an lmssl model exports as, or a UserError saying what does not fit."""
  m = c.model
  others = [f"model.{k}={m[k]!r}" for k, v in _BERT_GPT2_OPTIONS.items() if m[k] != v]
  others += [f"model.num_kv_heads={m.num_kv_heads}"] if m.num_kv_heads not in (
      0, m.num_heads) else []
  _check(not others, f"{', '.join(others)}: no BERT/GPT-2 counterpart, and lmssl exports "
         "BERT and GPT-2 only; export a run with these options at their BERT/GPT-2 values")
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

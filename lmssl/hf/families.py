"""The HuggingFace families lmssl converts, by model_type: BERT and GPT-2 here, Llama, Mistral
and Qwen2 in `decoders`, ModernBERT in `modernbert` (each a `family.Family`), and the
conversions of config.json that the converter calls, which dispatch on the family.

A family's config functions translate config.json to the lmssl config that computes the same
model, and back, refusing what lmssl cannot compute exactly.
"""

import ml_collections

from lmssl import config as config_lib
from lmssl.hf import decoders
from lmssl.hf import family as family_lib
from lmssl.hf import modernbert
from lmssl.hf.family import LAYER as _L
from lmssl.hf.family import Family
from lmssl.hf.family import check as _check
from lmssl.hf.family import differing

_HIDDEN_ACT = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# The model options at the values BERT and GPT-2 have (learned absolute positions, LayerNorm
# with biases, a GELU MLP, one key/value head per query head, no windows).
_CLASSIC = {"position": "learned", "norm_type": "layernorm", "embed_norm": False, "mlp": "gelu",
            "use_bias": True, "qkv_bias": False, "attention_window": 0,
            "skip_first_attn_norm": False}


def labels(hf_config: dict) -> list[str]:
  id2label = hf_config.get("id2label") or {}
  return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]


def _classic_misfits(m) -> list[str]:
  out = differing(m, _CLASSIC)
  return out + ([f"model.num_kv_heads={m.num_kv_heads}"] if m.num_kv_heads not in (
      0, m.num_heads) else [])


# --- BERT ------------------------------------------------------------------------------------

def _bert_config(c, hf_config: dict, heads: tuple) -> None:
  m = c.model
  act = hf_config.get("hidden_act", "gelu")
  _check(act in _HIDDEN_ACT, f"hidden_act {act!r} is not supported; lmssl has "
         f"{sorted(_HIDDEN_ACT)}")
  _check(hf_config.get("position_embedding_type", "absolute") == "absolute",
         "only absolute position embeddings convert (position_embedding_type='absolute')")
  _check(not hf_config.get("is_decoder") and not hf_config.get("add_cross_attention"),
         "BERT as a decoder (is_decoder / add_cross_attention) does not convert; lmssl's "
         "causal LMs are GPT-2 and Llama shaped")
  m.num_layers, m.d_model = hf_config["num_hidden_layers"], hf_config["hidden_size"]
  m.num_heads, m.mlp_dim = hf_config["num_attention_heads"], hf_config["intermediate_size"]
  m.max_len, m.type_vocab_size = hf_config["max_position_embeddings"], hf_config.get(
      "type_vocab_size", 2)
  m.ln_eps, m.gelu = hf_config.get("layer_norm_eps", 1e-12), _HIDDEN_ACT[act]
  m.norm, m.tie_embeddings, m.output_bias, m.position = "post", True, True, "learned"
  c.objective = "mlm"
  c.data.sentence_pair = "nsp" if "pair" in heads else ""


def _hf_act(gelu: str, tanh_name: str) -> str:
  return "gelu" if gelu == "erf" else tanh_name


def _bert_hf_config(c) -> dict:
  m = c.model
  out = dict(hidden_size=m.d_model, num_hidden_layers=m.num_layers,
             num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
             hidden_act=_hf_act(m.gelu, "gelu_pytorch_tanh"), layer_norm_eps=m.ln_eps,
             max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
             position_embedding_type="absolute", hidden_dropout_prob=0.1,
             attention_probs_dropout_prob=0.1)
  if c.task.kind:
    names = [n for n in c.task.labels.split(",") if n] or ["LABEL_0"]
    out.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
               problem_type=("regression" if c.task.kind == "regression"
                             else "single_label_classification"))
  return out


def _bert_misfits(c) -> list[str]:
  m = c.model
  out = _classic_misfits(m) + differing(m, {"norm": "post", "tie_embeddings": True,
                                            "output_bias": True})
  out += [f"model.type_vocab_size={m.type_vocab_size}"] if not m.type_vocab_size else []
  return out + ([f"objective={c.objective!r}"] if c.objective != "mlm" else [])


def _bert_architecture(c, heads: set) -> str:
  if c.task.kind:
    return ("BertForTokenClassification" if c.task.kind == "tokens"
            else "BertForSequenceClassification")
  if heads == {"mlm_head", "pair_head"}:
    return "BertForPreTraining"
  return "BertForMaskedLM" if "mlm_head" in heads else "BertModel"


def _bert_heads(hf_config: dict, names: set) -> tuple:
  architecture = (hf_config.get("architectures") or ["BertModel"])[0]
  found = []
  if any(n.startswith("cls.predictions.") for n in names):
    found.append("mlm")
  if any(n.startswith("cls.seq_relationship.") for n in names):
    found.append("pair")
  if any(n.startswith("classifier.") for n in names):
    if architecture == "BertForTokenClassification":
      found.append("tokens")
    elif hf_config.get("problem_type") == "regression" or len(labels(hf_config)) == 1:
      found.append("regression")
    else:
      found.append("classification")
  return tuple(found)


# --- GPT-2 -----------------------------------------------------------------------------------

def _gpt2_config(c, hf_config: dict, heads: tuple) -> None:
  m = c.model
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
  m.norm, m.output_bias, m.position = "pre", False, "learned"
  m.tie_embeddings = hf_config.get("tie_word_embeddings", True)
  c.objective = "clm"


def _gpt2_hf_config(c) -> dict:
  m = c.model
  return dict(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
              n_positions=m.max_len, layer_norm_epsilon=m.ln_eps,
              activation_function=_hf_act(m.gelu, "gelu_new"), scale_attn_weights=True,
              scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _gpt2_misfits(c) -> list[str]:
  m = c.model
  out = _classic_misfits(m) + differing(m, {"norm": "pre", "output_bias": False,
                                            "type_vocab_size": 0})
  return out + ([f"objective={c.objective!r}"] if c.objective != "clm" else [])


_gpt2_architecture = family_lib.causal_lm_architecture("GPT2LMHeadModel", "GPT2Model")
_gpt2_heads = family_lib.causal_lm_heads


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
    lmssl_config=_bert_config,
    hf_config=_bert_hf_config,
    misfits=_bert_misfits,
    architecture=_bert_architecture,
    present_heads=_bert_heads,
    special_roles=("pad",),
    encoder=True,
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
    transposed=frozenset(),  # lmssl's untied output kernel is [V, D], as lm_head.weight
    tied={"lm_head.weight": "wte.weight"},
    buffers=("h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
    base_model="GPT2Model",
    lmssl_config=_gpt2_config,
    hf_config=_gpt2_hf_config,
    misfits=_gpt2_misfits,
    architecture=_gpt2_architecture,
    present_heads=_gpt2_heads,
    special_roles=("bos", "eos"),
)


FAMILIES = {f.model_type: f for f in (BERT, GPT2, *decoders.FAMILIES, modernbert.MODERNBERT)}


def family_of(hf_config: dict) -> Family:
  model_type = hf_config.get("model_type", "")
  _check(model_type in FAMILIES, f"model_type {model_type!r} is not supported; lmssl converts "
         f"{sorted(FAMILIES)} (BERT-family encoders incl. compact and MiniLM sizes, GPT-2, "
         "Llama, Mistral, Qwen2, ModernBERT)")
  return FAMILIES[model_type]


def lmssl_config(hf_config: dict, heads: tuple) -> ml_collections.ConfigDict:
  """The lmssl config that computes what the HF model computes, with `heads` on top."""
  family = family_of(hf_config)
  c = config_lib.base_config()
  m = c.model
  m.size = f"hf-{family.model_type}"
  family.lmssl_config(c, hf_config, heads)
  m.vocab_size = hf_config["vocab_size"]
  _check(m.d_model % m.num_heads == 0, f"hidden size {m.d_model} is not divisible by "
         f"{m.num_heads} heads")
  c.data.seq_len = min(c.data.seq_len, m.max_len)
  task = [h for h in heads if h in ("classification", "regression", "tokens")]
  if task:
    c.task.kind = task[0]
    if task[0] != "regression":
      c.task.labels = config_lib.joined_labels(labels(hf_config))
  return c


def hf_config_for(c: ml_collections.ConfigDict, family: Family, architecture: str,
                  special_ids: dict) -> dict:
  """config.json for the lmssl config `c` exported as `architecture` of `family`."""
  m = c.model
  return dict(architectures=[architecture], model_type=family.model_type,
              vocab_size=m.vocab_size, tie_word_embeddings=bool(m.tie_embeddings),
              initializer_range=0.02, dtype="float32", **special_ids, **family.hf_config(c))


def check_exportable(c: ml_collections.ConfigDict) -> Family:
  """The family an lmssl model exports as, or a UserError saying what does not fit each."""
  misfits = {f.model_type: f.misfits(c) for f in FAMILIES.values()}
  for model_type, reasons in misfits.items():
    if not reasons:
      return FAMILIES[model_type]
  closest = sorted(misfits.items(), key=lambda kv: len(kv[1]))[:2]
  _check(False, "this model matches no HuggingFace family lmssl exports ("
         f"{', '.join(sorted(FAMILIES))}); the closest: " + "; ".join(
             f"as {t}, {', '.join(r)} do not fit" for t, r in closest)
         + "; export a run whose options are one family's")

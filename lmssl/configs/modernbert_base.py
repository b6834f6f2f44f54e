"""ModernBERT-style masked-LM pretraining (pre-norm encoder with bias-free LayerNorms, GeGLU,
no biases, RoPE; every third layer global with theta 160000, the others a 128-position window
with theta 10000; embedding and final norms, and no attention norm on layer 0, which reads the
normalized embeddings; tied output with a bias; 30% masking). Exports as ModernBertForMaskedLM
(python -m lmssl.convert to-hf).

Quickstart: python -m lmssl.main --config configs/modernbert_base.py:size=tiny \\
                --workdir /tmp/lmssl_modernbert
  then: python -m lmssl.main sample --workdir /tmp/lmssl_modernbert --prompt "The [MASK] is."
  600 steps of 32 x 128; its time and eval_loss on 2 CPU cores are not measured yet.
Smoke: python -m lmssl.main --config configs/modernbert_base.py:smoke \\
           --workdir /tmp/lmssl_modernbert_smoke
  33 s on 2 CPU cores with the built-in corpus already prepared; eval_loss ~6.16 after 4 steps
  (500-piece vocabulary: ln 500 = 6.21).

Variants (comma-separated after the colon):
  size=tiny|mini|small|base|large  model shape from SIZES below and a matching run length;
                                   base and large are ModernBERT-base and -large shaped.
  smoke                            a seconds-long run that exercises every piece (tests use
                                   it); its window shrinks to 16 to matter in 64-token rows.
Any knob: --config.model.attention_window=256 --config.model.global_every=4 ...
"""

from lmssl import config as config_lib

# name: (num_layers, d_model, num_heads, mlp_dim); GeGLU's mlp_dim as ModernBERT's
# intermediate_size (1.5 d_model in base).
SIZES = {
    "tiny": (3, 128, 2, 256),
    "mini": (6, 256, 4, 384),
    "small": (9, 512, 8, 768),
    "base": (22, 768, 12, 1152),
    "large": (28, 1024, 16, 2624),
}
# Run settings that make each size a sensible default: (steps, global batch, seq_len, lr).
RUNS = {
    "tiny": (600, 32, 128, 1e-3),
    "mini": (2_000, 64, 128, 5e-4),
    "small": (20_000, 128, 512, 3e-4),
    "base": (400_000, 512, 1024, 8e-4),
    "large": (400_000, 512, 1024, 5e-4),
}


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.objective = "mlm"
  m = c.model
  m.norm, m.norm_type, m.embed_norm, m.ln_eps = "pre", "layernorm", True, 1e-5
  m.skip_first_attn_norm = True
  m.mlp, m.gelu, m.use_bias = "geglu", "erf", False
  m.position, m.rope_theta, m.local_rope_theta = "rope", 160_000.0, 10_000.0
  m.attention_window, m.global_every = 128, 3
  m.type_vocab_size = 0
  m.tie_embeddings, m.output_bias = True, True
  c.data.mask_rate = 0.3
  c.train.weight_decay, c.train.b2 = 1e-5, 0.98
  c = config_lib.apply_variants(c, arg, RUNS, SIZES)
  c.data.max_predictions = -(-c.data.seq_len * 3 // 10)  # room for 30% of a row
  return c

"""Llama-style causal-LM pretraining (pre-norm RMSNorm decoder, SwiGLU MLP, grouped-query
attention, RoPE with theta 500000, no biases, untied output embedding: Llama 3's layout).

Quickstart: python -m lmssl.main --config configs/llama_base.py:size=tiny --workdir /tmp/lmssl_llama
  then: python -m lmssl.main sample --workdir /tmp/lmssl_llama --prompt "The"
  600 steps of 16 x 256: 6.3 min on 2 CPU cores from an empty cache (~7,300 train tokens/s),
  eval_loss 4.70, perplexity 110, 1.62 bits/byte.
Smoke: python -m lmssl.main --config configs/llama_base.py:smoke --workdir /tmp/lmssl_llama_smoke
  27 s on 2 CPU cores with the built-in corpus already prepared; eval_loss ~6.19 after 4 steps
  (500-piece vocabulary: ln 500 = 6.21).

Variants (comma-separated after the colon):
  size=tiny|mini|small|base|1b  model shape from SIZES below and a matching run length; 1b is
                                Llama 3.2 1B shaped (16 x 2048, 32 heads on 8 key/value heads,
                                SwiGLU 8192), with the vocabulary of the run's tokenizer.
  smoke                         a seconds-long run that exercises every piece (tests use it).
Any knob: --config.model.attention_window=4096 (Mistral's sliding window),
  --config.model.qkv_bias=true (Qwen2's q/k/v biases),
  --config.model.rope_scaling=llama3 --config.model.rope_scaling_factor=32 (Llama 3.2's long
  context), --config.model.num_kv_heads=1 (multi-query) ...
"""

from lmssl import config as config_lib

# name: (num_layers, d_model, num_heads, mlp_dim, num_kv_heads); SwiGLU's mlp_dim about
# 8/3 d_model (its three projections cost what two of 4 d_model do), rounded to 128.
SIZES = {
    "tiny": (2, 128, 4, 384, 2),
    "mini": (4, 256, 4, 768, 2),
    "small": (8, 512, 8, 1536, 4),
    "base": (12, 768, 12, 2048, 4),
    "1b": (16, 2048, 32, 8192, 8),
}
# Run settings that make each size a sensible default: (steps, global batch, seq_len, lr).
RUNS = {
    "tiny": (600, 16, 256, 1e-3),
    "mini": (2_000, 32, 256, 5e-4),
    "small": (20_000, 64, 512, 3e-4),
    "base": (300_000, 512, 1024, 6e-4),
    "1b": (300_000, 512, 2048, 3e-4),
}


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.objective = "clm"
  m = c.model
  m.norm, m.norm_type, m.ln_eps = "pre", "rmsnorm", 1e-5
  m.mlp, m.use_bias = "swiglu", False
  m.position, m.rope_theta = "rope", 500_000.0
  m.type_vocab_size = 0
  m.tie_embeddings, m.output_bias = False, False
  c.train.weight_decay = 0.1
  c.train.schedule, c.train.end_lr_frac = "cosine", 0.1
  c.train.b2, c.train.eps = 0.95, 1e-5
  return config_lib.apply_variants(c, arg, RUNS, SIZES)

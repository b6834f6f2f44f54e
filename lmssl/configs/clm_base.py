"""GPT-2-style causal-LM pretraining (pre-LN decoder, tanh GELU, final LayerNorm, tied output).

Quickstart: python -m lmssl.main --config configs/clm_base.py:size=tiny --workdir /tmp/lmssl_clm
  On 2 CPU cores (no accelerator) from an empty workdir: 8.6-9 minutes, ~5,000 train tokens/s
  (the full-vocabulary head runs at every position), 600 steps of 16 x 256; final eval_loss ~5.12,
  eval_perplexity ~168, 1.76 bits/byte (per sentencepiece token, 8000-piece vocabulary).

Variants (comma-separated after the colon):
  size=tiny|mini|small|base|large  model shape from lmssl.config.SIZES and a matching run length;
                                   base is GPT-2 small (124M), large is GPT-2 medium (355M).
  smoke                            a seconds-long run that exercises every piece (tests use it).
Any knob: --config.train.steps=1000 --config.model.position=rope ...
"""

from lmssl import config as config_lib

# Run settings that make each size a sensible default: (steps, global batch, seq_len, lr).
RUNS = {
    "tiny": (600, 16, 256, 1e-3),
    "mini": (2_000, 32, 256, 5e-4),
    "small": (20_000, 64, 512, 3e-4),
    "base": (600_000, 512, 1024, 6e-4),
    "large": (600_000, 512, 1024, 3e-4),
}


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.objective = "clm"
  c.model.norm, c.model.gelu, c.model.ln_eps = "pre", "tanh", 1e-5
  c.model.type_vocab_size, c.model.output_bias = 0, False
  c.model.max_len = 1024
  c.train.weight_decay = 0.1
  c.train.schedule = "cosine"
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  return config_lib.apply_variants(c, arg, RUNS)

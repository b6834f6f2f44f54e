"""BERT-style masked-LM pretraining (post-LN encoder, exact GELU, token types, tied output + bias).

Quickstart: python -m lmssl.main --config configs/mlm_base.py:size=tiny --workdir /tmp/lmssl_mlm
  On 2 CPU cores (no accelerator) from an empty cache: 3.7 minutes in all (corpus harvest and
  tokenizer training included), ~14,000 train tokens/s, 600 steps of 32 x 128; final
  eval_loss ~6.34, eval_accuracy ~0.11 (masked-token accuracy, 8000-piece vocabulary).

Variants (comma-separated after the colon):
  size=tiny|mini|small|base|large  model shape from lmssl.config.SIZES and a matching run length;
                                   base is BERT-base (110M), large is BERT-large.
  smoke                            a seconds-long run that exercises every piece (tests use it).
Any knob: --config.train.steps=1000 --config.data.source=text:/data/*.txt ...
"""

from lmssl import config as config_lib

# Run settings that make each size a sensible default: (steps, global batch, seq_len, lr).
RUNS = {
    "tiny": (600, 32, 128, 1e-3),
    "mini": (2_000, 64, 128, 5e-4),
    "small": (20_000, 128, 128, 3e-4),
    "base": (1_000_000, 256, 128, 1e-4),
    "large": (1_000_000, 256, 128, 1e-4),
}


def get_config(arg: str = ""):
  c = config_lib.base_config()
  c.objective = "mlm"
  c.model.norm, c.model.gelu, c.model.ln_eps = "post", "erf", 1e-12
  c.model.type_vocab_size, c.model.output_bias = 2, True
  return config_lib.apply_variants(c, arg, RUNS)

"""HuggingFace interop: families (name tables, config.json), weights (reading and writing HF
folders), tokenizer (transformers' tokenizers behind lmssl's interface, and `load` by path) and
convert (the `python -m lmssl.convert` CLI).

Importing this package stays light: torch, transformers, safetensors and tokenizers (the `hf`
extra) are imported inside the functions that need them, so lmssl runs without the extra.
"""

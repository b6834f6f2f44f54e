"""Random-init HuggingFace models and tokenizers trained here, for the HF interop tests: nothing
is downloaded. Every weight, bias and norm is drawn at random, so that no mapping hides behind
zeros and ones."""

import json

import tokenizers
import torch
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

_SUBJECTS = ["The river", "A small village", "The old castle", "Her second album", "The storm",
             "This species", "The railway line", "His father", "The new bridge", "The team"]
_VERBS = ["was built in", "reached the coast by", "was described in", "moved north after",
          "won three titles in", "was renamed in", "grew quickly after"]
_ENDS = ["1887.", "the autumn of 1923.", "the early 1970s, despite the war.",
         "2004; it closed soon after.", "May, when prices rose by 12%.", "the Great Depression."]
TEXTS = [f"{s} {v} {e}" for s in _SUBJECTS for v in _VERBS for e in _ENDS]
# Llama 3's split of text into words, numbers of up to 3 digits, punctuation and spaces.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def randomize(model, seed: int):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator) * 0.1
      norm_scale = name.endswith("weight") and any(
          k in name for k in ("LayerNorm", ".ln_", "norm."))
      p.copy_(noise + 1.0 if norm_scale else noise)
  return model


def _write_json(path, value) -> None:
  path.write_text(json.dumps(value))


def wordpiece(directory) -> int:
  """BERT's vocab.txt, trained on TEXTS."""
  tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
  tok.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, show_progress=False,
                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok.save_model(str(directory))
  _write_json(directory / "tokenizer_config.json",
              {"do_lower_case": True, "tokenizer_class": "BertTokenizer"})
  return tok.get_vocab_size()


def byte_bpe(directory) -> int:
  """GPT-2's vocab.json + merges.txt, trained on TEXTS."""
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1, show_progress=False,
                          special_tokens=["<|endoftext|>"])
  tok.save_model(str(directory))
  _write_json(directory / "tokenizer_config.json",
              {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "add_prefix_space": False})
  return tok.get_vocab_size()


def sentencepiece_bpe(directory) -> int:
  """A Llama 2 / Mistral tokenizer.json: sentencepiece-style BPE over "▁"-joined words with
  byte fallback (<0x00>..<0xFF> right after <unk>, <s>, </s>), <s> prepended."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                         normalizers.Replace(" ", "\u2581")])
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
  spec = json.loads(tok.to_str())
  trained = spec["model"]["vocab"]
  vocab = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>"]
                                      + [f"<0x{b:02X}>" for b in range(256)])}
  for piece in sorted(trained, key=trained.get):
    vocab.setdefault(piece, len(vocab))
  spec["model"]["vocab"] = vocab
  spec["model"]["byte_fallback"] = True
  spec["added_tokens"] = [dict(a, id=vocab[a["content"]]) for a in spec["added_tokens"]]
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
      ("<s>", vocab["<s>"])])
  tok.save(str(directory / "tokenizer.json"))
  _write_json(directory / "tokenizer_config.json",
              {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": False})
  return tok.get_vocab_size()


def tiktoken_bpe(directory, specials=("<|begin_of_text|>", "<|end_of_text|>"),
                 template: str = "<|begin_of_text|> $A") -> int:
  """A Llama 3 / Qwen2 (tiktoken-style) tokenizer.json: byte-level BPE after a regex split of
  words, numbers and punctuation, special tokens at the end of the vocabulary."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens(list(specials))
  pieces = template.split()
  tok.post_processor = processors.TemplateProcessing(
      single=template, special_tokens=[(p, tok.token_to_id(p)) for p in pieces if p != "$A"])
  tok.save(str(directory / "tokenizer.json"))
  return tok.get_vocab_size()


def tiktoken_llama3(directory) -> int:
  vocab = tiktoken_bpe(directory)
  _write_json(directory / "tokenizer_config.json",
              {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|end_of_text|>"})
  return vocab


def modernbert_bpe(directory) -> int:
  """ModernBERT's byte-level BPE with BERT's special tokens around each text."""
  vocab = tiktoken_bpe(directory, ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"),
                       "[CLS] $A [SEP]")
  _write_json(directory / "tokenizer_config.json",
              {"tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
               "unk_token": "[UNK]"})
  return vocab


def tiktoken_qwen2(directory) -> int:
  """Qwen2's: the same byte-level BPE, no bos, <|endoftext|> ending and padding texts."""
  vocab = tiktoken_bpe(directory, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "$A")
  _write_json(directory / "tokenizer_config.json",
              {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
               "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None})
  return vocab

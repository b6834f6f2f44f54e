"""HuggingFace tokenizers (BERT WordPiece, GPT-2 byte-level BPE) behind lmssl's tokenizer interface.

A directory loads as transformers loads it: `tokenizer.json` when present, else BERT's
`vocab.txt` (WordPiece; do_lower_case, strip_accents and tokenize_chinese_chars from
tokenizer_config.json), else GPT-2's `vocab.json` + `merges.txt` (byte-level BPE, no prefix
space). Special ids keep the original's values: they come from the `*_token` names of
tokenizer_config.json and special_tokens_map.json, else from well-known token strings. A
missing role follows BERT/GPT-2 conventions: cls = bos, sep = eos, pad = eos; mask may be
absent (None). Needs the optional `tokenizers` package (`pip install lmssl[hf]`), imported only
when a tokenizer is built.
"""

import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lmssl import errors
from lmssl import files
from lmssl.data import tokenizer as sp_tokenizer

ROLES = ("pad", "unk", "cls", "sep", "bos", "eos", "mask")
# Roles of well-known special tokens, for a tokenizer.json that comes without config files.
_KNOWN = {"[PAD]": ("pad",), "[UNK]": ("unk",), "[CLS]": ("cls",), "[SEP]": ("sep",),
          "[MASK]": ("mask",), "<|endoftext|>": ("bos", "eos", "unk")}
# What BertTokenizer and GPT2Tokenizer assume when their files name no special tokens.
_WORDPIECE_DEFAULTS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                       "mask": "[MASK]"}
_BYTE_LEVEL_DEFAULTS = {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # the later one wins
_BYTE_SPACE = "\u0120"  # "Ġ": the byte-level alphabet's stand-in for a space
_META_SPACE = "\u2581"  # "▁": sentencepiece's mark of a preceding space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece byte fallback
# "[unused0]", "[CLS]": BERT's pre-tokenizer splits off every "[", so text never yields these.
_BRACKETED = re.compile(r"\[[^\[\]]+\]")


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError("a HuggingFace tokenizer needs the `tokenizers` package; install "
                           "lmssl's hf extra: pip install 'lmssl[hf]'") from e
  return tokenizers


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"tokenizer file {path} cannot be read as JSON ({e}); fix or "
                           f"remove it") from None


def _configured_names(directory: str) -> dict[str, str | None]:
  """Role -> token string (None: explicitly none) named by the directory's config files."""
  names = {}
  for file_name in _CONFIG_FILES:
    path = os.path.join(directory, file_name)
    config = _read_json(path) if os.path.isfile(path) else {}
    for role in ROLES:
      if f"{role}_token" in config:
        value = config[f"{role}_token"]
        names[role] = value.get("content") if isinstance(value, dict) else value
  return names


def _tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer_config.json")
  return _read_json(path) if os.path.isfile(path) else {}


def _wordpiece(directory: str, names: dict):
  """BERT's tokenizer from vocab.txt, built as transformers' BertTokenizer builds it."""
  tk_lib = _tokenizers()
  config = _tokenizer_config(directory)
  with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  tk = tk_lib.Tokenizer(tk_lib.models.WordPiece(vocab, unk_token=names.get("unk") or "[UNK]"))
  tk.normalizer = tk_lib.normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
  tk.pre_tokenizer = tk_lib.pre_tokenizers.BertPreTokenizer()
  tk.decoder = tk_lib.decoders.WordPiece(prefix="##")
  cls, sep = names.get("cls"), names.get("sep")
  if cls in vocab and sep in vocab:  # what add_special_tokens=True adds, for a saved copy
    tk.post_processor = tk_lib.processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  return tk


def _byte_level_bpe(directory: str):
  """GPT-2's tokenizer from vocab.json + merges.txt, as transformers' GPT2Tokenizer builds it."""
  tk_lib = _tokenizers()
  model = tk_lib.models.BPE.from_file(os.path.join(directory, "vocab.json"),
                                      os.path.join(directory, "merges.txt"))
  tk = tk_lib.Tokenizer(model)
  tk.pre_tokenizer = tk_lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tk_lib.decoders.ByteLevel()
  tk.post_processor = tk_lib.processors.ByteLevel(trim_offsets=False)
  return tk


def _from_sentencepiece(model_bytes: bytes, path: str, cls_sep_template: bool):
  """A `tokenizers` Unigram model that tokenizes as the sentencepiece unigram model does: its
  pieces and scores, its precompiled normalizer, whitespace folding and "▁" word marks."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  tk_lib = _tokenizers()
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
    raise errors.UserError(f"tokenizer {path} is a sentencepiece BPE model; only unigram models "
                           "(lmssl's default data.tokenizer_type) convert to tokenizer.json")
  pieces = [(p.piece, p.score) for p in proto.pieces]
  tk = tk_lib.Tokenizer(tk_lib.models.Unigram(pieces, unk_id=proto.trainer_spec.unk_id,
                                              byte_fallback=proto.trainer_spec.byte_fallback))
  norm = proto.normalizer_spec
  steps = [tk_lib.normalizers.Precompiled(norm.precompiled_charsmap)] if (
      norm.precompiled_charsmap) else []
  if norm.remove_extra_whitespaces:
    steps += [tk_lib.normalizers.Strip(left=False, right=True),
              tk_lib.normalizers.Replace(tk_lib.Regex(" {2,}"), _META_SPACE)]
  tk.normalizer = tk_lib.normalizers.Sequence(steps)
  scheme = "always" if norm.add_dummy_prefix else "never"
  tk.pre_tokenizer = tk_lib.pre_tokenizers.Metaspace(replacement=_META_SPACE, prepend_scheme=scheme)
  tk.decoder = tk_lib.decoders.Metaspace(replacement=_META_SPACE, prepend_scheme=scheme)
  if cls_sep_template:
    tk.post_processor = tk_lib.processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tk


def _build(directory: str):
  """(tokenizers.Tokenizer, role -> token string) of a HuggingFace tokenizer directory."""
  configured = _configured_names(directory)

  def has(name):
    return os.path.isfile(os.path.join(directory, name))

  if has("tokenizer.json"):
    tk = _tokenizers().Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    names = {}
    for token in tk.get_added_tokens_decoder().values():
      if token.special:
        names.update(dict.fromkeys(_KNOWN.get(token.content, ()), token.content))
    names.update(configured)
  elif has("vocab.txt"):
    names = dict(_WORDPIECE_DEFAULTS, **configured)
    tk = _wordpiece(directory, names)
  elif has("vocab.json") and has("merges.txt"):
    names = dict(_BYTE_LEVEL_DEFAULTS, **configured)
    tk = _byte_level_bpe(directory)
  else:
    raise errors.UserError(
        f"tokenizer directory {directory} holds no tokenizer.json, vocab.txt (BERT) or "
        f"vocab.json + merges.txt (GPT-2); point --config.data.tokenizer at a HuggingFace "
        f"model directory or a sentencepiece .model")
  return tk, names


def _resolve_roles(names: dict, path: str) -> dict[str, str | None]:
  """Every role's token string, following cls = bos, sep = eos, pad = eos where one is unnamed."""
  full = {role: names.get(role) for role in ROLES}
  full["cls"] = full["cls"] or full["bos"]
  full["bos"] = full["bos"] or full["cls"]
  full["sep"] = full["sep"] or full["eos"]
  full["eos"] = full["eos"] or full["sep"]
  full["pad"] = full["pad"] or full["eos"]
  missing = [role for role in ROLES if role != "mask" and not full[role]]
  if missing:
    raise errors.UserError(
        f"tokenizer {path} names no {'/'.join(missing)} token (found {names}); lmssl needs "
        f"pad, unk, cls or bos and sep or eos: add e.g. \"unk_token\": \"[UNK]\" to its "
        f"tokenizer_config.json")
  return full


class HFTokenizer:
  """A `tokenizers.Tokenizer` with its special ids and per-piece tables (see tokenizer.py)."""

  def __init__(self, tk, names: dict[str, str | None], path: str):
    """`names`: role -> token string as the files name them (saved back by `save`)."""
    tk.no_truncation()
    tk.no_padding()
    self._tk, self.path = tk, path
    self._names = {role: s for role, s in names.items() if s}
    roles = _resolve_roles(self._names, path)
    for role, token in roles.items():
      if token is not None and tk.token_to_id(token) is None:
        raise errors.UserError(
            f"tokenizer {path}: its {role} token {token!r} is not in the vocabulary; fix "
            f"{role}_token in its tokenizer_config.json")
    added = {t.content for t in tk.get_added_tokens_decoder().values()}
    # As transformers does: named special tokens match as wholes, never split into pieces.
    tk.add_special_tokens([_tokenizers().AddedToken(t, special=True, normalized=False)
                           for t in sorted({t for t in roles.values() if t} - added)])
    ids = {role: (None if t is None else tk.token_to_id(t)) for role, t in roles.items()}
    self.pad_id, self.unk_id, self.mask_id = ids["pad"], ids["unk"], ids["mask"]
    self.cls_id, self.sep_id, self.bos_id, self.eos_id = (ids[r] for r in ("cls", "sep", "bos",
                                                                           "eos"))
    self.mask_token = roles["mask"]
    self.vocab_size = max(tk.get_vocab(with_added_tokens=True).values()) + 1
    spec = json.loads(tk.to_str())
    decoder = (spec.get("decoder") or {}).get("type")
    self._kind = ("wordpiece" if spec["model"]["type"] == "WordPiece" else
                  {"ByteLevel": "byte_level", "Metaspace": "metaspace"}.get(decoder))
    self._wordpiece = self._kind == "wordpiece"
    if self._kind is None:
      raise errors.UserError(
          f"tokenizer {path} is a {spec['model']['type']} tokenizer with {decoder} decoding; "
          "lmssl reads WordPiece (BERT), byte-level BPE (GPT-2) and sentencepiece-style "
          "(Metaspace) tokenizers")
    self._pieces = [tk.id_to_token(i) or "" for i in range(self.vocab_size)]
    self.special = self._special(ids.values())
    self.word_start = self._word_start()
    self.fingerprint = (tk.to_str() + json.dumps(ids, sort_keys=True)).encode("utf-8")

  @classmethod
  def load(cls, path: str) -> "HFTokenizer":
    """A HuggingFace tokenizer directory, or the tokenizer.json in one."""
    is_file = os.path.basename(path) == "tokenizer.json"
    directory = (os.path.dirname(path) or ".") if is_file else path
    if not os.path.isdir(directory) or not os.path.exists(path):
      raise errors.UserError(
          f"tokenizer {path} does not exist; point --config.data.tokenizer at a HuggingFace "
          f"tokenizer directory (tokenizer.json, or vocab.txt, or vocab.json + merges.txt)")
    try:
      tk, names = _build(directory)
    except Exception as e:  # the tokenizers library raises its own Exception subclasses
      if isinstance(e, errors.UserError):
        raise
      raise errors.UserError(f"tokenizer {path} cannot be read ({type(e).__name__}: {e}); "
                             f"point --config.data.tokenizer at a valid HuggingFace tokenizer "
                             f"directory") from e
    return cls(tk, names, path)

  @classmethod
  def from_sentencepiece(cls, model_bytes: bytes, path: str,
                         cls_sep_template: bool = False) -> "HFTokenizer":
    """An lmssl sentencepiece (unigram) tokenizer as a HuggingFace one with the same ids, for
    export; `cls_sep_template` makes transformers add [CLS] ... [SEP] as BERT inputs have."""
    names = dict(_WORDPIECE_DEFAULTS)
    return cls(_from_sentencepiece(model_bytes, path, cls_sep_template), names, path)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json and its special token names, loadable by `load` and by
    transformers' AutoTokenizer."""
    os.makedirs(directory, exist_ok=True)
    self._tk.save(os.path.join(directory, "tokenizer.json"))
    tokens = {f"{role}_token": token for role, token in self._names.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # encode_batch_fast skips offsets; tokenizers before 0.20.1 lack it.
    encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_with_masks(self, text: str) -> list[int]:
    """Encodes `text` with each literal "[MASK]" (or the tokenizer's mask token) as mask_id."""
    if self.mask_id is None:
      raise errors.UserError(f"tokenizer {self.path} has no mask token, so it cannot fill in "
                             f"[MASK]; use a masked-LM model and its tokenizer")
    return self.encode(text.replace("[MASK]", self.mask_token))

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  def piece_bytes(self) -> np.ndarray:
    """int32[vocab_size]: UTF-8 bytes of text each id stands for, for bits-per-byte.

    Byte-level: one byte per character of the piece ("Ġ" is the space). WordPiece: the piece
    without "##", plus the space before it when it starts a word. Metaspace: the piece with "▁"
    as a space, a byte-fallback piece ("<0x41>") one byte. Special ids count none.
    """
    if self._wordpiece:
      sizes = [len(p[2:].encode("utf-8")) if p.startswith("##") else len(p.encode("utf-8")) + 1
               for p in self._pieces]
    elif self._kind == "metaspace":
      sizes = [1 if _BYTE_PIECE.fullmatch(p) else len(p.replace(_META_SPACE, " ").encode("utf-8"))
               for p in self._pieces]
    else:
      alphabet = set(_tokenizers().pre_tokenizers.ByteLevel.alphabet())
      sizes = [sum(1 if c in alphabet else len(c.encode("utf-8")) for c in p)
               for p in self._pieces]
    return np.where(self.special, 0, np.array(sizes, dtype=np.int32)).astype(np.int32)

  def _special(self, role_ids: Iterable[int | None]) -> np.ndarray:
    """bool[vocab_size]: the role ids, added special tokens and (WordPiece) bracketed pieces."""
    special = np.zeros(self.vocab_size, dtype=bool)
    special[[i for i in role_ids if i is not None]] = True
    special[[i for i, t in self._tk.get_added_tokens_decoder().items() if t.special]] = True
    if self._wordpiece:
      special |= np.array([bool(_BRACKETED.fullmatch(p)) for p in self._pieces], dtype=bool)
    special |= np.array([not p for p in self._pieces], dtype=bool)  # holes in the id range
    return special

  def _word_start(self) -> np.ndarray:
    """bool[vocab_size]: WordPiece pieces without "##", byte-level pieces after a space ("Ġ"),
    Metaspace pieces starting with "▁"; special ids count as word starts, as in
    tokenizer.Tokenizer."""
    if self._wordpiece:
      starts = [not p.startswith("##") for p in self._pieces]
    else:
      space = _META_SPACE if self._kind == "metaspace" else _BYTE_SPACE
      starts = [p.startswith(space) for p in self._pieces]
    return np.array(starts, dtype=bool) | self.special


AnyTokenizer = sp_tokenizer.Tokenizer | HFTokenizer


def load(path: str) -> AnyTokenizer:
  """The tokenizer at `path`: a sentencepiece `.model` file, or a HuggingFace tokenizer
  directory (tokenizer.json, BERT's vocab.txt or GPT-2's vocab.json + merges.txt) or its
  tokenizer.json."""
  if files.at(path).is_dir() or os.path.basename(path) == "tokenizer.json":
    return HFTokenizer.load(path)
  return sp_tokenizer.Tokenizer.load(path)

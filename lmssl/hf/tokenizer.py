"""HuggingFace tokenizers behind lmssl's tokenizer interface, and `load` of any tokenizer by path.

A directory loads through transformers' AutoTokenizer, so lmssl tokenizes exactly as
transformers does: tokenizer.json when present, else BERT's vocab.txt, GPT-2's vocab.json +
merges.txt, or a sentencepiece tokenizer.model (Llama) or spiece.model (T5). A folder that
names no tokenizer class (no tokenizer_class in tokenizer_config.json, no config.json) loads
by its files: BertTokenizer, GPT2Tokenizer, or tokenizer.json alone. Special ids keep the
original's values; a role transformers leaves unnamed follows BERT/GPT-2 conventions: cls =
bos, sep = eos, pad = eos; unk (byte-level BPE needs none) and mask may be absent (None).
The adapter only adds what lmssl needs on top: those roles, and per-piece tables (special,
word_start, piece_bytes) read off the fast tokenizer's pipeline.

The `hf` extra (transformers, tokenizers) is imported only when a HuggingFace tokenizer is
built, so lmssl loads sentencepiece `.model` files without it.
"""

import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lmssl import errors
from lmssl import files
from lmssl.data import tokenizer as sp_tokenizer
from lmssl.hf import extra as hf_extra

ROLES = ("pad", "unk", "cls", "sep", "bos", "eos", "mask")
# Roles of well-known special tokens, for a tokenizer.json that comes without config files.
_KNOWN = {"[PAD]": ("pad",), "[UNK]": ("unk",), "[CLS]": ("cls",), "[SEP]": ("sep",),
          "[MASK]": ("mask",), "<|endoftext|>": ("bos", "eos", "unk")}
# The transformers class of a folder that names none, by the files it holds.
_CLASS_BY_FILE = (("tokenizer.json", "AutoTokenizer"), ("vocab.txt", "BertTokenizer"),
                  ("vocab.json", "GPT2Tokenizer"), ("tokenizer.model", "LlamaTokenizer"),
                  ("spiece.model", "T5Tokenizer"))
_BYTE_SPACE = "\u0120"  # "Ġ": the byte-level alphabet's stand-in for a space
_META_SPACE = "\u2581"  # "▁": sentencepiece's mark of a preceding space
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece byte fallback
# "[unused0]", "[CLS]": BERT's pre-tokenizer splits off every "[", so text never yields these.
_BRACKETED = re.compile(r"\[[^\[\]]+\]")


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"tokenizer file {path} cannot be read as JSON ({e}); fix or "
                           f"remove it") from None


def _from_directory(directory: str):
  """transformers' fast tokenizer for `directory`, as AutoTokenizer picks it."""
  def has(name):
    return os.path.isfile(os.path.join(directory, name))

  found = [(f, c) for f, c in _CLASS_BY_FILE
           if has(f) and (f != "vocab.json" or has("merges.txt"))]
  if not found:
    raise errors.UserError(
        f"tokenizer directory {directory} holds no tokenizer.json, vocab.txt (BERT), "
        f"vocab.json + merges.txt (GPT-2) or tokenizer.model / spiece.model (sentencepiece); "
        f"point --config.data.tokenizer at a HuggingFace model directory or a sentencepiece "
        f".model")
  config = (_read_json(os.path.join(directory, "tokenizer_config.json"))
            if has("tokenizer_config.json") else {})
  named = "tokenizer_class" in config or has("config.json")
  hf_extra.load("tokenizers")  # under transformers' fast tokenizers, whose pipeline lmssl reads
  transformers = hf_extra.load("transformers")
  cls = getattr(transformers, "AutoTokenizer" if named else found[0][1])
  tk = cls.from_pretrained(directory)
  if not tk.is_fast:
    raise errors.UserError(f"tokenizer {directory} loads as transformers' slow "
                           f"{type(tk).__name__}; lmssl reads tokenizers with a fast "
                           "(tokenizer.json) form: save it with its fast class")
  return tk


def _file_tokens(directory: str, backend) -> set[str]:
  """Tokens the files themselves hold: the model's vocabulary and tokenizer.json's added
  tokens (not those transformers adds for a special token the vocabulary lacks)."""
  tokens = set(backend.get_vocab(with_added_tokens=False))
  path = os.path.join(directory, "tokenizer.json")
  if os.path.isfile(path):
    tokens |= {t["content"] for t in _read_json(path).get("added_tokens", [])}
  return tokens


def _resolve_roles(names: dict, path: str) -> dict[str, str | None]:
  """Every role's token string, following cls = bos, sep = eos, pad = eos where one is unnamed.
  unk and mask may be absent (None): byte-level BPE (GPT-2, Llama 3) spells any text without
  an unknown token, and only MLM needs a mask."""
  full = {role: names.get(role) for role in ROLES}
  full["cls"] = full["cls"] or full["bos"]
  full["bos"] = full["bos"] or full["cls"]
  full["sep"] = full["sep"] or full["eos"]
  full["eos"] = full["eos"] or full["sep"]
  full["pad"] = full["pad"] or full["eos"]
  missing = [role for role in ROLES if role not in ("unk", "mask") and not full[role]]
  if missing:
    raise errors.UserError(
        f"tokenizer {path} names no {'/'.join(missing)} token (found {names}); lmssl needs "
        f"cls or bos, and sep or eos: add e.g. \"eos_token\": \"</s>\" to its "
        f"tokenizer_config.json")
  return full


def _kind(spec: dict) -> str | None:
  """How pieces spell text: "wordpiece" ("##" continues a word), "byte_level" ("Ġ" is a
  space) or "metaspace" ("▁" is a space, as sentencepiece writes it)."""
  if spec["model"]["type"] == "WordPiece":
    return "wordpiece"
  pipeline = json.dumps([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")],
                        ensure_ascii=False)
  if '"ByteLevel"' in pipeline:
    return "byte_level"
  return "metaspace" if _META_SPACE in pipeline else None


def _sentencepiece_proto():
  """The generated code of sentencepiece's model proto: sentencepiece's own, or, where it needs
  a newer protobuf than is installed (the beam extra holds protobuf below 7), the copy
  transformers ships of the same proto."""
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    return sentencepiece_model_pb2
  except Exception:  # protobuf's VersionError, or an older sentencepiece without the module
    from transformers.utils import sentencepiece_model_pb2_new  # pylint: disable=g-import-not-at-top
    return sentencepiece_model_pb2_new


def _from_sentencepiece(model_bytes: bytes, path: str, cls_sep_template: bool):
  """A `tokenizers` Unigram model that tokenizes as the sentencepiece unigram model does: its
  pieces and scores, its precompiled normalizer, whitespace folding and "▁" word marks."""
  tk_lib = hf_extra.load("tokenizers")
  proto = _sentencepiece_proto().ModelProto()
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


class HFTokenizer:
  """A transformers fast tokenizer with lmssl's special ids and per-piece tables (see
  lmssl/data/tokenizer.py for the interface)."""

  def __init__(self, tk, path: str, file_tokens: set[str] | None = None):
    """`file_tokens`: the tokens the files hold, when transformers may have added others."""
    self._hf, self.path = tk, path
    backend = tk.backend_tokenizer
    names = {}
    for token in tk.added_tokens_decoder.values():
      if token.special:
        names.update(dict.fromkeys(_KNOWN.get(token.content, ()), token.content))
    names.update({r: getattr(tk, f"{r}_token") for r in ROLES if getattr(tk, f"{r}_token")})
    self._names = names
    roles = _resolve_roles(names, path)
    known = file_tokens if file_tokens is not None else set(tk.get_vocab())
    for role, token in roles.items():
      if token is not None and token not in known:
        raise errors.UserError(
            f"tokenizer {path}: its {role} token {token!r} is not in the vocabulary; fix "
            f"{role}_token in its tokenizer_config.json")
    ids = {role: (None if t is None else backend.token_to_id(t)) for role, t in roles.items()}
    self.pad_id, self.unk_id, self.mask_id = ids["pad"], ids["unk"], ids["mask"]
    self.cls_id, self.sep_id, self.bos_id, self.eos_id = (ids[r] for r in ("cls", "sep", "bos",
                                                                           "eos"))
    self.mask_token = roles["mask"]
    self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    spec = json.loads(backend.to_str())
    self._kind = _kind(spec)
    self._wordpiece = self._kind == "wordpiece"
    if self._kind is None:
      raise errors.UserError(
          f"tokenizer {path} is a {spec['model']['type']} tokenizer whose pieces mark spaces "
          "neither as WordPiece, byte-level nor sentencepiece (\u2581) ones do; lmssl reads "
          "WordPiece (BERT), byte-level BPE (GPT-2) and sentencepiece-style tokenizers")
    self._pieces = [backend.id_to_token(i) or "" for i in range(self.vocab_size)]
    self.special = self._special(ids.values())
    self.word_start = self._word_start()
    self.fingerprint = (backend.to_str() + json.dumps(ids, sort_keys=True)).encode("utf-8")

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
      tk = _from_directory(directory)
      return cls(tk, path, _file_tokens(directory, tk.backend_tokenizer))
    except Exception as e:  # transformers and tokenizers raise their own Exception subclasses
      if isinstance(e, errors.UserError):
        raise
      raise errors.UserError(f"tokenizer {path} cannot be read ({type(e).__name__}: {e}); "
                             f"point --config.data.tokenizer at a valid HuggingFace tokenizer "
                             f"directory") from e

  @classmethod
  def from_sentencepiece(cls, model_bytes: bytes, path: str,
                         cls_sep_template: bool = False) -> "HFTokenizer":
    """An lmssl sentencepiece (unigram) tokenizer as a HuggingFace one with the same ids, for
    export; `cls_sep_template` makes transformers add [CLS] ... [SEP] as BERT inputs have."""
    tk = _from_sentencepiece(model_bytes, path, cls_sep_template)
    roles = dict(zip(("pad", "unk", "cls", "sep", "mask"), sp_tokenizer.RESERVED_PIECES))
    fast = hf_extra.load("transformers").PreTrainedTokenizerFast(
        tokenizer_object=tk, **{f"{r}_token": t for r, t in roles.items()})
    return cls(fast, path)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json and its special token names, loadable by `load` and by
    transformers' AutoTokenizer."""
    os.makedirs(directory, exist_ok=True)
    self._hf.backend_tokenizer.save(os.path.join(directory, "tokenizer.json"))
    tokens = {f"{role}_token": token for role, token in self._names.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # verbose=False: documents longer than the model's max length are fine when packing.
    return self._hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

  def decode(self, ids: Iterable[int]) -> str:
    return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

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
      alphabet = set(hf_extra.load("tokenizers").pre_tokenizers.ByteLevel.alphabet())
      sizes = [sum(1 if c in alphabet else len(c.encode("utf-8")) for c in p)
               for p in self._pieces]
    return np.where(self.special, 0, np.array(sizes, dtype=np.int32)).astype(np.int32)

  def _special(self, role_ids: Iterable[int | None]) -> np.ndarray:
    """bool[vocab_size]: the role ids, added special tokens and (WordPiece) bracketed pieces."""
    special = np.zeros(self.vocab_size, dtype=bool)
    special[[i for i in role_ids if i is not None]] = True
    special[[i for i, t in self._hf.added_tokens_decoder.items() if t.special]] = True
    if self._wordpiece:
      special |= np.array([bool(_BRACKETED.fullmatch(p)) for p in self._pieces], dtype=bool)
    special |= np.array([not p for p in self._pieces], dtype=bool)  # holes in the id range
    return special

  def _word_start(self) -> np.ndarray:
    """bool[vocab_size]: WordPiece pieces without "##", byte-level pieces after a space ("Ġ"),
    Metaspace pieces starting with "▁"; special ids count as word starts, as in
    lmssl.data.tokenizer.Tokenizer."""
    if self._wordpiece:
      starts = [not p.startswith("##") for p in self._pieces]
    else:
      space = _META_SPACE if self._kind == "metaspace" else _BYTE_SPACE
      starts = [p.startswith(space) for p in self._pieces]
    return np.array(starts, dtype=bool) | self.special


AnyTokenizer = sp_tokenizer.Tokenizer | HFTokenizer


def load(path: str) -> AnyTokenizer:
  """The tokenizer at `path`: a sentencepiece `.model` file, or a HuggingFace tokenizer
  directory (tokenizer.json, BERT's vocab.txt, GPT-2's vocab.json + merges.txt, or a
  sentencepiece tokenizer.model) or its tokenizer.json."""
  if files.at(path).is_dir() or os.path.basename(path) == "tokenizer.json":
    return HFTokenizer.load(path)
  return sp_tokenizer.Tokenizer.load(path)


def load_of_run(path: str, workdir: str) -> AnyTokenizer:
  """The tokenizer at `path` that the run in `workdir` was trained with. Missing or damaged, it
  is named as that run's, with one fix for every command that reads the run (a resumed train,
  eval, sample): none can go on with another tokenizer, so no setting is the way out."""
  try:
    return load(path)
  except errors.UserError as e:
    why = "is missing" if not files.at(path).exists() else f"cannot be read ({_cause(e)})"
    raise errors.UserError(
        f"tokenizer {path}, which the run in {workdir} was trained with, {why}; restore it from "
        "a copy (the run cannot go on with another tokenizer), or start over in a new "
        "--workdir") from None


def _cause(e: BaseException) -> str:
  """What the tokenizer library itself said, first line: sentencepiece's parse error."""
  if e.__cause__ is not None:
    return (str(e.__cause__).strip().splitlines() or [type(e.__cause__).__name__])[0]
  return str(e).split("; ")[0]  # its own words, less the fix it gives for a setting

"""lmssl's own SentencePiece tokenizers (trained here, or a `.model` file), and the interface
every tokenizer lmssl uses has.

A tokenizer lmssl trains has five reserved ids at the front of its vocabulary:

  0 [PAD]   1 [UNK]   2 [CLS] (= BOS)   3 [SEP] (= EOS)   4 [MASK]

An imported HuggingFace tokenizer (lmssl/hf/tokenizer.py) keeps its original's ids, so code
outside this module reads special ids from the tokenizer object, never these constants. Both
kinds have (`AnyTokenizer`)
  path, vocab_size, pad_id, unk_id, cls_id, sep_id, bos_id, eos_id, mask_id (None: no mask
  token); special (bool[vocab]: ids text does not produce, never masked nor drawn as random
  replacements); word_start (bool[vocab]); fingerprint (bytes naming its behaviour, for cache
  keys); encode, encode_batch (neither adds special tokens), decode, encode_with_masks,
  piece_bytes and id_to_piece.
[CLS]/[SEP] double as BOS/EOS: a packed document is `[CLS] ids [SEP]` for both objectives.
Data code takes tokenizer objects; loading one by path, which may be a HuggingFace folder, is
lmssl.hf.tokenizer.load's job (above this package), so lmssl/data never imports lmssl/hf.
"""

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

from lmssl import errors
from lmssl import files

PAD_ID = 0
UNK_ID = 1
CLS_ID = BOS_ID = 2
SEP_ID = EOS_ID = 3
MASK_ID = 4
NUM_RESERVED = 5
RESERVED_PIECES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Below this a vocabulary is little more than the reserved ids and single characters.
MIN_VOCAB_SIZE = NUM_RESERVED + 59
MODEL_TYPES = ("unigram", "bpe")
# SentencePiece skips longer "sentences" during training; we cut lines to stay under it.
_MAX_SENTENCE_BYTES = 4096


def _sentences(docs: Iterable[str]) -> Iterator[str]:
  """Non-empty lines of every document, cut to at most _MAX_SENTENCE_BYTES-ish chunks."""
  for doc in docs:
    for line in doc.splitlines():
      line = line.strip()
      # A character is at most 4 UTF-8 bytes, so 1000-char chunks always fit.
      for start in range(0, len(line), 1000):
        yield line[start:start + 1000]


def train(docs: Iterable[str], path: str, vocab_size: int, model_type: str,
          max_sentences: int) -> None:
  """Trains a SentencePiece model on `docs` and writes it to `path` atomically.

  Deterministic for given inputs: the first `max_sentences` lines are used in order (no
  sampling), and sentencepiece's training is otherwise seedless.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise errors.UserError(
        f"tokenizer vocab_size {vocab_size} is below the minimum {MIN_VOCAB_SIZE} "
        f"({NUM_RESERVED} reserved ids plus pieces); set --config.data.vocab_size to at least "
        f"{MIN_VOCAB_SIZE} (8000 is a good default)")
  if model_type not in MODEL_TYPES:
    raise errors.UserError(f"unknown tokenizer_type {model_type!r}; known: {list(MODEL_TYPES)}")
  buffer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(docs), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"], input_sentence_size=max_sentences,
        shuffle_input_sentence=False, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    # The common case is a corpus too small for the requested vocabulary.
    raise errors.UserError(
        f"training a {model_type} tokenizer with vocab_size {vocab_size} failed: {e}; "
        f"use more text or a smaller --config.data.vocab_size") from e
  data = buffer.getvalue()
  _check_reserved(spm.SentencePieceProcessor(model_proto=data), path)
  files.write_atomically(path, data)


def _check_reserved(sp: spm.SentencePieceProcessor, path: str) -> None:
  found = {"[PAD]": sp.pad_id(), "[UNK]": sp.unk_id(), "[CLS]": sp.bos_id(),
           "[SEP]": sp.eos_id(), "[MASK]": sp.piece_to_id("[MASK]")}
  for want_id, piece in enumerate(RESERVED_PIECES):
    if found[piece] != want_id or (piece == "[MASK]" and sp.id_to_piece(want_id) != piece):
      raise errors.UserError(
          f"tokenizer {path}: {piece} has id {found[piece]}, but lmssl needs ids "
          f"{dict(zip(RESERVED_PIECES, range(NUM_RESERVED)))}; train one with "
          f"lmssl.data.tokenizer.train (leave --config.data.tokenizer empty to do so)")


class Tokenizer:
  """A loaded SentencePiece model with lmssl's reserved ids."""

  pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
  bos_id, eos_id = BOS_ID, EOS_ID

  def __init__(self, model_bytes: bytes, path: str = "<bytes>"):
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as e:
      raise errors.UserError(f"tokenizer {path} is not a valid sentencepiece .model ({e}); "
                       f"point --config.data.tokenizer at a .model file or a HuggingFace "
                       f"tokenizer directory, or leave it empty to train one") from e
    _check_reserved(self.sp, path)
    self.path = path
    self.threads = os.cpu_count() or 1  # for encode_batch; a prepare worker uses one
    self.model_bytes = model_bytes
    self.fingerprint = model_bytes  # prepared-data cache keys hash exactly these bytes
    self.special = np.arange(self.vocab_size) < NUM_RESERVED
    self.word_start = self._word_start()

  def __reduce__(self):  # to prepare workers: the model's bytes, not the C++ processor
    return (Tokenizer, (self.model_bytes, self.path))

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not files.at(path).is_file():
      raise errors.UserError(
          f"tokenizer file {path} does not exist; point --config.data.tokenizer at a "
          f"sentencepiece .model (or a HuggingFace tokenizer directory), or leave it empty to "
          f"train one")
    return cls(files.at(path).read_bytes(), path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # One call for many texts runs in C++ threads; far faster than a Python loop.
    return self.sp.encode(list(texts), out_type=int, num_threads=self.threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def encode_with_masks(self, text: str) -> list[int]:
    """Encodes `text` with each literal "[MASK]" as MASK_ID (for fill-mask queries)."""
    ids = []
    for i, part in enumerate(text.split("[MASK]")):
      if i:
        ids.append(MASK_ID)
      ids.extend(self.encode(part.strip()) if part.strip() else [])
    return ids

  def piece_bytes(self) -> np.ndarray:
    """int32[vocab_size]: UTF-8 bytes of text each id stands for, for bits-per-byte.

    "▁" counts as the space it marks, a byte-fallback piece as one byte, and reserved
    ids as none.
    """
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(NUM_RESERVED, self.vocab_size):
      piece = self.sp.id_to_piece(i)
      byte = self.sp.is_byte(i)
      out[i] = 1 if byte else len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def _word_start(self) -> np.ndarray:
    """bool[vocab_size]: True where a piece begins a word.

    A piece begins a word when it starts with "▁" (SentencePiece's marker for a preceding
    space). Reserved ids also count as word starts so a special token is never glued onto
    the word before or after it by whole-word masking.
    """
    pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
    starts = np.array([p.startswith("\u2581") for p in pieces], dtype=bool)
    starts[:NUM_RESERVED] = True
    return starts


class AnyTokenizer(Protocol):
  """What data code may use of a tokenizer: `Tokenizer` here, or lmssl.hf.tokenizer's
  HFTokenizer (see the module docstring)."""

  path: str
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  bos_id: int
  eos_id: int
  mask_id: int | None
  special: np.ndarray
  word_start: np.ndarray
  fingerprint: bytes

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def encode_with_masks(self, text: str) -> list[int]: ...
  def piece_bytes(self) -> np.ndarray: ...
  def id_to_piece(self, i: int) -> str: ...

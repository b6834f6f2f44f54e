"""Sentence pairs for next-sentence (BERT "nsp") and sentence-order (ALBERT "sop") prediction.

Prepare time (numpy, deterministic): each document is cut into sentences, the sentences are
grouped into chunks of about seq_len - 3 tokens and each chunk is split into a first part A and
the rest B, as BERT's create_pretraining_data does. Only these original pairs are stored, per
split: `a_ids`, `b_ids` int32 [N, M] (zero-padded, M = seq_len - 3), `a_len`, `b_len`, `doc`
int32 [N].

Train time (tf.data, pair_rows.py): global row g becomes `[CLS] A [SEP] B [SEP]`, a negative
with probability 1/2 drawn from (seed, g). So the same prepared rows serve both objectives, and
every epoch sees fresh negatives. This module stays free of TensorFlow: prepare's worker
processes import it.
"""

import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from lmssl import errors

KINDS = ("nsp", "sop")
ARRAYS = ("a_ids", "a_len", "b_ids", "b_len", "doc")
NUM_SPECIAL = 3  # [CLS] A [SEP] B [SEP]
# Bump when the pair building changes: it is part of the prepared cache key.
VERSION = 1
# Folded into the (seed, g) key so negatives never share randomness with mask_row, which
# splits (seed, g) itself, or with the shuffle (a different cipher keyed by three words).
# "end." / "end!" / "end?" followed by whitespace. Deliberately simple: abbreviations such as
# "H. americanus" also end a sentence, which only moves a possible A/B boundary.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Ids = Sequence[int]


def _check_kind(sentence_pair: str) -> None:
  if sentence_pair not in ("",) + KINDS:
    raise errors.UserError(f"--config.data.sentence_pair={sentence_pair!r} is not known; use "
                           f"'' (none), 'nsp' or 'sop'")


def check_settings(sentence_pair: str, short_seq_prob: float, seq_len: int) -> None:
  """Fails, naming the flag, on pair settings prepare cannot build from."""
  _check_kind(sentence_pair)
  if not 0.0 <= short_seq_prob <= 1.0:
    raise errors.UserError(f"--config.data.short_seq_prob={short_seq_prob} must be in [0, 1]")
  if sentence_pair and seq_len < NUM_SPECIAL + 2:
    raise errors.UserError(f"--config.data.seq_len={seq_len} leaves no room for a sentence pair "
                           f"([CLS] A [SEP] B [SEP]); use at least {NUM_SPECIAL + 2}")


def split_sentences(doc: str) -> list[str]:
  """A document's non-empty lines when it has several, else its text cut at sentence ends."""
  lines = [line.strip() for line in doc.splitlines() if line.strip()]
  if len(lines) > 1:
    return lines
  return [s for s in _SENTENCE_END.split(doc.strip()) if s]


def truncate_lengths(a_len: int, b_len: int, max_tokens: int) -> tuple[int, int]:
  """Lengths after BERT's longest-first truncation (a token off the longer side, B on ties).

  Closed form of that loop: the shorter side survives whole when it fits in half, else the two
  end up splitting max_tokens, A taking the odd token.
  """
  if a_len + b_len <= max_tokens:
    return a_len, b_len
  if 2 * min(a_len, b_len) <= max_tokens:
    return (max_tokens - b_len, b_len) if a_len > b_len else (a_len, max_tokens - a_len)
  return (max_tokens + 1) // 2, max_tokens // 2


def _split_chunk(chunk: list[Ids], rng: np.random.Generator) -> tuple[list, list] | None:
  """(A, B) at a random sentence boundary; a lone sentence splits at a random token."""
  if len(chunk) == 1:
    chunk = [[t] for t in chunk[0]]
    if len(chunk) < 2:
      return None
  cut = int(rng.integers(1, len(chunk)))
  return [t for s in chunk[:cut] for t in s], [t for s in chunk[cut:] for t in s]


def document_pairs(sentences: Sequence[Ids], max_tokens: int, short_seq_prob: float,
                   rng: np.random.Generator) -> Iterator[tuple[list, list]]:
  """(A, B) token lists of one document, truncated to max_tokens together.

  Sentences accumulate into a chunk until it holds the target length or the document ends. The
  target is max_tokens, or with probability short_seq_prob uniform in [2, max_tokens]; it is
  drawn per chunk (BERT draws once per document), so short_seq_prob is the share of rows.
  """
  def draw_target():
    short = rng.random() < short_seq_prob
    return int(rng.integers(2, max_tokens + 1)) if short else max_tokens

  sentences = [s for s in sentences if len(s)]
  chunk, length, target = [], 0, draw_target()
  for i, sentence in enumerate(sentences):
    chunk.append(sentence)
    length += len(sentence)
    if length < target and i < len(sentences) - 1:
      continue
    pair = _split_chunk(chunk, rng)
    if pair is not None:
      a_len, b_len = truncate_lengths(len(pair[0]), len(pair[1]), max_tokens)
      yield pair[0][:a_len], pair[1][:b_len]
    chunk, length, target = [], 0, draw_target()


def build_pairs(doc_sentences: Sequence[Sequence[Ids]], seq_len: int, short_seq_prob: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The stored arrays (see the module docstring) for documents given as token-id sentences."""
  max_tokens = seq_len - NUM_SPECIAL
  docs, a_parts, b_parts = [], [], []
  for d, sentences in enumerate(doc_sentences):
    for a, b in document_pairs(sentences, max_tokens, short_seq_prob, rng):
      docs.append(d)
      a_parts.append(a)
      b_parts.append(b)
  out = dict(doc=np.asarray(docs, dtype=np.int32).reshape(-1))
  for name, parts in (("a", a_parts), ("b", b_parts)):
    lens = np.asarray([len(p) for p in parts], dtype=np.int32).reshape(-1)
    ids = np.zeros((len(parts), max_tokens), dtype=np.int32)
    # Boolean assignment fills row-major, i.e. each row's first `len` slots in turn.
    ids[np.arange(max_tokens) < lens[:, None]] = np.fromiter(
        (t for p in parts for t in p), dtype=np.int32, count=int(lens.sum()))
    out[f"{name}_ids"], out[f"{name}_len"] = ids, lens
  return out


def prepare_split(docs: Sequence[str], encode: Callable[[list[str]], list[list[int]]],
                  seq_len: int, short_seq_prob: float,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
  """Pair arrays of one split and its number of document tokens; `encode` tokenizes texts."""
  sentences = [split_sentences(doc) for doc in docs]
  ids = encode([s for doc in sentences for s in doc])
  ends = np.cumsum([len(doc) for doc in sentences])
  doc_sentences = [ids[end - len(doc):end] for doc, end in zip(sentences, ends)]
  return (build_pairs(doc_sentences, seq_len, short_seq_prob, rng),
          int(sum(map(len, ids))))


def is_pair_arrays(arrays) -> bool:
  return "a_ids" in arrays


def check_arrays(arrays, sentence_pair: str) -> bool:
  """Whether `arrays` are pair arrays; a UserError when they do not fit `sentence_pair`."""
  _check_kind(sentence_pair)
  if is_pair_arrays(arrays) and not sentence_pair:
    raise errors.UserError(
        "the prepared data holds sentence pairs, but --config.data.sentence_pair is empty; set "
        "it to 'nsp' or 'sop', or prepare packed data with it empty")
  if not is_pair_arrays(arrays) and sentence_pair:
    raise errors.UserError(
        f"--config.data.sentence_pair={sentence_pair!r} needs data prepared as sentence pairs, "
        f"but these are packed rows; prepare with the same --config.data.sentence_pair (its "
        f"cache entry differs) or set it to ''")
  return is_pair_arrays(arrays)

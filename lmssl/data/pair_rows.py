"""Sentence-pair rows at train time (tf.data): prepared pairs (pairs.py) laid out as
`[CLS] A [SEP] B [SEP]`, half of them negatives drawn per (seed, global row)."""

from collections.abc import Callable

import tensorflow as tf

from lmssl import errors
from lmssl.data import pairs
from lmssl.data import tokenizer as tok

_PAIR_STREAM = 0x5A125
NUM_SPECIAL = pairs.NUM_SPECIAL


def _negative_draws(seed: int, g, num_rows: int):
  """(is negative, random partner row) of global row g, from its own stream of (seed, g)."""
  key = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.constant(seed, tf.int64), tf.cast(g, tf.int64)]),
      tf.constant(_PAIR_STREAM, tf.int64))
  coin_key, partner_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  negative = tf.random.stateless_uniform([], coin_key) < 0.5
  partner = tf.random.stateless_uniform([], partner_key, minval=0, maxval=num_rows,
                                        dtype=tf.int64)
  return negative, partner


def layout_row(first_M, first_len, second_M, second_len, tokenizer: tok.AnyTokenizer):
  """`[CLS] first [SEP] second [SEP]` + padding, with its segment ids, positions and types.

  [CLS], [SEP] and padding are the tokenizer's cls_id, sep_id and pad_id.
  """
  max_tokens = first_M.shape[0]
  length = max_tokens + NUM_SPECIAL
  j_L = tf.range(length)
  n = first_len + second_len + NUM_SPECIAL
  from_first_L = tf.gather(first_M, tf.clip_by_value(j_L - 1, 0, max_tokens - 1))
  from_second_L = tf.gather(second_M, tf.clip_by_value(j_L - first_len - 2, 0, max_tokens - 1))
  is_sep_L = (j_L == first_len + 1) | (j_L == n - 1)
  ids_L = tf.where(j_L <= first_len, from_first_L, from_second_L)
  ids_L = tf.where(is_sep_L, tokenizer.sep_id, tf.where(j_L == 0, tokenizer.cls_id, ids_L))
  real_L = j_L < n
  return dict(input_ids=tf.where(real_L, ids_L, tokenizer.pad_id),
              segment_ids=tf.cast(real_L, tf.int32),
              positions=tf.where(real_L, j_L, 0),
              token_types=tf.cast(real_L & (j_L > first_len + 1), tf.int32))


def row_builder(tables: dict, *, kind: str, seed: int, tokenizer: tok.AnyTokenizer) -> Callable:
  """A tf function (features of one stored row, g) -> the model's features for global row g.

  Rows are laid out by `layout_row` with the tokenizer's special ids.

  Negatives (pair_labels 1): "sop" swaps A and B; "nsp" keeps A and takes the B of a random
  row r of the split, or of row r + 1 when r comes from the same document. Row r + 1 can
  still be of that document (and a document can repeat in another part of the corpus), so a
  few nsp negatives are in fact related text, as in BERT.
  """
  if kind not in pairs.KINDS:
    raise errors.UserError(f"--config.data.sentence_pair={kind!r}: pair rows need 'nsp' or 'sop'")
  num_rows = tables["a_ids"].shape[0]
  max_tokens = tables["a_ids"].shape[1]

  def build(features, g):
    a_M, a_len = features["a_ids"], features["a_len"]
    b_M, b_len = features["b_ids"], features["b_len"]
    negative, r = _negative_draws(seed, g, num_rows)
    if kind == "sop":
      first_M, first_len = tf.where(negative, b_M, a_M), tf.where(negative, b_len, a_len)
      second_M, second_len = tf.where(negative, a_M, b_M), tf.where(negative, a_len, b_len)
    else:
      r = tf.where(tf.gather(tables["doc"], r) == features["doc"], (r + 1) % num_rows, r)
      # Cut to the room A leaves; layout_row reads no further than the length.
      other_len = tf.minimum(tf.gather(tables["b_len"], r), max_tokens - a_len)
      first_M, first_len = a_M, a_len
      second_M = tf.where(negative, tf.gather(tables["b_ids"], r), b_M)
      second_len = tf.where(negative, other_len, b_len)
    out = layout_row(first_M, first_len, second_M, second_len, tokenizer)
    out = {k: tf.ensure_shape(v, [max_tokens + NUM_SPECIAL]) for k, v in out.items()}
    out["pair_labels"] = tf.cast(negative, tf.int32)
    return out

  return build

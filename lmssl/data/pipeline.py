"""The tf.data input pipeline: per-host batches whose content is a pure function of (seed, step).

Row r of the global batch at step s is global row g = s * global_batch + r; it reads example
`shuffle(g % N)` of epoch g // N, where the permutation is seeded by (seed, epoch). A host reads
only the rows r its devices hold (`host_rows`, from `sharding.host_rows`). MLM masks, and the
negatives of sentence-pair rows (pairs.py), are seeded by (seed, g). So a resumed run starts at
any step without replaying the stream, and the global batch does not depend on how many hosts
read it or how the mesh spreads it.

Shapes: B = per-host batch, L = seq_len, P = max_predictions.
"""

import atexit
import gc
from typing import Sequence
import weakref

import ml_collections
import numpy as np
import tensorflow as tf

from lmssl import errors
from lmssl.data import packed
from lmssl.data import pair_rows
from lmssl.data import pairs
from lmssl.data import tokenizer as tok

try:  # The data pipeline runs on the host CPU; leave accelerators to JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass  # TF was already initialised by someone else; their setting stands.

_SHUFFLE_STREAM = 0x5EED  # third word of the shuffle's seed
# "task": fine-tuning rows, used as given (no masking).
OBJECTIVES = ("mlm", "clm", "task")


def _check_args(objective, global_batch, rows, num_rows, tokenizer):
  if objective not in OBJECTIVES:
    raise errors.UserError(f"unknown objective {objective!r}; known: {list(OBJECTIVES)}")
  if global_batch <= 0:
    raise errors.UserError(f"global batch {global_batch} must be positive")
  if (not len(rows) or rows.min() < 0 or rows.max() >= global_batch
      or np.any(np.diff(rows) <= 0)):
    raise errors.UserError(f"host rows {rows.tolist()} must be distinct ascending rows of the "
                           f"global batch of {global_batch}; take them from sharding.host_rows")
  if num_rows == 0:
    raise errors.UserError("the prepared split has no rows; use a larger corpus")
  # The masking rates are the config's, checked by validation.validate; the tokenizer is checked
  # here, the first place that has it.
  if objective == "mlm":
    if tokenizer.mask_id is None:
      raise errors.UserError(f"tokenizer {tokenizer.path} has no mask token, but masked-LM "
                             f"(objective mlm) needs one; use a tokenizer with a [MASK] token "
                             f"(e.g. a BERT one) or objective clm")
    if np.asarray(tokenizer.special).all():
      raise errors.UserError(f"tokenizer {tokenizer.path} has only special ids, none to mask or "
                             f"to draw random tokens from; use a real tokenizer")


def _step_rows(step, *, global_batch, rows_B, num_rows, seed, shuffle):
  """Global row ids g [B] and the example index each reads, for one step on this host."""
  batch = rows_B.shape[0]
  g_B = step * global_batch + rows_B
  if not shuffle:
    return g_B, g_B % num_rows
  epoch_B = g_B // num_rows
  seeds_Bx3 = tf.stack([tf.fill([batch], tf.constant(seed, tf.int64)), epoch_B,
                        tf.fill([batch], tf.constant(_SHUFFLE_STREAM, tf.int64))], axis=1)
  # The raw op, because tf.random.experimental.index_shuffle mis-pads [n, 2] seeds here.
  index_B = tf.raw_ops.RandomIndexShuffle(index=g_B % num_rows, seed=seeds_Bx3,
                                          max_index=tf.constant(num_rows - 1, tf.int64), rounds=4)
  return g_B, index_B


def positions_from_segments(segment_ids_BxL):
  """Position of each token within its segment: 0 at each segment start and on padding."""
  # Segment ids rise 1, 2, 3... along a row, so a segment starts after all tokens of the
  # lower ids: the exclusive cumsum of per-id counts.
  length = tf.shape(segment_ids_BxL)[1]
  counts_BxS = tf.math.bincount(segment_ids_BxL, minlength=length + 1, maxlength=length + 1,
                                axis=-1)
  counts_BxS = tf.concat([tf.zeros_like(counts_BxS[:, :1]), counts_BxS[:, 1:]], axis=1)
  start_BxS = tf.cumsum(counts_BxS, axis=1, exclusive=True)
  start_BxL = tf.gather(start_BxS, segment_ids_BxL, batch_dims=1)
  cols_BxL = tf.range(length)[None, :]
  return tf.where(segment_ids_BxL > 0, cols_BxL - start_BxL, 0)


def mask_row(ids_L, g, *, seed, data_cfg, special, normal_ids, mask_id, word_start):
  """BERT-style dynamic masking of one row, seeded by (seed, global row g).

  `special`, `word_start`: bool [vocab] tables (the tokenizer's); `normal_ids`: int32 [M], the
  ids not special, ascending. Candidates are ids not special. k = min(P, max(1, round(mask_rate
  * candidates))) pieces are chosen; with whole_word_mask whole words are taken in a random
  order while they fit in k, so a word is never split (and fewer than k may be chosen). Of the
  chosen: mask_token_frac become mask_id, random_token_frac a uniformly drawn normal id, the
  rest stay.
  """
  length, num_predictions = ids_L.shape[0], data_cfg.max_predictions
  # Independent of the shuffle's randomness: that op keys a different cipher with 3 words.
  row_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(g, tf.int64)])
  order_seed, action_seed, random_seed = tf.unstack(
      tf.random.experimental.stateless_split(row_seed, 3))
  cand_L = ~tf.gather(special, ids_L)
  num_cand = tf.reduce_sum(tf.cast(cand_L, tf.int32))
  k = tf.cast(tf.floor(data_cfg.mask_rate * tf.cast(num_cand, tf.float32) + 0.5), tf.int32)
  k = tf.where(num_cand > 0, tf.clip_by_value(k, 1, num_predictions), 0)

  # Words are runs of candidates; without whole-word masking every candidate is its own word.
  begins_L = cand_L
  if data_cfg.whole_word_mask:
    prev_cand_L = tf.concat([[False], cand_L[:-1]], axis=0)
    begins_L = cand_L & (tf.gather(word_start, ids_L) | ~prev_cand_L)
  word_L = tf.cumsum(tf.cast(begins_L, tf.int32)) * tf.cast(cand_L, tf.int32)  # 0: no word
  # Visit words in a random order: one key per word, a stable sort keeps each word's pieces
  # together (words are contiguous, so even tied keys cannot interleave them).
  key_L = tf.where(cand_L, tf.gather(tf.random.stateless_uniform([length + 1], order_seed),
                                     word_L), 2.0)
  order_L = tf.argsort(key_L, stable=True)
  word_sorted_L = tf.gather(word_L, order_L)
  taken_L = tf.cumsum(tf.cast(tf.gather(cand_L, order_L), tf.int32))  # pieces so far
  word_end_W = tf.math.unsorted_segment_max(taken_L, word_sorted_L, length + 1)
  chosen_sorted_L = (word_sorted_L > 0) & (tf.gather(word_end_W, word_sorted_L) <= k)
  chosen_L = tf.gather(chosen_sorted_L, tf.math.invert_permutation(order_L))

  action_L = tf.random.stateless_uniform([length], action_seed)
  # Drawn as an index into normal_ids, so a random replacement is never a special id, wherever
  # a tokenizer puts its special ids.
  random_ids_L = tf.gather(normal_ids, tf.random.stateless_uniform(
      [length], random_seed, minval=0, maxval=normal_ids.shape[0], dtype=tf.int32))
  to_mask_L = chosen_L & (action_L < data_cfg.mask_token_frac)
  to_random_L = chosen_L & ~to_mask_L & (
      action_L < data_cfg.mask_token_frac + data_cfg.random_token_frac)
  input_ids_L = tf.where(to_mask_L, mask_id, tf.where(to_random_L, random_ids_L, ids_L))

  positions_N = tf.cast(tf.where(chosen_L)[:, 0], tf.int32)  # ascending, N <= k <= P
  pad = [[0, num_predictions - tf.shape(positions_N)[0]]]
  masked_positions_P = tf.ensure_shape(tf.pad(positions_N, pad), [num_predictions])
  masked_ids_P = tf.ensure_shape(tf.pad(tf.gather(ids_L, positions_N), pad), [num_predictions])
  weights_P = tf.ensure_shape(tf.pad(tf.ones_like(positions_N, tf.float32), pad),
                              [num_predictions])
  return input_ids_L, masked_positions_P, masked_ids_P, weights_P


def make_dataset(arrays, *, objective: str, global_batch: int, seed: int, start_step: int,
                 data_cfg: ml_collections.ConfigDict, tokenizer: tok.AnyTokenizer,
                 host_rows: Sequence[int] | None = None, shuffle: bool = True,
                 num_steps=None) -> tf.data.Dataset:
  """Per-host batches {input_ids, segment_ids, positions [B, L] (+ MLM targets [B, P])}.

  `host_rows`: the rows of each global batch this host reads, ascending (`sharding.host_rows`
  of the mesh); None reads them all. B = len(host_rows).

  `arrays`: a `packed.PackedRows` (prepared pretraining data, `prepare.load_prepared`), whose
  rows are read from its files as steps need them; or in-memory arrays {"tokens" (or
  "input_ids"), "segment_ids"} int32 [N, L] plus any other per-row arrays [N, ...] (token
  types, labels), read alongside under their own names and copied into memory (fine-tuning
  tasks and sentence pairs, which are small). Positions are derived
  from the segments unless given. Sentence-pair arrays of `prepare.load_prepared` (they need
  data_cfg.sentence_pair "nsp" or "sop") give rows `[CLS] A [SEP] B [SEP]` with token_types [B, L]
  and pair_labels [B] (1: negative) instead. Steps run from `start_step`, forever or for
  `num_steps`. For evaluation use shuffle=False, start_step=0 and a fixed num_steps: the same
  rows, masks and negatives every time.
  `tokenizer` gives the special ids: pair rows' [CLS]/[SEP]/padding, and MLM's mask id,
  candidates (ids not `tokenizer.special`), random replacements and word starts.
  """
  reader = arrays if isinstance(arrays, packed.PackedRows) else None
  # In-memory packed rows name their ids "tokens"; every other array keeps its name.
  arrays = {} if reader else {("input_ids" if k == "tokens" else k): v for k, v in arrays.items()}
  # Fine-tuning rows are never pairs, whatever the data config they came with says.
  is_pairs = objective != "task" and pairs.check_arrays(arrays, data_cfg.sentence_pair)
  num_rows = reader.num_rows if reader else arrays["a_ids" if is_pairs else "input_ids"].shape[0]
  rows = np.arange(global_batch) if host_rows is None else np.asarray(host_rows, np.int64)
  _check_args(objective, global_batch, rows, num_rows, tokenizer)
  batch = len(rows)
  if num_steps is None:
    steps = tf.data.Dataset.counter(start_step)
  else:
    steps = tf.data.Dataset.range(start_step, start_step + num_steps)
  tables = {k: tf.constant(np.asarray(v)) for k, v in arrays.items()}
  rows_B = tf.constant(rows)

  def read_step(step):
    g_B, index_B = _step_rows(step, global_batch=global_batch, rows_B=rows_B,
                              num_rows=num_rows, seed=seed, shuffle=shuffle)
    if reader:
      features = _read_rows(reader, index_B, batch)
    else:
      features = {k: tf.gather(table, index_B) for k, table in tables.items()}
    if "positions" not in features and not is_pairs:
      features["positions"] = positions_from_segments(features["segment_ids"])
    return features, g_B

  ds = steps.map(read_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  row_fns = []
  if is_pairs:
    row_fns.append(pair_rows.row_builder(tables, kind=data_cfg.sentence_pair, seed=seed,
                                     tokenizer=tokenizer))
  if objective == "mlm":
    row_fns.append(_masker(seed=seed, data_cfg=data_cfg, tokenizer=tokenizer))
  if not row_fns:
    return ds.map(lambda features, g_B: features).prefetch(tf.data.AUTOTUNE)

  def per_row(features, g):
    for fn in row_fns:
      features = fn(features, g)
    return features

  ds = ds.unbatch().map(per_row, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _read_rows(reader: packed.PackedRows, index_B, batch: int) -> dict:
  shape = [batch, reader.seq_len]
  tokens, segments = tf.numpy_function(reader.read, [index_B], [tf.int32, tf.int32],
                                       stateful=False)
  return dict(input_ids=tf.ensure_shape(tokens, shape),
              segment_ids=tf.ensure_shape(segments, shape))


# A tf.data iterator still alive when the interpreter shuts down hangs the exit if its
# background threads are inside a Python function (the packed reader) then: they wait for
# the GIL forever (TF 2.21). Iterators made by `iterate` are closed before shutdown begins.
_live = weakref.WeakSet()


class _Batches:
  def __init__(self, ds: tf.data.Dataset):
    self._it = ds.as_numpy_iterator()
    _live.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    self._it = None


def iterate(ds: tf.data.Dataset) -> _Batches:
  """`ds.as_numpy_iterator()`, closed at interpreter exit if it is still open."""
  return _Batches(ds)


@atexit.register
def _close_live_iterators() -> None:
  for batches in list(_live):
    batches.close()
  gc.collect()


def _masker(*, seed, data_cfg, tokenizer):
  """(features of one row, g) -> the features with mask_row's inputs and targets."""
  special = np.asarray(tokenizer.special, dtype=bool)
  tables = {"special": tf.constant(special),
            "normal_ids": tf.constant(np.flatnonzero(~special).astype(np.int32)),
            "word_start": tf.constant(np.asarray(tokenizer.word_start, dtype=bool))}

  def mask(features, g):
    input_ids, positions, ids, weights = mask_row(
        features["input_ids"], g, seed=seed, data_cfg=data_cfg, mask_id=tokenizer.mask_id, **tables)
    return dict(features, input_ids=input_ids, masked_positions=positions, masked_ids=ids,
                masked_weights=weights)

  return mask

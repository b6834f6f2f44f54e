"""Fine-tuning evaluation metrics, computed on the host from gathered predictions.

Pure numpy, so evaluation never traces or compiles anything, and the results are plain Python
floats that go straight into JSON. The definitions follow the usual references: macro F1 and the
Matthews correlation as scikit-learn computes them, entity F1 as conlleval and seqeval do.

Every function takes lists or numpy arrays and checks that predictions and references pair up.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def accuracy(preds: npt.ArrayLike, labels: npt.ArrayLike) -> float:
  """Fraction of positions where `preds` equals `labels`."""
  preds, labels = _pair(preds, labels)
  return float(np.mean(preds == labels))


def macro_f1(preds: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int | None = None) -> float:
  """Unweighted mean of per-class F1 over the classes that occur in `labels` or `preds`.

  A class that occurs in neither is skipped: the evaluated data say nothing about it, and scoring
  it as 0 (or 1) would move the mean for a class the model was never tested on. A class that
  occurs but is never predicted correctly (precision and recall both 0) counts as F1 = 0. This
  matches scikit-learn's `f1_score(average="macro")` with its default labels.

  Args:
    preds: predicted class per example.
    labels: reference class per example.
    num_classes: when given, every class must be an integer in [0, num_classes); it only checks
      the inputs, since classes absent from both sides are skipped either way.
  """
  preds, labels = _pair(preds, labels)
  if num_classes is not None:
    _check_class_range(preds, labels, num_classes)
  matrix = _confusion(preds, labels)
  tp = np.diag(matrix)
  fp = matrix.sum(axis=0) - tp
  fn = matrix.sum(axis=1) - tp
  # Every class in the matrix occurred somewhere, so 2TP + FP + FN > 0.
  return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def matthews_corrcoef(preds: npt.ArrayLike, labels: npt.ArrayLike) -> float:
  """Matthews correlation, multi-class (Gorodkin's R_K, as scikit-learn computes it).

  With confusion matrix C (rows true, columns predicted), t = row sums, p = column sums,
  c = trace and s = total:  (c s - t.p) / sqrt((s^2 - t.t) (s^2 - p.p)).
  Returns 0.0 when the denominator is 0, e.g. when the predictions or labels are constant.
  """
  preds, labels = _pair(preds, labels)
  # Floats, because s^2 overflows int64 long before it matters for float64 precision.
  matrix = _confusion(preds, labels).astype(np.float64)
  t, p = matrix.sum(axis=1), matrix.sum(axis=0)
  c, s = np.trace(matrix), matrix.sum()
  denominator = np.sqrt((s * s - t @ t) * (s * s - p @ p))
  if denominator == 0:
    return 0.0
  return float((c * s - t @ p) / denominator)


def pearson(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
  """Pearson correlation of `x` and `y`; 0.0 (not NaN) when either side is constant."""
  x, y = _pair(x, y, ("x", "y"))
  x, y = x.astype(np.float64), y.astype(np.float64)
  # Tested exactly: centering a constant like [0.1] * 3 leaves rounding noise, not zeros.
  if _is_constant(x) or _is_constant(y):
    return 0.0
  xc, yc = x - x.mean(), y - y.mean()
  # Norms rather than sums of squares, whose product can overflow for large values.
  r = (xc @ yc) / (np.linalg.norm(xc) * np.linalg.norm(yc))
  return float(np.clip(r, -1.0, 1.0))


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
  """Spearman rank correlation: Pearson of the ranks, tied values sharing their average rank.

  Returns 0.0 (not NaN) when either side is constant.
  """
  x, y = _pair(x, y, ("x", "y"))
  return pearson(_average_ranks(x), _average_ranks(y))


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
  """Entity spans (type, start, end_exclusive) of one tag sequence, read as conlleval reads it.

  Tags are `O`, `B-X` or `I-X`. Both IOB2 (BIO) and IOB1 are accepted: `B-X` always starts an
  entity; `I-X` continues an open X entity and otherwise starts a new one; `O` closes the open
  entity; a change of type closes it and opens the new one.

  Raises:
    ValueError: a tag is neither `O` nor `B-`/`I-` followed by a type.
    TypeError: `tags` is a single string rather than a sequence of tags.
  """
  if isinstance(tags, str):
    raise TypeError(f"tags must be a sequence of tag strings, got the string {tags!r}")
  spans = set()
  open_type, start = None, 0
  for i, tag in enumerate(tags):
    prefix, tag_type = _split_tag(tag)
    if open_type is not None and (prefix != "I" or tag_type != open_type):
      spans.add((open_type, start, i))
      open_type = None
    if prefix != "O" and open_type is None:
      open_type, start = tag_type, i
  if open_type is not None:
    spans.add((open_type, start, len(tags)))
  return spans


def entity_f1(pred_sequences: Sequence[Sequence[str]],
              gold_sequences: Sequence[Sequence[str]]) -> dict[str, float]:
  """Micro-averaged precision, recall and F1 over exact-match entity spans of all sentences.

  An entity counts as correct only when its type, start and end all match (conlleval and
  seqeval semantics). Each value is 0.0 where its denominator is 0.

  Args:
    pred_sequences: predicted tags, one list per sentence.
    gold_sequences: reference tags, one list per sentence, each as long as its prediction.

  Returns:
    {"precision": ..., "recall": ..., "f1": ...}.
  """
  correct, num_pred, num_gold = _entity_counts(pred_sequences, gold_sequences)
  return {
      "precision": _ratio(correct, num_pred),
      "recall": _ratio(correct, num_gold),
      # 2PR / (P + R) written over counts, so it is exact and needs no separate zero case.
      "f1": _ratio(2 * correct, num_pred + num_gold),
  }


def classification(preds: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
  """Sequence-classification metrics: accuracy, macro F1 and the Matthews correlation."""
  return {
      "accuracy": accuracy(preds, labels),
      "macro_f1": macro_f1(preds, labels),
      "mcc": matthews_corrcoef(preds, labels),
  }


def regression(preds: npt.ArrayLike, targets: npt.ArrayLike) -> dict[str, float]:
  """Regression metrics: Pearson and Spearman correlation, and the mean squared error."""
  preds, targets = _pair(preds, targets, ("preds", "targets"))
  error = preds.astype(np.float64) - targets.astype(np.float64)
  return {
      "pearson": pearson(preds, targets),
      "spearman": spearman(preds, targets),
      "mse": float(np.mean(error * error)),
  }


def token_classification(pred_sequences: Sequence[Sequence[str]],
                         gold_sequences: Sequence[Sequence[str]]) -> dict[str, float]:
  """Tagging metrics: entity-level precision, recall and F1, and accuracy over all tags."""
  entity = entity_f1(pred_sequences, gold_sequences)
  # entity_f1 has checked that the sentences pair up, so the flattened tags align.
  flat_pred = [tag for sentence in pred_sequences for tag in sentence]
  flat_gold = [tag for sentence in gold_sequences for tag in sentence]
  return {
      "entity_f1": entity["f1"],
      "entity_precision": entity["precision"],
      "entity_recall": entity["recall"],
      "token_accuracy": accuracy(flat_pred, flat_gold),
  }


# For best-checkpoint tracking: every key the functions above return.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "macro_f1": True,
    "mcc": True,
    "pearson": True,
    "spearman": True,
    "mse": False,
    "precision": True,
    "recall": True,
    "f1": True,
    "entity_f1": True,
    "entity_precision": True,
    "entity_recall": True,
    "token_accuracy": True,
}


def _pair(a, b, names: tuple[str, str] = ("preds", "labels")) -> tuple[np.ndarray, np.ndarray]:
  """Both sides as 1-D arrays of one non-zero length."""
  a, b = np.asarray(a), np.asarray(b)
  for name, array in zip(names, (a, b)):
    # A (N, 1) against an (N,) would broadcast to (N, N) and give a plausible wrong score.
    if array.ndim != 1:
      raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
  if len(a) != len(b):
    raise ValueError(f"{names[0]} has length {len(a)} but {names[1]} has length {len(b)}")
  if not len(a):
    raise ValueError(f"{names[0]} and {names[1]} are empty")
  return a, b


def _check_class_range(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  for name, array in (("preds", preds), ("labels", labels)):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{name} must hold integer classes when num_classes is given, "
                       f"got dtype {array.dtype}")
    outside = array[(array < 0) | (array >= num_classes)]
    if outside.size:
      raise ValueError(f"{name} holds class {outside[0]}, outside [0, {num_classes})")


def _confusion(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Counts over the classes seen on either side: rows are labels, columns predictions."""
  classes, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  index = index.reshape(-1)
  matrix = np.zeros((len(classes), len(classes)), np.int64)
  np.add.at(matrix, (index[:len(labels)], index[len(labels):]), 1)
  return matrix


def _is_constant(x: np.ndarray) -> bool:
  return bool(np.all(x == x[0]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks; a run of tied values shares the mean of the ranks it spans."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  # A group of `count` ties ending at rank `end` spans end - count + 1 .. end.
  ends = np.cumsum(counts)
  return (ends - (counts - 1) / 2)[inverse.reshape(-1)]


def _split_tag(tag: str) -> tuple[str, str | None]:
  """(prefix, type) of one tag: ("O", None), ("B", type) or ("I", type)."""
  if tag == "O":
    return "O", None
  if isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2:
    return tag[0], tag[2:]
  raise ValueError(f"tag {tag!r} is neither 'O' nor 'B-'/'I-' followed by an entity type")


def _entity_counts(pred_sequences, gold_sequences) -> tuple[int, int, int]:
  """(exactly matching entities, predicted entities, gold entities) over all sentences."""
  if len(pred_sequences) != len(gold_sequences):
    raise ValueError(f"pred_sequences has {len(pred_sequences)} sentences but gold_sequences has "
                     f"{len(gold_sequences)}")
  if not len(pred_sequences):
    raise ValueError("pred_sequences and gold_sequences are empty")
  correct = num_pred = num_gold = 0
  for i, (pred, gold) in enumerate(zip(pred_sequences, gold_sequences)):
    if len(pred) != len(gold):
      raise ValueError(f"sentence {i}: {len(pred)} predicted tags but {len(gold)} gold tags")
    pred_spans, gold_spans = entities(pred), entities(gold)
    correct += len(pred_spans & gold_spans)
    num_pred += len(pred_spans)
    num_gold += len(gold_spans)
  return correct, num_pred, num_gold


def _ratio(numerator: int, denominator: int) -> float:
  return numerator / denominator if denominator else 0.0

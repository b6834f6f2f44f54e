"""Evaluation metrics against examples worked by hand, plus their edge cases and input checks."""

import re

import numpy as np
import pytest

from lmssl import scores

# A 3-class example shared by the classification tests.
#   labels: 0 0 0 0 1 1 2 2 2
#   preds:  0 0 0 1 1 1 0 2 1
# Confusion matrix (rows true, columns predicted):
#   true 0: [3, 1, 0]
#   true 1: [0, 2, 0]
#   true 2: [1, 1, 1]
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2]
PREDS = [0, 0, 0, 1, 1, 1, 0, 2, 1]


def test_accuracy_counts_matching_positions():
  # The diagonal: 3 + 2 + 1 = 6 of 9.
  assert scores.accuracy(PREDS, LABELS) == pytest.approx(6 / 9)


def test_macro_f1_is_the_mean_of_per_class_f1():
  # class 0: TP 3, FP 1 (a 2 read as 0), FN 1 (a 0 read as 1) -> P 3/4, R 3/4, F1 3/4
  # class 1: TP 2, FP 2 (a 0 and a 2 read as 1), FN 0          -> P 1/2, R 1,   F1 2/3
  # class 2: TP 1, FP 0, FN 2                                  -> P 1,   R 1/3, F1 1/2
  # macro F1 = (3/4 + 2/3 + 1/2) / 3 = (9/12 + 8/12 + 6/12) / 3 = 23/36
  assert scores.macro_f1(PREDS, LABELS) == pytest.approx(23 / 36)
  assert scores.macro_f1(np.array(PREDS), np.array(LABELS)) == pytest.approx(23 / 36)


def test_macro_f1_skips_classes_absent_from_both_sides():
  # num_classes=5 names classes 3 and 4, which occur nowhere: the score is unchanged.
  assert scores.macro_f1(PREDS, LABELS, num_classes=5) == pytest.approx(23 / 36)


def test_macro_f1_counts_a_class_that_only_occurs_in_predictions():
  # labels 0 0 1, preds 0 0 2:
  #   class 0: TP 2, FP 0, FN 0 -> F1 1
  #   class 1: TP 0, FN 1       -> P and R both 0, F1 0
  #   class 2: TP 0, FP 1       -> F1 0 (never a label, but predicted, so it counts)
  assert scores.macro_f1([0, 0, 2], [0, 0, 1]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("preds,labels,num_classes,message", [
    ([0, 3], [0, 1], 3, "preds holds class 3, outside [0, 3)"),
    ([0, 1], [-1, 1], 3, "labels holds class -1, outside [0, 3)"),
    ([0.0, 1.0], [0, 1], 3, "preds must hold integer classes"),
    ([0, 1], [0, 1], 0, "num_classes must be positive"),
])
def test_macro_f1_checks_classes_against_num_classes(preds, labels, num_classes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    scores.macro_f1(preds, labels, num_classes=num_classes)


def test_mcc_multiclass_by_the_covariance_formula():
  # From the confusion matrix above: t (row sums) = [4, 2, 3], p (column sums) = [4, 4, 1],
  # c (trace) = 6, s (total) = 9.
  #   c s - t.p = 54 - (16 + 8 + 3)  = 27
  #   s^2 - t.t = 81 - (16 + 4 + 9)  = 52
  #   s^2 - p.p = 81 - (16 + 16 + 1) = 48
  assert scores.matthews_corrcoef(PREDS, LABELS) == pytest.approx(27 / np.sqrt(52 * 48))


def test_mcc_binary_matches_the_textbook_formula():
  # labels 1 1 1 1 0 0 0 0, preds 1 1 1 0 1 1 0 0: TP 3, FN 1, FP 2, TN 2.
  # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5 * 4 * 4 * 3)
  labels = [1, 1, 1, 1, 0, 0, 0, 0]
  preds = [1, 1, 1, 0, 1, 1, 0, 0]
  assert scores.matthews_corrcoef(preds, labels) == pytest.approx(4 / np.sqrt(240))


def test_mcc_is_zero_for_a_constant_predictor():
  # Constant predictions make s^2 - p.p = 81 - 81 = 0: the denominator is 0, the score 0.
  assert scores.matthews_corrcoef([1] * 9, LABELS) == 0.0
  assert scores.matthews_corrcoef([0] * 9, LABELS) == 0.0


def test_mcc_is_minus_one_for_swapped_binary_classes():
  assert scores.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_pearson_by_hand():
  # x = 1 2 3 4 (mean 2.5), y = 2 4 5 9 (mean 5)
  # centred x: -1.5 -0.5 0.5 1.5; centred y: -3 -1 0 4
  # sum xy = 4.5 + 0.5 + 0 + 6 = 11; sum x^2 = 5; sum y^2 = 9 + 1 + 0 + 16 = 26
  assert scores.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / np.sqrt(5 * 26))


@pytest.mark.parametrize("seed", range(5))
def test_pearson_agrees_with_numpy_on_random_data(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=200)
  y = 0.3 * x + rng.normal(size=200)
  assert scores.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


def test_spearman_gives_ties_their_average_rank():
  # x = 10 20 20 30 40 -> ranks 1 2.5 2.5 4 5   (the two 20s share ranks 2 and 3)
  # y =  5  1  1  1  9 -> ranks 4 2   2   2 5   (the three 1s share ranks 1, 2 and 3)
  # centred ranks (both means are 3): x: -2 -0.5 -0.5 1 2; y: 1 -1 -1 -1 2
  # sum xy = -2 + 0.5 + 0.5 - 1 + 4 = 2; sum x^2 = 4 + 0.25 + 0.25 + 1 + 4 = 9.5; sum y^2 = 8
  x = [10, 20, 20, 30, 40]
  y = [5, 1, 1, 1, 9]
  assert scores.spearman(x, y) == pytest.approx(2 / np.sqrt(9.5 * 8))
  rx, ry = [1, 2.5, 2.5, 4, 5], [4, 2, 2, 2, 5]
  assert scores.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_spearman_is_one_for_any_increasing_relation():
  x = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
  y = np.exp(x)
  assert scores.spearman(x, y) == pytest.approx(1.0)
  assert scores.pearson(x, y) < 0.95
  assert scores.spearman(x, -y) == pytest.approx(-1.0)


@pytest.mark.parametrize("metric", [scores.pearson, scores.spearman])
def test_correlations_are_zero_not_nan_when_a_side_is_constant(metric):
  assert metric([3, 3, 3], [1, 2, 3]) == 0.0
  assert metric([1, 2, 3], [3, 3, 3]) == 0.0
  assert metric([2, 2], [2, 2]) == 0.0
  # 0.1 is not exact in binary: centring it leaves rounding noise that must not count.
  assert metric([0.1] * 7, [1, 2, 3, 4, 5, 6, 7]) == 0.0


def test_regression_metrics_by_hand():
  # preds 1 2 3, targets 1.5 2 1: squared errors 0.25 0 4 -> mse 4.25 / 3
  # pearson: centred preds -1 0 1; centred targets (mean 1.5) 0 0.5 -0.5
  #   sum xy = -0.5; sum x^2 = 2; sum y^2 = 0.5 -> -0.5 / sqrt(1) = -0.5
  # spearman: pred ranks 1 2 3, target ranks 2 3 1; centred -1 0 1 and 0 1 -1
  #   sum xy = -1; sums of squares 2 and 2 -> -1 / 2 = -0.5
  result = scores.regression([1, 2, 3], [1.5, 2, 1])
  assert result == pytest.approx({"pearson": -0.5, "spearman": -0.5, "mse": 4.25 / 3})


def test_entities_reads_iob2():
  tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O", "B-ORG"]
  assert scores.entities(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 7, 8)}


def test_entities_reads_iob1_like_conlleval():
  # An I- that continues nothing starts an entity; a type change closes one and opens another.
  tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-ORG", "B-PER", "I-LOC"]
  assert scores.entities(tags) == {
      ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7), ("PER", 7, 8), ("LOC", 8, 9)}


def test_entities_of_no_entities():
  assert scores.entities([]) == set()
  assert scores.entities(["O", "O"]) == set()


@pytest.mark.parametrize("tag", ["PER", "E-PER", "S-PER", "B-", "o", "", "B_PER"])
def test_entities_rejects_tags_without_a_prefix(tag):
  with pytest.raises(ValueError, match=f"tag '{tag}' is neither"):
    scores.entities(["O", tag])


def test_entities_rejects_a_bare_string():
  with pytest.raises(TypeError, match="sequence of tag strings"):
    scores.entities("B-PER")


# Two sentences for the tagging tests. Sentence 0, by position:
#         0      1      2  3      4      5      6  7       8  9       10
#   gold: B-PER  I-PER  O  B-ORG  I-ORG  I-ORG  O  B-LOC   O  B-MISC  I-MISC
#   pred: B-PER  I-PER  O  B-ORG  I-ORG  O      O  B-MISC  O  I-MISC  I-MISC
#   gold entities: PER 0-2, ORG 3-6, LOC 7-8, MISC 9-11
#   pred entities: PER 0-2 (exact), ORG 3-5 (wrong boundary), MISC 7-8 (wrong type),
#                  MISC 9-11 (opened IOB1-style by an I-, still an exact match)
#   -> 2 correct, 4 predicted, 4 gold
# Sentence 1: gold O B-PER O, pred O O O -> 0 correct, 0 predicted, 1 gold
GOLD = [
    ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "O", "B-MISC", "I-MISC"],
    ["O", "B-PER", "O"],
]
PRED = [
    ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "O", "B-MISC", "O", "I-MISC", "I-MISC"],
    ["O", "O", "O"],
]


def test_entity_f1_is_micro_averaged_over_exact_spans():
  # Totals: 2 correct, 4 predicted, 5 gold.
  # P = 2/4 = 0.5; R = 2/5 = 0.4; F1 = 2 * 0.5 * 0.4 / (0.5 + 0.4) = 0.4 / 0.9 = 4/9.
  # (Averaging per sentence instead would give (1/2 + 0) / 2 = 1/4.)
  result = scores.entity_f1(PRED, GOLD)
  assert result == pytest.approx({"precision": 0.5, "recall": 0.4, "f1": 4 / 9})


def test_entity_f1_is_zero_without_entities():
  result = scores.entity_f1([["O", "O"]], [["O", "O"]])
  assert result == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
  # Predictions but no gold entities: precision 0 of 1, recall's denominator is 0.
  result = scores.entity_f1([["B-PER", "O"]], [["O", "O"]])
  assert result == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_f1_names_a_sentence_of_the_wrong_length():
  with pytest.raises(ValueError, match="sentence 1: 2 predicted tags but 3 gold tags"):
    scores.entity_f1([["O"], ["O", "O"]], [["O"], ["O", "O", "O"]])


def test_entity_f1_checks_the_sentence_counts():
  with pytest.raises(ValueError, match="pred_sequences has 1 sentences but gold_sequences has 2"):
    scores.entity_f1([["O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="empty"):
    scores.entity_f1([], [])


def test_token_classification_by_hand():
  # Token level, sentence 0 differs at positions 5 (I-ORG/O), 7 (B-LOC/B-MISC) and 9
  # (B-MISC/I-MISC, wrong as a tag though its entity matches): 8 of 11 right.
  # Sentence 1 differs at position 1: 2 of 3 right. In all 10 of 14.
  result = scores.token_classification(PRED, GOLD)
  assert result == pytest.approx({
      "entity_f1": 4 / 9, "entity_precision": 0.5, "entity_recall": 0.4,
      "token_accuracy": 10 / 14})


def test_perfect_predictions_score_one():
  assert scores.classification(LABELS, LABELS) == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
  targets = [0.5, -1.0, 2.0, 2.0, 3.5]
  assert scores.regression(targets, targets) == pytest.approx(
      {"pearson": 1.0, "spearman": 1.0, "mse": 0.0})
  assert scores.token_classification(GOLD, GOLD) == {
      "entity_f1": 1.0, "entity_precision": 1.0, "entity_recall": 1.0, "token_accuracy": 1.0}


def test_classification_combines_the_three_scores():
  assert scores.classification(PREDS, LABELS) == pytest.approx(
      {"accuracy": 6 / 9, "macro_f1": 23 / 36, "mcc": 27 / np.sqrt(52 * 48)})


def test_results_are_plain_floats():
  results = {**scores.classification(np.array(PREDS), np.array(LABELS)),
             **scores.regression(np.arange(4.0), np.array([1, 0, 3, 2])),
             **scores.token_classification(PRED, GOLD)}
  assert all(type(value) is float for value in results.values()), results


def test_higher_is_better_names_every_metric_key():
  keys = (set(scores.classification(PREDS, LABELS)) | set(scores.regression([1, 2], [2, 1]))
          | set(scores.token_classification(PRED, GOLD)) | set(scores.entity_f1(PRED, GOLD)))
  assert keys == set(scores.HIGHER_IS_BETTER)
  assert [key for key, higher in scores.HIGHER_IS_BETTER.items() if not higher] == ["mse"]


@pytest.mark.parametrize("metric", [
    scores.accuracy, scores.macro_f1, scores.matthews_corrcoef, scores.classification])
def test_classification_inputs_are_checked(metric):
  with pytest.raises(ValueError, match="preds has length 3 but labels has length 2"):
    metric([0, 1, 1], [0, 1])
  with pytest.raises(ValueError, match="preds and labels are empty"):
    metric([], [])
  # An (N, 1) column against (N,) would otherwise broadcast to an N x N comparison.
  with pytest.raises(ValueError, match=r"labels must be 1-D, got shape \(3, 1\)"):
    metric([0, 1, 1], [[0], [1], [1]])


@pytest.mark.parametrize("metric", [scores.pearson, scores.spearman])
def test_correlation_inputs_are_checked(metric):
  with pytest.raises(ValueError, match="x has length 2 but y has length 3"):
    metric([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="x and y are empty"):
    metric([], [])


def test_regression_inputs_are_checked():
  with pytest.raises(ValueError, match="preds has length 1 but targets has length 2"):
    scores.regression([1.0], [1.0, 2.0])

"""The evaluation metrics equal scikit-learn's on the same predictions; the pictures render."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from imageiq_spark.ml import metrics

LABELS = ["cat", "dog", "eel", "fox"]


@pytest.fixture(scope="module")
def predictions() -> tuple[np.ndarray, np.ndarray]:
    """400 rows of imperfect but informative probabilities over 4 classes."""
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probs


def test_accuracy_and_top_k_equal_sklearn(predictions):
    y_true, probs = predictions
    report = metrics.evaluate(y_true, probs, LABELS, k=2)
    assert report.accuracy == pytest.approx(skm.accuracy_score(y_true, probs.argmax(1)))
    assert report.top_k_accuracy == pytest.approx(
        skm.top_k_accuracy_score(y_true, probs, k=2, labels=range(4))
    )
    assert 0.3 < report.accuracy < report.top_k_accuracy < 1.0  # the data is neither trivial nor random


@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_averaged_precision_recall_f1_equal_sklearn(predictions, average):
    y_true, probs = predictions
    report = metrics.evaluate(y_true, probs, LABELS)
    expected = skm.precision_recall_fscore_support(
        y_true, probs.argmax(1), average=average, zero_division=0
    )
    got = report.macro if average == "macro" else report.weighted
    assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(list(expected[:3]))


def test_per_class_scores_and_confusion_equal_sklearn(predictions):
    y_true, probs = predictions
    report = metrics.evaluate(y_true, probs, LABELS)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, probs.argmax(1), labels=range(4), zero_division=0
    )
    np.testing.assert_allclose(report.per_class.precision, precision)
    np.testing.assert_allclose(report.per_class.recall, recall)
    np.testing.assert_allclose(report.per_class.f1, f1)
    np.testing.assert_array_equal(report.per_class.support, support)
    np.testing.assert_array_equal(
        report.confusion, skm.confusion_matrix(y_true, probs.argmax(1), labels=range(4))
    )


def test_a_class_never_predicted_scores_zero_like_sklearn():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 1, 0, 1, 1]] * 0.8 + 0.2 / 3  # class 2 is never predicted
    report = metrics.evaluate(y_true, probs, ["a", "b", "c"])
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, probs.argmax(1), zero_division=0
    )
    np.testing.assert_allclose(report.per_class.precision, precision)
    np.testing.assert_allclose(report.per_class.f1, f1)
    assert report.per_class.recall[2] == 0.0


def test_one_vs_rest_roc_auc_equals_sklearn(predictions):
    y_true, probs = predictions
    report = metrics.evaluate(y_true, probs, LABELS)
    for average in ("macro", "weighted"):
        expected = skm.roc_auc_score(y_true, probs, multi_class="ovr", average=average)
        got = report.roc_auc_macro if average == "macro" else report.roc_auc_weighted
        assert got == pytest.approx(expected)
    for c in range(4):
        assert report.roc_auc[c] == pytest.approx(skm.roc_auc_score(y_true == c, probs[:, c]))


def test_roc_auc_counts_tied_scores_as_half_like_sklearn():
    y_true = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.5, 0.5, 0.2, 0.9, 0.5, 0.5])  # heavy ties
    probs = np.stack([1 - scores, scores], axis=1)
    assert metrics.roc_auc_one_vs_rest(y_true, probs)[1] == pytest.approx(
        skm.roc_auc_score(y_true, scores)
    )


def test_roc_auc_of_a_class_absent_from_the_truth_is_nan():
    y_true = np.array([0, 1, 0, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    aucs = metrics.roc_auc_one_vs_rest(y_true, probs)
    assert aucs[:2] == pytest.approx([1.0, 1.0])
    assert np.isnan(aucs[2])


def test_expected_calibration_error_by_hand():
    # Bins of width 0.5. Bin (0, 0.5]: confidences 0.4, 0.5 with 1 of 2 right -> |0.5 - 0.45| = 0.05.
    # Bin (0.5, 1]: confidences 0.9, 0.9, 0.6, 0.6 with 3 of 4 right -> |0.75 - 0.75| = 0.
    probs = np.array([[0.4, 0.3, 0.3], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0],
                      [0.1, 0.9, 0.0], [0.6, 0.4, 0.0], [0.0, 0.4, 0.6]])
    y_true = np.array([0, 1, 0, 1, 1, 2])  # row 1 ties: argmax takes class 0, a miss
    assert metrics.expected_calibration_error(y_true, probs, bins=2) == pytest.approx(2 / 6 * 0.05)


def test_expected_calibration_error_is_zero_when_confidence_matches_accuracy():
    # Every row 0.75 confident; three quarters right.
    probs = np.tile([0.75, 0.25], (8, 1))
    y_true = np.array([0, 0, 0, 1, 0, 0, 0, 1])
    assert metrics.expected_calibration_error(y_true, probs, bins=10) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(1 - y_true, probs, bins=10) == pytest.approx(0.5)


def test_rows_hold_every_metric_once(predictions):
    y_true, probs = predictions
    report = metrics.evaluate(y_true, probs, LABELS, k=3)
    rows = report.rows()
    keys = [(metric, label) for metric, label, _ in rows]
    assert len(keys) == len(set(keys))
    values = {(metric, label): value for metric, label, value in rows}
    assert values[("accuracy", None)] == report.accuracy
    assert values[("top_3_accuracy", None)] == report.top_k_accuracy
    assert values[("count", None)] == 400
    assert values[("support", "dog")] == float(np.sum(y_true == 1))
    assert values[("confusion:eel", "dog")] == float(np.sum((y_true == 1) & (probs.argmax(1) == 2)))


def test_confident_mistakes_are_the_wrong_rows_by_falling_confidence():
    y_true = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.95, 0.05]])
    assert metrics.confident_mistakes(y_true, probs, 5).tolist() == [4, 3, 1]
    assert metrics.confident_mistakes(y_true, probs, 2).tolist() == [4, 3]


def test_pictures_render_as_png(predictions):
    y_true, probs = predictions
    images = np.random.default_rng(0).integers(0, 255, (400, 8, 8, 1), dtype=np.uint8)
    report = metrics.evaluate(y_true, probs, LABELS)
    pictures = [
        metrics.plot_confusion_matrix(report.confusion, LABELS),
        metrics.plot_reliability_diagram(y_true, probs, 10),
        metrics.plot_confident_mistakes(images, y_true, probs, LABELS, 8),
    ]
    for fig in pictures:
        png = metrics.figure_png(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    grid = metrics.plot_confident_mistakes(images, y_true, probs, LABELS, 8)
    titles = [ax.get_title() for ax in grid.axes if ax.get_title()]
    first = metrics.confident_mistakes(y_true, probs, 1)[0]
    assert titles[0].startswith(f"{LABELS[y_true[first]]} -> {LABELS[probs[first].argmax()]}")
    assert len(titles) == 8


def test_mismatched_shapes_are_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match="one class index per row"):
        metrics.evaluate(np.array([0, 1]), np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError, match="2 classes but 3 labels"):
        metrics.evaluate(np.array([0, 1]), np.ones((2, 2)) / 2, ["a", "b", "c"])

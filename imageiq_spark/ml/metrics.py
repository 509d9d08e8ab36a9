"""Classification metrics and pictures: scikit-learn's metrics and displays, plus what it lacks.

Inputs are integer class indices `y_true` of shape [n] and class probabilities `probs` of shape
[n, classes]; the predicted class is `argmax(probs)`. Undefined ratios count as 0
(`zero_division=0`). Ours on top of scikit-learn: one-vs-rest ROC-AUC per class that is NaN
(and left out of the averages) for a class absent from `y_true` where scikit-learn raises, the
expected calibration error of the top label, and the most-confident-mistakes grid.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display on executors or CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.calibration import CalibrationDisplay, calibration_curve  # noqa: E402


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D array [images, classes], got shape {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(
            f"y_true must hold one class index per row of probs ({probs.shape[0]}), "
            f"got shape {y_true.shape}"
        )
    if y_true.size and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"y_true holds class indices outside [0, {probs.shape[1]})")
    return y_true.astype(np.int64), probs


@dataclass(frozen=True)
class PerClass:
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def roc_auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC of each class against the rest; NaN where the class or its rest is absent."""
    y_true, probs = _check(y_true, probs)
    return np.array([skm.roc_auc_score(y_true == c, probs[:, c])
                     if 0 < np.sum(y_true == c) < len(y_true) else math.nan
                     for c in range(probs.shape[1])])


def _top_label(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each prediction is right (0/1), and its confidence."""
    y_true, probs = _check(y_true, probs)
    # Clipped: float32 softmax can overshoot 1 by an ulp, which calibration_curve refuses.
    return (probs.argmax(axis=1) == y_true).astype(np.int64), np.clip(probs.max(axis=1), 0, 1)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Sum over equal-width confidence bins (lo, hi] of |accuracy - mean confidence|, weighted by
    the bin's share of rows."""
    correct, confidence = _top_label(y_true, probs)
    accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=bins)
    # calibration_curve's own binning, for the bin sizes it does not return.
    count = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence),
                        minlength=bins)
    return float(np.sum(count[count > 0] * np.abs(accuracy - mean_conf)) / len(correct))


@dataclass(frozen=True)
class Report:
    """Every metric of one evaluation; `rows()` flattens it to (metric, class or None, value)."""

    labels: list[str]
    count: int
    accuracy: float
    top_k: int
    top_k_accuracy: float
    macro: dict[str, float]
    weighted: dict[str, float]
    per_class: PerClass
    confusion: np.ndarray
    roc_auc: np.ndarray
    roc_auc_macro: float
    roc_auc_weighted: float
    ece: float

    def global_metrics(self) -> dict[str, float]:
        return {
            "count": float(self.count),
            "accuracy": self.accuracy,
            f"top_{self.top_k}_accuracy": self.top_k_accuracy,
            **{f"{name}_macro": value for name, value in self.macro.items()},
            **{f"{name}_weighted": value for name, value in self.weighted.items()},
            "roc_auc_ovr_macro": self.roc_auc_macro,
            "roc_auc_ovr_weighted": self.roc_auc_weighted,
            "expected_calibration_error": self.ece,
        }

    def rows(self) -> list[tuple[str, str | None, float]]:
        rows: list[tuple[str, str | None, float]] = [
            (name, None, value) for name, value in self.global_metrics().items()
        ]
        for i, label in enumerate(self.labels):
            rows += [(name, label, float(getattr(self.per_class, name)[i]))
                     for name in ("precision", "recall", "f1", "support")]
            rows.append(("roc_auc_ovr", label, float(self.roc_auc[i])))
            # One row per confusion-matrix cell: class = true label, metric names the prediction.
            rows += [(f"confusion:{predicted}", label, float(self.confusion[i, j]))
                     for j, predicted in enumerate(self.labels)]
        return rows


def evaluate(
    y_true: np.ndarray, probs: np.ndarray, labels: list[str], k: int = 3, bins: int = 10
) -> Report:
    """All metrics of one non-empty set of predictions."""
    y_true, probs = _check(y_true, probs)
    if probs.shape[1] != len(labels):
        raise ValueError(f"probs has {probs.shape[1]} classes but {len(labels)} labels were given")
    classes = np.arange(len(labels))
    y_pred = probs.argmax(axis=1)
    scores = PerClass(*skm.precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                           zero_division=0))
    by_name = {"precision": scores.precision, "recall": scores.recall, "f1": scores.f1}
    roc = roc_auc_one_vs_rest(y_true, probs)
    defined = ~np.isnan(roc)
    # scikit-learn takes two-class scores as one column, and warns where k covers every class.
    top_k = (1.0 if k >= len(labels) else
             skm.top_k_accuracy_score(y_true, probs[:, 1] if len(labels) == 2 else probs,
                                      k=k, labels=classes))
    return Report(
        labels=list(labels),
        count=int(len(y_true)),
        accuracy=float(skm.accuracy_score(y_true, y_pred)),
        top_k=k,
        top_k_accuracy=float(top_k),
        macro={name: float(np.mean(v)) for name, v in by_name.items()},
        weighted={name: float(np.average(v, weights=scores.support)) for name, v in by_name.items()},
        per_class=scores,
        confusion=skm.confusion_matrix(y_true, y_pred, labels=classes),
        roc_auc=roc,
        roc_auc_macro=float(np.mean(roc[defined])) if defined.any() else math.nan,
        roc_auc_weighted=(float(np.average(roc[defined], weights=scores.support[defined]))
                          if defined.any() else math.nan),
        ece=expected_calibration_error(y_true, probs, bins),
    )


# --- pictures ---------------------------------------------------------------------------------


def plot_confusion_matrix(confusion: np.ndarray, labels: list[str]) -> Figure:
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    skm.ConfusionMatrixDisplay(confusion, display_labels=labels).plot(
        ax=ax, cmap="Blues", xticks_rotation="vertical", colorbar=False)
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    return fig


def plot_reliability_diagram(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> Figure:
    """Accuracy against mean confidence of the top label, per equal-width confidence bin."""
    correct, confidence = _top_label(y_true, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    CalibrationDisplay.from_predictions(correct, confidence, n_bins=bins, ax=ax, name="top label")
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {expected_calibration_error(y_true, probs, bins):.3f})")
    fig.tight_layout()
    return fig


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the n wrong predictions with the highest confidence, most confident first."""
    y_true, probs = _check(y_true, probs)
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    order = np.argsort(-probs[wrong].max(axis=1), kind="mergesort")
    return wrong[order[:n]]


def plot_confident_mistakes(
    images: np.ndarray, y_true: np.ndarray, probs: np.ndarray, labels: list[str], n: int = 16
) -> Figure:
    """A grid of the most confident mistakes, each titled `true -> predicted (confidence)`."""
    picked = confident_mistakes(y_true, probs, n)
    cols = 4
    rows = max(1, math.ceil(len(picked) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(picked):
        axes[0, 0].text(0, 0.5, "no mistakes", fontsize=12)
    for ax, i in zip(axes.flat, picked):
        image = images[i]
        gray = image.ndim == 2 or image.shape[-1] == 1
        ax.imshow(image.squeeze(-1) if image.ndim == 3 and gray else image,
                  cmap="gray" if gray else None)
        predicted = int(probs[i].argmax())
        ax.set_title(f"{labels[y_true[i]]} -> {labels[predicted]} ({probs[i, predicted]:.2f})",
                     fontsize=8)
    fig.suptitle("Most confident mistakes (true -> predicted)")
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes; closes it so long jobs do not accumulate figures."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()

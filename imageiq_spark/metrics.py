"""Classification metrics and pictures, in plain numpy and matplotlib (no Spark, no TF).

Inputs are integer class indices `y_true` of shape [n] and class probabilities `probs` of shape
[n, classes]; the predicted class is `argmax(probs)`. Undefined ratios (a class never predicted
or never present) count as 0, like scikit-learn's `zero_division=0`; a class absent from
`y_true` has no one-vs-rest ROC-AUC (NaN) and is left out of its averages.
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


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    flat = np.asarray(y_true, np.int64) * classes + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


@dataclass(frozen=True)
class PerClass:
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def per_class_scores(confusion: np.ndarray) -> PerClass:
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = _ratio(true_pos, predicted)
    recall = _ratio(true_pos, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return PerClass(precision, recall, f1, support)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable."""
    y_true, probs = _check(y_true, probs)
    if not y_true.size:
        return math.nan
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their mean rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    boundaries = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC of each class against the rest; NaN where the class or its rest is absent."""
    y_true, probs = _check(y_true, probs)
    aucs = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        positive = y_true == c
        n_pos = int(positive.sum())
        n_neg = len(y_true) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(probs[:, c])
        aucs[c] = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return aucs


def calibration_bins(y_true: np.ndarray, probs: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width confidence bin (lo, hi] (the first includes 0): count, accuracy, confidence."""
    y_true, probs = _check(y_true, probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    accuracy = _ratio(np.bincount(index, weights=correct, minlength=bins), count.astype(np.float64))
    mean_conf = _ratio(np.bincount(index, weights=confidence, minlength=bins),
                       count.astype(np.float64))
    return count, accuracy, mean_conf


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Sum over confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    count, accuracy, mean_conf = calibration_bins(y_true, probs, bins)
    total = count.sum()
    return float(np.sum(count * np.abs(accuracy - mean_conf)) / total) if total else math.nan


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
        metrics = {
            "count": float(self.count),
            "accuracy": self.accuracy,
            f"top_{self.top_k}_accuracy": self.top_k_accuracy,
            **{f"{name}_macro": value for name, value in self.macro.items()},
            **{f"{name}_weighted": value for name, value in self.weighted.items()},
            "roc_auc_ovr_macro": self.roc_auc_macro,
            "roc_auc_ovr_weighted": self.roc_auc_weighted,
            "expected_calibration_error": self.ece,
        }
        return metrics

    def rows(self) -> list[tuple[str, str | None, float]]:
        rows: list[tuple[str, str | None, float]] = [
            (name, None, value) for name, value in self.global_metrics().items()
        ]
        for i, label in enumerate(self.labels):
            rows += [
                ("precision", label, float(self.per_class.precision[i])),
                ("recall", label, float(self.per_class.recall[i])),
                ("f1", label, float(self.per_class.f1[i])),
                ("support", label, float(self.per_class.support[i])),
                ("roc_auc_ovr", label, float(self.roc_auc[i])),
            ]
            # One row per confusion-matrix cell: class = true label, metric names the prediction.
            rows += [
                (f"confusion:{predicted}", label, float(self.confusion[i, j]))
                for j, predicted in enumerate(self.labels)
            ]
        return rows


def evaluate(
    y_true: np.ndarray, probs: np.ndarray, labels: list[str], k: int = 3, bins: int = 10
) -> Report:
    """All metrics of one set of predictions."""
    y_true, probs = _check(y_true, probs)
    if probs.shape[1] != len(labels):
        raise ValueError(f"probs has {probs.shape[1]} classes but {len(labels)} labels were given")
    y_pred = probs.argmax(axis=1)
    confusion = confusion_matrix(y_true, y_pred, len(labels))
    scores = per_class_scores(confusion)
    support = scores.support.astype(np.float64)
    weights = support / support.sum() if support.sum() else support
    by_name = {"precision": scores.precision, "recall": scores.recall, "f1": scores.f1}
    roc = roc_auc_one_vs_rest(y_true, probs)
    defined = ~np.isnan(roc)
    roc_weights = support[defined]
    return Report(
        labels=list(labels),
        count=int(len(y_true)),
        accuracy=float(np.mean(y_pred == y_true)) if len(y_true) else math.nan,
        top_k=k,
        top_k_accuracy=top_k_accuracy(y_true, probs, k),
        macro={name: float(np.mean(v)) for name, v in by_name.items()},
        weighted={name: float(np.sum(v * weights)) for name, v in by_name.items()},
        per_class=scores,
        confusion=confusion,
        roc_auc=roc,
        roc_auc_macro=float(np.mean(roc[defined])) if defined.any() else math.nan,
        roc_auc_weighted=(float(np.sum(roc[defined] * roc_weights) / roc_weights.sum())
                          if defined.any() else math.nan),
        ece=expected_calibration_error(y_true, probs, bins),
    )


# --- pictures ---------------------------------------------------------------------------------


def plot_confusion_matrix(confusion: np.ndarray, labels: list[str]) -> Figure:
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), value in np.ndenumerate(confusion):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > threshold else "black")
    fig.tight_layout()
    return fig


def plot_reliability_diagram(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> Figure:
    count, accuracy, mean_conf = calibration_bins(y_true, probs, bins)
    edges = np.linspace(0, 1, bins + 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = count > 0
    ax.bar(edges[:-1][filled], accuracy[filled], width=1 / bins, align="edge",
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mean_conf[filled], accuracy[filled], "o", color="darkorange", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {expected_calibration_error(y_true, probs, bins):.3f})")
    ax.legend(loc="upper left")
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

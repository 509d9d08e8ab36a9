"""The ranking of classes by probability that every prediction shares: batch scoring's table rows,
serving's answers and the MLflow pyfunc's `top_k` all take their top k from `top_classes`."""

from __future__ import annotations

import numpy as np


def top_classes(probs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, float64 probabilities), each (n, k), most probable first; ties keep class
    order; k is clamped to [1, classes]."""
    k = max(1, min(top_k, probs.shape[1]))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(probs, top, axis=1).astype(np.float64)

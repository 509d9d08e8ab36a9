"""Reference code the tests and benchmarks compare the package with, or drive it by; none of it
ships in the package.

- `DirectoryLoader`: a model straight from an `ImageClassifier.save` directory, no registry (the
  benchmarks import it as `tests.reference`, so Spark's Python workers started from the repository
  root import it too).
- `brute_force_pairs`: every pair of hashes within k bits, comparing all pairs: what
  `duplicates.tiers.hamming_pairs` must equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imageiq_spark.ml.inference import Predictor
from imageiq_spark.vision import phash


@dataclass(frozen=True)
class DirectoryLoader:
    """Loads an `ImageClassifier.save` directory (a local or shared path)."""

    directory: str
    key: str

    def __call__(self) -> Predictor:
        from imageiq_spark.ml.classifier import ImageClassifier

        return ImageClassifier.load(self.directory)


def brute_force_pairs(ids: list[str], hashes: np.ndarray, k: int) -> set[tuple[str, str]]:
    """Every pair within k bits by comparing all pairs (numpy): the reference the join must equal."""
    order = np.argsort(np.asarray(ids, object))
    names = np.asarray(ids, object)[order]
    values = np.asarray(hashes, np.int64)[order]
    found: set[tuple[str, str]] = set()
    for i in range(len(values) - 1):
        near = np.flatnonzero(phash.hamming(values[i], values[i + 1:]) <= k) + i + 1
        found.update((names[i], names[j]) for j in near)
    return found

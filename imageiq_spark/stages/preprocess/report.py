"""What a preprocess run shows people: its summary lines and the sample grid picture."""

from __future__ import annotations

import io
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, Stopwatch, aligned
from imageiq_spark.lake import lakehouse, storage
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.ml.prepared import SPLITS
from imageiq_spark.vision.spec import TransformSpec

log = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    version: str = ""
    prepared: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    split_counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    grid: str | None = None
    watch: Stopwatch = field(default_factory=Stopwatch)

    def counts(self) -> RunCounts:
        quarantined = sum(self.quarantined.values())
        return RunCounts(read=self.prepared + quarantined, written=self.prepared, quarantined=quarantined)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        rows: list[Row] = [
            ("version", self.version),
            ("prepared", self.prepared),
            ("quarantined", f"{sum(self.quarantined.values())} ({reasons})"),
        ]
        for split in SPLITS:
            classes = self.class_counts.get(split, {})
            per_class = ", ".join(f"{label}={n}" for label, n in sorted(classes.items()))
            rows.append((split, f"{self.split_counts.get(split, 0)} ({per_class or 'no images'})"))
        if self.grid:
            rows.append(("sample grid", self.grid))
        rows.append(self.watch.row(self.prepared + sum(self.quarantined.values())))
        return aligned(rows)


def grid_png(samples: list[tuple[np.ndarray, str | None]], title: str) -> bytes:
    """A PNG of up to 16 tensors in a 4-column grid, each titled with its label."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = 4
    rows = max(1, math.ceil(len(samples) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2, rows * 2 + 0.4), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, (tensor, label) in zip(axes.flat, samples):
            image = tensor[:, :, 0] if tensor.shape[2] == 1 else tensor
            ax.imshow(image, cmap="gray" if tensor.shape[2] == 1 else None, vmin=0, vmax=255)
            ax.set_title("unlabelled" if label is None else str(label), fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        _log_figure(fig)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _log_figure(fig: Any) -> None:
    # Only when the caller already runs MLflow: importing it here would cost seconds per job.
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_figure(fig, "preprocess/samples.png")


def write_grid(config: Config, spec: TransformSpec,
               sample: list[tuple[float, str | None, bytes]]) -> str | None:
    """PNG grid of the run's random sample of prepared images; returns its URI."""
    if not sample:
        return None
    samples = [(np.frombuffer(tensor, np.uint8).reshape(spec.shape), label) for _, label, tensor in sample]
    uri = lakehouse.lake_path(config, "reports", "preprocess", f"samples_{spec.version}.png")
    picture = grid_png(samples, f"preprocess_version {spec.version}: {spec.resize}, "
                                f"{spec.size[0]}x{spec.size[1]} {spec.color}")
    try:
        storage.write_bytes(uri, picture)
    except OSError as exc:
        # A picture for people must not fail the job (e.g. an object store pyarrow cannot reach).
        log.warning("could not write the sample grid to %s: %s", uri, exc)
        return None
    return uri

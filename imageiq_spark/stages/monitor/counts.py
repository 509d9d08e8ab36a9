"""`monitor`'s distributions and drift statistics: each Spark task counts its rows per (source and
window, variable, category or grid value) in Arrow (`CountBatches`), the driver adds the counts up
into one `Distributions` per side (a window, or the baseline) and computes the drift statistics
(`drift_metrics`) and the profile rows (`profile_metrics`) from them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from imageiq_spark.core import tables
from imageiq_spark.core.clock import utc_from_timestamp
from imageiq_spark.lake.session import to_arrow
from imageiq_spark.ml import drift

#: Continuous variables and the grid they are counted on (`drift` module docstring).
QUANTUM = {"confidence": 1e-4, "width": 1.0, "height": 1.0, "brightness": 0.01, "contrast": 1e-3,
           "sharpness": 1e-3}
CATEGORICAL = ("label", "format", "correct")
BASELINE = "baseline"
BATCH = "batch"
#: Predictions `imageiq serve` logged (serve.request_log), a second source of windows.
ONLINE = "online"
SOURCES = (BATCH, BASELINE, ONLINE)
#: Partial counts of one task: `side` is `side_code` (source and window start as one integer).
COUNTS_SCHEMA = tables.schema("side BIGINT, variable STRING, category STRING, bin BIGINT, count BIGINT")


def count_pairs(sides: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (side, code) pairs of two integer arrays and how often each occurs, through one
    1-D integer key: a bincount while the key space is small, else a sort."""
    low = int(codes.min())
    span = int(codes.max()) - low + 1
    keys = sides.astype(np.int64) * span + (codes - low)
    if (int(sides.max()) + 1) * span <= 1 << 24:
        counts = np.bincount(keys)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(keys, return_counts=True)
    return keys // span, keys % span + low, counts


@dataclass(frozen=True)
class CountBatches:
    """`mapInArrow`: (side code, a string or boolean column per categorical variable, a grid bin per
    continuous one) -> COUNTS_SCHEMA rows. The task's whole partition is counted at once in numpy on
    integer codes, so a million rows leave it as a few thousand counts."""

    categorical: tuple[str, ...]
    continuous: tuple[str, ...]

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        received = [batch for batch in batches if batch.num_rows]
        if not received:  # an empty partition sends no batch, or only empty ones
            return
        rows = pa.Table.from_batches(received).combine_chunks()
        # A side is one (source, window) of the partition: a handful of them.
        side_keys, side_of_row = np.unique(rows["side"].chunk(0).to_numpy(), return_inverse=True)
        side_of_row = side_of_row.reshape(-1)
        for name in self.categorical + self.continuous:
            column = rows[name].chunk(0)
            if column.null_count == len(column):
                continue
            if pa.types.is_boolean(column.type):  # "true" / "false", as Spark casts them
                column = pc.cast(column, pa.string())
            if name in self.categorical:
                column = column.dictionary_encode()
                column, dictionary = column.indices, column.dictionary
            valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
            codes = pc.fill_null(column, 0).to_numpy().astype(np.int64)
            sides, values, counts = count_pairs(side_of_row[valid], codes[valid])
            n = len(counts)
            yield pa.RecordBatch.from_arrays(
                [pa.array(side_keys[sides], pa.int64()),
                 pa.array([name] * n, pa.string()),
                 dictionary.take(pa.array(values)) if name in self.categorical else pa.nulls(n, pa.string()),
                 pa.nulls(n, pa.int64()) if name in self.categorical else pa.array(values),
                 pa.array(counts, pa.int64())],
                names=COUNTS_SCHEMA.fieldNames())


def side_code(source: Column, window_start: Column) -> Column:
    """(source, window start) as one integer, unix seconds of the window times 4 plus the source's
    index in SOURCES (1..3), -4 + index for the baseline's null window: Arrow moves one integer
    column out of the JVM several times faster than a string and a timestamp."""
    index = F.array_position(F.array(*(F.lit(s) for s in SOURCES)), source)
    return F.coalesce(F.unix_seconds(window_start), F.lit(-1)) * (len(SOURCES) + 1) + index


def decode_side(code: int) -> tuple[str, datetime.datetime | None]:
    """`side_code`'s integer -> (source, window start in UTC; None for the baseline)."""
    seconds, index = divmod(code, len(SOURCES) + 1)
    start = None if seconds == -1 else utc_from_timestamp(seconds)
    return SOURCES[index - 1], start


def distribution_counts(rows: DataFrame) -> DataFrame:
    """Rows with a `source`, a `window_start` and any of the CATEGORICAL / QUANTUM columns -> each
    task's counts per (source, window_start, variable, category, bin); `collect_sides` adds the
    tasks' counts up. A continuous value v is counted at bin rint(v / quantum) (Spark's `round` goes
    through BigDecimal, several times slower); nulls are not counted. One pass, no row per (row,
    variable), no shuffle."""
    categorical = tuple(n for n in CATEGORICAL if n in rows.columns)
    continuous = tuple(n for n in QUANTUM if n in rows.columns)
    keyed = rows.select(side_code(F.col("source"), F.col("window_start")).alias("side"),
                        *(F.col(n) if dict(rows.dtypes)[n] == "boolean" else F.col(n).cast("string").alias(n)
                          for n in categorical),
                        *(F.rint(F.col(n) / QUANTUM[n]).cast("long").alias(n) for n in continuous))
    return keyed.mapInArrow(CountBatches(categorical, continuous), COUNTS_SCHEMA)


@dataclass
class Distributions:
    """One side's counts (a window's, or the baseline's), by variable."""

    categories: dict[str, dict[str, int]] = field(default_factory=dict)
    grids: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # values, counts

    def rows(self) -> int:
        """Predictions counted (each has a label), else images counted."""
        label = self.categories.get("label")
        if label:
            return sum(label.values())
        return max((int(c.sum()) for _, c in self.grids.values()), default=0)

    def accuracy(self) -> float | None:
        correct = self.categories.get("correct", {})
        total = sum(correct.values())
        return correct.get("true", 0) / total if total else None


def collect_sides(parts: list[DataFrame]) -> dict[tuple[str, datetime.datetime | None], Distributions]:
    """The counts of every part's rows (`distribution_counts`), collected through Arrow in one job and
    added up, as one Distributions per (source, window_start); window starts are naive local times,
    as Spark's own `collect` gives them."""
    from functools import reduce


    counts = reduce(DataFrame.unionByName, [distribution_counts(part) for part in parts])
    keys = ["side", "variable", "category", "bin"]
    frame = to_arrow(counts).to_pandas().groupby(keys, dropna=False, sort=False)["count"].sum().reset_index()
    sides: dict[tuple[str, datetime.datetime | None], Distributions] = {}
    for (code, variable), group in frame.groupby(["side", "variable"], sort=False):
        side = sides.setdefault(decode_side(int(code)), Distributions())
        if variable in CATEGORICAL:
            side.categories[variable] = dict(zip(group["category"], group["count"].astype(int).tolist()))
        else:
            side.grids[variable] = (group["bin"].to_numpy(np.int64) * QUANTUM[variable],
                                    group["count"].to_numpy(np.int64))
    return sides


def aligned_counts(a: dict[str, int], b: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two categories' counts as arrays over both's categories, sorted."""
    keys = sorted(set(a) | set(b))
    return np.array([a.get(k, 0) for k in keys], float), np.array([b.get(k, 0) for k in keys], float)


def drift_metrics(baseline: Distributions, window: Distributions) -> dict[str, float]:
    """Every drift statistic both sides have data for, by metric name (= its threshold key)."""
    metrics: dict[str, float] = {}
    for name in ("label", "format"):
        b, w = baseline.categories.get(name), window.categories.get(name)
        if b and w:
            expected, actual = aligned_counts(b, w)
            metrics[f"{name}_psi"] = drift.psi(expected, actual)
            if name == "label":
                metrics["label_js"] = drift.js_distance(expected, actual)
    for name in QUANTUM:
        if name in baseline.grids and name in window.grids:
            metrics[f"{name}_ks"] = drift.ks_statistic(*baseline.grids[name], *window.grids[name])
    if "confidence" in baseline.grids and "confidence" in window.grids:
        metrics["confidence_wasserstein"] = drift.wasserstein(*baseline.grids["confidence"],
                                                              *window.grids["confidence"])
    base_accuracy, window_accuracy = baseline.accuracy(), window.accuracy()
    if base_accuracy is not None and window_accuracy is not None:
        metrics["accuracy_drop"] = base_accuracy - window_accuracy
    return metrics


def profile_metrics(side: Distributions) -> list[tuple[str, str | None, float]]:
    """(metric, key, value) rows describing one side: shares, means, quantiles, accuracy."""
    rows: list[tuple[str, str | None, float]] = []
    for name, counts in sorted(side.categories.items()):
        if name == "correct":
            continue
        total = sum(counts.values())
        rows += [(f"{name}_share", key, n / total) for key, n in sorted(counts.items())]
    for name, (values, counts) in sorted(side.grids.items()):
        order = np.argsort(values)
        values, counts = values[order], counts[order].astype(float)
        mean = float(np.average(values, weights=counts))
        cumulative = np.cumsum(counts) / counts.sum()
        rows += [(f"{name}_mean", None, mean),
                 (f"{name}_std", None, float(np.sqrt(np.average((values - mean) ** 2, weights=counts)))),
                 (f"{name}_p05", None, float(values[np.searchsorted(cumulative, 0.05)])),
                 (f"{name}_p50", None, float(values[np.searchsorted(cumulative, 0.5)])),
                 (f"{name}_p95", None, float(values[np.searchsorted(cumulative, 0.95)]))]
    accuracy = side.accuracy()
    if accuracy is not None:
        rows.append(("accuracy", None, accuracy))
    return rows

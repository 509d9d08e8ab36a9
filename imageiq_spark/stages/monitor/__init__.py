"""Monitor: profiles and drift of the champion's predictions and of the images it scored, per
window, against the champion's baseline -> `monitor_profiles`, `monitor_drift`, `alerts`.

The baseline is what the champion was trained on: the `prepared` rows of its preprocess version
prepared before its training run started (its tags name the version; the timestamp pins the
rows, so the baseline survives table copies and VACUUM). Image properties come from its train
split; label mix, confidence and accuracy from its predictions on the val split, images it never
fitted. A window (`monitor.window`: day or hour) holds the champion's predictions of images
outside that baseline by `scored_at`, and the images outside it by `ingested_at`.

Where the time goes: one pass over the champion's predictions (they carry the image's label, so
accuracy needs no join) and one over `image_profiles` (one row per image with its properties,
format and size), each split from the baseline by a join with the baseline's image ids. Each task
counts its rows per (window, variable, category or grid value) in Arrow (`CountBatches`), so a
million predictions reach the driver as a few thousand counts, and `drift` computes the
statistics from those. Brightness, contrast and sharpness need a decode: `image_profiles` keeps
them, computed once per image.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core import tables
from imageiq_spark.core.clock import UTC, as_utc, utc_from_timestamp, utc_now
from imageiq_spark.core.config import Config, to_dict
from imageiq_spark.core.tensors import binary_views
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.ml import drift

log = logging.getLogger(__name__)
T = TypeVar("T")

#: One row per image: what `monitor` aggregates per window of `ingested_at`, so that the image
#: properties of a window need no join (the image columns were added later: last, nullable).
IMAGE_PROFILES_SCHEMA = tables.schema(
    "image_id STRING NOT NULL, brightness DOUBLE, contrast DOUBLE, sharpness DOUBLE, "
    "profiled_at TIMESTAMP NOT NULL, format STRING, width INT, height INT, ingested_at TIMESTAMP"
)
#: The image columns `profile_images` copies from `images`.
_IMAGE_COLUMNS = ("format", "width", "height", "ingested_at")
#: The key columns of `monitor_profiles` and `monitor_drift`: one row per window, source, model, metric.
_WINDOW_COLUMNS = (
    "window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, source STRING NOT NULL, "
    "model_name STRING NOT NULL, model_version STRING NOT NULL, metric STRING NOT NULL, "
)
PROFILES_SCHEMA = tables.schema(
    _WINDOW_COLUMNS + "key STRING, value DOUBLE, rows BIGINT NOT NULL, computed_at TIMESTAMP NOT NULL"
)
DRIFT_SCHEMA = tables.schema(
    _WINDOW_COLUMNS + "value DOUBLE, threshold DOUBLE, window_rows BIGINT NOT NULL, "
    "baseline_rows BIGINT NOT NULL, computed_at TIMESTAMP NOT NULL"
)
ALERTS_SCHEMA = tables.schema(
    "metric STRING NOT NULL, window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, "
    "source STRING NOT NULL, model_name STRING NOT NULL, model_version STRING NOT NULL, "
    "value DOUBLE NOT NULL, threshold DOUBLE NOT NULL, severity STRING NOT NULL, "
    "raised_at TIMESTAMP NOT NULL"
)
ALERT_KEYS = ["metric", "window_start", "source", "model_name", "model_version"]
#: Continuous variables and the grid they are counted on (`drift` module docstring).
QUANTUM = {"confidence": 1e-4, "width": 1.0, "height": 1.0, "brightness": 0.01, "contrast": 1e-3,
           "sharpness": 1e-3}
CATEGORICAL = ("label", "format", "correct")
#: The columns of `image_profiles` that are profiled per window.
IMAGE_VARIABLES = ("format", "width", "height", "brightness", "contrast", "sharpness")
#: Image properties come from a decode at most this much larger than PROFILE_SIDE per side.
PROFILE_SIDE = 256
BASELINE = "baseline"
BATCH = "batch"
#: Predictions `imageiq serve` logged (serve.request_log), a second source of windows.
ONLINE = "online"
SOURCES = (BATCH, BASELINE, ONLINE)


# --- per image: brightness, contrast, sharpness ------------------------------------------------


def image_properties(gray: np.ndarray) -> tuple[float, float, float]:
    """(mean grey level, contrast, sharpness) of a greyscale image.

    Contrast is the grey-level standard deviation over the mean, and sharpness the variance of
    the Laplacian over the grey-level variance: both are unchanged when an image is only made
    darker or brighter, so an exposure change reads as brightness drift alone.
    """
    import cv2

    pixels = gray.astype(np.float64)
    mean, variance = float(pixels.mean()), float(pixels.var())
    contrast = float(np.sqrt(variance) / mean) if mean > 0 else 0.0
    laplacian = cv2.Laplacian(pixels, cv2.CV_64F)
    sharpness = float(laplacian.var() / variance) if variance > 0 else 0.0
    return mean, contrast, sharpness


def _reduced_flag(width: int | None, height: int | None) -> int:
    """Decode large images at 1/2, 1/4 or 1/8 scale while the short side keeps PROFILE_SIDE."""
    import cv2

    short = min(width or 0, height or 0)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
        if short >= factor * PROFILE_SIDE:
            return flag
    return cv2.IMREAD_GRAYSCALE


def profile_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """`mapInArrow`: (image_id, content, format, width, height, ingested_at) -> (image_id,
    brightness, contrast, sharpness, format, width, height, ingested_at); an image that does not
    decode gets null properties (the other stages quarantine it)."""
    import cv2

    for batch in batches:
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        values = []
        for data, width, height in zip(binary_views(batch.column("content")), widths, heights):
            gray = None if data is None else cv2.imdecode(data, _reduced_flag(width, height))
            values.append((None, None, None) if gray is None else image_properties(gray))
        columns = list(zip(*values)) if values else [(), (), ()]
        yield pa.RecordBatch.from_arrays(
            [batch.column("image_id"), *(pa.array(c, pa.float64()) for c in columns),
             *(batch.column(name) for name in _IMAGE_COLUMNS)],
            names=["image_id", "brightness", "contrast", "sharpness", *_IMAGE_COLUMNS])


def profile_images(images: DataFrame) -> DataFrame:
    """`images` rows -> IMAGE_PROFILES_SCHEMA rows."""
    computed = StructType([f for f in IMAGE_PROFILES_SCHEMA.fields if f.name != "profiled_at"])
    return (images.select("image_id", "content", *_IMAGE_COLUMNS)
            .mapInArrow(profile_batches, computed)
            .select(*(F.current_timestamp().alias(n) if n == "profiled_at" else F.col(n)
                      for n in IMAGE_PROFILES_SCHEMA.fieldNames())))


# --- distributions ------------------------------------------------------------------------------

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

    from imageiq_spark.lake.session import to_arrow

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


# --- the champion's baseline and windows ---------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    run_id: str
    preprocess_version: str
    trained_at: datetime.datetime  # the training run's start, in UTC


def champion(config: Config) -> Champion:
    from mlflow.tracking import MlflowClient

    from imageiq_spark.lake import tracking

    name, version, run_id = tracking.resolve_model(config, tracking.default_model_uri(config))
    run = MlflowClient().get_run(run_id)
    preprocess_version = run.data.tags.get("preprocess_version")
    if preprocess_version is None:
        raise RuntimeError(
            f"the champion {name} version {version} (run {run_id}) has no preprocess_version tag: "
            "monitoring compares against the data a model was trained on, so it needs a champion "
            "trained by `imageiq train`"
        )
    trained_at = utc_from_timestamp(run.info.start_time / 1000)
    return Champion(name, version, run_id, preprocess_version, trained_at)


def baseline_splits(spark: SparkSession, config: Config, model: Champion) -> DataFrame:
    """(image_id, split) of the rows the champion was trained on."""
    return (lakehouse.read_table(spark, config, "prepared")
            .where((F.col("preprocess_version") == model.preprocess_version)
                   & (F.col("prepared_at") <= F.lit(model.trained_at)))
            .select("image_id", "split"))


def window_start(column: str, unit: str) -> Column:
    return F.date_trunc(unit, F.col(column))


def _window_end(start: datetime.datetime, unit: str) -> datetime.datetime:
    return start + (datetime.timedelta(days=1) if unit == "day" else datetime.timedelta(hours=1))


def population(spark: SparkSession, config: Config, model: Champion, since: datetime.datetime
               ) -> list[DataFrame]:
    """Window rows (source `batch`, and `online` from the serving log) and baseline rows (window_start
    null) with the columns `distribution_counts` counts, one DataFrame per table read.

    One pass over the champion's predictions: those of images outside its baseline are window rows
    (by `scored_at`), those of its val images baseline rows. One pass over `image_profiles`: images
    outside the baseline are window rows (by `ingested_at`, when they arrived), its training images
    baseline rows. Accuracy uses the label each prediction row carries (`score` writes the image's
    label, `relabel` keeps it current), so neither pass joins a table of the same size.
    """
    unit = config.monitor.window
    splits = baseline_splits(spark, config, model)
    in_window = F.col("split").isNull()

    def tagged(table: DataFrame, baseline_split: str, timestamp: str) -> DataFrame:
        """`table`'s rows with `source` and `window_start`: outside the baseline or in `baseline_split`."""
        start = window_start(timestamp, unit)
        return (table.join(splits, "image_id", "left")
                .where((in_window & (start >= F.lit(since))) | (F.col("split") == baseline_split))
                .withColumn("source", F.when(in_window, F.lit(BATCH)).otherwise(F.lit(BASELINE)))
                .withColumn("window_start", F.when(in_window, start)))

    predictions = (lakehouse.read_table(spark, config, "predictions")
                   .where((F.col("model_name") == model.name) & (F.col("model_version") == model.version))
                   .select("image_id", "scored_at", "predicted_label", "confidence", "label"))
    correct = F.when(F.col("label").isNotNull(),
                     (F.col("predicted_label") == F.col("label")).cast("string")).alias("correct")
    parts = [
        tagged(predictions, "val", "scored_at").select(
            "source", "window_start", F.col("predicted_label").alias("label"), "confidence", correct),
        tagged(lakehouse.read_table(spark, config, "image_profiles"), "train", "ingested_at").select(
            "source", "window_start", *IMAGE_VARIABLES),
    ]
    online = online_predictions(spark, config, model)
    if online is not None:
        parts.append(
            online.select(F.lit(ONLINE).alias("source"),
                          window_start("requested_at", unit).alias("window_start"),
                          F.col("predicted_label").alias("label"), "confidence")
            .where(F.col("window_start") >= F.lit(since)))
    return parts


def online_predictions(spark: SparkSession, config: Config, model: Champion) -> DataFrame | None:
    """The champion's predictions in the serving request log, or None when nothing was logged."""
    from pyspark.errors import AnalysisException

    from imageiq_spark.lake import storage

    folder = lakehouse.lake_path(config, "request_log")
    if not storage.folder_exists(folder):  # the server never logged, or request_log is off
        return None
    try:
        logged = spark.read.parquet(folder)
        # Analysed here: a Spark Connect client reads lazily and would fail only at the first action.
        logged.schema  # noqa: B018
    except AnalysisException:  # a log folder without a file yet
        return None
    return logged.where((F.col("model_name") == model.name) & (F.col("model_version") == model.version))


def quarantine_rates(spark: SparkSession, config: Config, since: datetime.datetime
                     ) -> dict[datetime.datetime, tuple[float, int]]:
    """Per window of `ingested_at`: (share of files quarantined, files seen)."""
    unit = config.monitor.window
    images = (lakehouse.read_table(spark, config, "images")
              .select(window_start("ingested_at", unit).alias("window_start"), F.lit(0).alias("bad")))
    if lakehouse.table_exists(spark, config, "quarantine"):
        images = images.unionByName(lakehouse.read_table(spark, config, "quarantine").select(
            window_start("ingested_at", unit).alias("window_start"), F.lit(1).alias("bad")))
    rows = (images.where(F.col("window_start") >= F.lit(since)).groupBy("window_start")
            .agg(F.avg("bad").alias("rate"), F.count("*").alias("files")).collect())
    return {as_utc(r["window_start"]): (float(r["rate"]), int(r["files"])) for r in rows}


def update_image_profiles(spark: SparkSession, config: Config) -> int:
    """Profile the images that have none yet; returns how many were added. Rows profiled before
    `image_profiles` held the image columns get them from `images`, once."""
    from imageiq_spark.lake.session import spread

    lakehouse.ensure_table(spark, config, "image_profiles", IMAGE_PROFILES_SCHEMA)
    images = lakehouse.read_table(spark, config, "images")
    profiles = lakehouse.read_table(spark, config, "image_profiles")
    if profiles.where(F.col("ingested_at").isNull()).limit(1).count():
        lakehouse.merge(config, "image_profiles", images.select("image_id", *_IMAGE_COLUMNS),
                        "t.image_id = s.image_id AND t.ingested_at IS NULL",
                        "WHEN MATCHED THEN UPDATE SET " + ", ".join(f"t.{c} = s.{c}" for c in _IMAGE_COLUMNS))
    # Profiles are only ever made from images: the same count and newest arrival mean none is
    # missing, which Delta answers from its file statistics instead of joining two large tables.
    def extent(table: DataFrame) -> tuple:
        return tuple(table.agg(F.count(F.lit(1)), F.max("ingested_at")).first())

    if extent(images) == extent(profiles):
        return 0
    with lakehouse.pending_rows(images, [profiles.select("image_id")]) as pending:
        if not pending.count:
            return 0
        return lakehouse.merge_new_rows(config, "image_profiles", profile_images(spread(pending.rows)),
                                        ["image_id"])


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    metric: str
    source: str
    window_start: datetime.datetime
    value: float
    threshold: float
    severity: str


@dataclass
class MonitorSummary:
    model_name: str = ""
    model_version: str = ""
    windows: int = 0
    profiled_images: int = 0
    latest_window: datetime.datetime | None = None
    latest: dict[str, float] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    report_uri: str = ""
    textfile: str = ""
    elapsed_s: float = 0.0

    def latest_alerts(self) -> list[Alert]:
        """Breaches in the newest batch window: what a scheduler pages on (older ones already did)."""
        return [a for a in self.alerts if a.source == BATCH and a.window_start == self.latest_window]

    def counts(self) -> RunCounts:
        return RunCounts(read=self.windows, written=len(self.alerts), model_name=self.model_name,
                         model_version=self.model_version)

    def lines(self) -> list[str]:
        from imageiq_spark.core.summary import Row, aligned

        rows: list[Row] = [("model", f"{self.model_name} version {self.model_version}"),
                           ("windows", self.windows),
                           ("profiled", f"{self.profiled_images} new images")]
        if self.latest:
            rows.append((f"latest window ({self.latest_window:%Y-%m-%d %H:%M})",
                         ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.latest.items()))))
        rows.append(("alerts", len(self.alerts)))
        rows += [f"  {a.severity:<8} {a.metric} = {a.value:.4f} > {a.threshold} in {a.source} window "
                 f"{a.window_start:%Y-%m-%d %H:%M}" for a in self.alerts]
        if self.report_uri:
            rows.append(("report", self.report_uri))
        if self.textfile:
            rows.append(("prometheus", self.textfile))
        rows.append(("elapsed", f"{self.elapsed_s:.1f} s"))
        return aligned(rows)


def thresholds(config: Config) -> dict[str, float | None]:
    return to_dict(config.monitor.thresholds)


def alerts_for(config: Config, source: str, window: datetime.datetime, values: dict[str, float],
               rows: int, files: int) -> list[Alert]:
    """The breaches of one window. Windows too small to judge raise none."""
    alerts = []
    for metric, value in sorted(values.items()):
        threshold = thresholds(config).get(metric)
        judged_rows = files if metric == "quarantine_rate" else rows
        if threshold is None or judged_rows < config.monitor.min_rows or not value > threshold:
            continue
        severity = "critical" if value > config.monitor.critical_factor * threshold else "warning"
        alerts.append(Alert(metric, source, window, value, threshold, severity))
    return alerts


def run(spark: SparkSession, config: Config) -> MonitorSummary:
    """Profile every window of the last `monitor.lookback_days` against the champion's baseline."""
    started = time.monotonic()
    for table in ("images", "prepared", "predictions"):
        if not lakehouse.table_exists(spark, config, table):
            raise RuntimeError(f"table '{table}' does not exist: monitoring needs ingest, preprocess, "
                               "train and score to have run")
    model = champion(config)
    summary = MonitorSummary(model.name, model.version)
    now = utc_now()
    since = datetime.datetime.combine(now.date() - datetime.timedelta(days=config.monitor.lookback_days),
                                      datetime.time(), UTC)
    with ThreadPoolExecutor(1, thread_name_prefix="imageiq-monitor") as pool:
        # Small independent jobs overlap: most of each is driver-side (planning, Delta logs).
        quarantine = pool.submit(quarantine_rates, spark, config, since)
        summary.profiled_images = update_image_profiles(spark, config)
        by_window = collect_sides(population(spark, config, model, since))
        rates = quarantine.result()
    baseline = by_window.pop((BASELINE, None), Distributions())

    computed_at = utc_now()
    unit = config.monitor.window
    limits = thresholds(config)
    profiles: list[tuple] = [
        (model.trained_at, model.trained_at, BASELINE, model.name, model.version, metric, key, value,
         baseline.rows(), computed_at) for metric, key, value in profile_metrics(baseline)]
    drifts: list[tuple] = []
    windows = sorted(set(by_window) | {(BATCH, start) for start in rates})
    for source, start in windows:
        side = by_window.get((source, start), Distributions())
        values = drift_metrics(baseline, side)
        rate, files = rates.get(start, (None, 0)) if source == BATCH else (None, 0)
        if rate is not None:
            values["quarantine_rate"] = rate
        end = _window_end(start, unit)
        profiles += [(start, end, source, model.name, model.version, metric, key, value, side.rows(),
                      computed_at) for metric, key, value in profile_metrics(side)]
        drifts += [(start, end, source, model.name, model.version, metric, value, limits.get(metric),
                    side.rows(), baseline.rows(), computed_at) for metric, value in sorted(values.items())]
        summary.alerts += alerts_for(config, source, start, values, side.rows(), files)
        if source == BATCH:
            summary.latest_window, summary.latest = start, values
    summary.windows = len(windows)
    writes = result_writes(spark, config, model, profiles, drifts, summary.alerts, unit)
    latest = summary.latest_window
    if latest is None:
        run_together(writes)
    else:
        # The report (PNG, Markdown, MLflow run) is made while the tables are written.
        report = functools.partial(write_report, config, model, baseline,
                                   by_window.get((BATCH, latest), Distributions()), latest, summary)
        summary.report_uri, *_ = run_together([report, *writes])
        summary.textfile = write_textfile(config, model, summary)
    summary.elapsed_s = time.monotonic() - started
    return summary


def result_writes(spark: SparkSession, config: Config, model: Champion, profiles: list[tuple],
                  drifts: list[tuple], alerts: list[Alert], unit: str) -> list[Callable[[], object]]:
    """The writes of this run's results, one per table (`run_together` runs them): profiles and
    drift upserted (a window still open changes), alerts insert-only."""
    window_keys = ("t.window_start = s.window_start AND t.source = s.source AND t.model_name = s.model_name "
                   "AND t.model_version = s.model_version AND t.metric = s.metric")
    upsert = "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
    writes: list[Callable[[], object]] = []
    for table, schema, rows, condition in (
        ("monitor_profiles", PROFILES_SCHEMA, profiles, window_keys + " AND t.key <=> s.key"),
        ("monitor_drift", DRIFT_SCHEMA, drifts, window_keys),
    ):
        lakehouse.ensure_table(spark, config, table, schema)
        if rows:
            writes.append(functools.partial(lakehouse.merge, config, table,
                                            spark.createDataFrame(rows, schema), condition, upsert))
    lakehouse.ensure_table(spark, config, "alerts", ALERTS_SCHEMA)
    if alerts:
        raised_at = utc_now()
        rows = [(a.metric, a.window_start, _window_end(a.window_start, unit), a.source, model.name,
                 model.version, a.value, a.threshold, a.severity, raised_at) for a in alerts]
        writes.append(functools.partial(lakehouse.merge_new_rows, config, "alerts",
                                        spark.createDataFrame(rows, ALERTS_SCHEMA), ALERT_KEYS))
    return writes


def run_together(actions: list[Callable[[], T]]) -> list[T]:
    """Run independent writes (different tables, the report) at once; their results in order, or
    the first failure raised once all have ended. Each is mostly driver-side work (a Delta MERGE
    of a few hundred rows: plans, log reads, a commit), so together they take little longer than
    the longest."""
    with ThreadPoolExecutor(max(1, len(actions)), thread_name_prefix="imageiq-monitor") as pool:
        running = [pool.submit(action) for action in actions]
    return [done.result() for done in running]


# --- pictures, report, Prometheus ---------------------------------------------------------------


def markdown_report(model: Champion, window: datetime.datetime, values: dict[str, float],
                    limits: dict[str, float | None], alerts: list[Alert], picture: str,
                    panels: list[str]) -> str:
    raised = {a.metric for a in alerts if a.source == BATCH and a.window_start == window}
    lines = [f"# Drift of {model.name} version {model.version}, window {window:%Y-%m-%d %H:%M}", "",
             f"Baseline: the champion's training data (preprocess version {model.preprocess_version}, "
             f"prepared before {model.trained_at:%Y-%m-%d %H:%M:%S} UTC).", "",
             "| metric | value | threshold | alert |", "|---|---|---|---|"]
    for metric, value in sorted(values.items()):
        limit = limits.get(metric)
        lines.append(f"| {metric} | {value:.4f} | {'-' if limit is None else limit} | "
                     f"{'**yes**' if metric in raised else ''} |")
    lines += ["", f"![{', '.join(panels)}]({picture})", ""]
    return "\n".join(lines)


def write_report(config: Config, model: Champion, baseline: Distributions, window: Distributions,
                 start: datetime.datetime, summary: MonitorSummary) -> str:
    """PNG + Markdown of the latest window under storage.root, also logged to an MLflow run."""
    import mlflow

    from imageiq_spark.lake.storage import write_bytes
    from imageiq_spark.lake.tracking import configure_mlflow, redact_run_tags
    from imageiq_spark.stages.monitor.report import drift_picture

    picture = "drift.png"
    png, panels = drift_picture(baseline, window, summary.latest_alerts(),
                                f"{model.name} v{model.version}, window {start:%Y-%m-%d %H:%M}")
    text = markdown_report(model, start, summary.latest, thresholds(config), summary.alerts, picture, panels)
    folder = lakehouse.lake_path(config, "reports", "monitor", config.catalog.database, model.name,
                                 f"v{model.version}", f"{start:%Y%m%dT%H%M}")
    write_bytes(f"{folder}/{picture}", png)
    write_bytes(f"{folder}/report.md", text.encode())
    configure_mlflow(config)
    with mlflow.start_run(run_name=f"monitor {start:%Y-%m-%d %H:%M}",
                          tags={"imageiq.stage": "monitor", "model_version": model.version}), \
            TemporaryDirectory() as tmp:
        redact_run_tags(mlflow.active_run().info.run_id)
        mlflow.log_metrics({k: v for k, v in summary.latest.items() if np.isfinite(v)})
        (Path(tmp) / picture).write_bytes(png)
        (Path(tmp) / "report.md").write_text(text)
        mlflow.log_artifacts(tmp, artifact_path="monitor")
    return f"{folder}/report.md"


def textfile_path(config: Config) -> str | None:
    if config.monitor.textfile:
        return config.monitor.textfile
    root = config.storage.root
    if "://" in root or root.startswith("dbfs:"):
        return None
    return str(Path(root) / "monitor" / f"{config.catalog.database}.prom")


def write_textfile(config: Config, model: Champion, summary: MonitorSummary) -> str:
    """The latest window's values in node-exporter's textfile-collector format (written atomically)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    path = textfile_path(config)
    if path is None:
        return ""
    registry = CollectorRegistry()
    labels = ["metric", "model_name", "model_version"]
    values = Gauge("imageiq_drift", "Drift of the latest monitored window against the champion's baseline",
                   labels, registry=registry)
    breached = Gauge("imageiq_drift_alert", "1 when the metric breaches its threshold in the latest window",
                     labels, registry=registry)
    raised = {a.metric for a in summary.latest_alerts()}
    for metric, value in summary.latest.items():
        values.labels(metric, model.name, model.version).set(value)
        breached.labels(metric, model.name, model.version).set(1 if metric in raised else 0)
    Gauge("imageiq_monitor_last_run_timestamp_seconds", "When monitoring last ran",
          registry=registry).set(time.time())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(path, registry)
    return path


"""Preprocess: `images` -> `prepared`, fixed-size uint8 tensors with a stable label vocabulary and split.

Each image's bytes go through `transform.prepare_image` (the one transform shared with training,
scoring and the exported model) inside a pandas iterator UDF over Arrow batches. Rows are keyed by
(`image_id`, `preprocess_version`), where the version is `TransformSpec.version`, a hash of every
transform parameter: a rerun prepares only images missing at the current version, and a config
change prepares everything again under a new version beside the old one. Images that fail go to
`quarantine` with stage `preprocess`; the job goes on, and later runs skip them (delete the
quarantine row to retry one, for example after a fix in the transform).

What travels with the table, in two small Delta tables beside it (same database folder):
- `prepared_labels` (label, label_index, added_at): the label vocabulary. Labels get indices in
  sorted order the first time they are seen; later labels are appended; an index never changes.
- `prepared_versions` (preprocess_version, spec, channel_mean, channel_std, train_images,
  updated_at): per version, the `TransformSpec` as JSON and the per-channel mean and std of the
  train split on the 0..255 scale, computed by Spark after each run that added rows.

`split` comes from a SHA-256 of the `image_id` mapped to [0, 1) and cut at the configured
fractions. It is written once per row and never moves: changing `preprocess.split` affects only
images prepared afterwards, so an image once used for training never lands in the test split.

Each run also writes a PNG grid of random prepared images with their labels to
`<storage.root>/reports/preprocess/samples_<version>.png` (and logs it to an active MLflow run).
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from delta.tables import DeltaTable
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from imageiq_spark import lakehouse
from imageiq_spark.config import Config
from imageiq_spark.ingest import QUARANTINE_KEYS, QUARANTINE_SCHEMA
from imageiq_spark.transform import ImageDecodeError, TransformSpec, prepare_image

log = logging.getLogger(__name__)

PREPARED_SCHEMA = StructType(
    [
        StructField("image_id", StringType(), False),
        StructField("label", StringType(), True),
        StructField("label_index", IntegerType(), True),
        StructField("split", StringType(), False),
        StructField("tensor", BinaryType(), False),
        StructField("height", IntegerType(), False),
        StructField("width", IntegerType(), False),
        StructField("channels", IntegerType(), False),
        StructField("preprocess_version", StringType(), False),
        StructField("prepared_at", TimestampType(), False),
    ]
)
PREPARED_KEYS = ["image_id", "preprocess_version"]
LABELS_TABLE, VERSIONS_TABLE = "prepared_labels", "prepared_versions"
LABELS_SCHEMA = StructType(
    [
        StructField("label", StringType(), False),
        StructField("label_index", IntegerType(), False),
        StructField("added_at", TimestampType(), False),
    ]
)
VERSIONS_SCHEMA = StructType(
    [
        StructField("preprocess_version", StringType(), False),
        StructField("spec", StringType(), False),
        StructField("channel_mean", ArrayType(DoubleType()), True),
        StructField("channel_std", ArrayType(DoubleType()), True),
        StructField("train_images", LongType(), False),
        StructField("updated_at", TimestampType(), False),
    ]
)
#: What the UDF returns per image: the tensor, or why there is none.
UDF_SCHEMA = StructType(
    [
        StructField("image_id", StringType(), False),
        StructField("path", StringType(), True),
        StructField("label", StringType(), True),
        StructField("size_bytes", LongType(), True),
        StructField("modified_at", TimestampType(), True),
        StructField("tensor", BinaryType(), True),
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
    ]
)
STATS_SCHEMA = StructType(
    [
        StructField("channel", IntegerType(), False),
        StructField("total", LongType(), False),
        StructField("total_sq", LongType(), False),
        StructField("pixels", LongType(), False),
    ]
)
PREPROCESS_FAILED = "preprocess_failed"
GRID_IMAGES = 16
SPLITS = ("train", "val", "test")


@dataclass
class PreprocessSummary:
    version: str = ""
    prepared: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    split_counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    grid: str | None = None
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        rate = self.prepared / self.elapsed_s if self.elapsed_s else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        lines = [
            f"version:      {self.version}",
            f"prepared:     {self.prepared}",
            f"quarantined:  {sum(self.quarantined.values())} ({reasons})",
        ]
        for split in SPLITS:
            classes = self.class_counts.get(split, {})
            per_class = ", ".join(f"{label}={n}" for label, n in sorted(classes.items()))
            lines.append(f"{split + ':':<13} {self.split_counts.get(split, 0)} ({per_class or 'no images'})")
        if self.grid:
            lines.append(f"sample grid:  {self.grid}")
        lines.append(f"elapsed:      {self.elapsed_s:.1f} s ({rate:.1f} images/s)")
        return lines


# ------------------------------------------------------------------------------ pure functions


def prepare_partition(spec: TransformSpec):
    """A mapInPandas function: image rows -> UDF_SCHEMA rows, one per image, never raising."""
    spec_dict = spec.to_dict()

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import cv2

        # Spark already runs one task per core; OpenCV's own threads would only contend.
        cv2.setNumThreads(1)
        worker_spec = TransformSpec.from_dict(spec_dict)
        for batch in batches:
            tensors: list[bytes | None] = []
            reasons: list[str | None] = []
            details: list[str | None] = []
            for content in batch["content"]:
                try:
                    tensors.append(prepare_image(content, worker_spec).tobytes())
                    reasons.append(None)
                    details.append(None)
                except ImageDecodeError as exc:
                    tensors.append(None)
                    reasons.append(exc.reason)
                    details.append(exc.detail)
                except Exception as exc:  # noqa: BLE001 - no single file may fail the job
                    tensors.append(None)
                    reasons.append(PREPROCESS_FAILED)
                    details.append(f"{type(exc).__name__}: {exc}"[:500])
            out = batch[["image_id", "path", "label", "size_bytes", "modified_at"]].reset_index(drop=True)
            out["tensor"] = tensors
            out["reason"] = reasons
            out["detail"] = details
            yield out

    return run


def split_column(image_id: Column, train: float, val: float) -> Column:
    """'train' | 'val' | 'test' from a hash of the image id: the same id always gets the same split."""
    digest = F.sha2(F.concat(F.lit("imageiq-split:"), image_id), 256)
    u = F.conv(F.substring(digest, 1, 8), 16, 10).cast("double") / float(1 << 32)
    return F.when(u < train, "train").when(u < train + val, "val").otherwise("test")


def prepared_rows(good: DataFrame, vocabulary: DataFrame, spec: TransformSpec, config: Config,
                  prepared_at: Column) -> DataFrame:
    """UDF rows that have a tensor -> PREPARED_SCHEMA rows."""
    fractions = config.preprocess.split
    height, width, channels = spec.shape
    return good.join(F.broadcast(vocabulary.select("label", "label_index")), "label", "left").select(
        "image_id",
        "label",
        F.col("label_index").cast("int"),
        split_column(F.col("image_id"), fractions.train, fractions.val).alias("split"),
        "tensor",
        F.lit(height).alias("height"),
        F.lit(width).alias("width"),
        F.lit(channels).alias("channels"),
        F.lit(spec.version).alias("preprocess_version"),
        prepared_at.alias("prepared_at"),
    )


def quarantine_rows(bad: DataFrame, quarantined_at: Column) -> DataFrame:
    return bad.select(
        "path",
        "reason",
        "detail",
        F.lit("preprocess").alias("stage"),
        "image_id",
        "size_bytes",
        "modified_at",
        quarantined_at.alias("ingested_at"),
    )


def channel_sums(channels: int):
    """A mapInPandas function: tensors -> per-channel sums of values and squares (exact integers)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        total = np.zeros(channels, np.int64)
        total_sq = np.zeros(channels, np.int64)
        pixels = 0
        for batch in batches:
            for tensor in batch["tensor"]:
                values = np.frombuffer(tensor, np.uint8).reshape(-1, channels)
                total += values.sum(axis=0, dtype=np.int64)
                wide = values.astype(np.int64)
                total_sq += (wide * wide).sum(axis=0)
                pixels += values.shape[0]
        yield pd.DataFrame(
            {"channel": np.arange(channels), "total": total, "total_sq": total_sq,
             "pixels": np.full(channels, pixels, np.int64)}
        )

    return run


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


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file under storage.root (local path, file:, s3a:// or s3://)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(data)


# ------------------------------------------------------------------------------- table readers


def current_version(config: Config) -> str:
    return TransformSpec.from_config(config).version


def read_prepared(
    spark: SparkSession, config: Config, version: str | None = None, splits: list[str] | None = None
) -> DataFrame:
    """Rows of `prepared` at `version` (default: the version `config` gives), optionally some splits."""
    rows = lakehouse.read_table(spark, config, "prepared").filter(
        F.col("preprocess_version") == (version or current_version(config))
    )
    if splits:
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"read_prepared: splits {unknown} are unknown; expected some of {SPLITS}")
        rows = rows.filter(F.col("split").isin(list(splits)))
    return rows


def read_label_vocabulary(spark: SparkSession, config: Config) -> list[str]:
    """Labels ordered by `label_index` (index i is `vocabulary[i]`); [] before the first preprocess."""
    if not lakehouse.table_exists(spark, config, LABELS_TABLE):
        return []
    rows = lakehouse.read_table(spark, config, LABELS_TABLE).orderBy("label_index").collect()
    return [row["label"] for row in rows]


def read_channel_stats(spark: SparkSession, config: Config, version: str | None = None
                       ) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of the train split at `version`, on the 0..255 scale."""
    version = version or current_version(config)
    row = _version_row(spark, config, version)
    if row is None or row["channel_mean"] is None:
        raise LookupError(
            f"no channel statistics for preprocess_version {version}: the train split at that "
            "version is empty or was never prepared; run `imageiq preprocess` with this config"
        )
    return list(row["channel_mean"]), list(row["channel_std"])


def read_spec(spark: SparkSession, config: Config, version: str) -> TransformSpec:
    """The TransformSpec that made the tensors of `version`."""
    row = _version_row(spark, config, version)
    if row is None:
        raise LookupError(f"preprocess_version {version} is unknown: no row in {VERSIONS_TABLE}")
    return TransformSpec.from_dict(json.loads(row["spec"]))


def _version_row(spark: SparkSession, config: Config, version: str) -> Any:
    if not lakehouse.table_exists(spark, config, VERSIONS_TABLE):
        return None
    rows = (
        lakehouse.read_table(spark, config, VERSIONS_TABLE)
        .filter(F.col("preprocess_version") == version)
        .collect()
    )
    return rows[0] if rows else None


# ------------------------------------------------------------------------------- table writers


def update_vocabulary(spark: SparkSession, config: Config, labels: set[str], attempts: int = 10) -> list[str]:
    """Append labels the vocabulary lacks (sorted, after the existing ones); returns the vocabulary.

    The MERGE inserts a label only if neither it nor its index exists, so two concurrent runs can
    never give one index to two labels; the loser re-reads and tries again.
    """
    current = read_label_vocabulary(spark, config)
    for _ in range(attempts):
        new = sorted(labels - set(current))
        if not new:
            return current
        rows = spark.createDataFrame(
            [(label, len(current) + i) for i, label in enumerate(new)], "label string, label_index int"
        ).withColumn("added_at", F.current_timestamp())
        inserted = lakehouse.merge(
            config, LABELS_TABLE, rows, "t.label = s.label OR t.label_index = s.label_index",
            "WHEN NOT MATCHED THEN INSERT *",
        )
        if inserted == len(new):
            return current + new
        # Another run added labels first: read what it wrote and append after it.
        current = read_label_vocabulary(spark, config)
    raise RuntimeError(f"could not add labels {sorted(labels)} to {LABELS_TABLE} after {attempts} attempts")


def update_channel_stats(
    spark: SparkSession, config: Config, spec: TransformSpec
) -> tuple[list[float], list[float]] | None:
    """Recompute the train split's per-channel mean and std at the spec's version and store them."""
    train = read_prepared(spark, config, spec.version, ["train"]).select("tensor")
    sums = (
        train.mapInPandas(channel_sums(spec.channels), STATS_SCHEMA)
        .groupBy("channel")
        .agg(F.sum("total").alias("total"), F.sum("total_sq").alias("total_sq"),
             F.sum("pixels").alias("pixels"))
        .orderBy("channel")
        .collect()
    )
    pixels = sums[0]["pixels"] if sums else 0
    stats: tuple[list[float], list[float]] | None = None
    if pixels:
        mean = [row["total"] / pixels for row in sums]
        std = [math.sqrt(max(0.0, row["total_sq"] / pixels - m * m)) for row, m in zip(sums, mean)]
        stats = (mean, std)
    images = pixels // (spec.size[0] * spec.size[1])
    row = spark.createDataFrame(
        [(spec.version, spec.to_json(), stats[0] if stats else None, stats[1] if stats else None, images)],
        "preprocess_version string, spec string, channel_mean array<double>, "
        "channel_std array<double>, train_images long",
    ).withColumn("updated_at", F.current_timestamp())
    target = DeltaTable.forPath(spark, lakehouse.table_location(config, VERSIONS_TABLE))

    def upsert() -> None:
        (
            target.alias("t")
            .merge(row.alias("s"), "t.preprocess_version = s.preprocess_version")
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
            .execute()
        )

    lakehouse.with_conflict_retry(upsert, f"merge {VERSIONS_TABLE}")
    return stats


def write_grid(spark: SparkSession, config: Config, spec: TransformSpec) -> str | None:
    """PNG grid of random prepared images at the spec's version; returns its URI."""
    # orderBy(rand) + limit runs as a per-partition top-k, not a full sort of the tensors.
    rows = (
        read_prepared(spark, config, spec.version)
        .select("label", "tensor", "height", "width", "channels")
        .orderBy(F.rand())
        .limit(GRID_IMAGES)
        .collect()
    )
    if not rows:
        return None
    samples = [
        (np.frombuffer(r["tensor"], np.uint8).reshape(r["height"], r["width"], r["channels"]), r["label"])
        for r in rows
    ]
    uri = lakehouse.lake_path(config, "reports", "preprocess", f"samples_{spec.version}.png")
    picture = grid_png(samples, f"preprocess_version {spec.version}: {spec.resize}, "
                                f"{spec.size[0]}x{spec.size[1]} {spec.color}")
    try:
        write_bytes(uri, picture)
    except OSError as exc:
        # A picture for people must not fail the job (e.g. an object store pyarrow cannot reach).
        log.warning("could not write the sample grid to %s: %s", uri, exc)
        return None
    return uri


def ensure_tables(spark: SparkSession, config: Config) -> None:
    lakehouse.ensure_table(spark, config, "prepared", PREPARED_SCHEMA)
    lakehouse.ensure_table(spark, config, "quarantine", QUARANTINE_SCHEMA)
    lakehouse.ensure_table(spark, config, LABELS_TABLE, LABELS_SCHEMA)
    lakehouse.ensure_table(spark, config, VERSIONS_TABLE, VERSIONS_SCHEMA)


def _count_table(
    spark: SparkSession, config: Config, version: str
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    rows = read_prepared(spark, config, version).groupBy("split", "label").count().collect()
    splits: Counter[str] = Counter()
    classes: dict[str, dict[str, int]] = {}
    for row in rows:
        splits[row["split"]] += row["count"]
        label = "unlabelled" if row["label"] is None else row["label"]
        classes.setdefault(row["split"], {})[label] = row["count"]
    return dict(splits), classes


def run(spark: SparkSession, config: Config) -> PreprocessSummary:
    """Prepare every image of `images` not yet in `prepared` at the current preprocess_version."""
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError(
            f"table images does not exist under storage.root '{config.storage.root}': "
            "run `imageiq ingest` first"
        )
    started = time.monotonic()
    spec = TransformSpec.from_config(config)
    summary = PreprocessSummary(version=spec.version)
    ensure_tables(spark, config)

    done = read_prepared(spark, config, spec.version).select("image_id")
    # An image this stage already quarantined is not decoded again on every run; delete its
    # quarantine row to retry it.
    failed = (
        lakehouse.read_table(spark, config, "quarantine")
        .filter(F.col("stage") == "preprocess")
        .select("image_id")
    )
    todo = (
        lakehouse.read_table(spark, config, "images")
        .join(done, "image_id", "left_anti")
        .join(failed, "image_id", "left_anti")
    )
    # No count first (a whole extra scan): a fixed spread over the cores, rebalanced round-robin
    # because the images table may hold everything in one file.
    partitions = 2 * spark.sparkContext.defaultParallelism
    batch_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(batch_key, None)
    # Rows per Arrow batch bound a Python worker's memory: batch_rows images in, tensors out.
    spark.conf.set(batch_key, str(config.preprocess.batch_rows))
    outcome = (
        todo.select("image_id", "path", "label", "size_bytes", "modified_at", "content")
        .repartition(partitions)
        .mapInPandas(prepare_partition(spec), UDF_SCHEMA)
        .persist(StorageLevel.DISK_ONLY)
    )
    try:
        counts = {r["reason"]: r["n"] for r in outcome.groupBy("reason").count()
                  .withColumnRenamed("count", "n").collect()}
        good_count = counts.pop(None, 0)
        summary.quarantined.update(counts)
        now = F.current_timestamp()
        if counts:
            lakehouse.merge_new_rows(config, "quarantine",
                                     quarantine_rows(outcome.filter(F.col("reason").isNotNull()), now),
                                     QUARANTINE_KEYS)
        if good_count:
            good = outcome.filter(F.col("reason").isNull())
            labels = {r["label"] for r in good.select("label").distinct().collect()
                      if r["label"] is not None}
            update_vocabulary(spark, config, labels)
            vocabulary = lakehouse.read_table(spark, config, LABELS_TABLE)
            summary.prepared = lakehouse.merge_new_rows(
                config, "prepared", prepared_rows(good, vocabulary, spec, config, now), PREPARED_KEYS
            )
    finally:
        outcome.unpersist()
        if previous is None:
            spark.conf.unset(batch_key)
        else:
            spark.conf.set(batch_key, previous)
    if summary.prepared or _version_row(spark, config, spec.version) is None:
        update_channel_stats(spark, config, spec)
        summary.grid = write_grid(spark, config, spec)
    summary.split_counts, summary.class_counts = _count_table(spark, config, spec.version)
    summary.elapsed_s = time.monotonic() - started
    return summary

"""Preprocess: `images` -> `prepared`, fixed-size uint8 tensors with a stable label vocabulary and split.

Each image's bytes go through `transform.prepare_batch` (the one transform shared with training,
scoring and the exported model) inside an Arrow iterator UDF (`mapInArrow`: bytes read from the
Arrow buffers, tensors written as one buffer per batch; the pandas flavour of the same UDF cost
10% more CPU per image). Rows are keyed by (`image_id`, `preprocess_version`), where the version
is `TransformSpec.version`, a hash of every transform parameter: a rerun prepares only images
missing at the current version, and a config change prepares everything again under a new
version beside the old one. Images that fail go to `quarantine` with stage `preprocess`; the job
goes on, and later runs skip them (delete the quarantine row to retry one).

One pass over the pending images: the UDF's tensors go straight into an idempotent Delta append
(`txnAppId` per version, `txnVersion` = the `prepared` version the run started from, so a
concurrent run or a retry never adds an image twice), and a `RunReport` accumulator brings back
the failures, the train split's channel sums and a random sample for the grid, so nothing is
read twice. Tensors are stored uncompressed by default (`preprocess.compression`).

What travels with the table, in small Delta tables beside it (same database folder):
- `prepared_labels` (label, label_index, added_at): the label vocabulary. Labels get indices in
  sorted order the first time they are seen; later labels are appended; an index never changes.
- `prepared_versions` (preprocess_version, spec, created_at): each version's `TransformSpec`.
- `prepared_stats` (preprocess_version, prepared_at, train_images, channel_total,
  channel_total_sq): exact integer channel sums of each run's train rows; `read_channel_stats`
  adds them up to the mean and std on the 0..255 scale. A run that crashed after its commit is
  caught up by the next one from the table's commit history.

`split` is decided once per image and stored in `image_splits` (`splits.assign`: first assignment
wins, near-duplicate clusters share one split, otherwise a SHA-256 of the `image_id` mapped to
[0, 1) and cut at the configured fractions). Every preprocess version reads it back: changing
`preprocess.split` affects only images never prepared before, so an image once used for training
never lands in the test split, and twins found by `imageiq duplicates` never straddle splits.

Each run that prepares images also writes a PNG grid of a random sample of them with their labels
to `<storage.root>/reports/preprocess/samples_<version>.png` (and logs it to an active MLflow run).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from delta.tables import DeltaTable
from pyspark import Accumulator, AccumulatorParam
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
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
from imageiq_spark.runs import RunCounts
from imageiq_spark.session import session_conf, spread
from imageiq_spark.tensors import binary_from_tensors, binary_views, tensors_from_binary
from imageiq_spark.transform import TransformSpec, prepare_batch

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
LABELS_TABLE, VERSIONS_TABLE, STATS_TABLE = "prepared_labels", "prepared_versions", "prepared_stats"
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
        StructField("created_at", TimestampType(), False),
    ]
)
#: What the UDF returns per image: the tensor, or why there is none.
OUTCOME_SCHEMA = StructType(
    [
        StructField("image_id", StringType(), False),
        StructField("path", StringType(), True),
        StructField("label", StringType(), True),
        StructField("size_bytes", LongType(), True),
        StructField("modified_at", TimestampType(), True),
        StructField("split", StringType(), True),
        StructField("tensor", BinaryType(), True),
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
    ]
)
#: Per run (rows sharing a `prepared_at`): exact integer sums of the train split's channels.
RUN_STATS_SCHEMA = StructType(
    [
        StructField("preprocess_version", StringType(), False),
        StructField("prepared_at", TimestampType(), False),
        StructField("train_images", LongType(), False),
        StructField("channel_total", ArrayType(LongType()), False),
        StructField("channel_total_sq", ArrayType(LongType()), False),
    ]
)
SUMS_SCHEMA = StructType(
    [
        StructField("prepared_at", TimestampType(), False),
        StructField("channel", IntegerType(), False),
        StructField("images", LongType(), False),
        StructField("total", LongType(), False),
        StructField("total_sq", LongType(), False),
    ]
)
GRID_IMAGES = 16
SPLITS = ("train", "val", "test")
#: Up to this many image ids to prepare are broadcast to pick their rows out of `images`; more
#: are joined by a shuffle (of the image bytes, so only for a large backlog).
BROADCAST_IDS = 500_000
#: Runs that lose a race to a concurrent run of the same version start over this many times.
ATTEMPTS = 5
#: userMetadata of an append to `prepared`: TAG_PREFIX + "<version>:<prepared_at ISO>#<run id>".
TAG_PREFIX = "imageiq-preprocess:"


@dataclass
class PreprocessSummary:
    version: str = ""
    prepared: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    split_counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    grid: str | None = None
    elapsed_s: float = 0.0

    def counts(self) -> RunCounts:
        quarantined = sum(self.quarantined.values())
        return RunCounts(read=self.prepared + quarantined, written=self.prepared, quarantined=quarantined)

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


#: Columns that travel through the UDF unchanged: `images` columns plus the row's `split`.
PASSED_COLUMNS = ("image_id", "path", "label", "size_bytes", "modified_at", "split")
#: What a failure record holds: enough for its quarantine row.
FAILURE_FIELDS = ("image_id", "path", "size_bytes", "modified_at", "reason", "detail")
Failure = tuple[Any, ...]


@dataclass
class RunReport:
    """What a run's UDF saw, added up over its tasks through an accumulator.

    It lets the stage write `prepared` straight from the UDF and still quarantine the failures,
    store the train split's channel sums and draw the sample grid without reading the tensors
    again. Updates come from result tasks only (the UDF runs in the write's final stage), so
    Spark applies each partition's report once.
    """

    failures: list[Failure] = field(default_factory=list)
    train_images: int = 0
    channel_total: list[int] = field(default_factory=list)
    channel_total_sq: list[int] = field(default_factory=list)
    #: Up to GRID_IMAGES (random key, label, tensor bytes): the smallest keys are a uniform sample.
    sample: list[tuple[float, str | None, bytes]] = field(default_factory=list)

    def add(self, other: RunReport) -> RunReport:
        self.failures.extend(other.failures)
        self.train_images += other.train_images
        self.channel_total = _add_lists(self.channel_total, other.channel_total)
        self.channel_total_sq = _add_lists(self.channel_total_sq, other.channel_total_sq)
        self.add_sample(other.sample)
        return self

    def add_sample(self, entries: list[tuple[float, str | None, bytes]]) -> None:
        self.sample = sorted(self.sample + entries, key=lambda entry: entry[0])[:GRID_IMAGES]

    def add_train(self, tensors: np.ndarray) -> None:
        """Add the channel sums of [n, h, w, c] train tensors (exact integers).

        OpenCV sums the batch as one tall image in float64: exact after rounding here (the error
        stays far below 0.5) and ten times faster than numpy's integer reductions over
        interleaved channels.
        """
        import cv2

        n, height, width, channels = tensors.shape
        if n == 0:
            return
        pixels = n * height * width
        mean, std = (v.reshape(-1) for v in cv2.meanStdDev(tensors.reshape(-1, width, channels)))
        totals = np.rint(mean * pixels).astype(np.int64).tolist()
        squares = np.rint((std * std + mean * mean) * pixels).astype(np.int64).tolist()
        self.train_images += n
        self.channel_total = _add_lists(self.channel_total, totals)
        self.channel_total_sq = _add_lists(self.channel_total_sq, squares)


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)] if a and b else list(a or b)


class RunReportParam(AccumulatorParam):
    def zero(self, value: RunReport) -> RunReport:
        return RunReport()

    def addInPlace(self, value1: RunReport, value2: RunReport) -> RunReport:
        return value1.add(value2)


@dataclass(frozen=True)
class PrepareBatches:
    """The `mapInArrow` function: image rows -> OUTCOME_SCHEMA rows, one per image, never raising.

    Image bytes are read as views of the Arrow buffer and each batch's tensors leave as one
    contiguous array wrapped as an Arrow binary column, so no image is copied into a Python
    object on the way in or out (pandas conversion cost 10% more CPU per image on 500x375 JPEGs;
    docs/benchmarks.md). With a `report` accumulator, each task also adds up its RunReport.
    """

    spec: TransformSpec
    report: Accumulator[RunReport] | None = None

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import cv2

        # Spark already runs one task per core; OpenCV's own threads would only contend.
        cv2.setNumThreads(1)
        report = RunReport()
        rng = np.random.default_rng()
        # Arrow binary offsets are int32: a batch's tensors must stay under 2 GiB.
        rows = max(1, (2**31 - 1) // math.prod(self.spec.shape))
        for whole in batches:
            for start in range(0, whole.num_rows, rows):
                batch = whole.slice(start, rows)
                tensors, failures = prepare_batch(binary_views(batch.column("content")), self.spec)
                passed = batch.select(list(PASSED_COLUMNS))
                ok = np.ones(batch.num_rows, bool)
                ok[[index for index, _ in failures]] = False
                good = passed.filter(pa.array(ok)) if failures else passed
                if self.report is not None:
                    _report_batch(report, good, tensors, rng)
                if len(tensors):
                    yield _outcome(good, binary_from_tensors(tensors))
                if failures:
                    failed = _outcome(
                        passed.filter(pa.array(~ok)),
                        pa.nulls(len(failures), pa.binary()),
                        pa.array([error.reason for _, error in failures], pa.string()),
                        pa.array([error.detail for _, error in failures], pa.string()),
                    )
                    report.failures += [tuple(r[k] for k in FAILURE_FIELDS) for r in failed.to_pylist()]
                    yield failed
        if self.report is not None:
            self.report.add(report)


def _report_batch(report: RunReport, good: pa.RecordBatch, tensors: np.ndarray,
                  rng: np.random.Generator) -> None:
    train = np.asarray(good.column("split").to_numpy(zero_copy_only=False) == "train", bool)
    report.add_train(tensors if train.all() else tensors[train])
    keys = rng.random(len(tensors))
    labels = good.column("label").to_pylist()
    report.add_sample([(float(keys[i]), labels[i], tensors[i].tobytes())
                       for i in np.argsort(keys)[:GRID_IMAGES]])


def _outcome(passed: pa.RecordBatch, tensor: pa.Array, reason: pa.Array | None = None,
             detail: pa.Array | None = None) -> pa.RecordBatch:
    n = passed.num_rows
    return pa.RecordBatch.from_arrays(
        [*passed.columns, tensor,
         reason if reason is not None else pa.nulls(n, pa.string()),
         detail if detail is not None else pa.nulls(n, pa.string())],
        names=[*PASSED_COLUMNS, "tensor", "reason", "detail"],
    )


def split_column(image_id: Column, train: float, val: float) -> Column:
    """'train' | 'val' | 'test' from a hash of the image id: the same id always gets the same split."""
    digest = F.sha2(F.concat(F.lit("imageiq-split:"), image_id), 256)
    u = F.conv(F.substring(digest, 1, 8), 16, 10).cast("double") / float(1 << 32)
    return F.when(u < train, "train").when(u < train + val, "val").otherwise("test")


def prepared_rows(good: DataFrame, vocabulary: DataFrame, spec: TransformSpec,
                  prepared_at: Column) -> DataFrame:
    """UDF rows that have a tensor -> PREPARED_SCHEMA rows."""
    height, width, channels = spec.shape
    return good.join(F.broadcast(vocabulary.select("label", "label_index")), "label", "left").select(
        "image_id",
        "label",
        F.col("label_index").cast("int"),
        "split",
        "tensor",
        F.lit(height).alias("height"),
        F.lit(width).alias("width"),
        F.lit(channels).alias("channels"),
        F.lit(spec.version).alias("preprocess_version"),
        prepared_at.alias("prepared_at"),
    )


def transform_settings(config: Config) -> dict[str, str]:
    """Session settings for a job that runs `transform_images`, while it runs."""
    return {
        # Rows per Arrow batch bound a Python worker's memory: batch_rows images in, tensors out.
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(config.preprocess.batch_rows),
        # Scan tasks of at most 32 MB of image bytes (four row groups, lakehouse.ROW_GROUP_SETTINGS),
        # so no core idles at the end: at Spark's own split size a 3-file table of 500x375 JPEGs
        # ran as 3 tasks on 2 cores, and 626 MB of camera photos as 5. Smaller tasks cost more
        # Python CPU per image (16 MB: +20% on 500x375 JPEGs).
        "spark.sql.files.maxPartitionBytes": str(32 << 20),
    }


def transform_images(images: DataFrame, spec: TransformSpec, config: Config,
                     report: Accumulator[RunReport] | None = None,
                     splits: DataFrame | None = None) -> DataFrame:
    """`images` rows -> OUTCOME_SCHEMA rows (tensor or failure reason), spread over the cores.

    Each row's split comes from `splits` (image_id, split: the stored ones, `splits.assign`), or
    without it from the hash of its image_id at the configured fractions."""
    fractions = config.preprocess.split
    rows = images.select(*PASSED_COLUMNS[:-1], "content")
    if splits is None:
        rows = rows.withColumn("split", split_column(F.col("image_id"), fractions.train, fractions.val))
    else:
        # Ids and splits only (about 80 bytes an image): a shuffle join would move the image bytes.
        rows = rows.join(F.broadcast(splits), "image_id")
    # Run under `transform_settings`, the scan of `images` (small row groups) already splits into
    # many small tasks; dealing the image bytes round-robin would shuffle all of them (0.4 ms of
    # JVM CPU per 500x375 JPEG), so only a table too small to split is spread.
    return spread(rows, per_core=1).mapInArrow(PrepareBatches(spec, report), OUTCOME_SCHEMA)


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


@dataclass(frozen=True)
class ChannelSums:
    """The `mapInArrow` function: (prepared_at, tensor) train rows -> SUMS_SCHEMA rows per run.

    The catch-up path for a run whose own report was lost (it crashed after its commit).
    """

    shape: tuple[int, int, int]

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        channels = self.shape[2]
        for batch in batches:
            runs = batch.column(0)
            keys = np.asarray(runs.cast(pa.int64()))
            tensors = tensors_from_binary(batch.column(1), self.shape)
            for key in np.unique(keys):
                sums = RunReport()
                sums.add_train(tensors[keys == key])
                yield pa.RecordBatch.from_arrays(
                    [
                        pa.array(np.full(channels, key), runs.type),
                        pa.array(np.arange(channels, dtype=np.int32)),
                        pa.array(np.full(channels, sums.train_images, np.int64)),
                        pa.array(sums.channel_total, pa.int64()),
                        pa.array(sums.channel_total_sq, pa.int64()),
                    ],
                    names=SUMS_SCHEMA.fieldNames(),
                )


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
    runs = _run_stats(spark, config, version)
    images = sum(run["train_images"] for run in runs)
    if not images:
        raise LookupError(
            f"no channel statistics for preprocess_version {version}: the train split at that "
            "version is empty or was never prepared; run `imageiq preprocess` with this config"
        )
    spec = read_spec(spark, config, version)
    pixels = images * spec.size[0] * spec.size[1]
    total = np.sum([run["channel_total"] for run in runs], axis=0, dtype=object)
    total_sq = np.sum([run["channel_total_sq"] for run in runs], axis=0, dtype=object)
    mean = [int(t) / pixels for t in total]
    std = [math.sqrt(max(0.0, int(t2) / pixels - m * m)) for t2, m in zip(total_sq, mean)]
    return mean, std


def _run_stats(spark: SparkSession, config: Config, version: str) -> list[Any]:
    if not lakehouse.table_exists(spark, config, STATS_TABLE):
        return []
    return (
        lakehouse.read_table(spark, config, STATS_TABLE)
        .filter(F.col("preprocess_version") == version)
        .collect()
    )


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


def store_run_stats(spark: SparkSession, config: Config, spec: TransformSpec,
                    runs: dict[datetime.datetime, RunReport]) -> None:
    """One `prepared_stats` row per run: its train images and channel sums (insert-only)."""
    zeros = [0] * spec.channels
    rows = spark.createDataFrame(
        [(spec.version, at, r.train_images, r.channel_total or zeros, r.channel_total_sq or zeros)
         for at, r in runs.items()],
        RUN_STATS_SCHEMA,
    )
    lakehouse.merge_new_rows(config, STATS_TABLE, rows, ["preprocess_version", "prepared_at"])


def catch_up_run_stats(spark: SparkSession, config: Config, spec: TransformSpec) -> int:
    """Sum the train split of runs at the spec's version that have no `prepared_stats` row.

    A run stores its own sums from its report; only one that crashed between its commit and
    that store is missing. The runs are found in the table's commit history (each append names
    its version and `prepared_at` in userMetadata), and only their files are read (data
    skipping on `prepared_at`). Returns the runs caught up.
    """
    prefix = f"{TAG_PREFIX}{spec.version}:"
    history = DeltaTable.forPath(spark, lakehouse.table_location(config, "prepared")).history()
    committed = {
        datetime.datetime.fromisoformat(row["userMetadata"][len(prefix):].split("#")[0])
        for row in history.filter(F.col("userMetadata").startswith(prefix)).select("userMetadata").collect()
    }
    missing = sorted(committed - {run["prepared_at"] for run in _run_stats(spark, config, spec.version)})
    if not missing:
        return 0
    sums = (
        read_prepared(spark, config, spec.version)
        .filter((F.col("split") == "train") & F.col("prepared_at").isin(missing))
        .select("prepared_at", "tensor")
        .mapInArrow(ChannelSums(spec.shape), SUMS_SCHEMA)
        .groupBy("prepared_at", "channel")
        .agg(F.sum("images").alias("images"), F.sum("total").alias("total"),
             F.sum("total_sq").alias("total_sq"))
        .collect()
    )
    runs = {at: RunReport(channel_total=[0] * spec.channels, channel_total_sq=[0] * spec.channels)
            for at in missing}
    for row in sums:
        run = runs[row["prepared_at"]]
        run.train_images = row["images"]
        run.channel_total[row["channel"]] = row["total"]
        run.channel_total_sq[row["channel"]] = row["total_sq"]
    store_run_stats(spark, config, spec, runs)
    return len(missing)


def store_version(spark: SparkSession, config: Config, spec: TransformSpec) -> None:
    """The version's TransformSpec, once (insert-only), so a model can be traced to it."""
    row = spark.createDataFrame([(spec.version, spec.to_json())], "preprocess_version string, spec string")
    lakehouse.merge_new_rows(config, VERSIONS_TABLE, row.withColumn("created_at", F.current_timestamp()),
                             ["preprocess_version"])


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
    lakehouse.ensure_table(spark, config, STATS_TABLE, RUN_STATS_SCHEMA)


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


def pending_images(spark: SparkSession, config: Config, spec: TransformSpec,
                   prepared_version: int) -> tuple[DataFrame, int]:
    """Rows of `images` not prepared at the spec's version (as of the table's `prepared_version`)
    and not quarantined by this stage, and how many there are.

    The anti-joins run on ids only; the image bytes are then picked out without a shuffle.
    """
    images = lakehouse.read_table(spark, config, "images")
    done = (
        spark.read.format("delta").option("versionAsOf", prepared_version)
        .load(lakehouse.table_location(config, "prepared"))
        .filter(F.col("preprocess_version") == spec.version)
        .select("image_id")
    )
    # An image this stage already quarantined is not decoded again on every run; delete its
    # quarantine row to retry it.
    failed = (
        lakehouse.read_table(spark, config, "quarantine")
        .filter(F.col("stage") == "preprocess")
        .select("image_id")
    )
    pending = (
        images.select("image_id").join(done, "image_id", "left_anti").join(failed, "image_id", "left_anti")
    )
    count = pending.count()
    if count == 0 or count == images.count():
        return images, count
    ids = F.broadcast(pending) if count <= BROADCAST_IDS else pending
    return images.join(ids, "image_id", "left_semi"), count


def latest_version(spark: SparkSession, config: Config, table: str) -> int:
    return DeltaTable.forPath(spark, lakehouse.table_location(config, table)).history(1).first()["version"]


def committed_rows(spark: SparkSession, config: Config, table: str, tag: str) -> int | None:
    """Rows written by the commit tagged `tag` (userMetadata); None if there is no such commit."""
    history = DeltaTable.forPath(spark, lakehouse.table_location(config, table)).history(50)
    found = history.filter(F.col("userMetadata") == tag).select("operationMetrics").collect()
    return int(found[0][0].get("numOutputRows", 0)) if found else None


def quarantine_failures(spark: SparkSession, config: Config, failures: list[Failure],
                        quarantined_at: datetime.datetime) -> Counter[str]:
    """Write the UDF's failure records to `quarantine` (once per image); returns reasons counted."""
    unique = list({record[0]: record for record in failures}.values())
    if unique:
        rows = spark.createDataFrame(unique, StructType([OUTCOME_SCHEMA[name] for name in FAILURE_FIELDS]))
        lakehouse.merge_new_rows(config, "quarantine",
                                 quarantine_rows(rows, F.lit(quarantined_at)), QUARANTINE_KEYS)
    return Counter(record[FAILURE_FIELDS.index("reason")] for record in unique)


def append_prepared(
    spark: SparkSession,
    config: Config,
    spec: TransformSpec,
    todo: DataFrame,
    report: Accumulator[RunReport],
    start_version: int,
    prepared_at: datetime.datetime,
    tag: str,
) -> int | None:
    """Transform `todo` and append the tensors to `prepared` in one pass; returns the rows
    written, or None when Delta skipped the append because another run moved on from
    `start_version` first. What the UDF saw lands in the `report` accumulator."""
    from imageiq_spark import splits

    labels = {r["label"] for r in todo.select("label").distinct().collect() if r["label"] is not None}
    update_vocabulary(spark, config, labels)
    stored_splits = splits.assign(spark, config, todo.select("image_id"))
    outcome = transform_images(todo, spec, config, report, stored_splits)
    rows = prepared_rows(outcome.filter(F.col("reason").isNull()),
                         lakehouse.read_table(spark, config, LABELS_TABLE), spec, F.lit(prepared_at))
    settings = {
        **transform_settings(config),
        "spark.sql.parquet.compression.codec": config.preprocess.compression,
        **lakehouse.ROW_GROUP_SETTINGS,
    }
    with session_conf(spark, settings):
        (rows.write.format("delta").mode("append")
         .option("txnAppId", f"imageiq-preprocess-{spec.version}")
         .option("txnVersion", start_version)
         .option("userMetadata", tag)
         .save(lakehouse.table_location(config, "prepared")))
    return committed_rows(spark, config, "prepared", tag)


def run(spark: SparkSession, config: Config) -> PreprocessSummary:
    """Prepare every image of `images` not yet in `prepared` at the current preprocess_version.

    One pass: the UDF's tensors go straight into an append to `prepared`, and a RunReport
    accumulator brings back its failures (quarantined), the train split's channel sums and a
    random sample for the grid. The append is idempotent: Delta `txnAppId` per preprocess
    version, `txnVersion` = the `prepared` table version the run started from, so a run that
    started from a state another run has moved on from writes nothing and starts over, and
    concurrent runs and reruns add each image exactly once.
    """
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError(
            f"table images does not exist under storage.root '{config.storage.root}': "
            "run `imageiq ingest` first"
        )
    started = time.monotonic()
    spec = TransformSpec.from_config(config)
    summary = PreprocessSummary(version=spec.version)
    ensure_tables(spark, config)
    # One timestamp names this run's rows, and its statistics row.
    prepared_at = datetime.datetime.now()
    tag = f"{TAG_PREFIX}{spec.version}:{prepared_at.isoformat()}#{uuid.uuid4().hex}"
    report = RunReport()
    for attempt in range(1, ATTEMPTS + 1):
        start_version = latest_version(spark, config, "prepared")
        todo, pending = pending_images(spark, config, spec, start_version)
        if not pending:
            break
        log.info("preprocess: %d images to prepare at version %s", pending, spec.version)
        accumulator = spark.sparkContext.accumulator(RunReport(), RunReportParam())
        try:
            written = append_prepared(spark, config, spec, todo, accumulator, start_version, prepared_at, tag)
        except lakehouse.CONFLICTS as exc:
            written, lost = None, type(exc).__name__
        else:
            lost = "it prepared these images first"
        if written is None:
            log.warning("preprocess: a concurrent run committed first (%s); attempt %d of %d",
                        lost, attempt, ATTEMPTS)
            continue
        summary.prepared, report = written, accumulator.value
        summary.quarantined.update(quarantine_failures(spark, config, report.failures, prepared_at))
        break
    else:
        raise RuntimeError(f"preprocess: {ATTEMPTS} attempts lost to concurrent runs of version "
                           f"{spec.version}; run it again")
    if _version_row(spark, config, spec.version) is None:
        store_version(spark, config, spec)
    if summary.prepared:
        store_run_stats(spark, config, spec, {prepared_at: report})
        summary.grid = write_grid(config, spec, report.sample)
    catch_up_run_stats(spark, config, spec)
    summary.split_counts, summary.class_counts = _count_table(spark, config, spec.version)
    summary.elapsed_s = time.monotonic() - started
    return summary

"""Ingest's rows of one micro-batch of files: labels (folder or manifest), the probe (hash and header,
never the pixels) in a mapInArrow, the `images` and `quarantine` rows, and the zero-length files
binaryFile never yields."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from urllib.parse import unquote

import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.core.tables import schema
from imageiq_spark.lake.session import storage_uri
from imageiq_spark.vision.probe import EMPTY, TOO_LARGE, ProbeError, probe

BATCH_SCHEMA = schema(
    "path STRING NOT NULL, modificationTime TIMESTAMP, length BIGINT NOT NULL, content BINARY, "
    "label STRING"
)
PROBE_FIELDS = [
    StructField("image_id", StringType(), True),
    StructField("format", StringType(), True),
    StructField("width", IntegerType(), True),
    StructField("height", IntegerType(), True),
    StructField("channels", IntegerType(), True),
    StructField("bit_depth", IntegerType(), True),
    StructField("orientation", IntegerType(), True),
    StructField("reason", StringType(), True),
    StructField("detail", StringType(), True),
]
#: The probe's columns after image_id, and the Arrow type of each probe column.
PROBE_COLUMNS = [f.name for f in PROBE_FIELDS[1:]]
PROBE_TYPES = {f.name: pa.string() if isinstance(f.dataType, StringType) else pa.int32()
               for f in PROBE_FIELDS}
PROBED_SCHEMA = schema(
    "path STRING NOT NULL, modificationTime TIMESTAMP, length BIGINT NOT NULL, content BINARY, "
    "label STRING, image_id STRING, format STRING, width INT, height INT, channels INT, "
    "bit_depth INT, orientation INT, reason STRING, detail STRING"
)


def source_uri(source: str) -> str:
    """The source as binaryFile reports paths: local folders become `file:/abs/path`."""
    uri = storage_uri(source)
    return "file:" + uri[len("file://") :] if uri.startswith("file://") else uri


def probe_partition(max_pixels: int, fault_inject: str = ""):
    """A mapInArrow function: hash and probe each file's bytes; never decodes pixels.

    The batch's own columns, the bytes among them, go back as the Arrow arrays that came in: no
    pandas frames, and each file's bytes are copied once, to hash and probe them."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            found: dict[str, list[object]] = {f.name: [] for f in PROBE_FIELDS}
            for path, content in zip(batch.column("path").to_pylist(), batch.column("content")):
                faults.inject(path, fault_inject)
                data = content.as_py()
                found["image_id"].append(hashlib.sha256(data).hexdigest())
                try:
                    info = probe(data, max_pixels)
                except ProbeError as exc:
                    values: tuple[object, ...] = (None,) * 6 + (exc.reason, exc.detail)
                else:
                    values = (info.format, info.width, info.height, info.channels, info.bit_depth,
                              info.orientation, None, None)
                for name, value in zip(PROBE_COLUMNS, values):
                    found[name].append(value)
            yield pa.RecordBatch.from_arrays(
                [batch.column(name) for name in BATCH_SCHEMA.names]
                + [pa.array(found[f.name], PROBE_TYPES[f.name]) for f in PROBE_FIELDS],
                names=PROBED_SCHEMA.names,
            )

    return run


def label_column(files: DataFrame, spark: SparkSession, config: Config) -> DataFrame:
    """Add `label`: the parent folder's name, a manifest's label, or null."""
    labels = config.ingest.labels
    root = source_uri(config.ingest.source or "").rstrip("/") + "/"
    relative = F.when(F.col("path").startswith(root), F.expr(f"substring(path, {len(root) + 1})"))
    if labels == "none":
        return files.withColumn("label", F.lit(None).cast("string"))
    if labels == "folder":
        parts = F.split(relative, "/")
        return files.withColumn("label", F.when(F.size(parts) >= 2, F.element_at(parts, -2)).cast("string"))
    manifest = read_manifest(spark, labels)
    # Manifest paths may be relative to the source or full URIs/absolute paths.
    files = files.withColumn("_relative", relative)
    joined = files.join(
        F.broadcast(manifest),
        (F.col("_relative") == F.col("_manifest_path"))
        | (F.col("path") == F.col("_manifest_path"))
        | (F.col("path") == F.concat(F.lit("file:"), F.col("_manifest_path"))),
        "left",
    )
    return joined.drop("_relative", "_manifest_path").withColumnRenamed("_manifest_label", "label")


def read_manifest(spark: SparkSession, uri: str) -> DataFrame:
    reader = spark.read
    if uri.lower().endswith(".parquet"):
        manifest = reader.parquet(uri)
    elif uri.lower().endswith(".csv"):
        manifest = reader.option("header", "true").csv(uri)
    else:
        raise ConfigError(
            f"config key 'ingest.labels' expects 'folder', 'none' or a .csv/.parquet manifest path, "
            f"got '{uri}'"
        )
    missing = {"path", "label"} - set(manifest.columns)
    if missing:
        raise ConfigError(
            f"config key 'ingest.labels': manifest '{uri}' lacks column(s) {sorted(missing)}; "
            "expected columns path,label"
        )
    return manifest.select(
        F.col("path").alias("_manifest_path"), F.col("label").cast("string").alias("_manifest_label")
    ).dropDuplicates(["_manifest_path"])


def probed_files(files: DataFrame, config: Config, crashed: list[str] | None = None) -> DataFrame:
    """binaryFile rows -> PROBED_SCHEMA rows; oversized files are judged by length, never read.

    Files in `crashed` killed a Python worker before (`faults`): they are quarantined unprobed.
    """
    max_bytes = config.ingest.max_bytes
    # binaryFile pushes filters on `length` into the scan: oversized files' bytes are never read.
    small = files.filter(F.col("length") <= max_bytes).select(*BATCH_SCHEMA.names)
    if crashed:
        small = small.filter(~F.col("path").isin(crashed))
    fault_inject = faults.injected("ingest")
    probed = small.mapInArrow(probe_partition(config.ingest.max_pixels, fault_inject), PROBED_SCHEMA)
    oversized = files.filter(F.col("length") > max_bytes).select(
        "path",
        "modificationTime",
        "length",
        F.lit(None).cast("binary").alias("content"),
        "label",
        *[F.lit(None).cast(f.dataType).alias(f.name) for f in PROBE_FIELDS[:-2]],
        F.lit(TOO_LARGE).alias("reason"),
        F.format_string(f"%d bytes > ingest.max_bytes {max_bytes}", F.col("length")).alias("detail"),
    )
    if crashed:
        oversized = oversized.unionByName(
            files.filter(F.col("path").isin(crashed)).select(
                "path",
                "modificationTime",
                "length",
                F.lit(None).cast("binary").alias("content"),
                "label",
                *[F.lit(None).cast(f.dataType).alias(f.name) for f in PROBE_FIELDS[:-2]],
                F.lit(faults.WORKER_CRASH).alias("reason"),
                F.lit("the Python worker process died while probing this file").alias("detail"),
            )
        )
    return probed.unionByName(oversized)


def image_rows(probed: DataFrame, ingested_at: F.Column) -> DataFrame:
    """Good files -> `images` rows, one per distinct content (the first path wins).

    The first path is picked on (image_id, path) alone and broadcast back (a micro-batch holds
    at most `ingest.files_per_batch` files): the image bytes are never shuffled."""
    good = probed.filter(F.col("reason").isNull())
    first = good.groupBy("image_id").agg(F.min("path").alias("path"))
    return (
        good.join(F.broadcast(first), ["image_id", "path"], "left_semi")
        .select(
            "image_id",
            "path",
            "label",
            "format",
            "width",
            "height",
            "channels",
            "bit_depth",
            "orientation",
            F.col("length").alias("size_bytes"),
            F.col("modificationTime").alias("modified_at"),
            "content",
            ingested_at.alias("ingested_at"),
        )
    )


def quarantine_rows(probed: DataFrame, ingested_at: F.Column) -> DataFrame:
    return probed.filter(F.col("reason").isNotNull()).select(
        "path",
        "reason",
        "detail",
        F.lit("ingest").alias("stage"),
        "image_id",
        F.col("length").alias("size_bytes"),
        F.col("modificationTime").alias("modified_at"),
        ingested_at.alias("ingested_at"),
        F.lit(None).cast("string").alias("version"),
    )


def empty_files(session: SparkSession, checkpoint: str, batch_id: int, probed: DataFrame,
                rows_seen: int) -> list[str]:
    """Zero-length files of a micro-batch: binaryFile yields no row for them (a file of 0 bytes
    has no split), so they are found as the files the stream's source log lists for this batch
    without a row."""
    listed = batch_files(session, checkpoint, batch_id)
    if len(listed) <= rows_seen:
        return []
    return sorted(listed - {r.path for r in probed.select("path").collect()})


def batch_files(session: SparkSession, checkpoint: str, batch_id: int) -> set[str]:
    """The files the streaming file source logged for `batch_id` (in its own log file, or in the
    `.compact` file that absorbed it), as binaryFile's `path` column spells them."""
    entry = "struct<path:string,batchId:long>"
    for name in (f"{batch_id}", f"{batch_id}.compact"):
        try:
            lines = session.read.text(f"{checkpoint}/sources/0/{name}")
            rows = (lines.filter(F.col("value").startswith("{"))
                    .select(F.from_json("value", entry).alias("e"))
                    .filter(F.col("e.batchId") == batch_id).select("e.path").collect())
        except AnalysisException:  # this batch's entries are in the other file
            continue
        return {unquote(r.path).replace("file:///", "file:/", 1) for r in rows}
    return set()


def empty_file_rows(session: SparkSession, paths: list[str], ingested_at: F.Column) -> DataFrame:
    rows = session.createDataFrame([(p,) for p in paths], "path string")
    return rows.select(
        "path", F.lit(EMPTY).alias("reason"), F.lit("file has 0 bytes").alias("detail"),
        F.lit("ingest").alias("stage"), F.lit(None).cast("string").alias("image_id"),
        F.lit(0).cast("long").alias("size_bytes"), F.lit(None).cast("timestamp").alias("modified_at"),
        ingested_at.alias("ingested_at"), F.lit(None).cast("string").alias("version"),
    )

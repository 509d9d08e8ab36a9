"""Ingest: image files in object storage -> `images` (one row per distinct content) + `quarantine`.

Files are discovered by a Structured Streaming binaryFile source run with an availableNow trigger:
its checkpoint remembers every file already taken, so a rerun reads only new files. Each
micro-batch is probed (header only), hashed and written with insert-only MERGEs keyed by content
hash (`images`) and by file (`quarantine`); a crash replays the batch and the MERGEs add nothing
twice. A batch's rows are made in `files`; this module runs the stream and counts.

Relabelling (`imageiq_spark.ml.labels`): a known image whose file was moved to another label folder
takes that label (a copy there is a duplicate and changes nothing), and with a manifest
(`ingest.labels`) every run compares the manifest with `images` and applies the labels that changed.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.core.summary import Stopwatch, aligned
from imageiq_spark.core.tables import IMAGES_SCHEMA, QUARANTINE_KEYS, QUARANTINE_SCHEMA
from imageiq_spark.lake import lakehouse, storage
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.session import session_conf
from imageiq_spark.ml import labels
from imageiq_spark.stages.ingest.files import (
    BATCH_SCHEMA,
    empty_file_rows,
    empty_files,
    image_rows,
    label_column,
    probed_files,
    quarantine_rows,
    read_manifest,
    source_uri,
)
from imageiq_spark.vision.probe import EMPTY

log = logging.getLogger(__name__)

#: `spark.sql.files.openCostInBytes` of the scan of a micro-batch's files.
SCAN_OPEN_COST = 16 << 10


@dataclass
class IngestSummary:
    files_seen: int = 0
    new_images: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    relabelled: int = 0
    watch: Stopwatch = field(default_factory=Stopwatch)

    def counts(self) -> RunCounts:
        return RunCounts(read=self.files_seen, written=self.new_images,
                         quarantined=sum(self.quarantined.values()))

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        return aligned([
            ("files seen", self.files_seen),
            ("new images", self.new_images),
            ("duplicates", self.duplicates),
            ("quarantined", f"{sum(self.quarantined.values())} ({reasons})"),
            ("relabelled", self.relabelled),
            self.watch.row(self.files_seen),
        ])


def extension_glob(extensions: list[str]) -> str:
    """A case-insensitive file-name glob: ["png"] -> "*.{[pP][nN][gG]}"."""

    def insensitive(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext)

    return "*.{" + ",".join(insensitive(e) for e in extensions) + "}"


def ensure_tables(spark: SparkSession, config: Config) -> None:
    lakehouse.ensure_table(spark, config, "images", IMAGES_SCHEMA)
    lakehouse.ensure_table(spark, config, "quarantine", QUARANTINE_SCHEMA)


BATCH_REPORT_SCHEMA = ("files_seen int, new_images int, duplicates int, relabelled int, "
                       "quarantined map<string, int>, started double")


def add_batch_reports(spark: SparkSession, reports: str, summary: IngestSummary) -> None:
    """Add the micro-batches' counts to `summary`, then delete them; a run that found no new
    file had no batch and wrote none."""
    # Looked up first: Spark logs a missing folder's read with a stack trace before it raises.
    if not storage.folder_exists(reports):
        return
    rows = spark.read.schema(BATCH_REPORT_SCHEMA).parquet(reports).collect()
    for row in rows:
        summary.files_seen += row["files_seen"]
        summary.new_images += row["new_images"]
        summary.duplicates += row["duplicates"]
        summary.relabelled += row["relabelled"]
        summary.quarantined.update(row["quarantined"])
        summary.watch.work(at=row["started"])
    storage.delete_dir(reports)


def run(spark: SparkSession, config: Config) -> IngestSummary:
    """Ingest every file of `ingest.source` not taken by an earlier run."""
    source = config.ingest.source
    if not source:
        raise ConfigError("config key 'ingest.source' is required for ingest: a folder or URI of images")
    if config.ingest.labels not in ("folder", "none"):
        read_manifest(spark, config.ingest.labels)  # a bad manifest is a config error, before any work
    ensure_tables(spark, config)
    checkpoint = lakehouse.lake_path(
        config, "checkpoints", "ingest", hashlib.sha256(source_uri(source).encode()).hexdigest()[:16]
    )
    summary = IngestSummary()
    stream = (
        spark.readStream.format("binaryFile")
        .schema(StructType(BATCH_SCHEMA.fields[:4]))
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", extension_glob(config.ingest.extensions))
        .option("maxFilesPerTrigger", config.ingest.files_per_batch)
        # Files keep their old modification times when copied; never skip a file for its age.
        .option("maxFileAge", "36500d")
        .load(source)
    )

    # Each micro-batch appends its counts here: under Spark Connect foreachBatch runs in a Python
    # process of the server, so what it sees comes back as data, not through this closure.
    reports = lakehouse.lake_path(config, "staging", "ingest_reports", uuid.uuid4().hex)

    def write_batch(files: DataFrame, batch_id: int) -> None:
        # Files that kill a Python worker are quarantined unprobed by the rerun (`probed_files`).
        faults.survive_worker_crashes(
            lambda crashed: write_files(files, batch_id, crashed),
            lambda: sorted(r.path for r in files.select("path").collect()),
            lambda subset: probed_files(
                label_column(files, files.sparkSession, config).filter(F.col("path").isin(subset)), config
            ).count(),
            f"ingest batch {batch_id}",
        )

    def write_files(files: DataFrame, batch_id: int, crashed: list[str]) -> None:
        started = time.time()  # wall clock: under Spark Connect this runs in the server's process
        labelled = label_column(files, files.sparkSession, config)
        probed = probed_files(labelled, config, crashed).persist(StorageLevel.DISK_ONLY)
        relabelled = 0
        try:
            ingested_at = F.current_timestamp()
            counts = Counter({
                r["reason"]: r["n"] for r in probed.groupBy("reason").agg(F.count("*").alias("n")).collect()
            })
            good = counts.pop(None, 0)
            rejected = quarantine_rows(probed, ingested_at)
            empties = empty_files(files.sparkSession, checkpoint, batch_id, probed,
                                  good + sum(counts.values()))
            if empties:
                counts[EMPTY] += len(empties)
                rejected = rejected.unionByName(empty_file_rows(files.sparkSession, empties, ingested_at))
            if counts:
                lakehouse.merge_new_rows(config, "quarantine", rejected, QUARANTINE_KEYS)
            with session_conf(files.sparkSession, lakehouse.ROW_GROUP_SETTINGS):
                inserted = (
                    lakehouse.merge_new_rows(config, "images", image_rows(probed, ingested_at), ["image_id"])
                    if good
                    else 0
                )
            if good > inserted and config.ingest.labels != "none":
                # Files of images already known: one moved to another label folder relabels it.
                known = image_rows(probed, ingested_at).where(F.col("label").isNotNull())
                relabelled = labels.relabel(files.sparkSession, config, known, config.ingest.labels,
                                            moved_only=True)
        finally:
            probed.unpersist()
        report = (good + sum(counts.values()), inserted, good - inserted, relabelled, dict(counts), started)
        session = files.sparkSession
        session.createDataFrame([report], BATCH_REPORT_SCHEMA).write.mode("append").parquet(reports)
        log.info("ingest batch %d: %d files, %d new images, %d quarantined", batch_id,
                 good + sum(counts.values()), inserted, sum(counts.values()))

    # At the session's 1 MB open cost per file, 3,000 JPEGs of 30 KB made 48 tasks, each paying a
    # task's and an Arrow round trip's fixed cost; at 16 KB they pack by their bytes into a few
    # tasks per core (still at most `maxPartitionBytes` each) and ingest runs 1.4x faster. The
    # source plans each micro-batch's scan with this session's settings: they hold to the end.
    with session_conf(spark, {"spark.sql.files.openCostInBytes": str(SCAN_OPEN_COST)}):
        query = (
            stream.writeStream.foreachBatch(write_batch)
            .option("checkpointLocation", checkpoint)
            .trigger(availableNow=True)
            .queryName("imageiq_ingest")
            .start()
        )
        query.awaitTermination()
    add_batch_reports(spark, reports, summary)
    if config.ingest.labels not in ("folder", "none"):
        ids = lakehouse.read_table(spark, config, "images").select("image_id", "path")
        listed = label_column(ids, spark, config).where(F.col("label").isNotNull())
        summary.relabelled += labels.relabel(spark, config, listed, config.ingest.labels)
    summary.watch.stop()
    return summary

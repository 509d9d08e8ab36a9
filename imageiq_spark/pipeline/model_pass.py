"""The pass score and embed share: images without a row of a model version -> staged results ->
one insert-only MERGE, undecodable images quarantined, a summary."""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core import faults
from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Stopwatch, aligned
from imageiq_spark.core.tables import QUARANTINE_KEYS, QUARANTINE_SCHEMA
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import RunCounts

log = logging.getLogger(__name__)


def scored_ids(predictions: DataFrame, name: str, version: str) -> DataFrame:
    """The image ids with a prediction from this model version."""
    done = predictions.where((F.col("model_name") == name) & (F.col("model_version") == version))
    return done.select("image_id")


def quarantine_failed(config: Config, staged: DataFrame, crashed: list[str], images: DataFrame,
                      stage: str, version: str, at: datetime.datetime) -> int:
    """Staged rows of a model pass whose image could not be decoded, and the `crashed` images
    that killed a Python worker -> `quarantine`, under this stage and model version; returns how
    many there were."""
    failed = staged.where(F.col("error").isNotNull()).select("image_id", "error", "error_detail")
    if crashed:
        failed = failed.unionByName(staged.sparkSession.createDataFrame(
            [(image_id, faults.WORKER_CRASH, f"the Python worker process died in {stage}")
             for image_id in crashed], "image_id string, error string, error_detail string"))
    count = failed.count()
    if count:
        lakehouse.ensure_table(staged.sparkSession, config, "quarantine", QUARANTINE_SCHEMA)
        rows = failed.join(images.select("image_id", "path", "size_bytes", "modified_at"), "image_id").select(
            "path", F.col("error").alias("reason"), F.col("error_detail").alias("detail"),
            F.lit(stage).alias("stage"), "image_id", "size_bytes", "modified_at",
            F.lit(at).alias("ingested_at"), F.lit(version).alias("version"),
        )
        lakehouse.merge_new_rows(config, "quarantine", rows, QUARANTINE_KEYS,
                                 attempts=config.score.merge_retries)
    return count


@dataclass
class ScoreSummary:
    model_name: str
    model_version: str
    candidates: int = 0
    inserted: int = 0
    failed: int = 0
    watch: Stopwatch = field(default_factory=Stopwatch)
    #: How `lines()` names the images to do and the rows made (embed's summary says its own).
    todo_label: ClassVar[str] = "to score"
    output_label: ClassVar[str] = "predictions"

    def counts(self) -> RunCounts:
        return RunCounts(read=self.candidates, written=self.inserted, quarantined=self.failed,
                         model_name=self.model_name, model_version=self.model_version)

    def lines(self) -> list[str]:
        return aligned([
            ("model", f"{self.model_name} version {self.model_version}"),
            (self.todo_label, self.candidates),
            (self.output_label, f"{self.inserted} new"),
            ("quarantined", self.failed),
            self.watch.row(self.candidates),
        ])


def model_pass(
    spark: SparkSession,
    config: Config,
    summary: ScoreSummary,
    table: str,
    table_schema: StructType,
    keys: list[str],
    stage: str,
    predict: Callable[[DataFrame, datetime.datetime], DataFrame],
    output: Callable[[DataFrame, datetime.datetime], DataFrame],
) -> None:
    """The pass score and embed share; fills `summary`'s counts.

    The images without a row of the summary's model version in `table` (found on their ids
    alone, `lakehouse.pending_rows`; none: nothing is read or written) go through `predict`
    (rows with `error` set where an image cannot be decoded), staged to Parquet so the model
    runs once; the good rows, shaped by `output`, are merged insert-only on `keys`, and the
    undecodable images are quarantined under `stage`, as are images that kill a Python worker
    (`faults.survive_worker_crashes`: the pass runs again without them).
    """
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError("table 'images' does not exist: run `imageiq ingest` first")
    lakehouse.ensure_table(spark, config, table, table_schema)
    images = lakehouse.read_table(spark, config, "images")
    done = scored_ids(lakehouse.read_table(spark, config, table), summary.model_name, summary.model_version)
    with lakehouse.pending_rows(images.select("image_id", "content"), [done]) as pending:
        if pending.count:
            todo = pending.rows
            at = utc_now()
            staging = lakehouse.lake_path(config, "staging", table, uuid.uuid4().hex)
            try:
                summary.watch.work()
                _, crashed = faults.survive_worker_crashes(
                    lambda crashed: predict(faults.restrict(todo, "image_id", crashed, keep=False) if crashed
                                            else todo, at).write.mode("overwrite").parquet(staging),
                    lambda: sorted(r.image_id for r in pending.ids.collect()),
                    lambda subset: predict(faults.restrict(todo, "image_id", subset, keep=True), at).count(),
                    stage,
                )
                staged = spark.read.parquet(staging)
                summary.candidates = staged.count() + len(crashed)
                good = output(staged.where(F.col("error").isNull()), at)
                summary.inserted = lakehouse.merge_new_rows(config, table, good, keys,
                                                            attempts=config.score.merge_retries)
                summary.failed = quarantine_failed(config, staged, crashed, images, stage,
                                                   f"{summary.model_name}/{summary.model_version}", at)
            finally:
                lakehouse.remove_staging(staging)
    lakehouse.register_tables(spark, config)



"""`imageiq maintain`: OPTIMIZE (compact small files) and VACUUM (delete files no table version of
the retention window needs) every table under storage.root.

Every ingest batch, MERGE and run record adds files; a lake written nightly gathers thousands of
small ones, which slow every scan, and the files that MERGEs replaced stay until VACUUM. The
retention is `maintain.retention_hours` (default 168, Delta's own): files a running reader or a
time-travel query of that window may need are kept. A shorter retention is refused unless the
Spark conf `spark.databricks.delta.retentionDurationCheck.enabled` is `false`, Delta's own switch
for it, so that turning the safety off is a deliberate act.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.core.summary import Row, aligned
from imageiq_spark.lake import conflicts, delta_log, lakehouse
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.session import session_conf

log = logging.getLogger(__name__)

#: Delta's default `delta.deletedFileRetentionDuration`; VACUUM refuses less unless told not to.
DELTA_MIN_RETENTION_HOURS = 168
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"


@dataclass(frozen=True)
class TableMaintenance:
    table: str
    files_before: int
    files_after: int
    bytes_after: int
    files_vacuumed: int | None  # None when Delta did not log the count


@dataclass
class MaintainSummary:
    retention_hours: int
    tables: list[TableMaintenance] = field(default_factory=list)
    elapsed_s: float = 0.0

    def counts(self) -> RunCounts:
        return RunCounts(read=sum(t.files_before for t in self.tables),
                         written=sum(t.files_after for t in self.tables))

    def lines(self) -> list[str]:
        rows: list[Row] = [("retention", f"{self.retention_hours} h; {len(self.tables)} tables")]
        for t in self.tables:
            vacuumed = "?" if t.files_vacuumed is None else str(t.files_vacuumed)
            rows.append(f"  {t.table:<24} files {t.files_before:>5} -> {t.files_after:>5} "
                        f"({t.bytes_after / 1e6:.1f} MB); vacuumed {vacuumed} file(s)")
        rows.append(("elapsed", f"{self.elapsed_s:.1f} s"))
        return aligned(rows)


def check_retention(spark: SparkSession, hours: int) -> None:
    checked = str(spark.conf.get(RETENTION_CHECK, "true")).lower() != "false"
    if hours < DELTA_MIN_RETENTION_HOURS and checked:
        raise ConfigError(
            f"config key 'maintain.retention_hours' is {hours}, under Delta's safe minimum of "
            f"{DELTA_MIN_RETENTION_HOURS} hours: VACUUM would delete files that running readers and "
            f"time-travel queries (train's pinned prepared version) may still need. Set it to "
            f"{DELTA_MIN_RETENTION_HOURS} or more, or, when no job uses the lake during maintain, "
            f"turn Delta's retention check off on purpose: --set spark_conf.{RETENTION_CHECK}=false"
        )


def _file_count(spark: SparkSession, location: str) -> tuple[int, int]:
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").select("numFiles", "sizeInBytes").first()
    return int(detail[0]), int(detail[1])


def _vacuumed_files(spark: SparkSession, location: str, since_version: int) -> int | None:
    """Files the VACUUM just run deleted, from its `VACUUM END` commit (Delta's vacuum logging)."""
    ends = (delta_log.history(spark, location)
            .where((F.col("version") > since_version) & (F.col("operation") == "VACUUM END"))
            .select("operationMetrics").collect())
    return int(ends[0][0].get("numDeletedFiles", 0)) if ends else None


def maintain_table(spark: SparkSession, config: Config, table: str, hours: int) -> TableMaintenance:
    location = lakehouse.table_location(config, table)
    files_before, _ = _file_count(spark, location)
    with session_conf(spark, lakehouse.rewrite_settings(config, table)):
        conflicts.with_conflict_retry(lambda: spark.sql(f"OPTIMIZE delta.`{location}`").collect(),
                                      f"optimize {table}")
    before_vacuum = delta_log.latest_version(spark, location)
    with session_conf(spark, {"spark.databricks.delta.vacuum.logging.enabled": "true"}):
        spark.sql(f"VACUUM delta.`{location}` RETAIN {hours} HOURS").collect()
    files_after, bytes_after = _file_count(spark, location)
    return TableMaintenance(table, files_before, files_after, bytes_after,
                            _vacuumed_files(spark, location, before_vacuum))


def run(spark: SparkSession, config: Config) -> MaintainSummary:
    """OPTIMIZE then VACUUM each table that exists, one after the other."""
    hours = config.maintain.retention_hours
    check_retention(spark, hours)
    started = time.monotonic()
    summary = MaintainSummary(hours)
    for table in lakehouse.TABLES:
        if lakehouse.table_exists(spark, config, table):
            summary.tables.append(maintain_table(spark, config, table, hours))
            log.info("maintain: %s done", table)
    summary.elapsed_s = time.monotonic() - started
    return summary

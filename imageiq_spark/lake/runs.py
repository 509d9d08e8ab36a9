"""Run records: one row in `job_runs` per stage run, also when it fails.

Every stage runs through `record_run` (cli.run_stage, hence the CLI and every spark-submit job),
which appends the row when the stage ends, whatever way it ends. An append, not a MERGE: each
run has its own `run_id`, so there is nothing to deduplicate, and one small commit per stage costs
less than a MERGE's join. A process killed outright (SIGKILL, a lost driver) leaves no row: the
scheduler's own record covers that case.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pyspark.sql import SparkSession

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config, ConfigError, loggable_params
from imageiq_spark.core.redact import redact
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import conflicts, lakehouse

log = logging.getLogger(__name__)

JOB_RUNS_SCHEMA = schema(
    "stage STRING NOT NULL, run_id STRING NOT NULL, started_at TIMESTAMP NOT NULL, "
    "ended_at TIMESTAMP NOT NULL, status STRING NOT NULL, exit_code BIGINT NOT NULL, "
    "rows_read BIGINT, rows_written BIGINT, rows_quarantined BIGINT, "
    "config_fingerprint STRING NOT NULL, spark_app_id STRING, model_name STRING, "
    "model_version STRING, error STRING, rows_skipped BIGINT"
)
#: The `rows_*` columns, in the order `imageiq status` shows them.
COUNTED = ("read", "written", "quarantined", "skipped")
#: The longest error summary kept in a row: the cause, not a whole stack trace.
ERROR_CHARS = 1000
S = TypeVar("S", bound="Counted")


@dataclass(frozen=True)
class RunCounts:
    """What a stage's summary reports about its rows (each stage's Summary has `counts()`)."""

    read: int | None = None
    written: int | None = None
    quarantined: int | None = None
    #: Rows a stage left out on purpose (duplicates: images too small to hash-compare).
    skipped: int | None = None
    model_name: str | None = None
    model_version: str | None = None


class Counted(Protocol):
    def counts(self) -> RunCounts: ...


def config_fingerprint(config: Config) -> str:
    """A short hash of the whole resolved config (credentials redacted before hashing)."""
    payload = json.dumps(loggable_params(config), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class RunRecord:
    stage: str
    config: Config
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime.datetime = field(default_factory=utc_now)
    counts: RunCounts = field(default_factory=RunCounts)

    def row(self, status: str, exit_code: int, error: str | None, app_id: str | None) -> tuple:
        c = self.counts
        model_name = c.model_name or (self.config.mlflow.registered_model if c.model_version else None)
        return (self.stage, self.run_id, self.started_at, utc_now(), status, exit_code, c.read,
                c.written, c.quarantined, config_fingerprint(self.config), app_id, model_name,
                c.model_version, redact(error)[:ERROR_CHARS] if error else None, c.skipped)


def append_run(spark: SparkSession, config: Config, row: tuple) -> None:
    lakehouse.ensure_table(spark, config, "job_runs", JOB_RUNS_SCHEMA)
    rows = spark.createDataFrame([row], JOB_RUNS_SCHEMA)
    conflicts.with_conflict_retry(
        # mergeSchema: a job_runs table from before rows_skipped gains the column.
        lambda: rows.write.format("delta").mode("append").option("mergeSchema", "true").save(
            lakehouse.table_location(config, "job_runs")),
        "append job_runs",
    )


def record_run(spark: SparkSession, config: Config, stage: str, action: Callable[[], S],
               exit_code: Callable[[S], int] = lambda _: 0) -> S:
    """Run `action` (a stage) and append its `job_runs` row, `failed` with the cause if it raised;
    `exit_code` gives the code a succeeded run exits with (3: monitoring raised an alert).

    The stage's own exception is what the caller sees; a failure to write the record is logged,
    never allowed to hide it.
    """
    record = RunRecord(stage, config)
    try:
        summary = action()
    except BaseException as exc:
        code = 2 if isinstance(exc, ConfigError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
        _append_quietly(spark, config, record.row("failed", code, f"{type(exc).__name__}: {exc}",
                                                  _app_id(spark)))
        raise
    record.counts = summary.counts()
    _append_quietly(spark, config, record.row("succeeded", exit_code(summary), None, _app_id(spark)))
    return summary


def _append_quietly(spark: SparkSession, config: Config, row: tuple) -> None:
    try:
        append_run(spark, config, row)
    except Exception as exc:  # the record is secondary: never replace the stage's outcome
        log.warning("could not record the run in job_runs: %s: %s", type(exc).__name__, redact(exc))


def _app_id(spark: SparkSession) -> str | None:
    return spark.conf.get("spark.app.id", None)

"""Run records: one row in `job_runs` per stage run, also when it fails; and `imageiq status`.

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
from typing import Any, Protocol, TypeVar

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark import lakehouse
from imageiq_spark.clock import utc_now
from imageiq_spark.config import Config, ConfigError, loggable_params
from imageiq_spark.redact import redact
from imageiq_spark.tables import schema

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
    lakehouse.with_conflict_retry(
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


# --- imageiq status -------------------------------------------------------------------------


def latest_runs(job_runs: DataFrame) -> DataFrame:
    """The latest row per stage, stages in order of their latest start."""
    from pyspark.sql.window import Window

    newest = Window.partitionBy("stage").orderBy(F.col("started_at").desc(), F.col("ended_at").desc())
    return (job_runs.withColumn("_n", F.row_number().over(newest)).where("_n = 1").drop("_n")
            .orderBy("started_at"))


@dataclass
class StatusSummary:
    runs: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, int | str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = ["latest runs:"]
        if not self.runs:
            lines.append("  none recorded yet")
        for r in self.runs:
            took = (r["ended_at"] - r["started_at"]).total_seconds()
            counts = ", ".join(f"{name} {r[f'rows_{name}']}" for name in COUNTED
                               if r.get(f"rows_{name}") is not None)
            model = f" model v{r['model_version']}" if r["model_version"] else ""
            lines.append(f"  {r['stage']:<11}{r['status']:<10}{r['started_at']:%Y-%m-%d %H:%M:%S} "
                         f"({took:.0f} s) exit {r['exit_code']}{model}"
                         + (f"; {counts}" if counts else ""))
            if r["error"]:
                lines.append(f"  {'':<11}error: {r['error'].splitlines()[0][:200]}")
        lines.append("pending:")
        lines += [f"  {what}: {n}" for what, n in self.pending.items()]
        return lines


def pending_work(spark: SparkSession, config: Config) -> dict[str, int | str]:
    """Images not prepared at the current preprocess version, and not scored by the champion."""
    from imageiq_spark.transform import TransformSpec

    if not lakehouse.table_exists(spark, config, "images"):
        return {"images": "none ingested yet"}
    ids = lakehouse.read_table(spark, config, "images").select("image_id")
    pending: dict[str, int | str] = {}
    version = TransformSpec.from_config(config).version
    if lakehouse.table_exists(spark, config, "prepared"):
        done = (lakehouse.read_table(spark, config, "prepared")
                .where(F.col("preprocess_version") == version).select("image_id"))
        pending[f"not prepared at preprocess version {version}"] = ids.join(done, "image_id",
                                                                            "left_anti").count()
    else:
        pending["not prepared"] = ids.count()
    champion = _champion(spark, config)
    if champion is None:
        pending["not scored"] = "no champion yet"
    elif lakehouse.table_exists(spark, config, "predictions"):
        scored = (lakehouse.read_table(spark, config, "predictions")
                  .where((F.col("model_name") == champion[0]) & (F.col("model_version") == champion[1]))
                  .select("image_id"))
        pending[f"not scored by the champion (v{champion[1]})"] = ids.join(scored, "image_id",
                                                                            "left_anti").count()
    else:
        pending[f"not scored by the champion (v{champion[1]})"] = ids.count()
    return pending


def _champion(spark: SparkSession, config: Config) -> tuple[str, str] | None:
    """The champion as the lake records it (`model_aliases`), without asking the registry."""
    from imageiq_spark.tracking import CHAMPION

    if not lakehouse.table_exists(spark, config, "model_aliases"):
        return None
    row = (lakehouse.read_table(spark, config, "model_aliases")
           .where((F.col("model_name") == config.mlflow.registered_model) & (F.col("alias") == CHAMPION))
           .select("model_name", "model_version").first())
    return (row[0], row[1]) if row else None


def status(spark: SparkSession, config: Config) -> StatusSummary:
    summary = StatusSummary()
    if lakehouse.table_exists(spark, config, "job_runs"):
        summary.runs = [r.asDict() for r in
                        latest_runs(lakehouse.read_table(spark, config, "job_runs")).collect()]
    summary.pending = pending_work(spark, config)
    return summary

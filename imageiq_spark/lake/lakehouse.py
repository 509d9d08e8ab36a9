"""Tables of the embedded lakehouse: where they live, how they are created, registered and merged.

Each table is a Delta folder at `<storage.root>/warehouse/<database>.db/<table>`. The catalog is
rebuilt from those folders whenever a session starts (`register_tables`), so `imageiq sql` sees
every table and concurrent jobs need no single-writer metastore. With `catalog.name` set the same
`CREATE TABLE IF NOT EXISTS ... LOCATION` registers them as external tables of that catalog of a
persistent metastore (Hive, Glue, Unity Catalog), and the project reads, merges and alters them by
their three-level names, as every other client of the metastore does.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
    ProtocolChangedException,
)
import pyarrow as pa
from pyarrow import fs
from pyspark import StorageLevel
from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.lake import storage
from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.lake.session import cores, deal, is_connect, storage_uri

log = logging.getLogger(__name__)

TABLES = (
    "images", "quarantine", "prepared", "prepared_labels", "prepared_versions", "prepared_stats",
    "predictions", "evaluations", "model_aliases", "alias_history", "image_labels",
    "job_runs", "image_profiles", "monitor_profiles", "monitor_drift", "alerts", "champion_decisions",
    "image_hashes", "near_duplicates", "near_duplicate_clusters", "embeddings", "image_splits",
)
CONFLICTS = (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
    ProtocolChangedException,
)
#: The same conflicts by error condition: a Spark Connect client gets no `delta.exceptions` classes.
CONFLICT_CONDITIONS = frozenset({
    "DELTA_CONCURRENT_APPEND", "DELTA_CONCURRENT_DELETE_READ", "DELTA_CONCURRENT_TRANSACTION",
    "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
})
T = TypeVar("T")
#: Session settings for writes of image bytes and tensors: Parquet row groups of 8 MB, so that Spark
#: splits a scan of the table over the cores evenly by bytes. A default 128 MB row group cannot be
#: split: a table of three files then ran as three tasks on two cores. Parquet measures a row
#: group's size every 100 rows at first, 130 MB of camera photos; from 4 rows on it keeps the size.
ROW_GROUP_SETTINGS = {"parquet.block.size": str(8 << 20), "parquet.page.size.row.check.min": "4"}
#: Up to this many pending ids are broadcast to pick their rows out of a table of image bytes;
#: more are joined by a shuffle (of the image bytes, so only for a large backlog).
BROADCAST_IDS = 500_000
#: Pending rows whose busiest scan task holds more than this many times a core's share are dealt.
UNEVEN = 1.25
#: How long a table creation that found the folder taken waits for the other creator's commit.
CREATE_RACE_WAIT_S = 10.0


def table_location(config: Config, table: str) -> str:
    return f"{storage_uri(config.storage.root)}/warehouse/{config.catalog.database}.db/{table}"


def database_name(config: Config) -> str:
    """`catalog.database`, under `catalog.name` when one is set."""
    catalog = f"`{config.catalog.name}`." if config.catalog.name else ""
    return f"{catalog}`{config.catalog.database}`"


def qualified_name(config: Config, table: str) -> str:
    return f"{database_name(config)}.`{table}`"


def table_ref(config: Config, table: str) -> str:
    """How SQL statements name a table: by path in the session's own catalog, by its name in a
    persistent one (Unity Catalog governs a registered table by its name)."""
    if config.catalog.name:
        return qualified_name(config, table)
    return f"delta.`{table_location(config, table)}`"


def lake_path(config: Config, *parts: str) -> str:
    """A URI under storage.root for things that are not tables (checkpoints, reports, staging)."""
    return "/".join([storage_uri(config.storage.root), *parts])


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is a Delta commit that lost to a concurrent writer (classic or Connect)."""
    if isinstance(exc, CONFLICTS):
        return True
    condition = error_condition(exc)
    return bool(condition) and condition.split(".")[0] in CONFLICT_CONDITIONS


def error_condition(exc: BaseException) -> str | None:
    """Spark's error condition (`PATH_NOT_FOUND`, ...): `getCondition` from Spark 4, before it
    `getErrorClass`."""
    if not isinstance(exc, PySparkException):
        return None
    return exc.getCondition() if hasattr(exc, "getCondition") else exc.getErrorClass()


def with_conflict_retry(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run a Delta write, retrying when a concurrent writer committed first."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except PySparkException as exc:
            if not is_conflict(exc) or attempt == attempts:
                raise
            delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s: concurrent write (%s); retry %d in %.1fs", what,
                        type(exc).__name__, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def ensure_database(spark: SparkSession, config: Config) -> None:
    if config.catalog.name:
        # A metastore's schema has its own storage (Unity Catalog refuses LOCATION); the tables
        # are external, at their own locations under storage.root.
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {database_name(config)}")
        return
    location = f"{storage_uri(config.storage.root)}/warehouse/{config.catalog.database}.db"
    spark.sql(f"CREATE DATABASE IF NOT EXISTS `{config.catalog.database}` LOCATION '{location}'")


def ensure_table(
    spark: SparkSession,
    config: Config,
    table: str,
    schema: StructType,
    partition_by: Iterable[str] = (),
) -> None:
    """Create the Delta table at its location if it does not exist yet, and register it."""
    ensure_database(spark, config)

    def create() -> None:
        if register_table(spark, config, table):
            return
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" + ("" if f.nullable else " NOT NULL")
                            for f in schema.fields)
        partitioned = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in partition_by)})" if partition_by else ""
        spark.sql(f"CREATE TABLE IF NOT EXISTS {qualified_name(config, table)} ({columns}) USING DELTA"
                  f"{partitioned} LOCATION '{table_location(config, table)}'")
        if config.catalog.name:
            check_registered_location(spark, config, table)

    def create_tolerating_race() -> None:
        try:
            create()
        except AnalysisException:
            # A concurrent job created the folder between our check and our commit; its first
            # commit may still be on its way (the folder exists, its log does not yet).
            deadline = time.monotonic() + CREATE_RACE_WAIT_S
            while not is_delta_table(spark, table_location(config, table)):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            register_table(spark, config, table)

    with_conflict_retry(create_tolerating_race, f"create {table}")
    add_missing_columns(spark, config, table, schema)


def add_missing_columns(spark: SparkSession, config: Config, table: str, schema: StructType) -> None:
    """Schema evolution: columns of `schema` an existing table lacks are added at its end.

    Delta adds them as nullable and old rows read NULL, so a column is added to a table by adding
    its StructField (nullable, last) to the schema in `tables`: the next run of the stage does it.
    """
    present = set(read_table(spark, config, table).columns)
    missing = [f for f in schema.fields if f.name not in present]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        with_conflict_retry(
            lambda: spark.sql(f"ALTER TABLE {table_ref(config, table)} ADD COLUMNS ({columns})"),
            f"add columns to {table}")


def register_table(spark: SparkSession, config: Config, table: str) -> bool:
    """Register an existing table folder in the session's catalog; False if there is none."""
    location = table_location(config, table)
    if not is_delta_table(spark, location):
        return False
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS {qualified_name(config, table)} USING DELTA LOCATION '{location}'"
    )
    if config.catalog.name:
        check_registered_location(spark, config, table)
    return True


def check_registered_location(spark: SparkSession, config: Config, table: str) -> None:
    """A persistent metastore may hold the name already, for another lake: reads and merges by
    name would then go to that lake's table."""
    name = qualified_name(config, table)
    registered = spark.sql(f"DESCRIBE DETAIL {name}").select("location").first()[0]
    if _normal(registered) != _normal(table_location(config, table)):
        raise ConfigError(
            f"table {name} is registered at {registered}, not at {table_location(config, table)} "
            f"under storage.root: another lake uses catalog '{config.catalog.name}' and database "
            f"'{config.catalog.database}'. Set catalog.database to a database of this lake's own "
            f"(or DROP TABLE {name} if that lake is gone)"
        )


def _normal(location: str) -> str:
    """`file:/x`, `file:///x` and `file:/x/` are one location."""
    if location.startswith("file:"):
        location = "file:/" + location[len("file:"):].lstrip("/")
    return location.rstrip("/")


def register_tables(spark: SparkSession, config: Config) -> list[str]:
    """Register every table and view that exists under storage.root; returns the table names."""
    ensure_database(spark, config)
    found = [table for table in TABLES if register_table(spark, config, table)]
    for name, sql in VIEWS.items():
        if VIEW_NEEDS[name] <= set(found):
            spark.sql(
                f"CREATE OR REPLACE VIEW {qualified_name(config, name)} AS "
                + sql.format(db=database_name(config), threshold=config.score.review_threshold)
            )
    return found


def read_table(spark: SparkSession, config: Config, table: str) -> DataFrame:
    if config.catalog.name:
        return spark.read.table(qualified_name(config, table))
    return spark.read.format("delta").load(table_location(config, table))


def table_exists(spark: SparkSession, config: Config, table: str) -> bool:
    return is_delta_table(spark, table_location(config, table))


def is_delta_table(spark: SparkSession, location: str) -> bool:
    """Whether `location` holds a Delta table: a commit or a checkpoint in its `_delta_log`.

    Listed with the driver's file system (a millisecond) where it reaches the lake; a Spark Connect
    client may not, nor a file system pyarrow lacks: those ask the server with SQL (~80 ms, and
    a stage asks about each of its tables a few times per run). SQL rather than Delta's Python
    `DeltaTable`, which Spark Connect serves only with Delta's Connect plugin on the server."""
    if not is_connect(spark):
        try:
            return has_delta_log(location)
        except (OSError, ValueError) as exc:  # pyarrow's errors: no such file system, no access
            log.debug("listing %s/_delta_log failed (%s): asking Spark", location, exc)
    try:
        detail = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").select("format").first()
    except AnalysisException:
        return False
    return detail is not None and detail["format"] == "delta"


def has_delta_log(location: str) -> bool:
    """A commit (`NNN.json`) or checkpoint in `location`/_delta_log, as Delta finds a table; a
    hidden file is a commit still being written."""
    filesystem, path = storage.filesystem(location)
    listing = filesystem.get_file_info(fs.FileSelector(f"{path}/_delta_log", allow_not_found=True))
    return any((entry.base_name.endswith(".json") or ".checkpoint." in entry.base_name)
               and not entry.base_name.startswith(".") for entry in listing)


def history(spark: SparkSession, location: str, limit: int | None = None) -> DataFrame:
    """The Delta table's commit history, newest first (DESCRIBE HISTORY's columns)."""
    return spark.sql(f"DESCRIBE HISTORY delta.`{location}`" + (f" LIMIT {limit}" if limit else ""))


def latest_version(spark: SparkSession, location: str) -> int:
    return int(history(spark, location, 1).select("version").first()[0])


def merge(config: Config, table: str, rows: DataFrame, condition: str, actions: str,
          attempts: int = 5) -> int:
    """`MERGE INTO table t USING rows s ON condition actions`; returns the rows inserted.

    The rows go through a uniquely named temporary view of their own session (inside
    foreachBatch that is a cloned session), and a commit that loses to a concurrent writer is
    retried against the new table state.
    """
    view = f"imageiq_merge_{uuid.uuid4().hex}"
    session = rows.sparkSession
    rows.createOrReplaceTempView(view)
    statement = f"MERGE INTO {table_ref(config, table)} t USING {view} s ON {condition} {actions}"
    try:
        metrics = with_conflict_retry(lambda: session.sql(statement).collect(), f"merge {table}",
                                      attempts)
    finally:
        session.catalog.dropTempView(view)
    return int(metrics[0]["num_inserted_rows"]) if metrics else 0


@dataclass(frozen=True)
class Pending:
    """The rows a stage has still to process: `rows` (wide: image bytes), their `ids` (cached
    until the `with` block ends) and how many there are."""

    rows: DataFrame
    ids: DataFrame
    count: int

    def __enter__(self) -> Pending:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ids.unpersist()


def pending_rows(rows: DataFrame, done: Sequence[DataFrame], key: str = "image_id") -> Pending:
    """The rows of `rows` whose `key` is in none of `done` (DataFrames of that one column).

    The anti-joins run on the keys alone, once (the keys are cached: a run reads them for the
    count, the pick and a crash bisection); the wide rows are then picked: all of `rows` as they are
    when every key is pending (not shuffled), else by a broadcast semi-join of the keys (up to
    BROADCAST_IDS), dealt round-robin over the cores only when the scan leaves them uneven (new
    images sit in the newest files; a shuffle of the image bytes cost up to a quarter of preprocess's
    time on camera photos). An anti-join of `rows` itself with a million done keys sorted and
    shuffled every image's bytes to find the few new ones.
    """
    ids = rows.select(key)
    for keys in done:
        ids = ids.join(keys, key, "left_anti")
    ids = ids.persist(StorageLevel.MEMORY_AND_DISK)
    count = ids.count()
    if count == 0:
        picked = rows.limit(0)
    elif count == rows.count():
        picked = rows
    else:
        picked = rows.join(F.broadcast(ids) if count <= BROADCAST_IDS else ids, key, "left_semi")
        if busiest_task(picked.select(key)) > UNEVEN * count / cores(rows.sparkSession):
            picked = deal(picked)
    return Pending(picked, ids, count)


def busiest_task(keys: DataFrame) -> int:
    """The most rows one task of `keys`' plan holds (a scan of the keys alone: cheap)."""
    per_task = keys.groupBy(F.spark_partition_id().alias("task")).count()
    return per_task.agg(F.max("count")).first()[0] or 0


def merge_new_rows(
    config: Config,
    table: str,
    rows: DataFrame,
    keys: list[str],
    attempts: int = 5,
    pinned: Mapping[str, str] | None = None,
) -> int:
    """Insert the rows whose keys the table lacks; returns how many were inserted.

    An insert-only MERGE: a rerun or a concurrent run with the same rows inserts nothing.
    `pinned` names key columns that hold one value in every row of `rows` (e.g. a version):
    they are matched against that literal, so Delta reads only the target files whose
    statistics (or partition) can hold it, not the whole table.
    """
    pinned = dict(pinned or {})
    literals = [f"t.`{k}` = {sql_string(v)}" for k, v in pinned.items()]
    condition = " AND ".join(literals + [f"t.`{k}` <=> s.`{k}`" for k in keys if k not in pinned])
    return merge(config, table, rows, condition, "WHEN NOT MATCHED THEN INSERT *", attempts)


def sql_string(value: str) -> str:
    """`value` as a SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


VIEWS = {
    "latest_predictions": """
        SELECT p.* FROM {db}.predictions p
        JOIN {db}.model_aliases a
          ON p.model_name = a.model_name AND p.model_version = a.model_version
        WHERE a.alias = 'champion'""",
    "daily_label_counts": """
        SELECT score_date, model_name, model_version, predicted_label, count(*) AS images,
               avg(confidence) AS mean_confidence
        FROM {db}.predictions
        GROUP BY score_date, model_name, model_version, predicted_label""",
    "review_queue": """
        SELECT p.image_id, i.path, p.predicted_label, p.confidence, p.top_k, p.model_name,
               p.model_version, p.scored_at
        FROM {db}.predictions p JOIN {db}.images i ON p.image_id = i.image_id
        WHERE p.confidence < {threshold}""",
}
VIEW_NEEDS = {
    "latest_predictions": {"predictions", "model_aliases"},
    "daily_label_counts": {"predictions"},
    "review_queue": {"predictions", "images"},
}


def rewrite_settings(config: Config, table: str) -> dict[str, str]:
    """Rewrite the image and tensor tables the way their writers do: 8 MB row groups (splittable
    scans) and, for `prepared`, its configured codec."""
    if table == "images":
        return dict(ROW_GROUP_SETTINGS)
    if table == "prepared":
        return {**ROW_GROUP_SETTINGS,
                "spark.sql.parquet.compression.codec": config.preprocess.compression}
    return {}


def remove_staging(uri: str) -> None:
    """Delete a staging folder (local, file:, s3a:// or s3://); a leftover is only wasted space."""
    try:
        storage.delete_dir(uri)
    except (OSError, pa.ArrowException) as exc:
        log.warning("could not remove staging folder %s: %s", uri, exc)

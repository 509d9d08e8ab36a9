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
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.lake import conflicts, delta_log, storage
from imageiq_spark.lake.session import cores, deal, storage_uri

log = logging.getLogger(__name__)

TABLES = (
    "images", "quarantine", "prepared", "prepared_labels", "prepared_versions", "prepared_stats",
    "predictions", "evaluations", "model_aliases", "alias_history", "image_labels",
    "job_runs", "image_profiles", "monitor_profiles", "monitor_drift", "alerts", "champion_decisions",
    "image_hashes", "near_duplicates", "near_duplicate_clusters", "embeddings", "image_splits",
)
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


@dataclass
class Known:
    """What one session learnt about the lake: its databases, the tables it registered (by name
    and location) and the columns each table has. A stage ensures the same tables several times a
    run (its writes, `job_runs`, a model pass), and each statement of creation, registration or
    schema check costs Spark jobs; a table whose log has gone since (a listing, free) is
    learnt again. Columns are only ever added, so a concurrent writer cannot make this wrong."""

    databases: set[str] = field(default_factory=set)
    registered: set[tuple[str, str]] = field(default_factory=set)
    columns: dict[str, frozenset[str]] = field(default_factory=dict)


#: Per session: a catalog (and a foreachBatch's cloned session) is a session's own.
_KNOWN: weakref.WeakKeyDictionary[SparkSession, Known] = weakref.WeakKeyDictionary()


def known(spark: SparkSession) -> Known:
    return _KNOWN.setdefault(spark, Known())


def ensure_database(spark: SparkSession, config: Config) -> None:
    learnt = known(spark)
    if database_name(config) in learnt.databases:
        return
    if config.catalog.name:
        # A metastore's schema has its own storage (Unity Catalog refuses LOCATION); the tables
        # are external, at their own locations under storage.root.
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {database_name(config)}")
    else:
        location = f"{storage_uri(config.storage.root)}/warehouse/{config.catalog.database}.db"
        spark.sql(f"CREATE DATABASE IF NOT EXISTS `{config.catalog.database}` LOCATION '{location}'")
    learnt.databases.add(database_name(config))


def ensure_table(
    spark: SparkSession,
    config: Config,
    table: str,
    schema: StructType,
    partition_by: Iterable[str] = (),
) -> None:
    """Create the Delta table at its location if it does not exist yet, and register it."""
    location = table_location(config, table)
    learnt = known(spark)
    if ((qualified_name(config, table), location) in learnt.registered
            and set(schema.fieldNames()) <= learnt.columns.get(location, frozenset())
            and table_exists(spark, config, table)):
        return
    learnt.columns.pop(location, None)
    ensure_database(spark, config)

    def create() -> None:
        if register_table(spark, config, table):
            return
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" + ("" if f.nullable else " NOT NULL")
                            for f in schema.fields)
        partitioned = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in partition_by)})" if partition_by else ""
        spark.sql(f"CREATE TABLE IF NOT EXISTS {qualified_name(config, table)} ({columns}) USING DELTA"
                  f"{partitioned} LOCATION '{location}'")
        if config.catalog.name:
            check_registered_location(spark, config, table)
        learnt.registered.add((qualified_name(config, table), location))

    def create_tolerating_race() -> None:
        try:
            create()
        except AnalysisException:
            # A concurrent job created the folder between our check and our commit; its first
            # commit may still be on its way (the folder exists, its log does not yet).
            deadline = time.monotonic() + CREATE_RACE_WAIT_S
            while not table_exists(spark, config, table):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            register_table(spark, config, table)

    conflicts.with_conflict_retry(create_tolerating_race, f"create {table}")
    learnt.columns[location] = add_missing_columns(spark, config, table, schema)


def add_missing_columns(spark: SparkSession, config: Config, table: str, schema: StructType
                        ) -> frozenset[str]:
    """Schema evolution: columns of `schema` an existing table lacks are added at its end; returns
    the table's columns.

    Delta adds them as nullable and old rows read NULL, so a column is added to a table by adding
    its StructField (nullable, last) to the schema in `tables`: the next run of the stage does it.
    """
    present = set(read_table(spark, config, table).columns)
    missing = [f for f in schema.fields if f.name not in present]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        conflicts.with_conflict_retry(
            lambda: spark.sql(f"ALTER TABLE {table_ref(config, table)} ADD COLUMNS ({columns})"),
            f"add columns to {table}")
    return frozenset(present | {f.name for f in missing})


def register_table(spark: SparkSession, config: Config, table: str) -> bool:
    """Register an existing table folder in the session's catalog (once per session); False if
    there is none."""
    location = table_location(config, table)
    if not table_exists(spark, config, table):
        return False
    name = qualified_name(config, table)
    if (name, location) in known(spark).registered:
        return True
    spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING DELTA LOCATION '{location}'")
    if config.catalog.name:
        check_registered_location(spark, config, table)
    known(spark).registered.add((name, location))
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
    return delta_log.is_delta_table(spark, table_location(config, table))


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
        metrics = conflicts.with_conflict_retry(lambda: session.sql(statement).collect(), f"merge {table}",
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

"""The `prepared` table store: reads that train and evaluate use, and the side tables beside it.

Rows are keyed by (`image_id`, `preprocess_version`), where the version is
`TransformSpec.version`, a hash of every transform parameter. What travels with the table, in
small Delta tables beside it (same database folder; schemas in `tables`):
- `prepared_labels` (label, label_index, added_at): the label vocabulary. Labels get indices in
  sorted order the first time they are seen; later labels are appended; an index never changes.
- `prepared_versions` (preprocess_version, spec, created_at): each version's `TransformSpec`.
- `prepared_stats` (preprocess_version, prepared_at, train_images, channel_total,
  channel_total_sq): exact integer channel sums of each run's train rows; `read_channel_stats`
  adds them up to the mean and std on the 0..255 scale. A run that crashed after its commit is
  caught up by the next one from the table's commit history.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core.clock import as_utc
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import (
    LABELS_SCHEMA,
    LABELS_TABLE,
    PREPARED_SCHEMA,
    QUARANTINE_KEYS,
    QUARANTINE_SCHEMA,
    RUN_STATS_SCHEMA,
    STATS_TABLE,
    VERSIONS_SCHEMA,
    VERSIONS_TABLE,
)
from imageiq_spark.lake import delta_log, lakehouse, storage
from imageiq_spark.vision.preprocess_udf import (
    FAILURE_FIELDS,
    OUTCOME_SCHEMA,
    SUMS_SCHEMA,
    ChannelSums,
    Failure,
    RunReport,
)
from imageiq_spark.vision.spec import TransformSpec

SPLITS = ("train", "val", "test")
#: userMetadata of a run's MERGE into `prepared`: TAG_PREFIX + "<version>:<prepared_at ISO>#<run id>".
TAG_PREFIX = "imageiq-preprocess:"

# ------------------------------------------------------------------------------------- reads


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
    row = version_row(spark, config, version)
    if row is None:
        raise LookupError(f"preprocess_version {version} is unknown: no row in {VERSIONS_TABLE}")
    return TransformSpec.from_dict(json.loads(row["spec"]))


def version_row(spark: SparkSession, config: Config, version: str) -> Any:
    if not lakehouse.table_exists(spark, config, VERSIONS_TABLE):
        return None
    rows = (
        lakehouse.read_table(spark, config, VERSIONS_TABLE)
        .filter(F.col("preprocess_version") == version)
        .collect()
    )
    return rows[0] if rows else None


def count_table(
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
                   prepared_version: int) -> lakehouse.Pending:
    """Rows of `images` not prepared at the spec's version (as of the table's `prepared_version`)
    and not quarantined by this stage at that version (`lakehouse.pending_rows`)."""
    images = lakehouse.read_table(spark, config, "images")
    done = (
        spark.read.format("delta").option("versionAsOf", prepared_version)
        .load(lakehouse.table_location(config, "prepared"))
        .filter(F.col("preprocess_version") == spec.version)
        .select("image_id")
    )
    # An image this stage quarantined at this version is not decoded again on every run (delete
    # its quarantine row to retry it); a new version, e.g. a fixed transform, tries it again.
    failed = (
        lakehouse.read_table(spark, config, "quarantine")
        .filter((F.col("stage") == "preprocess") & (F.col("version") == spec.version))
        .select("image_id")
    )
    return lakehouse.pending_rows(images, [done, failed])


def latest_version(spark: SparkSession, config: Config, table: str) -> int:
    return delta_log.latest_version(spark, lakehouse.table_location(config, table))


# ------------------------------------------------------------------------------------ writes


def ensure_tables(spark: SparkSession, config: Config) -> None:
    lakehouse.ensure_table(spark, config, "prepared", PREPARED_SCHEMA)
    lakehouse.ensure_table(spark, config, "quarantine", QUARANTINE_SCHEMA)
    lakehouse.ensure_table(spark, config, LABELS_TABLE, LABELS_SCHEMA)
    lakehouse.ensure_table(spark, config, VERSIONS_TABLE, VERSIONS_SCHEMA)
    lakehouse.ensure_table(spark, config, STATS_TABLE, RUN_STATS_SCHEMA)


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


def quarantine_rows(bad: DataFrame, quarantined_at: Column, version: str) -> DataFrame:
    return bad.select(
        "path",
        "reason",
        "detail",
        F.lit("preprocess").alias("stage"),
        "image_id",
        "size_bytes",
        "modified_at",
        quarantined_at.alias("ingested_at"),
        F.lit(version).alias("version"),
    )


def quarantine_failures(spark: SparkSession, config: Config, failures: list[Failure],
                        quarantined_at: datetime.datetime, version: str) -> Counter[str]:
    """Write the UDF's failure records to `quarantine` under the preprocess `version` (once per
    image); returns reasons counted."""
    unique = list({record[0]: record for record in failures}.values())
    if unique:
        rows = spark.createDataFrame(unique, StructType([OUTCOME_SCHEMA[name] for name in FAILURE_FIELDS]))
        lakehouse.merge_new_rows(config, "quarantine",
                                 quarantine_rows(rows, F.lit(quarantined_at), version), QUARANTINE_KEYS)
    return Counter(record[FAILURE_FIELDS.index("reason")] for record in unique)


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


def committed_runs(spark: SparkSession, config: Config, version: str) -> set[datetime.datetime]:
    """`prepared_at` of each run at `version` whose MERGE into `prepared` committed: each names its
    version and `prepared_at` in userMetadata. The commit files are read on the driver where it
    reaches the lake (no Spark job), else DESCRIBE HISTORY reads them."""
    prefix = f"{TAG_PREFIX}{version}:"
    location = lakehouse.table_location(config, "prepared")
    tags = _log_tags(location) if delta_log.readable(spark) else None
    if tags is None:
        tagged = delta_log.history(spark, location).filter(F.col("userMetadata").startswith(prefix))
        tags = [row["userMetadata"] for row in tagged.select("userMetadata").collect()]
    # A tag without an offset was written in local time, before the one clock.
    return {as_utc(datetime.datetime.fromisoformat(tag[len(prefix):].split("#")[0]))
            for tag in tags if tag and tag.startswith(prefix)}


def _log_tags(location: str) -> list[str] | None:
    """userMetadata of every commit file left in `location`/_delta_log (what DESCRIBE HISTORY
    shows), or None when the driver cannot read them."""
    try:
        tags = []
        for version in sorted(set(delta_log.log_versions(location))):
            data = storage.read_bytes(f"{location}/_delta_log/{version:020d}.json")
            for line in (data or b"").splitlines():
                if line.startswith(b'{"commitInfo"'):
                    tags.append(json.loads(line)["commitInfo"].get("userMetadata"))
        return tags
    except (OSError, ValueError):  # pyarrow's errors: no such file system, no access
        return None


def catch_up_run_stats(spark: SparkSession, config: Config, spec: TransformSpec) -> int:
    """Sum the train split of runs at the spec's version that have no `prepared_stats` row.

    A run stores its own sums from its report; only one that crashed between its commit and
    that store is missing. The runs are found in the table's commit log (`committed_runs`), and
    only their files are read (data skipping on `prepared_at`). Returns the runs caught up.
    """
    committed = committed_runs(spark, config, spec.version)
    stored = {as_utc(run["prepared_at"]) for run in _run_stats(spark, config, spec.version)}
    missing = sorted(committed - stored)
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
        run = runs[as_utc(row["prepared_at"])]
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

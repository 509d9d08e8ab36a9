"""Relabelling: a changed manifest label, or an image file moved to another label folder, changes
the image's label in `images` and in every `prepared` row of it, and keeps the history. A copy
under another folder (the image's recorded path still exists) is a duplicate: its label stays.

`image_labels` (image_id, label_version, label, path, source, valid_from) holds one row per label
an image has had: version 1 is the label ingest first gave it (written when the first change
comes, so ingest pays nothing for images that never change), each change adds the next version.
`images.label` is always the newest. `prepared` rows are updated in place (label and label_index,
every preprocess version; split and tensor stay), so the next `train` sees changed training rows
and trains again; so is the `label` of every `predictions` row of the image (monitoring's
accuracy). Applying the same change twice adds nothing.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from imageiq_spark.core import tables
from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import lakehouse, storage
from imageiq_spark.lake.session import session_conf
from imageiq_spark.ml import prepared

log = logging.getLogger(__name__)

IMAGE_LABELS_SCHEMA = schema(
    "image_id STRING NOT NULL, label_version INT NOT NULL, label STRING, path STRING, "
    "source STRING NOT NULL, valid_from TIMESTAMP NOT NULL"
)


def _latest_history(spark: SparkSession, config: Config) -> DataFrame:
    """(image_id, _version, _history_label) of each image's newest `image_labels` row."""
    newest = Window.partitionBy("image_id").orderBy(F.col("label_version").desc())
    return (lakehouse.read_table(spark, config, "image_labels")
            .withColumn("_n", F.row_number().over(newest)).where("_n = 1")
            .select("image_id", F.col("label_version").alias("_version"),
                    F.col("label").alias("_history_label")))


def relabel(spark: SparkSession, config: Config, candidates: DataFrame, source: str,
            moved_only: bool = False) -> int:
    """Apply the (image_id, path, label) rows of `candidates` whose label differs from the image's
    current label (with `moved_only`, only those whose recorded path is gone); `source` (`folder`
    or the manifest's path) is kept in the history. Returns how many images changed label."""
    current = lakehouse.read_table(spark, config, "images").select(
        "image_id", F.col("label").alias("_old_label"), F.col("path").alias("_old_path"), "ingested_at")
    changed = (candidates.select("image_id", "path", "label").dropDuplicates(["image_id"])
               .join(current, "image_id")
               .where(~F.col("label").eqNullSafe(F.col("_old_label")))
               .localCheckpoint())
    if moved_only:
        moved = [r.image_id for r in changed.select("image_id", "_old_path").collect()
                 if not storage.exists(r._old_path)]
        changed = changed.where(F.col("image_id").isin(moved))
    count = changed.count()
    if count == 0:
        return 0
    _append_history(spark, config, changed, source)
    lakehouse.merge(config, "images", changed.select("image_id", "path", "label"), "t.image_id = s.image_id",
                    "WHEN MATCHED THEN UPDATE SET t.label = s.label, t.path = s.path")
    _update_prepared(spark, config, changed.select("image_id", "label"))
    if lakehouse.table_exists(spark, config, "predictions"):
        lakehouse.merge(config, "predictions", changed.select("image_id", "label"), "t.image_id = s.image_id",
                        "WHEN MATCHED THEN UPDATE SET t.label = s.label")
    log.info("relabelled %d image(s) from %s", count, source)
    return count


def _append_history(spark: SparkSession, config: Config, changed: DataFrame, source: str) -> None:
    lakehouse.ensure_table(spark, config, "image_labels", IMAGE_LABELS_SCHEMA)
    now = utc_now()
    known = changed.join(_latest_history(spark, config), "image_id", "left")
    # Version 1 is the label the image had before its first change.
    first = known.where(F.col("_version").isNull()).select(
        "image_id", F.lit(1).alias("label_version"), F.col("_old_label").alias("label"),
        F.col("_old_path").alias("path"), F.lit("ingest").alias("source"),
        F.col("ingested_at").alias("valid_from"))
    # A change the history already holds (a run that died before updating `images`) adds nothing.
    new = known.where(~F.col("label").eqNullSafe(F.col("_history_label"))).select(
        "image_id", (F.coalesce(F.col("_version"), F.lit(1)) + 1).cast("int").alias("label_version"),
        "label", "path", F.lit(source).alias("source"), F.lit(now).alias("valid_from"))
    lakehouse.merge_new_rows(config, "image_labels", first.unionByName(new),
                             ["image_id", "label_version"])


def _update_prepared(spark: SparkSession, config: Config, changed: DataFrame) -> None:
    """New label and label index on every `prepared` row of the changed images."""
    if not lakehouse.table_exists(spark, config, "prepared"):
        return
    labels = {r["label"] for r in changed.select("label").distinct().collect() if r["label"] is not None}
    prepared.update_vocabulary(spark, config, labels)
    vocabulary = lakehouse.read_table(spark, config, tables.LABELS_TABLE).select("label", "label_index")
    rows = changed.join(F.broadcast(vocabulary), "label", "left")
    with session_conf(spark, lakehouse.rewrite_settings(config, "prepared")):
        lakehouse.merge(config, "prepared", rows, "t.image_id = s.image_id",
                        "WHEN MATCHED THEN UPDATE SET t.label = s.label, t.label_index = s.label_index")


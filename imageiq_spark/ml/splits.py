"""The split of each image: decided once, stored in `image_splits`, shared by near-duplicates.

Why: a split recomputed by every preprocess version from the current `preprocess.split` fractions
moves images when the fractions change, so images that trained one model land in the test set of
the next; and twins (the same photo resized, re-encoded, cropped) split independently fall on
both sides, so the test accuracy measures memory, not recognition. Here:

- first assignment wins: a split is written once per image by an insert-only MERGE, and every
  later preprocess version reads it back; changing the fractions affects new images only;
- an image prepared before this table existed keeps the split of its earliest `prepared` row;
- an image in a near-duplicate cluster (`imageiq duplicates`) takes the split of the cluster's
  smallest already-assigned member, or if none has one yet, the split its cluster id (the
  cluster's smallest image_id) hashes to, so the whole cluster lands in one split;
- any other image: the hash of its own image_id cut at the current fractions (the old rule).

`leakage` counts the images of a split with a near-duplicate in train, under the stored splits
and under the old per-image rule; `evaluate` reports both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core import tables
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import lakehouse
from imageiq_spark.vision.preprocess_udf import split_column

SPLITS_TABLE = "image_splits"
#: `rule`: `hash` (own image_id), `cluster` (a near-duplicate cluster's) or `prepared` (kept from
#: a `prepared` row written before the table existed).
SPLITS_SCHEMA = schema(
    "image_id STRING NOT NULL, split STRING NOT NULL, rule STRING NOT NULL, "
    "assigned_at TIMESTAMP NOT NULL"
)


def new_splits(ids: DataFrame, stored: DataFrame, earlier: DataFrame | None, clusters: DataFrame | None,
               train: float, val: float) -> DataFrame:
    """(image_id) rows without a stored split -> (image_id, split, rule): the pure rule.

    `stored` holds (image_id, split) already assigned, `earlier` (image_id, split) of images
    prepared before splits were stored, `clusters` (image_id, cluster_id) of near-duplicates."""
    todo = ids.select("image_id").distinct().join(stored.select("image_id"), "image_id", "left_anti")
    kept = None if earlier is None else earlier.join(todo, "image_id", "left_semi")
    rest = todo if kept is None else todo.join(kept, "image_id", "left_anti")
    if clusters is None:
        # No near-duplicates found yet: each image by its own id (no cluster joins to plan and run).
        assigned = rest.select("image_id", split_column(F.col("image_id"), train, val).alias("split"),
                               F.lit("hash").alias("rule"))
    else:
        known = stored.select("image_id", "split")
        if kept is not None:
            known = known.unionByName(kept)
        members = clusters.select("image_id", "cluster_id")
        # Per cluster, the split of its smallest member that already has one.
        cluster_split = (known.join(members, "image_id")
                         .groupBy("cluster_id").agg(F.min_by("split", "image_id").alias("cluster_split")))
        hashed = split_column(F.coalesce("cluster_id", "image_id"), train, val)
        assigned = (rest.join(members, "image_id", "left")
                    .join(cluster_split, "cluster_id", "left")
                    .select("image_id", F.coalesce("cluster_split", hashed).alias("split"),
                            F.when(F.col("cluster_id").isNull(), "hash").otherwise("cluster").alias("rule")))
    if kept is not None:
        assigned = assigned.unionByName(kept.select("image_id", "split", F.lit("prepared").alias("rule")))
    return assigned


def assign(spark: SparkSession, config: Config, ids: DataFrame) -> DataFrame:
    """Store a split for each of `ids` that has none yet; returns (image_id, split) of all `ids`.

    Insert-only: a concurrent run that assigned an image first wins, and both read its split."""
    lakehouse.ensure_table(spark, config, SPLITS_TABLE, SPLITS_SCHEMA)
    stored = lakehouse.read_table(spark, config, SPLITS_TABLE)
    earlier = None
    if lakehouse.table_exists(spark, config, "prepared"):
        # Only `ids`' rows are grouped (`new_splits` keeps those without a stored split).
        earlier = (lakehouse.read_table(spark, config, "prepared").select("image_id", "split", "prepared_at")
                   .join(ids.select("image_id"), "image_id", "left_semi")
                   .groupBy("image_id").agg(F.min_by("split", "prepared_at").alias("split")))
    fractions = config.preprocess.split
    rows = new_splits(ids, stored, earlier, read_clusters(spark, config), fractions.train, fractions.val)
    lakehouse.merge_new_rows(config, SPLITS_TABLE, rows.withColumn("assigned_at", F.current_timestamp()),
                             ["image_id"])
    return lakehouse.read_table(spark, config, SPLITS_TABLE).join(ids.select("image_id"), "image_id",
                                                                   "left_semi").select("image_id", "split")


@dataclass(frozen=True)
class Leakage:
    split: str
    images: int  # images of `split` evaluated
    stored: int  # of them with a near-duplicate in train under the stored splits
    old_rule: int  # ... had each image been split by its own image_id (the rule before clusters)


def leakage(spark: SparkSession, config: Config, prepared: DataFrame, split: str = "test") -> Leakage | None:
    """How many images of `split` have a near-duplicate in train, now and under the old rule.

    `prepared` holds (image_id, split) rows of one preprocess version; None without
    `near_duplicates`."""
    if not lakehouse.table_exists(spark, config, "near_duplicates"):
        return None
    pairs = lakehouse.read_table(spark, config, "near_duplicates").select("image_id_a", "image_id_b")
    edges = pairs.unionByName(pairs.select(F.col("image_id_b").alias("image_id_a"),
                                           F.col("image_id_a").alias("image_id_b"))).distinct()
    fractions = config.preprocess.split
    rows = prepared.select("image_id", "split",
                           split_column(F.col("image_id"), fractions.train, fractions.val).alias("old"))
    a = rows.select(F.col("image_id").alias("image_id_a"), F.col("split").alias("split_a"),
                    F.col("old").alias("old_a"))
    b = rows.select(F.col("image_id").alias("image_id_b"), F.col("split").alias("split_b"),
                    F.col("old").alias("old_b"))
    linked = edges.join(a, "image_id_a").join(b, "image_id_b")
    counts = linked.agg(
        F.count_distinct(F.when((F.col("split_a") == split) & (F.col("split_b") == "train"),
                                F.col("image_id_a"))).alias("stored"),
        F.count_distinct(F.when((F.col("old_a") == split) & (F.col("old_b") == "train"),
                                F.col("image_id_a"))).alias("old_rule"),
    ).first()
    total = prepared.where(F.col("split") == split).count()
    return Leakage(split, total, int(counts["stored"]), int(counts["old_rule"]))


def read_clusters(spark: SparkSession, config: Config) -> DataFrame | None:
    """(image_id, cluster_id, cluster_size, clustered_at) of images with a near-duplicate, or None."""
    if not lakehouse.table_exists(spark, config, tables.CLUSTERS_TABLE):
        return None
    return lakehouse.read_table(spark, config, tables.CLUSTERS_TABLE)

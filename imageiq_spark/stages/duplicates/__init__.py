"""Duplicates: `images` -> `image_hashes`, `near_duplicates` (three tiers) and `near_duplicate_clusters`.

Ingest already keeps one row per distinct file content, so what is left are different files of
the same picture, found in three tiers (`tiers` says how): `exact` (identical decoded pixels),
`phash` (perceptual hashes within `duplicates.max_distance` bits; images under
`duplicates.min_side` pixels a side are left out, counted in the summary and
`job_runs.rows_skipped`: on tiny images a 64-bit hash links look-alikes, not copies) and
`embedding` (cosine similarity of the latest model's `embeddings` at or above
`duplicates.min_similarity`).

Hashes are computed once per image (insert-only `image_hashes`, incremental like every stage);
pairs go in by an insert-only MERGE, so a rerun adds nothing. Clusters are the connected
components of all pairs, labelled by their smallest image_id (`tiers.components`); the clusters
table is brought to the new components by one MERGE (update, insert, delete what left).

A rerun with nothing new runs no Spark job: a search ends by recording (`stage_state`) the Delta
versions of the tables it read and wrote, the duplicates settings and its counts; while every
version and the settings are the same, a rerun reports those counts.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    StructField,
    StructType,
)

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, Stopwatch, aligned
from imageiq_spark.core.tables import CLUSTERS_SCHEMA, CLUSTERS_TABLE, schema
from imageiq_spark.lake import lakehouse, stage_state
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.session import spread
from imageiq_spark.stages.duplicates.tiers import components, cosine_pairs, exact_pairs, hamming_pairs
from imageiq_spark.vision import phash

log = logging.getLogger(__name__)

HASHES_TABLE, PAIRS_TABLE = "image_hashes", "near_duplicates"
HASHES_SCHEMA = schema(
    "image_id STRING NOT NULL, dhash BIGINT, phash BIGINT, pixel_digest STRING, error STRING, "
    "hashed_at TIMESTAMP NOT NULL"
)
PAIRS_SCHEMA = schema(
    "image_id_a STRING NOT NULL, image_id_b STRING NOT NULL, tier STRING NOT NULL, "
    "distance DOUBLE NOT NULL, found_at TIMESTAMP NOT NULL"
)
PAIR_KEYS = ["image_id_a", "image_id_b", "tier"]
TIERS = ("exact", "phash", "embedding")
#: The tables a search reads or writes: while none has a new commit, a search would find the same.
WATCHED = ("images", "embeddings", HASHES_TABLE, PAIRS_TABLE, CLUSTERS_TABLE)
#: What a rerun with nothing new reports from the last search (it hashes and adds nothing).
RECORDED = ("pairs", "embedding_model", "clusters", "clustered_images", "small", "min_side")
_HASH_ROWS = StructType([StructField(f.name, f.dataType, True) for f in HASHES_SCHEMA.fields[:-1]])


@dataclass
class DuplicatesSummary:
    hashed: int = 0
    unreadable: int = 0
    pairs: dict[str, int] = field(default_factory=dict)
    new_pairs: int = 0
    embedding_model: tuple[str, str] | None = None  # (name, version) of the embeddings compared
    clusters: int = 0
    clustered_images: int = 0
    #: Images under `duplicates.min_side` pixels a side, left out of the `phash` tier.
    small: int = 0
    min_side: int = 0
    watch: Stopwatch = field(default_factory=Stopwatch)

    def counts(self) -> RunCounts:
        return RunCounts(read=self.hashed, written=self.new_pairs, quarantined=self.unreadable,
                         skipped=self.small)

    def lines(self) -> list[str]:
        rows: list[Row] = [("hashed", f"{self.hashed} new images ({self.unreadable} unreadable)")]
        for tier in TIERS:
            if tier == "embedding" and self.embedding_model is None:
                rows.append((tier, "skipped (no embeddings: run `imageiq embed`)"))
                continue
            extra = (f" ({self.embedding_model[0]} version {self.embedding_model[1]})"
                     if tier == "embedding" and self.embedding_model else
                     f" ({self.small} images under {self.min_side} px a side left out)"
                     if tier == "phash" and self.small else "")
            rows.append((tier, f"{self.pairs.get(tier, 0)} pairs{extra}"))
        rows += [("new pairs", self.new_pairs),
                 ("clusters", f"{self.clusters} ({self.clustered_images} images)"),
                 self.watch.row(self.hashed)]
        return aligned(rows)


# ------------------------------------------------------------------------------- table access


def ensure_tables(spark: SparkSession, config: Config) -> None:
    lakehouse.ensure_table(spark, config, HASHES_TABLE, HASHES_SCHEMA)
    lakehouse.ensure_table(spark, config, PAIRS_TABLE, PAIRS_SCHEMA)
    lakehouse.ensure_table(spark, config, CLUSTERS_TABLE, CLUSTERS_SCHEMA)


def update_hashes(spark: SparkSession, config: Config, watch: Stopwatch | None = None) -> tuple[int, int]:
    """Hash every image of `images` without an `image_hashes` row; returns (new rows, unreadable).
    `watch` marks the start of the hashing, if any.

    The hashes are staged to Parquet first, so a retried MERGE never decodes the images again."""
    images = lakehouse.read_table(spark, config, "images").select("image_id", "content")
    done = lakehouse.read_table(spark, config, HASHES_TABLE).select("image_id")
    with lakehouse.pending_rows(images, [done]) as pending:
        if not pending.count:
            return 0, 0
        if watch is not None:
            watch.work()
        staging = lakehouse.lake_path(config, "staging", HASHES_TABLE, uuid.uuid4().hex)
        try:
            spread(pending.rows).mapInArrow(phash.hash_record_batches, _HASH_ROWS).write.parquet(staging)
            staged = spark.read.parquet(staging).withColumn("hashed_at", F.current_timestamp())
            inserted = lakehouse.merge_new_rows(config, HASHES_TABLE, staged, ["image_id"])
            unreadable = staged.where(F.col("error").isNotNull()).count() if inserted else 0
        finally:
            lakehouse.remove_staging(staging)
    return inserted, unreadable


def latest_embeddings(spark: SparkSession, config: Config) -> tuple[tuple[str, str] | None, DataFrame | None]:
    """((model name, version), its (image_id, vector) rows) of the model that embedded last."""
    if not lakehouse.table_exists(spark, config, "embeddings"):
        return None, None
    embeddings = lakehouse.read_table(spark, config, "embeddings")
    latest = (embeddings.groupBy("model_name", "model_version").agg(F.max("embedded_at").alias("at"))
              .orderBy(F.desc("at")).first())
    if latest is None:
        return None, None
    model = (latest["model_name"], latest["model_version"])
    rows = embeddings.where((F.col("model_name") == model[0]) & (F.col("model_version") == model[1]))
    return model, rows.select("image_id", "vector")


def write_clusters(spark: SparkSession, config: Config, clusters: dict[str, str]) -> None:
    """Bring `near_duplicate_clusters` to these components in one MERGE."""
    sizes: dict[str, int] = {}
    for cluster in clusters.values():
        sizes[cluster] = sizes.get(cluster, 0) + 1
    now = utc_now()
    rows = spark.createDataFrame(
        [(image, cluster, sizes[cluster], now) for image, cluster in sorted(clusters.items())],
        CLUSTERS_SCHEMA,
    )
    lakehouse.merge(
        config, CLUSTERS_TABLE, rows, "t.image_id = s.image_id",
        "WHEN MATCHED AND (t.cluster_id <> s.cluster_id OR t.cluster_size <> s.cluster_size) "
        "THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT * WHEN NOT MATCHED BY SOURCE THEN DELETE",
    )


def run(spark: SparkSession, config: Config) -> DuplicatesSummary:
    """Hash new images, find the pairs of every tier, add the new ones and recompute the clusters."""
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError(
            f"table images does not exist under storage.root '{config.storage.root}': "
            "run `imageiq ingest` first"
        )
    watch = Stopwatch()
    ensure_tables(spark, config)
    versions = stage_state.table_versions(spark, config, WATCHED)
    found = stage_state.unchanged(config, "duplicates", config.fingerprint("duplicates"), versions)
    if found and found["embedding_model"]:
        found["embedding_model"] = tuple(found["embedding_model"])  # a JSON list
    summary = DuplicatesSummary(**found, watch=watch) if found else search(spark, config, watch)
    watch.stop()
    return summary


def search(spark: SparkSession, config: Config, watch: Stopwatch) -> DuplicatesSummary:
    settings = config.duplicates
    summary = DuplicatesSummary(watch=watch)
    summary.hashed, summary.unreadable = update_hashes(spark, config, watch)
    # Taken before the reads: a commit in between leaves the state older than what was read.
    before = stage_state.table_versions(spark, config, WATCHED)
    hashes = lakehouse.read_table(spark, config, HASHES_TABLE)
    sized = lakehouse.read_table(spark, config, "images").select(
        "image_id", (F.least("width", "height") >= settings.min_side).alias("large"))
    large = sized.where("large").select("image_id")
    summary.min_side = settings.min_side
    summary.small = sized.where(~F.col("large")).count()
    found = {
        "exact": exact_pairs(hashes).withColumn("distance", F.lit(0.0)),
        "phash": hamming_pairs(hashes.join(large, "image_id", "left_semi"), settings.max_distance)
        .withColumn("distance", F.col("distance").cast("double")),
    }
    summary.embedding_model, vectors = latest_embeddings(spark, config)
    if vectors is not None:
        found["embedding"] = cosine_pairs(spark, vectors, settings.min_similarity).select(
            "image_id_a", "image_id_b", (1.0 - F.col("similarity")).alias("distance"))
    found_at = utc_now()
    tiers = [pairs.select("image_id_a", "image_id_b", F.lit(tier).alias("tier"), "distance",
                          F.lit(found_at).alias("found_at")) for tier, pairs in found.items()]
    rows = tiers[0]
    for more in tiers[1:]:
        rows = rows.unionByName(more)
    # One MERGE for all tiers: each MERGE is a Delta commit of its own (seconds on a small lake).
    summary.new_pairs = lakehouse.merge_new_rows(config, PAIRS_TABLE, rows, PAIR_KEYS)
    watch.done()
    stored = lakehouse.read_table(spark, config, PAIRS_TABLE)
    edges = [(r["image_id_a"], r["image_id_b"], r["tier"]) for r in
             stored.select("image_id_a", "image_id_b", "tier").collect()]
    summary.pairs = dict(Counter(tier for _, _, tier in edges))
    clusters = components([(a, b) for a, b, _ in edges])
    # Pairs are never removed, so the components change only with new pairs; comparing with the
    # stored ones also repairs a run that crashed between the two writes.
    current = lakehouse.read_table(spark, config, CLUSTERS_TABLE).select("image_id", "cluster_id")
    stored_clusters = {r["image_id"]: r["cluster_id"] for r in current.collect()}
    rewrite = stored_clusters != clusters
    if rewrite:
        write_clusters(spark, config, clusters)
    summary.clusters = len(set(clusters.values()))
    summary.clustered_images = len(clusters)
    lakehouse.register_tables(spark, config)
    # Recorded only when this run's own commits are all that changed: another driver's commit
    # in between may hold pairs these counts and clusters lack.
    after = stage_state.table_versions(spark, config, WATCHED)
    ours = {PAIRS_TABLE: int(summary.new_pairs > 0), CLUSTERS_TABLE: int(rewrite)}
    if all(after[t] == (None if before[t] is None else before[t] + ours.get(t, 0)) for t in WATCHED):
        found = {k: getattr(summary, k) for k in RECORDED}
        stage_state.record(config, "duplicates", config.fingerprint("duplicates"), after, found)
    return summary


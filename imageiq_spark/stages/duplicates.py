"""Duplicates: `images` -> `image_hashes`, `near_duplicates` (three tiers) and `near_duplicate_clusters`.

Ingest already keeps one row per distinct file content, so what is left are different files of
the same picture. Three tiers, each a pair (`image_id_a` < `image_id_b`) with a `distance`:

- `exact`: identical decoded pixels (`phash.pixel_digest`): the same picture saved again with
  other metadata, another PNG compression level or a lossless conversion. Distance 0.
- `phash`: DCT perceptual hashes within `duplicates.max_distance` bits: resized, re-encoded,
  slightly cropped or brightened copies, and thumbnails down to `duplicates.min_side` pixels a
  side (smaller images are left out, counted in the summary and `job_runs.rows_skipped`: on
  tiny images a 64-bit hash links look-alikes, not copies). Found by a banded join: the 64
  bits are cut into k // 2 + 1 bands, and two hashes within k bits agree on at least one band
  within one bit (pigeonhole), so grouping by band value with one bit cleared finds every
  candidate, and counting the differing bits keeps the true ones (`hamming_pairs`). Never a
  cross join: the work grows with the candidates, not with the square of the images.
- `embedding`: cosine similarity of the latest model's `embeddings` at or above
  `duplicates.min_similarity` (distance = 1 - similarity): the same scene shot twice. An exact
  blocked search: the normalised vectors are broadcast once, and each task multiplies its rows
  by them (docs/benchmarks.md measures it against Spark's BucketedRandomProjectionLSH).

Hashes are computed once per image (insert-only `image_hashes`, incremental like every stage);
pairs go in by an insert-only MERGE, so a rerun adds nothing. Clusters are the connected
components of all pairs, labelled by their smallest image_id: union-find on the driver, because
the edge list holds only near-duplicates (a few per image at most, bytes per edge), whereas label
propagation in Spark costs one shuffle job per step of the longest chain. The clusters table is
brought to the new components by one MERGE (update, insert, delete what left).

A rerun with nothing new runs no Spark job: a search ends by recording (`stage_state`) the Delta
versions of the tables it read and wrote, the duplicates settings and its counts; while every
version and the settings are the same, a rerun reports those counts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    StructField,
    StructType,
)

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, aligned
from imageiq_spark.core.tables import CLUSTERS_SCHEMA, CLUSTERS_TABLE, schema
from imageiq_spark.lake import lakehouse, stage_state
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.session import deal, spread, to_arrow
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
_SIMILAR_ROWS = schema("image_id_a STRING NOT NULL, image_id_b STRING NOT NULL, similarity DOUBLE NOT NULL")


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
    elapsed_s: float = 0.0

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
                 ("elapsed", f"{self.elapsed_s:.1f} s")]
        return aligned(rows)


# ------------------------------------------------------------------------------ pure functions


def bands(count: int, bits: int = phash.HASH_BITS) -> list[tuple[int, int]]:
    """(offset, width) of `count` bands covering `bits` bits, widths differing by at most one."""
    if not 1 <= count <= bits:
        raise ValueError(f"bands: count must be 1..{bits}, got {count}")
    widths = [bits // count + (1 if i < bits % count else 0) for i in range(count)]
    offsets = [sum(widths[:i]) for i in range(count)]
    return list(zip(offsets, widths))


def band_values(hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
    """Bits offset..offset+width-1 (from the most significant) of signed 64-bit hashes."""
    unsigned = np.asarray(hashes, np.int64).view(np.uint64)
    return (unsigned >> np.uint64(phash.HASH_BITS - offset - width)) & np.uint64((1 << width) - 1)


_HAMMING_ROWS = schema("image_id_a STRING NOT NULL, image_id_b STRING NOT NULL, distance INT NOT NULL")
_HAMMING_ROWS_ARROW = pa.schema([pa.field(f.name, pa.int32() if f.name == "distance" else pa.string(), False)
                                 for f in _HAMMING_ROWS.fields])


@dataclass(frozen=True)
class BandPairs:
    """The `mapInArrow` function of `hamming_pairs`: (image_id, h, band) rows, a partition holding
    every hash of its bands -> the pairs within k bits that agree on such a band within one bit.

    Within a band, two values at most one bit apart are equal once that bit is cleared: for each
    bit j of the band, the hashes are sorted by their band value with bit j cleared, and each run
    of equal keys is compared all against all, in numpy. A pair met more than once (equal band
    values meet under every j; a pair can agree on several bands) is kept at its first meeting
    only: the lowest band within one bit, at j = 0 when the values are equal.
    """

    k: int
    layout: list[tuple[int, int]]

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        received = list(batches)
        if not received:
            return
        rows = pa.Table.from_batches(received)
        for band in np.unique(rows.column("band").to_numpy()):
            of_band = rows.filter(pc.equal(rows.column("band"), band))
            of_band = of_band.take(pc.sort_indices(of_band.column("image_id")))  # pairs come out a < b
            yield from self._band(of_band.column("image_id"), of_band.column("h").to_numpy(), int(band))

    def _band(self, ids: pa.ChunkedArray, hashes: np.ndarray, band: int) -> Iterator[pa.RecordBatch]:
        offset, width = self.layout[band]
        values = band_values(hashes, offset, width)
        earlier = [band_values(hashes, o, w) for o, w in self.layout[:band]]
        for bit in range(width):
            keys = values & ~np.uint64(1 << bit)
            order = np.argsort(keys, kind="stable")
            first, second = (order[i] for i in pairs_within_runs(keys[order]))
            a, b = np.minimum(first, second), np.maximum(first, second)
            distance = phash.hamming(hashes[a], hashes[b])
            near = distance <= self.k
            a, b, distance = a[near], b[near], distance[near]
            keep = (bit == 0) | (values[a] != values[b])  # equal band values: at bit 0 only
            for previous in earlier:
                keep &= phash.popcount(previous[a] ^ previous[b]) > 1
            if keep.any():
                yield pa.RecordBatch.from_arrays(
                    [ids.take(a[keep]).combine_chunks(), ids.take(b[keep]).combine_chunks(),
                     pa.array(distance[keep].astype(np.int32))], schema=_HAMMING_ROWS_ARROW)


def pairs_within_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j), i < j, of every pair of equal values in sorted `keys`, without a Python loop."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    run_end = np.repeat(np.r_[starts[1:], len(keys)], np.diff(np.r_[starts, len(keys)]))
    partners = run_end - np.arange(len(keys)) - 1  # later positions in the same run
    first = np.repeat(np.arange(len(keys)), partners)
    offsets = np.arange(len(first)) - np.repeat(np.cumsum(partners) - partners, partners)
    return first, first + offsets + 1


def hamming_pairs(hashes: DataFrame, k: int, column: str = "phash") -> DataFrame:
    """(image_id, <column> bigint) rows -> (image_id_a, image_id_b, distance) of every pair within
    `k` bits, each pair once, by a banded join without a cross join.

    Multi-index hashing: cut into k // 2 + 1 bands, two hashes within k bits agree on some band
    within k // (k // 2 + 1) <= 1 bit (pigeonhole). Each band is one task holding every hash
    (`BandPairs`). Fewer, wider bands than k + 1 exact bands make runs of candidates a few hashes
    long: at k = 8 and 100,000 random hashes, 4.6x fewer candidate pairs (docs/benchmarks.md).
    """
    layout = bands(k // 2 + 1)
    every_band = F.explode(F.sequence(F.lit(0), F.lit(len(layout) - 1))).alias("band")
    keyed = hashes.where(F.col(column).isNotNull()).select("image_id", F.col(column).alias("h"), every_band)
    # One partition per band (range bounds on distinct values): a hash partitioner could put two
    # bands on one task and leave another idle.
    return keyed.repartitionByRange(len(layout), "band").mapInArrow(BandPairs(k, layout), _HAMMING_ROWS)


def exact_pairs(hashes: DataFrame) -> DataFrame:
    """(image_id, pixel_digest) rows -> (image_id_a, image_id_b) of images with identical pixels."""
    keyed = hashes.where(F.col("pixel_digest").isNotNull()).select("image_id", "pixel_digest")
    a, b = keyed.alias("a"), keyed.alias("b")
    return a.join(b, (F.col("a.pixel_digest") == F.col("b.pixel_digest"))
                  & (F.col("a.image_id") < F.col("b.image_id"))).select(
        F.col("a.image_id").alias("image_id_a"), F.col("b.image_id").alias("image_id_b"))


def normalised_matrix(vectors: DataFrame) -> tuple[list[str], np.ndarray]:
    """(image_id, vector array<float>) rows -> (ids sorted, L2-normalised float32 [n, d]), via Arrow."""
    table = to_arrow(vectors.select("image_id", "vector").orderBy("image_id"))
    ids = table.column("image_id").to_pylist()
    if not ids:
        return [], np.zeros((0, 0), np.float32)
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = np.asarray(flat, np.float32).reshape(len(ids), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return ids, matrix / np.where(norms == 0, 1.0, norms)


@dataclass(frozen=True)
class CosineBlocks:
    """The `mapInArrow` function: (image_id, row) batches -> pairs with similarity >= threshold.

    Row r of the matrix is compared with rows r+1.. only, so each pair comes out once, in image_id
    order (the matrix is sorted by image_id). The matrix travels inside the function: Spark Connect
    has no broadcast variables, and classic PySpark broadcasts a function over 1 MB by itself.
    """

    ids: list[str]
    matrix: np.ndarray
    threshold: float
    #: Similarities held at once per task (block rows x all images): 128 MB of float32.
    block_cells: int = 1 << 25

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ids, matrix = self.ids, self.matrix
        names = np.asarray(ids, object)
        step = max(1, min(1024, self.block_cells // max(1, len(ids))))
        for batch in batches:
            rows = np.asarray(batch.column(0).to_numpy(), np.int64)
            for start in range(0, len(rows), step):
                block = rows[start:start + step]
                sims = matrix[block] @ matrix.T
                hit_i, hit_j = np.nonzero(sims >= self.threshold)
                keep = hit_j > block[hit_i]
                hit_i, hit_j = hit_i[keep], hit_j[keep]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(names[block[hit_i]], pa.string()), pa.array(names[hit_j], pa.string()),
                     pa.array(sims[hit_i, hit_j].astype(np.float64))],
                    names=_SIMILAR_ROWS.fieldNames(),
                )


def cosine_pairs(spark: SparkSession, vectors: DataFrame, threshold: float) -> DataFrame:
    """(image_id, vector) rows -> (image_id_a, image_id_b, similarity) of every pair whose cosine
    similarity is >= threshold: an exact search, the normalised vectors shipped once per task."""
    ids, matrix = normalised_matrix(vectors)
    if len(ids) < 2:
        return spark.createDataFrame([], _SIMILAR_ROWS)
    rows = spark.range(len(ids)).select(F.col("id").alias("row"))
    return deal(rows).mapInArrow(CosineBlocks(ids, matrix, threshold), _SIMILAR_ROWS)


def components(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Connected components of an edge list: image_id -> smallest image_id of its component."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            # The smaller id becomes the root, so a component's root is its smallest image_id.
            parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


# ------------------------------------------------------------------------------- table access


def ensure_tables(spark: SparkSession, config: Config) -> None:
    lakehouse.ensure_table(spark, config, HASHES_TABLE, HASHES_SCHEMA)
    lakehouse.ensure_table(spark, config, PAIRS_TABLE, PAIRS_SCHEMA)
    lakehouse.ensure_table(spark, config, CLUSTERS_TABLE, CLUSTERS_SCHEMA)


def update_hashes(spark: SparkSession, config: Config) -> tuple[int, int]:
    """Hash every image of `images` without an `image_hashes` row; returns (new rows, unreadable).

    The hashes are staged to Parquet first, so a retried MERGE never decodes the images again."""
    images = lakehouse.read_table(spark, config, "images").select("image_id", "content")
    done = lakehouse.read_table(spark, config, HASHES_TABLE).select("image_id")
    with lakehouse.pending_rows(images, [done]) as pending:
        if not pending.count:
            return 0, 0
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
    started = time.monotonic()
    ensure_tables(spark, config)
    versions = stage_state.table_versions(spark, config, WATCHED)
    found = stage_state.unchanged(config, "duplicates", config.fingerprint("duplicates"), versions)
    summary = DuplicatesSummary(**found) if found else search(spark, config)
    summary.elapsed_s = time.monotonic() - started
    return summary


def search(spark: SparkSession, config: Config) -> DuplicatesSummary:
    settings = config.duplicates
    summary = DuplicatesSummary()
    summary.hashed, summary.unreadable = update_hashes(spark, config)
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


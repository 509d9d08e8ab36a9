"""How the duplicates stage finds pairs, each (`image_id_a` < `image_id_b`) with a `distance`, in three tiers:

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

Clusters are the connected components of all pairs: union-find on the driver, because the edge
list holds only near-duplicates (a few per image at most, bytes per edge), whereas label
propagation in Spark costs one shuffle job per step of the longest chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.tables import schema
from imageiq_spark.lake.session import deal, to_arrow
from imageiq_spark.vision import phash

_SIMILAR_ROWS = schema("image_id_a STRING NOT NULL, image_id_b STRING NOT NULL, similarity DOUBLE NOT NULL")


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

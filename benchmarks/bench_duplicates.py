"""Near-duplicate search: the banded Hamming join and the blocked cosine search against brute force.

Hashes: 64-bit values, 90% random and 10% planted twins (a random hash with 0..2k bits flipped),
so both the join's bucket sizes and the pair count are known. Real photo hashes are less uniform
than random bits (fuller band buckets), so the join's candidates here are a lower bound. Brute
force is numpy on one core (XOR of each hash with every later one, bits counted by
`phash.popcount`, the same 16-bit table lookups the join's buckets use), the best bare comparison
of all pairs; the join is `duplicates.tiers.hamming_pairs` on local[2].
Embeddings: 128-dim float32 vectors with planted twins (small noise); exact blocked search
(`duplicates.tiers.cosine_pairs`) against all-pairs numpy matrix products on one core and Spark's
BucketedRandomProjectionLSH (approxSimilarityJoin) on the same vectors.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bench_config, table
from imageiq_spark.lake.session import get_spark
from imageiq_spark.stages.duplicates import tiers
from imageiq_spark.vision import phash

HASHES = 100_000
EMBEDDINGS = 20_000
DIM = 128
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
KS = (4, 8)  # 8 is the default duplicates.max_distance
SAMPLED_ROWS = 2_000
MIN_SIMILARITY = 0.97


def planted_hashes(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    twins = rng.choice(n, n // 10, replace=False)
    sources = rng.integers(0, n, len(twins))
    for twin, source in zip(twins, sources):
        flips = rng.choice(64, int(rng.integers(0, 2 * k + 1)), replace=False)
        mask = sum(1 << int(bit) for bit in flips)
        hashes[twin] = hashes[source] ^ np.int64(mask - (1 << 64) if mask >= 1 << 63 else mask)
    return hashes


def brute_force_hamming(hashes: np.ndarray, k: int, blocks: int | None = None,
                        block: int = 64) -> tuple[int, int]:
    """(pairs within k bits, pairs compared): each row against every later hash, numpy, one core,
    64 rows at a time. With `blocks`, only that many evenly spread blocks of rows are compared:
    the cost is proportional to the pairs compared, so the full time is scaled from it."""
    values = hashes.view(np.uint64)
    n = len(values)
    starts = np.arange(0, n - 1, block)
    if blocks is not None and blocks < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, blocks).astype(np.int64)]
    found = compared = 0
    for start in starts:
        rows, later = values[start:start + block], values[start + 1:]
        near = phash.popcount(rows[:, None] ^ later[None, :]) <= k
        near &= np.arange(start + 1, n)[None, :] > np.arange(start, start + len(rows))[:, None]
        found += int(np.count_nonzero(near))
        compared += len(rows) * len(later)
    return found, compared


def planted_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = np.abs(rng.normal(size=(n, DIM))).astype(np.float32)  # ReLU features are >= 0
    twins = rng.choice(n, n // 10, replace=False)
    vectors[twins] = vectors[rng.integers(0, n, len(twins))] + rng.normal(0, 0.05, (len(twins), DIM))
    return vectors


def brute_force_cosine(vectors: np.ndarray, threshold: float, block: int = 2048) -> int:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = 0
    for start in range(0, len(unit), block):
        sims = unit[start:start + block] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        found += int(np.count_nonzero(cols > rows + start))
    return found


def seconds(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def run(workdir: Path, scale: float = 1.0) -> str:
    import threadpoolctl
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.functions import array_to_vector

    shutil.rmtree(workdir, ignore_errors=True)
    spark = get_spark(bench_config(workdir / "lake"), app_name="bench-duplicates")
    hash_rows, vector_rows = [], []
    all_hashes = planted_hashes(int(HASHES * scale), max(KS))
    for fraction in FRACTIONS:
        n = int(len(all_hashes) * fraction)
        hashes = all_hashes[:n]
        df = spark.createDataFrame([(f"{i:07d}", int(h)) for i, h in enumerate(hashes)],
                                   "image_id string, phash bigint").cache()
        df.count()
        brute_s, (_, compared) = seconds(
            lambda: brute_force_hamming(hashes, max(KS), SAMPLED_ROWS // 64))  # noqa: B023
        brute_s *= (n * (n - 1) / 2) / compared
        for k in KS:
            join_s, joined = seconds(lambda: tiers.hamming_pairs(df, k).count())  # noqa: B023
            if fraction == FRACTIONS[0] and joined != brute_force_hamming(hashes, k)[0]:
                raise AssertionError(f"banded join found {joined} pairs at k={k}, brute force another count")
            hash_rows.append([k, f"{n:,}", joined, join_s, brute_s, brute_s / join_s])
        df.unpersist()

    all_vectors = planted_vectors(int(EMBEDDINGS * scale))
    radius = float(np.sqrt(2 - 2 * MIN_SIMILARITY))  # Euclidean distance of unit vectors at that cosine
    for fraction in FRACTIONS:
        n = int(len(all_vectors) * fraction)
        vectors = all_vectors[:n]
        df = spark.createDataFrame([(f"{i:07d}", v.tolist()) for i, v in enumerate(vectors)],
                                   "image_id string, vector array<float>").cache()
        df.count()
        exact_s, exact = seconds(lambda: tiers.cosine_pairs(spark, df, MIN_SIMILARITY).count())  # noqa: B023
        with threadpoolctl.threadpool_limits(1):
            brute_s, brute = seconds(lambda: brute_force_cosine(vectors, MIN_SIMILARITY))  # noqa: B023
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = spark.createDataFrame([(f"{i:07d}", v.tolist()) for i, v in enumerate(vectors / norms)],
                                     "image_id string, vector array<float>").select(
            "image_id", array_to_vector("vector").alias("features")).cache()
        lsh = BucketedRandomProjectionLSH(inputCol="features", outputCol="buckets", bucketLength=radius * 4,
                                          numHashTables=3, seed=1).fit(unit)
        lsh_s, lsh_pairs = seconds(lambda: lsh.approxSimilarityJoin(  # noqa: B023
            unit, unit, radius, "d").where("datasetA.image_id < datasetB.image_id").count())  # noqa: B023
        vector_rows.append([f"{n:,}", exact, exact_s, brute_s, lsh_s, f"{lsh_pairs / max(exact, 1):.0%}"])
        df.unpersist()
        unit.unpersist()
    spark.stop()

    return f"""## Near-duplicates (`imageiq duplicates`)

{__doc__.split(chr(10), 1)[1].strip()}

Perceptual-hash tier, k = 4 (3 bands of 21-22 bits) and k = 8 (the default `duplicates.max_distance`:
5 bands of 12-13 bits); twins agree on some band within one bit (multi-index hashing). Brute force
timed on {SAMPLED_ROWS:,} evenly spread rows against every later hash and scaled to all pairs (its cost is
exactly proportional to the pairs compared); at the smallest size the join's pairs are checked
against the full brute-force count.

{table(["k", "hashes", "pairs", "banded join s", "brute force s (numpy, 1 core)", "join speed-up"],
       hash_rows)}

Embedding tier, cosine >= {MIN_SIMILARITY}:

{table(["vectors", "pairs", "blocked exact s (Spark)", "brute force s (numpy, 1 core)", "BRP LSH s",
        "LSH recall"], vector_rows)}
"""

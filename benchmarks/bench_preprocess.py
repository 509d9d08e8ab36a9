"""Preprocess throughput against a plain two-process OpenCV loop over the same bytes on the same cores.

Three image sets: the 28x28 sample digits (to 32x32), generated 500x375 JPEGs and generated
4000x3000 camera-like JPEGs (both to 224x224). For each: the baseline (multiprocessing Pool(2):
full decode + INTER_AREA resize + BGR->RGB), the preprocessing UDF alone over the Delta `images`
table (Spark job, rows discarded), and the whole `preprocess` stage (UDF, MERGE into `prepared`,
label vocabulary, train-split statistics, sample grid) into a fresh database each repeat.
"""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from pyspark.sql import SparkSession

from benchmarks.common import bench_config, cpu_used, median, table, timed
from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core.config import Config
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.session import get_spark, session_conf
from imageiq_spark.stages import ingest, preprocess
from imageiq_spark.vision import decode, resize, transform
from imageiq_spark.vision.decode import jpeg_size, reduction_factor
from imageiq_spark.vision.spec import TransformSpec

REPEATS = 3
SETS = (  # name, count, stored (height, width), target size
    ("28x28 PNG digits -> 32x32", 5000, (28, 28), (32, 32)),
    ("500x375 JPEG -> 224x224", 4000, (375, 500), (224, 224)),
    ("4000x3000 JPEG -> 224x224", 480, (3000, 4000), (224, 224)),
)
#: Images prepared before the timed stage run (one per label), so that it runs as an
#: incremental run into existing tables.
SEED = 10
#: Distinct photos generated per set; the rest are byte-unique copies (see `image_set`).
PHOTOS = 40


def photo(height: int, width: int, seed: int) -> bytes:
    """A camera-like JPEG: gradients, filled shapes and sensor-like texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(x / width * 3 * np.pi + seed), 60 + 150 * y / height,
                      200 - 150 * x / width], axis=-1).clip(0, 255).astype(np.uint8)
    for _ in range(10):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(min(height, width) // 20, min(height, width) // 5))
        cv2.circle(image, centre, radius, tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    noise = cv2.GaussianBlur(rng.normal(0, 10, (height, width)).astype(np.float32), (0, 0), 1.2)
    image = cv2.add(image, noise[:, :, None].astype(np.int16).repeat(3, axis=2), dtype=cv2.CV_8U)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OSError("could not encode a JPEG")
    return data.tobytes()


def image_set(count: int, stored: tuple[int, int]) -> list[bytes]:
    if stored == (28, 28):
        digits, _ = load_digits()
        return [cv2.imencode(".png", d)[1].tobytes() for d in digits[:count]]
    photos = [photo(*stored, seed=i) for i in range(min(count, PHOTOS))]
    # A JPEG comment segment right after SOI makes each copy's bytes (and image_id) unique while
    # its pixels, and so the decode work, stay those of a real photo.
    return [
        data if i < len(photos) else data[:2] + b"\xff\xfe\x00\x0a" + f"{i:08d}".encode() + data[2:]
        for i, data in ((i, photos[i % len(photos)]) for i in range(count))
    ]


_TARGET: tuple[int, int] = (0, 0)


def _init(target: tuple[int, int]) -> None:
    global _TARGET
    _TARGET = target
    cv2.setNumThreads(1)


def _plain(data: bytes) -> int:
    """The baseline per image: full decode, INTER_AREA resize, BGR -> RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = _TARGET
    interpolation = cv2.INTER_AREA if image.shape[0] >= h and image.shape[1] >= w else cv2.INTER_LINEAR
    out = cv2.cvtColor(cv2.resize(image, (w, h), interpolation=interpolation), cv2.COLOR_BGR2RGB)
    return out.nbytes


def _ours(data: bytes) -> int:
    """The second baseline per image: our own transform (`prepare_image`: the same reduced decode
    and resize as the UDF), in a plain process without Spark."""
    return transform.prepare_image(data, TransformSpec(size=_TARGET)).nbytes


def per_image_costs(contents: list[bytes], target: tuple[int, int]) -> list[float]:
    """Milliseconds per image on one core, median of REPEATS passes over up to 200 images: the
    plain loop's decode and exact INTER_AREA resize, and the transform's decode (DCT-reduced
    where it applies) and resize."""
    _init(target)
    sample = [np.frombuffer(data, np.uint8) for data in contents[:200]]
    spec = TransformSpec(size=target)
    full = [cv2.imdecode(data, cv2.IMREAD_COLOR) for data in sample]
    ours = [decode.decode(data, spec) for data in sample]
    steps = (
        lambda: [cv2.imdecode(data, cv2.IMREAD_COLOR) for data in sample],
        lambda: [cv2.resize(image, target[::-1], interpolation=cv2.INTER_AREA) for image in full],
        lambda: [decode.decode(data, spec) for data in sample],
        lambda: [resize.resize(image, spec) for image in ours],
    )
    return [1000 * median(timed(step, repeats=REPEATS)) / len(sample) for step in steps]


def preprocess_factor(data: bytes, spec: TransformSpec) -> int:
    size = jpeg_size(data)
    return reduction_factor(size, spec) if size else 1


def load_images(spark: SparkSession, config: Config, contents: list[bytes], first: int = 0) -> None:
    """Append images (ids from their bytes) to the config's `images` table, in chunks of ~64 MB."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ingest.ensure_tables(spark, config)
    chunk = max(1, (64 << 20) // max(1, max(map(len, contents))))
    for start in range(0, len(contents), chunk):
        rows = [(hashlib.sha256(d).hexdigest(), f"file:/bench/{i}.img", str(i % 10), "jpeg", 0, 0, 3, 8, 1,
                 len(d), None, d, now)
                for i, d in enumerate(contents[start:start + chunk], start=first + start)]
        frame = spark.createDataFrame(rows, ingest.IMAGES_SCHEMA)
        # Row groups as ingest writes them.
        with session_conf(spark, lakehouse.ROW_GROUP_SETTINGS):
            frame.write.format("delta").mode("append").save(lakehouse.table_location(config, "images"))


def udf_only(spark: SparkSession, config: Config) -> None:
    """The transform inside Spark: Delta scan -> UDF -> rows discarded (no table writes)."""
    spec = TransformSpec.from_config(config)
    images = lakehouse.read_table(spark, config, "images")
    with session_conf(spark, preprocess.transform_settings(config)):
        preprocess.transform_images(images, spec, config).write.format("noop").mode("overwrite").save()


def measure(spark: SparkSession, workdir: Path, count: int, stored: tuple[int, int],
            target: tuple[int, int]) -> list[object]:
    """One image set: baseline, UDF alone and whole stage, each timed REPEATS times."""
    contents = image_set(count, stored)

    def config_for() -> Config:
        return bench_config(workdir / "lake", catalog={"database": f"bench_{uuid.uuid4().hex[:8]}"},
                            preprocess={"size": list(target)})

    def seeded(images: list[bytes]) -> Config:
        """A lakehouse after an earlier run: tables, vocabulary and version exist, SEED images
        are prepared, and the rest of `images` is new (what a nightly run finds)."""
        config = config_for()
        load_images(spark, config, images[:SEED])
        preprocess.run(spark, config)
        load_images(spark, config, images[SEED:], first=SEED)
        return config

    stages: list[Config] = []
    source = config_for()
    load_images(spark, source, contents)
    with multiprocessing.get_context("spawn").Pool(2, initializer=_init, initargs=(target,)) as pool:
        pool.map(_plain, contents[:4])  # workers started and warm before timing
        plain_cpu: list[dict[str, float]] = []
        baseline = timed(cpu_used(lambda: pool.map(_plain, contents, chunksize=8), plain_cpu),
                         repeats=REPEATS)
        pool.map(_ours, contents[:4])
        ours = timed(lambda: pool.map(_ours, contents, chunksize=8), repeats=REPEATS)
    udf_only(spark, source)  # warm-up: Python workers, Delta classes
    udf_cpu: list[dict[str, float]] = []
    udf = timed(cpu_used(lambda: udf_only(spark, source), udf_cpu), repeats=REPEATS)
    # The same job over a one-image table: what any such Spark job costs regardless of size.
    single = config_for()
    load_images(spark, single, contents[:1])
    floor = timed(lambda: udf_only(spark, single), repeats=REPEATS)

    stage = timed(lambda: preprocess.run(spark, stages[-1]), repeats=REPEATS,
                  setup=lambda: stages.append(seeded(contents)))
    rerun = timed(lambda: preprocess.run(spark, stages[-1]), repeats=1)
    stage_floor = timed(lambda: preprocess.run(spark, stages[-1]), repeats=REPEATS,
                        setup=lambda: stages.append(seeded(contents[: SEED + 1])))
    factor = preprocess_factor(contents[0], TransformSpec.from_config(source))
    b, u, o = count / median(baseline), count / median(udf), count / median(ours)
    s = (count - SEED) / median(stage)
    # Per-image rates once a job's fixed cost is paid: what a large set converges to.
    udf_marginal = (count - 1) / max(median(udf) - median(floor), 1e-3)
    stage_marginal = (count - SEED - 1) / max(median(stage) - median(stage_floor), 1e-3)
    cpu_ms = [1000 * median([c[kind] for c in used]) / count
              for used, kind in ((plain_cpu, "python"), (udf_cpu, "python"), (udf_cpu, "jvm"))]
    return [count, f"{sum(map(len, contents)) / 1e6:.1f}", f"1/{factor}", b, u, u / b,
            udf_marginal / b, s, s / b, stage_marginal / b, o, s / o, median(floor), median(stage_floor),
            rerun[0], *cpu_ms, *per_image_costs(contents, target)]


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    spark = get_spark(bench_config(workdir / "lake"), app_name="bench-preprocess")
    rows = []
    for name, count, stored, target in SETS:
        rows.append([name, *measure(spark, workdir, count, stored, target)])
    header = ["images", "n", "MB", "decode", "plain loop img/s", "UDF img/s", "UDF ratio",
              "UDF marginal ratio", "stage img/s", "stage ratio", "stage marginal ratio",
              "our-transform loop img/s", "stage ratio to our-transform loop",
              "UDF floor s", "stage floor s", "rerun s", "plain CPU ms/img", "UDF Python CPU ms/img",
              "UDF JVM CPU ms/img", "loop decode ms", "loop INTER_AREA ms", "transform decode ms",
              "transform resize ms"]
    load = os.getloadavg()[0]
    return f"""## Preprocess

`local[2]`, same bytes, same 2 cores, median of {REPEATS} runs; 1-minute load average at the end:
{load:.1f} on 2 cores. *Plain loop*: multiprocessing `Pool(2)` over the bytes in memory, full
`cv2.imdecode` + `INTER_AREA` resize + BGR->RGB (the bare baseline). *Our-transform loop*: the
same `Pool(2)` running our own `transform.prepare_image` (the UDF's reduced decode and resize),
so that "stage ratio to our-transform loop" is what Spark, Arrow and Delta cost apart from the
algorithm's gain. *UDF*: the stage's Arrow UDF
(`preprocess.transform_images`) over the Delta `images` table, rows discarded (`noop` sink).
*Stage*: the whole `preprocess.run` as a nightly run finds it: tables, vocabulary and
{SEED} images prepared by an earlier run, the other n - {SEED} new (one pass: UDF straight into
an idempotent Delta append of uncompressed tensors, quarantine, run statistics, sample grid,
summary counts). *Decode*: the DCT-domain reduction the transform chose. *Floors*: the same UDF
job over a one-image table, and a stage run that finds one new image: what a run costs
whatever its size. *Marginal*: per-image throughput once that floor is paid ((n - 1) / (time -
floor)), what a large set converges to. Ratios are throughput over the plain loop's. *CPU
ms/img*: CPU time of the Python processes and of the Spark JVM per image during the timed runs
(the plain loop has no JVM). *Per-image ms* (last four columns): one core, no Spark, the plain
loop's full decode and exact `INTER_AREA` resize against the transform's decode and resize.

{table(header, rows)}

Where the time goes (targets for the stage, the UDF: >= 0.8x and 0.9x at 500x375, >= 2.5x and 3x at
4000x3000):
- Resizing, not decoding, is most of the plain loop's cost at 500x375: OpenCV's exact
  `INTER_AREA` runs scalar code at non-integer ratios (compare the two loop columns). The transform
  shrinks by 2x2 means (OpenCV's SIMD path) over a bilinear supersample at twice the target, within
  a grey level of `INTER_AREA` (`tests/vision/test_transform.py`), for a fraction of its cost. That saving
  is what pays for Spark's share of the same two cores.
- 4000x3000 camera JPEGs: the full-size decode is nearly all of the plain loop's cost; the
  transform decodes at 1/4 scale in the DCT domain (within 2 grey levels mean of the full decode
  with exact area averaging, `tests/vision/test_transform.py`).
- Both cores are busy in every column, so throughput is CPU per image: the UDF's Python CPU is
  the transform plus Arrow transport; the JVM's is the Parquet scan of the bytes and Arrow in and
  out of the Python workers. The scan is split into tasks of 32 MB (row groups of 8 MB), so no
  image bytes are shuffled and no core idles at the end.
- The stage adds the Parquet write of the tensors (150 KB each at 224x224x3) into `prepared`:
  on 2 cores every JVM millisecond is taken from OpenCV; on a cluster executor it is not.
- 28x28 digits: a decode + resize is ~20 us, so per-row and per-job costs dominate everything.
- The floors are fixed per run (Delta snapshots, the pending-id anti-join, the commit of the
  append, the statistics row, the grid PNG, the summary counts), not per image.
- A rerun prepares nothing: it costs the anti-join of image ids against `prepared`.
"""

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

from benchmarks.common import bench_config, median, table, timed
from imageiq_spark import ingest, lakehouse, preprocess
from imageiq_spark.config import Config
from imageiq_spark.sample_data import load_digits
from imageiq_spark.session import get_spark
from imageiq_spark.transform import TransformSpec, jpeg_size, reduction_factor

REPEATS = 3
SETS = (  # name, count, stored (height, width), target size
    ("28x28 PNG digits -> 32x32", 5000, (28, 28), (32, 32)),
    ("500x375 JPEG -> 224x224", 2000, (375, 500), (224, 224)),
    ("4000x3000 JPEG -> 224x224", 240, (3000, 4000), (224, 224)),
)
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


def preprocess_factor(data: bytes, spec: TransformSpec) -> int:
    size = jpeg_size(data)
    return reduction_factor(size, spec) if size else 1


def load_images(spark: SparkSession, config: Config, contents: list[bytes]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [(hashlib.sha256(d).hexdigest(), f"file:/bench/{i}.img", str(i % 10), "jpeg", 0, 0, 3, 8, 1,
             len(d), None, d, now) for i, d in enumerate(contents)]
    ingest.ensure_tables(spark, config)
    frame = spark.createDataFrame(rows, ingest.IMAGES_SCHEMA).repartition(4)
    lakehouse.merge_new_rows(config, "images", frame, ["image_id"])


def udf_only(spark: SparkSession, config: Config) -> None:
    """The transform inside Spark: Delta scan -> UDF -> rows discarded (no table writes)."""
    spec = TransformSpec.from_config(config)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.preprocess.batch_rows))
    images = lakehouse.read_table(spark, config, "images")
    preprocess.transform_images(images, spec, config).write.format("noop").mode("overwrite").save()


def measure(spark: SparkSession, workdir: Path, count: int, stored: tuple[int, int],
            target: tuple[int, int]) -> list[object]:
    """One image set: baseline, UDF alone and whole stage, each timed REPEATS times."""
    contents = image_set(count, stored)

    def config_for() -> Config:
        return bench_config(workdir / "lake", catalog={"database": f"bench_{uuid.uuid4().hex[:8]}"},
                            preprocess={"size": list(target)})

    source = config_for()
    load_images(spark, source, contents)
    with multiprocessing.get_context("spawn").Pool(2, initializer=_init, initargs=(target,)) as pool:
        pool.map(_plain, contents[:4])  # workers started and warm before timing
        baseline = timed(lambda: pool.map(_plain, contents, chunksize=8), repeats=REPEATS)
    udf_only(spark, source)  # warm-up: Python workers, Delta classes
    udf = timed(lambda: udf_only(spark, source), repeats=REPEATS)
    # The same job over a one-image table: what any such Spark job costs regardless of size.
    single = config_for()
    load_images(spark, single, contents[:1])
    floor = timed(lambda: udf_only(spark, single), repeats=REPEATS)

    stage_configs: list[Config] = []

    def fresh_database() -> None:
        stage_configs.append(config_for())
        load_images(spark, stage_configs[-1], contents)

    stage = timed(lambda: preprocess.run(spark, stage_configs[-1]), repeats=REPEATS, setup=fresh_database)
    rerun = timed(lambda: preprocess.run(spark, stage_configs[-1]), repeats=1)
    factor = preprocess_factor(contents[0], TransformSpec.from_config(source))
    b, u, s = count / median(baseline), count / median(udf), count / median(stage)
    # Per-image rate once the job's fixed cost is paid: what a large set converges to.
    marginal = (count - 1) / max(median(udf) - median(floor), 1e-3)
    row = [count, f"{sum(map(len, contents)) / 1e6:.1f}", f"1/{factor}", b, u, u / b, s, s / b,
           median(floor), marginal, marginal / b, rerun[0]]
    return row


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    spark = get_spark(bench_config(workdir / "lake"), app_name="bench-preprocess")
    rows = []
    for name, count, stored, target in SETS:
        rows.append([name, *measure(spark, workdir, count, stored, target)])
    header = ["images", "n", "MB", "decode", "plain loop img/s", "UDF img/s", "UDF ratio",
              "stage img/s", "stage ratio", "job floor s", "UDF marginal img/s", "marginal ratio",
              "rerun s"]
    load = os.getloadavg()[0]
    return f"""## Preprocess

`local[2]`, same bytes, same 2 cores, median of {REPEATS} runs; 1-minute load average at the end:
{load:.1f} on 2 cores (other sessions ran beside it). *Plain loop*: multiprocessing `Pool(2)` over
the bytes in memory, full `cv2.imdecode` + `INTER_AREA` resize + BGR->RGB (the bare baseline).
*UDF*: `prepare_image` in the stage's pandas iterator UDF over the Delta `images` table, rows
discarded (`noop` sink). *Stage*: the whole `preprocess.run` into a fresh database (UDF, MERGE into
`prepared`, label vocabulary, train-split channel statistics, sample-grid PNG). *Decode*: the
DCT-domain reduction the transform chose. *Job floor*: the same UDF job over a one-image table.
*UDF marginal*: (n - 1) / (UDF time - job floor), the per-image rate once the job's fixed cost is
paid. Ratios are throughput over the plain loop's.

{table(header, rows)}

Where the time goes (read the figures above; the targets are >= 0.9x for 500x375 and >= 3x for
4000x3000):
- Every Spark job here pays a fixed cost (the job floor: Delta log and Parquet scan planning,
  the round-robin shuffle that spreads one table file over both cores, Python worker round
  trips) that the in-memory loop never pays. With sets this small it is most of the UDF's time,
  so the end-to-end ratios understate the per-image rate; the marginal columns separate the two.
- 4000x3000 camera JPEGs: the full-size decode is nearly all of the plain loop's cost; the
  transform decodes at 1/4 scale in the DCT domain (within 2 grey levels mean of the full decode,
  `tests/test_transform.py`), so its marginal rate is where a reduction shows.
- 500x375 JPEGs: no reduction applies (1/2 would leave less than twice 224 px), so the UDF does
  the same decode and resize as the loop plus Arrow <-> pandas conversion and the tensor bytes out.
- 28x28 digits: a decode + resize is ~20 us, so per-row and per-job costs dominate everything.
- The stage adds to the UDF: two MERGE commits (vocabulary, `prepared`), the train-split
  statistics job and its MERGE, the grid job and the summary counts: fixed per run, not per image.
- A rerun prepares nothing: it costs the anti-join of `images` against `prepared` and the summary.
"""

"""The preprocess UDF: `images` rows -> tensors or failure reasons, one pass, nothing read twice.

Each image's bytes go through `transform.prepare_batch` (the one transform shared with training,
scoring and the exported model) inside an Arrow iterator UDF (`mapInArrow`: bytes read from the
Arrow buffers, tensors written as one buffer per batch; the pandas flavour of the same UDF cost
10% more CPU per image). Each task leaves a `RunReport` of the failures, the train split's channel
sums and a random sample for the grid as a file of its own (`ReportFiles`): data, not an
accumulator, so it works the same on a classic and a Spark Connect session.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from pyarrow import fs
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config
from imageiq_spark.core.registry import RESIZE_POLICIES
from imageiq_spark.core.tables import schema
from imageiq_spark.core.tensors import binary_from_tensors, binary_views, tensors_from_binary
from imageiq_spark.lake import storage
from imageiq_spark.lake.session import spread
from imageiq_spark.vision.resize import ResizePolicy
from imageiq_spark.vision.spec import TransformSpec
from imageiq_spark.vision.transform import prepare_batch

#: What the UDF returns per image: the tensor, or why there is none.
OUTCOME_SCHEMA = schema(
    "image_id STRING NOT NULL, path STRING, label STRING, size_bytes BIGINT, "
    "modified_at TIMESTAMP, split STRING, tensor BINARY, reason STRING, detail STRING"
)
SUMS_SCHEMA = schema(
    "prepared_at TIMESTAMP NOT NULL, channel INT NOT NULL, images BIGINT NOT NULL, "
    "total BIGINT NOT NULL, total_sq BIGINT NOT NULL"
)
GRID_IMAGES = 16
#: Columns that travel through the UDF unchanged: `images` columns plus the row's `split`.
PASSED_COLUMNS = ("image_id", "path", "label", "size_bytes", "modified_at", "split")
#: What a failure record holds: enough for its quarantine row.
FAILURE_FIELDS = ("image_id", "path", "size_bytes", "modified_at", "reason", "detail")
Failure = tuple[Any, ...]


@dataclass
class RunReport:
    """What a run's UDF saw, added up over its tasks (`ReportFiles`).

    It lets the stage write `prepared` straight from the UDF and still quarantine the failures,
    store the train split's channel sums and draw the sample grid without reading the tensors
    again.
    """

    failures: list[Failure] = field(default_factory=list)
    train_images: int = 0
    channel_total: list[int] = field(default_factory=list)
    channel_total_sq: list[int] = field(default_factory=list)
    #: Up to GRID_IMAGES (random key, label, tensor bytes): the smallest keys are a uniform sample.
    sample: list[tuple[float, str | None, bytes]] = field(default_factory=list)

    def add(self, other: RunReport) -> RunReport:
        self.failures.extend(other.failures)
        self.train_images += other.train_images
        self.channel_total = _add_lists(self.channel_total, other.channel_total)
        self.channel_total_sq = _add_lists(self.channel_total_sq, other.channel_total_sq)
        self.add_sample(other.sample)
        return self

    def add_sample(self, entries: list[tuple[float, str | None, bytes]]) -> None:
        self.sample = sorted(self.sample + entries, key=lambda entry: entry[0])[:GRID_IMAGES]

    def add_train(self, tensors: np.ndarray) -> None:
        """Add the channel sums of [n, h, w, c] train tensors (exact integers).

        OpenCV sums the batch as one tall image in float64: exact after rounding here (the error
        stays far below 0.5) and ten times faster than numpy's integer reductions over
        interleaved channels.
        """
        import cv2

        n, height, width, channels = tensors.shape
        if n == 0:
            return
        pixels = n * height * width
        mean, std = (v.reshape(-1) for v in cv2.meanStdDev(tensors.reshape(-1, width, channels)))
        totals = np.rint(mean * pixels).astype(np.int64).tolist()
        squares = np.rint((std * std + mean * mean) * pixels).astype(np.int64).tolist()
        self.train_images += n
        self.channel_total = _add_lists(self.channel_total, totals)
        self.channel_total_sq = _add_lists(self.channel_total_sq, squares)


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)] if a and b else list(a or b)


class ReportSink(Protocol):
    """Where each task of the UDF hands its RunReport."""

    def add(self, report: RunReport) -> None: ...


@dataclass(frozen=True)
class ReportFiles:
    """A ReportSink of files: each task writes its RunReport to `<uri>/<partition>.pickle`.

    Spark Connect has no accumulators, so the reports come back as data under storage.root. A
    retried task rewrites its partition's file: each partition counts once. The files are this
    run's own, written and read by this package only.
    """

    uri: str

    def add(self, report: RunReport) -> None:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        storage.write_bytes(f"{self.uri}/{partition:05d}.pickle", pickle.dumps(report))

    def take(self) -> RunReport:
        """The tasks' reports added up; the files are deleted."""
        filesystem, path = storage.filesystem(self.uri)
        total = RunReport()
        if filesystem.get_file_info(path).type == fs.FileType.Directory:
            for info in filesystem.get_file_info(fs.FileSelector(path)):
                if info.base_name.endswith(".pickle"):
                    with filesystem.open_input_file(info.path) as file:
                        total.add(pickle.loads(file.read()))
        storage.delete_dir(self.uri)
        return total


@dataclass(frozen=True)
class PrepareBatches:
    """The `mapInArrow` function: image rows -> OUTCOME_SCHEMA rows, one per image, never raising.

    Image bytes are read as views of the Arrow buffer and each batch's tensors leave as one
    contiguous array wrapped as an Arrow binary column, so no image is copied into a Python
    object on the way in or out (pandas conversion cost 10% more CPU per image on 500x375 JPEGs;
    docs/benchmarks.md). With a `report` sink, each task also hands it its RunReport.

    `policy` is the spec's resize policy as registered on the driver: one registered in a notebook
    or a script reaches the workers with the job (`resize.resize_policy`).
    """

    spec: TransformSpec
    report: ReportSink | None = None
    policy: ResizePolicy | None = None
    fault_inject: str = ""  # `faults.injected("preprocess")`

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import cv2

        # Spark already runs one task per core; OpenCV's own threads would only contend.
        cv2.setNumThreads(1)
        if self.policy is not None:
            RESIZE_POLICIES.setdefault(self.spec.resize, self.policy)
        report = RunReport()
        rng = np.random.default_rng()
        # Arrow binary offsets are int32: a batch's tensors must stay under 2 GiB.
        rows = max(1, (2**31 - 1) // math.prod(self.spec.shape))
        for whole in batches:
            for start in range(0, whole.num_rows, rows):
                batch = whole.slice(start, rows)
                if self.fault_inject:
                    faults.inject_any(batch.column("image_id").to_pylist(), self.fault_inject)
                tensors, failures = prepare_batch(binary_views(batch.column("content")), self.spec)
                passed = batch.select(list(PASSED_COLUMNS))
                ok = np.ones(batch.num_rows, bool)
                ok[[index for index, _ in failures]] = False
                good = passed.filter(pa.array(ok)) if failures else passed
                if self.report is not None:
                    _report_batch(report, good, tensors, rng)
                if len(tensors):
                    yield _outcome(good, binary_from_tensors(tensors))
                if failures:
                    failed = _outcome(
                        passed.filter(pa.array(~ok)),
                        pa.nulls(len(failures), pa.binary()),
                        pa.array([error.reason for _, error in failures], pa.string()),
                        pa.array([error.detail for _, error in failures], pa.string()),
                    )
                    report.failures += [tuple(r[k] for k in FAILURE_FIELDS) for r in failed.to_pylist()]
                    yield failed
        if self.report is not None:
            self.report.add(report)


def _report_batch(report: RunReport, good: pa.RecordBatch, tensors: np.ndarray,
                  rng: np.random.Generator) -> None:
    train = np.asarray(good.column("split").to_numpy(zero_copy_only=False) == "train", bool)
    report.add_train(tensors if train.all() else tensors[train])
    keys = rng.random(len(tensors))
    labels = good.column("label").to_pylist()
    report.add_sample([(float(keys[i]), labels[i], tensors[i].tobytes())
                       for i in np.argsort(keys)[:GRID_IMAGES]])


def _outcome(passed: pa.RecordBatch, tensor: pa.Array, reason: pa.Array | None = None,
             detail: pa.Array | None = None) -> pa.RecordBatch:
    n = passed.num_rows
    return pa.RecordBatch.from_arrays(
        [*passed.columns, tensor,
         reason if reason is not None else pa.nulls(n, pa.string()),
         detail if detail is not None else pa.nulls(n, pa.string())],
        names=[*PASSED_COLUMNS, "tensor", "reason", "detail"],
    )


def split_column(image_id: Column, train: float, val: float) -> Column:
    """'train' | 'val' | 'test' from a hash of the image id: the same id always gets the same split."""
    digest = F.sha2(F.concat(F.lit("imageiq-split:"), image_id), 256)
    u = F.conv(F.substring(digest, 1, 8), 16, 10).cast("double") / float(1 << 32)
    return F.when(u < train, "train").when(u < train + val, "val").otherwise("test")


def transform_settings(config: Config) -> dict[str, str]:
    """Session settings for a job that runs `transform_images`, while it runs."""
    return {
        # Rows per Arrow batch bound a Python worker's memory: batch_rows images in, tensors out.
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(config.preprocess.batch_rows),
        # Scan tasks of at most 32 MB of image bytes (four row groups, lakehouse.ROW_GROUP_SETTINGS),
        # so no core idles at the end: at Spark's own split size a 3-file table of 500x375 JPEGs
        # ran as 3 tasks on 2 cores, and 626 MB of camera photos as 5. Smaller tasks cost more
        # Python CPU per image (16 MB: +20% on 500x375 JPEGs).
        "spark.sql.files.maxPartitionBytes": str(32 << 20),
    }


def transform_images(images: DataFrame, spec: TransformSpec, config: Config,
                     report: ReportSink | None = None,
                     splits: DataFrame | None = None) -> DataFrame:
    """`images` rows -> OUTCOME_SCHEMA rows (tensor or failure reason), spread over the cores.

    Each row's split comes from `splits` (image_id, split: the stored ones, `splits.assign`), or
    without it from the hash of its image_id at the configured fractions."""
    fractions = config.preprocess.split
    # Run under `transform_settings`, the scan of `images` (small row groups) already splits into
    # many small tasks; dealing the image bytes round-robin would shuffle all of them (0.4 ms of
    # JVM CPU per 500x375 JPEG), so only a table too small to split is spread. Spread before the
    # splits join: the partitions of the join's plan are known only once its broadcast has run
    # (5-8 Spark jobs more for a preprocess run).
    rows = spread(images.select(*PASSED_COLUMNS[:-1], "content"))
    if splits is None:
        rows = rows.withColumn("split", split_column(F.col("image_id"), fractions.train, fractions.val))
    else:
        # Ids and splits only (about 80 bytes an image): a shuffle join would move the image bytes;
        # a broadcast join keeps the partitions of the images.
        rows = rows.join(F.broadcast(splits), "image_id")
    prepare = PrepareBatches(spec, report, RESIZE_POLICIES[spec.resize],
                             faults.injected("preprocess"))
    return rows.mapInArrow(prepare, OUTCOME_SCHEMA)


@dataclass(frozen=True)
class ChannelSums:
    """The `mapInArrow` function: (prepared_at, tensor) train rows -> SUMS_SCHEMA rows per run.

    The catch-up path for a run whose own report was lost (it crashed after its commit).
    """

    shape: tuple[int, int, int]

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        channels = self.shape[2]
        for batch in batches:
            runs = batch.column(0)
            keys = np.asarray(runs.cast(pa.int64()))
            tensors = tensors_from_binary(batch.column(1), self.shape)
            for key in np.unique(keys):
                sums = RunReport()
                sums.add_train(tensors[keys == key])
                yield pa.RecordBatch.from_arrays(
                    [
                        pa.array(np.full(channels, key), runs.type),
                        pa.array(np.arange(channels, dtype=np.int32)),
                        pa.array(np.full(channels, sums.train_images, np.int64)),
                        pa.array(sums.channel_total, pa.int64()),
                        pa.array(sums.channel_total_sq, pa.int64()),
                    ],
                    names=SUMS_SCHEMA.fieldNames(),
                )

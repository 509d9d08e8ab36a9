"""Score: images without a prediction from a model version -> `predictions` (gold), + SQL views.

One pass over `images`: each Spark task decodes, preprocesses and predicts Arrow batches
(`mapInArrow`), with the model loaded once per Python worker. Where the time goes and why it is
built this way (measured in benchmarks/bench_score.py):

- Arrow carries uint8 bytes, never float32 arrays: raw file bytes for the job, or the prepared
  tensors' bytes for `predict_tensors`, viewed as an NHWC array without a copy.
- Predictions leave as Arrow columns built from whole numpy arrays (top-k as a list<struct>),
  with no per-row Python.
- Each worker process gets as many TensorFlow threads as its task has cores
  (`spark.task.cpus`), so two workers on two cores do not start a thread per core each.
- GPUs: run executors with `spark.executor.resource.gpu.amount=1` and
  `spark.task.resource.gpu.amount` (1, or a fraction to share a GPU between tasks) plus a
  discovery script; each worker then sees only the GPU(s) Spark assigned to its task
  (CUDA_VISIBLE_DEVICES) and TensorFlow places the model there. Without GPUs it runs on CPU.

Incremental and safe to rerun or to run twice at once: only images with no prediction from the
model version are read (anti-join); results go to a staging folder first, so a retried MERGE
never recomputes the model; an insert-only MERGE on (image_id, model_name, model_version), retried
on Delta conflicts, adds each row once. Undecodable images go to `quarantine` (stage `score`,
version `<model name>/<model version>`), and so does an image that kills the Python worker
(`faults`: found by bisection, reason `worker_crash`); the run goes on without them.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark import faults, lakehouse
from imageiq_spark.clock import utc_now
from imageiq_spark.config import Config
from imageiq_spark.runs import RunCounts
from imageiq_spark.session import spread
from imageiq_spark.tables import schema
from imageiq_spark.tensors import binary_views, tensors_from_binary

log = logging.getLogger(__name__)

#: `top_k`: the k most probable labels, most probable first.
_TOP_K = "ARRAY<STRUCT<label: STRING, probability: DOUBLE>>"
PREDICTIONS_SCHEMA = schema(
    f"image_id STRING NOT NULL, predicted_label STRING, confidence DOUBLE, top_k {_TOP_K}, "
    "model_name STRING NOT NULL, model_version STRING NOT NULL, run_id STRING, "
    "scored_at TIMESTAMP NOT NULL, score_date DATE NOT NULL, label STRING"
)
PREDICTION_KEYS = ["image_id", "model_name", "model_version"]
# What the inference UDF returns per image: a prediction, or the reason it could not decode.
SCORED_SCHEMA = schema(
    f"image_id STRING, predicted_label STRING, confidence DOUBLE, top_k {_TOP_K}, error STRING, "
    "error_detail STRING"
)
_ARROW_TOP_K = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))
_ARROW_SCORED = pa.schema(
    [
        ("image_id", pa.string()),
        ("predicted_label", pa.string()),
        ("confidence", pa.float64()),
        ("top_k", _ARROW_TOP_K),
        ("error", pa.string()),
        ("error_detail", pa.string()),
    ]
)


class Predictor(Protocol):
    """What the worker needs from a model; `classifier.ImageClassifier` is one."""

    labels: list[str]
    spec: Any  # transform.TransformSpec: how raw bytes become the model's input

    def predict_tensors(self, images: np.ndarray) -> np.ndarray: ...


class ModelLoader(Protocol):
    """Picklable recipe for a Predictor; `key` names the exact model (made on the driver)."""

    key: str

    def __call__(self) -> Predictor: ...


@dataclass(frozen=True)
class RegistryLoader:
    """Loads a model version from the MLflow registry (on a worker: the project's own store)."""

    config: Config
    model_uri: str
    key: str

    def __call__(self) -> Predictor:
        from imageiq_spark.classifier import load_classifier
        from imageiq_spark.tracking import configure_mlflow

        configure_mlflow(self.config)
        return load_classifier(self.model_uri)


@dataclass(frozen=True)
class DirectoryLoader:
    """Loads an `ImageClassifier.save` directory (a local or shared path)."""

    directory: str
    key: str

    def __call__(self) -> Predictor:
        from imageiq_spark.classifier import ImageClassifier

        return ImageClassifier.load(self.directory)


# --- the per-worker side ----------------------------------------------------------------------

# Like pyspark.ml.functions' ModelCache: models by driver-made key, a few at most, per process.
_MODELS: OrderedDict[str, Predictor] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_MODELS_KEPT = 2


def _place_worker(threads: int) -> None:
    """Before TensorFlow starts in this process: its GPU(s) and thread counts."""
    if "tensorflow" in sys.modules:
        return
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from imageiq_spark.quiet import import_quietly

    tf = import_quietly("tensorflow")
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def cached_model(loader: ModelLoader, threads: int) -> Predictor:
    """This worker's copy of the model; loaded on first use, then reused by every task."""
    with _MODELS_LOCK:
        model = _MODELS.get(loader.key)
        if model is None:
            _place_worker(threads)
            model = loader()
            _MODELS[loader.key] = model
            while len(_MODELS) > _MODELS_KEPT:
                _MODELS.popitem(last=False)
        _MODELS.move_to_end(loader.key)
        return model


def top_classes(probs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, float64 probabilities), each (n, k), most probable first; ties keep class
    order. The one ranking batch and online predictions share."""
    k = max(1, min(top_k, probs.shape[1]))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(probs, top, axis=1).astype(np.float64)


def prediction_rows(probs: np.ndarray, labels: list[str], top_k: int) -> list[dict[str, Any]]:
    """Plain rows (predicted_label, confidence, top_k) for a few images: what Arrow would build,
    without its per-call overhead, for a server answering one request at a time."""
    top, top_p = top_classes(probs, top_k)
    rows = []
    for indices, probabilities in zip(top.tolist(), top_p.tolist()):
        ranked = [{"label": labels[i], "probability": p} for i, p in zip(indices, probabilities)]
        rows.append({"predicted_label": ranked[0]["label"], "confidence": ranked[0]["probability"],
                     "top_k": ranked})
    return rows


def predictions_batch(
    image_ids: pa.Array, probs: np.ndarray, labels: list[str], top_k: int
) -> pa.RecordBatch:
    """Arrow rows of predictions built column-wise: the label, its probability and the top k."""
    n = len(probs)
    top, top_p = top_classes(probs, top_k)
    k = top.shape[1]
    vocabulary = pa.array(labels, pa.string())
    flat_labels = vocabulary.take(pa.array(top.reshape(-1)))
    entries = pa.StructArray.from_arrays(
        [flat_labels, pa.array(top_p.reshape(-1))], names=["label", "probability"]
    )
    top_k_column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                            entries)
    return pa.RecordBatch.from_arrays(
        [
            image_ids,
            vocabulary.take(pa.array(top[:, 0])) if n else pa.array([], pa.string()),
            pa.array(top_p[:, 0]) if n else pa.array([], pa.float64()),
            top_k_column.cast(_ARROW_TOP_K),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
        ],
        schema=_ARROW_SCORED,
    )


def failures_batch(image_ids: list[str], reasons: list[str], details: list[str]) -> pa.RecordBatch:
    n = len(image_ids)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(image_ids, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.float64()),
            pa.nulls(n, _ARROW_TOP_K),
            pa.array(reasons, pa.string()),
            pa.array(details, pa.string()),
        ],
        schema=_ARROW_SCORED,
    )


@dataclass(frozen=True)
class ScoreBatches:
    """The `mapInArrow` function: (image_id, content | tensor) batches -> SCORED_SCHEMA batches.

    A module-level class, so workers import it (and its model cache) instead of unpickling a
    private copy of the cache with every task.
    """

    loader: ModelLoader
    top_k: int
    threads: int
    tensor_shape: tuple[int, int, int] | None = None  # set: input is prepared tensors, not bytes
    fault_inject: str = ""  # `score.fault_inject_id_contains`

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from imageiq_spark.transform import prepare_batch

        model = cached_model(self.loader, self.threads)
        for batch in batches:
            ids = batch.column(0)
            if self.fault_inject:
                faults.inject_any(ids.to_pylist(), self.fault_inject)
            if self.tensor_shape is not None:
                probs = model.predict_tensors(tensors_from_binary(batch.column(1), self.tensor_shape))
                yield predictions_batch(ids, probs, model.labels, self.top_k)
                continue
            tensors, failures = prepare_batch(binary_views(batch.column(1)), model.spec)
            probs = model.predict_tensors(tensors)
            if not failures:
                yield predictions_batch(ids, probs, model.labels, self.top_k)
                continue
            ok = np.ones(len(ids), bool)
            ok[[index for index, _ in failures]] = False
            yield predictions_batch(ids.filter(pa.array(ok)), probs, model.labels, self.top_k)
            yield failures_batch([ids[index].as_py() for index, _ in failures],
                                 [error.reason for _, error in failures],
                                 [error.detail for _, error in failures])


# --- the driver side --------------------------------------------------------------------------


def task_threads(spark: SparkSession) -> int:
    """Cores each task may use: TensorFlow's thread count in each worker."""
    return max(1, int(spark.conf.get("spark.task.cpus", "1") or 1))


def score_contents(df: DataFrame, loader: ModelLoader, top_k: int, fault_inject: str = "") -> DataFrame:
    """(image_id, content) rows -> SCORED_SCHEMA rows: decode, preprocess and predict in one pass."""
    spark = df.sparkSession
    scorer = ScoreBatches(loader, top_k, task_threads(spark), fault_inject=fault_inject)
    return spread(df.select("image_id", "content")).mapInArrow(scorer, SCORED_SCHEMA)


def score_tensors(
    df: DataFrame, loader: ModelLoader, shape: tuple[int, int, int], top_k: int
) -> DataFrame:
    """(image_id, tensor) rows of prepared uint8 tensors -> SCORED_SCHEMA rows."""
    spark = df.sparkSession
    scorer = ScoreBatches(loader, top_k, task_threads(spark), tuple(shape))
    return spread(df.select("image_id", "tensor")).mapInArrow(scorer, SCORED_SCHEMA)


def scored_ids(predictions: DataFrame, name: str, version: str) -> DataFrame:
    """The image ids with a prediction from this model version."""
    done = predictions.where((F.col("model_name") == name) & (F.col("model_version") == version))
    return done.select("image_id")


def with_model_columns(scored: DataFrame, name: str, version: str, run_id: str | None,
                       scored_at: datetime.datetime) -> DataFrame:
    return scored.select(
        "image_id", "predicted_label", "confidence", "top_k",
        F.lit(name).alias("model_name"),
        F.lit(version).alias("model_version"),
        F.lit(run_id).cast("string").alias("run_id"),
        F.lit(scored_at).cast("timestamp").alias("scored_at"),
        F.lit(scored_at.date()).alias("score_date"),
        "error", "error_detail",
    )


def remove_staging(uri: str) -> None:
    """Delete a staging folder (local, file:, s3a:// or s3://); a leftover is only wasted space."""
    from imageiq_spark import storage

    try:
        storage.delete_dir(uri)
    except (OSError, pa.ArrowException) as exc:
        log.warning("could not remove staging folder %s: %s", uri, exc)


def quarantine_failed(config: Config, staged: DataFrame, crashed: list[str], images: DataFrame,
                      stage: str, version: str, at: datetime.datetime) -> int:
    """Staged rows of a model pass whose image could not be decoded, and the `crashed` images
    that killed a Python worker -> `quarantine`, under this stage and model version; returns how
    many there were."""
    from imageiq_spark.tables import QUARANTINE_KEYS, QUARANTINE_SCHEMA

    failed = staged.where(F.col("error").isNotNull()).select("image_id", "error", "error_detail")
    if crashed:
        failed = failed.unionByName(staged.sparkSession.createDataFrame(
            [(image_id, faults.WORKER_CRASH, f"the Python worker process died in {stage}")
             for image_id in crashed], "image_id string, error string, error_detail string"))
    count = failed.count()
    if count:
        lakehouse.ensure_table(staged.sparkSession, config, "quarantine", QUARANTINE_SCHEMA)
        rows = failed.join(images.select("image_id", "path", "size_bytes", "modified_at"), "image_id").select(
            "path", F.col("error").alias("reason"), F.col("error_detail").alias("detail"),
            F.lit(stage).alias("stage"), "image_id", "size_bytes", "modified_at",
            F.lit(at).alias("ingested_at"), F.lit(version).alias("version"),
        )
        lakehouse.merge_new_rows(config, "quarantine", rows, QUARANTINE_KEYS,
                                 attempts=config.score.merge_retries)
    return count


@dataclass
class ScoreSummary:
    model_name: str
    model_version: str
    candidates: int = 0
    inserted: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    #: How `lines()` names the images to do and the rows made (embed's summary says its own).
    todo_label: ClassVar[str] = "to score:"
    output_label: ClassVar[str] = "predictions:"

    def counts(self) -> RunCounts:
        return RunCounts(read=self.candidates, written=self.inserted, quarantined=self.failed,
                         model_name=self.model_name, model_version=self.model_version)

    def lines(self) -> list[str]:
        rate = self.candidates / self.elapsed_s if self.elapsed_s else 0.0
        return [
            f"model:        {self.model_name} version {self.model_version}",
            f"{self.todo_label:<14}{self.candidates}",
            f"{self.output_label:<14}{self.inserted} new",
            f"quarantined:  {self.failed}",
            f"elapsed:      {self.elapsed_s:.1f} s ({rate:.1f} images/s)",
        ]


def model_pass(
    spark: SparkSession,
    config: Config,
    summary: ScoreSummary,
    table: str,
    table_schema: StructType,
    keys: list[str],
    stage: str,
    predict: Callable[[DataFrame, datetime.datetime], DataFrame],
    output: Callable[[DataFrame, datetime.datetime], DataFrame],
) -> None:
    """The pass score and embed share; fills `summary`'s counts.

    The images without a row of the summary's model version in `table` (found on their ids
    alone, `lakehouse.pending_rows`; none: nothing is read or written) go through `predict`
    (rows with `error` set where an image cannot be decoded), staged to Parquet so the model
    runs once; the good rows, shaped by `output`, are merged insert-only on `keys`, and the
    undecodable images are quarantined under `stage`, as are images that kill a Python worker
    (`faults.survive_worker_crashes`: the pass runs again without them).
    """
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError("table 'images' does not exist: run `imageiq ingest` first")
    lakehouse.ensure_table(spark, config, table, table_schema)
    images = lakehouse.read_table(spark, config, "images")
    done = scored_ids(lakehouse.read_table(spark, config, table), summary.model_name, summary.model_version)
    with lakehouse.pending_rows(images.select("image_id", "content"), [done]) as pending:
        if pending.count:
            todo = pending.rows
            at = utc_now()
            staging = lakehouse.lake_path(config, "staging", table, uuid.uuid4().hex)
            try:
                _, crashed = faults.survive_worker_crashes(
                    lambda crashed: predict(faults.restrict(todo, "image_id", crashed, keep=False) if crashed
                                            else todo, at).write.mode("overwrite").parquet(staging),
                    lambda: sorted(r.image_id for r in pending.ids.collect()),
                    lambda subset: predict(faults.restrict(todo, "image_id", subset, keep=True), at).count(),
                    stage,
                )
                staged = spark.read.parquet(staging)
                summary.candidates = staged.count() + len(crashed)
                good = output(staged.where(F.col("error").isNull()), at)
                summary.inserted = lakehouse.merge_new_rows(config, table, good, keys,
                                                            attempts=config.score.merge_retries)
                summary.failed = quarantine_failed(config, staged, crashed, images, stage,
                                                   f"{summary.model_name}/{summary.model_version}", at)
            finally:
                remove_staging(staging)
    lakehouse.register_tables(spark, config)


def run(spark: SparkSession, config: Config, model_uri: str | None = None) -> ScoreSummary:
    """Score every image without a prediction from the model version behind `model_uri`."""
    from imageiq_spark import tracking

    started = time.monotonic()
    uri = model_uri or tracking.default_model_uri(config)
    name, version, run_id = tracking.resolve_model(config, uri)
    pinned = f"models:/{name}/{version}"
    # The key names the exact version and run, so a worker never serves a stale model.
    loader = RegistryLoader(config, pinned, key=f"{pinned}#{run_id}")
    summary = ScoreSummary(name, version)
    model_pass(
        spark, config, summary, "predictions", PREDICTIONS_SCHEMA, PREDICTION_KEYS, "score",
        lambda todo, at: with_model_columns(
            score_contents(todo, loader, config.score.top_k, config.score.fault_inject_id_contains),
            name, version, run_id, at),
        # The image's known label rides along (`relabel` keeps it current), so accuracy per window
        # is one pass over `predictions` (monitor), and SQL needs no join for it.
        lambda good, _at: good.join(lakehouse.read_table(spark, config, "images").select("image_id", "label"),
                                    "image_id").select(*PREDICTIONS_SCHEMA.fieldNames()),
    )
    summary.elapsed_s = time.monotonic() - started
    return summary

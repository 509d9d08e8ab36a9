"""Inference in Spark tasks: decode, preprocess and run a model over Arrow batches with the model
loaded once per Python worker (like pyspark's `predict_batch_udf` and its `ModelCache`), numpy in
and out. One batch runner (`ModelBatches`) serves score and embed; a head says what each makes
of the tensors (`Predictions` here: ranked classes).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config
from imageiq_spark.core.quiet import import_quietly
from imageiq_spark.core.tables import TOP_K_DDL, schema
from imageiq_spark.core.tensors import binary_views, tensors_from_binary
from imageiq_spark.lake.session import spread
from imageiq_spark.ml.ranking import top_classes

log = logging.getLogger(__name__)

# What the inference UDF returns per image: a prediction, or the reason it could not decode.
SCORED_SCHEMA = schema(
    f"image_id STRING, predicted_label STRING, confidence DOUBLE, top_k {TOP_K_DDL}, error STRING, "
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
    spec: Any  # vision.spec.TransformSpec: how raw bytes become the model's input

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
        from imageiq_spark.lake.tracking import configure_mlflow
        from imageiq_spark.ml.classifier import load_classifier

        configure_mlflow(self.config)
        return load_classifier(self.model_uri)


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


def failures_batch(arrow_schema: pa.Schema, image_ids: list[str], reasons: list[str],
                   details: list[str]) -> pa.RecordBatch:
    """Rows of `arrow_schema` for images that could not decode: their id and why, nulls elsewhere."""
    given = {"image_id": image_ids, "error": reasons, "error_detail": details}
    return pa.RecordBatch.from_arrays(
        [pa.array(given[f.name], f.type) if f.name in given else pa.nulls(len(image_ids), f.type)
         for f in arrow_schema],
        schema=arrow_schema,
    )


class BatchHead(Protocol):
    """What a `ModelBatches` makes of a model and the tensors of a batch's decodable images."""

    arrow_schema: pa.Schema  # its rows; it has image_id, error and error_detail for failures

    def __call__(self, model: Any, image_ids: pa.Array, tensors: np.ndarray) -> pa.RecordBatch: ...


@dataclass(frozen=True)
class Predictions:
    """Score's head: probabilities ranked into SCORED_SCHEMA rows."""

    top_k: int
    arrow_schema: ClassVar[pa.Schema] = _ARROW_SCORED

    def __call__(self, model: Predictor, image_ids: pa.Array, tensors: np.ndarray) -> pa.RecordBatch:
        return predictions_batch(image_ids, model.predict_tensors(tensors), model.labels, self.top_k)


@dataclass(frozen=True)
class ModelBatches:
    """The `mapInArrow` function of score and embed: (image_id, content | tensor) batches -> the
    head's rows for decodable images, then a failures batch for those that were not.

    A module-level class, so workers import it (and its model cache) instead of unpickling a
    private copy of the cache with every task.
    """

    loader: ModelLoader
    head: BatchHead
    threads: int
    tensor_shape: tuple[int, int, int] | None = None  # set: input is prepared tensors, not bytes
    fault_inject: str = ""  # `faults.injected(stage)`, the stage that runs it

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from imageiq_spark.vision.transform import prepare_batch

        model = cached_model(self.loader, self.threads)
        for batch in batches:
            ids = batch.column(0)
            if self.fault_inject:
                faults.inject_any(ids.to_pylist(), self.fault_inject)
            if self.tensor_shape is not None:
                yield self.head(model, ids, tensors_from_binary(batch.column(1), self.tensor_shape))
                continue
            tensors, failures = prepare_batch(binary_views(batch.column(1)), model.spec)
            if not failures:
                yield self.head(model, ids, tensors)
                continue
            ok = np.ones(len(ids), bool)
            ok[[index for index, _ in failures]] = False
            yield self.head(model, ids.filter(pa.array(ok)), tensors)
            yield failures_batch(self.head.arrow_schema, [ids[index].as_py() for index, _ in failures],
                                 [error.reason for _, error in failures],
                                 [error.detail for _, error in failures])


# --- the driver side --------------------------------------------------------------------------


def task_threads(spark: SparkSession) -> int:
    """Cores each task may use: TensorFlow's thread count in each worker."""
    return max(1, int(spark.conf.get("spark.task.cpus", "1") or 1))


def score_contents(df: DataFrame, loader: ModelLoader, top_k: int, fault_inject: str = "") -> DataFrame:
    """(image_id, content) rows -> SCORED_SCHEMA rows: decode, preprocess and predict in one pass."""
    spark = df.sparkSession
    scorer = ModelBatches(loader, Predictions(top_k), task_threads(spark), fault_inject=fault_inject)
    return spread(df.select("image_id", "content")).mapInArrow(scorer, SCORED_SCHEMA)


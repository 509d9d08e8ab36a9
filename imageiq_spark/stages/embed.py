"""Embed: images without an embedding from a model version -> `embeddings` (a vector per image).

The vector is the model's penultimate layer: the input of its last (classification) layer, after
global average pooling for every architecture of the zoo (128 floats for the small CNN, 1,280 for
MobileNetV2). Run by score's batch runner (`inference.ModelBatches`) with its own head: one pass
of `mapInArrow` over `images`, the model loaded once per Python worker (keyed by the exact
version and run), raw image bytes in and float32 vectors out as Arrow list<float> columns built
from one numpy array (no pandas, no float64 copy); results staged to Parquet, then an insert-only
MERGE on (image_id, model_name, model_version), so reruns and concurrent runs add each row once.
Undecodable images go to `quarantine` with stage `embed`, as do images that kill the Python
worker (reason `worker_crash`, `model_pass`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import schema
from imageiq_spark.lake.session import spread
from imageiq_spark.ml.inference import ModelBatches, ModelLoader, RegistryLoader, task_threads
from imageiq_spark.pipeline.model_pass import ScoreSummary, model_pass

log = logging.getLogger(__name__)

EMBEDDINGS_SCHEMA = schema(
    "image_id STRING NOT NULL, model_name STRING NOT NULL, model_version STRING NOT NULL, "
    "vector ARRAY<FLOAT> NOT NULL, embedded_at TIMESTAMP NOT NULL"
)
EMBEDDING_KEYS = ["image_id", "model_name", "model_version"]
#: What the UDF returns per image: a vector, or why there is none.
EMBEDDED_SCHEMA = schema("image_id STRING, vector ARRAY<FLOAT>, error STRING, error_detail STRING")
_ARROW_EMBEDDED = pa.schema([("image_id", pa.string()), ("vector", pa.list_(pa.float32())),
                             ("error", pa.string()), ("error_detail", pa.string())])
#: Rows per forward pass: bounds a worker's activations, as score's chunk does.
CHUNK = 256


class Embedder:
    """A classifier's network cut before its last layer: uint8 NHWC in, float32 vectors out."""

    def __init__(self, classifier: Any) -> None:
        import tensorflow as tf
        import tf_keras as keras

        model = classifier.model
        features = keras.Model(model.inputs, model.layers[-1].input, name=f"{model.name}_features")
        self.spec = classifier.spec
        self.dim = int(features.output_shape[-1])
        # One compiled graph, as the classifier's own forward pass (an eager call is 1.5-2x slower).
        self._forward = tf.function(
            lambda images: features(images, training=False),
            input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8)],
        )

    def embed_tensors(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, h, w, c] prepared tensors -> float32 [n, dim]."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self._forward(images[i:i + CHUNK]).numpy().astype(np.float32, copy=False)
                               for i in range(0, len(images), CHUNK)])


@dataclass(frozen=True)
class EmbedderLoader:
    """Picklable recipe for an Embedder: the classifier `base` loads, cut before its last layer."""

    base: ModelLoader
    key: str

    def __call__(self) -> Embedder:
        return Embedder(self.base())


def vectors_batch(image_ids: pa.Array, vectors: np.ndarray) -> pa.RecordBatch:
    """Arrow rows of (image_id, vector) over one float32 buffer: list offsets, no per-row objects."""
    n, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.RecordBatch.from_arrays(
        [image_ids, pa.ListArray.from_arrays(offsets, values), pa.nulls(n, pa.string()),
         pa.nulls(n, pa.string())],
        schema=_ARROW_EMBEDDED,
    )


@dataclass(frozen=True)
class Vectors:
    """Embed's head for `inference.ModelBatches`: an Embedder's vectors as EMBEDDED_SCHEMA rows."""

    arrow_schema: ClassVar[pa.Schema] = _ARROW_EMBEDDED

    def __call__(self, model: Embedder, image_ids: pa.Array, tensors: np.ndarray) -> pa.RecordBatch:
        return vectors_batch(image_ids, model.embed_tensors(tensors))


def embed_contents(df: DataFrame, loader: EmbedderLoader, fault_inject: str = "") -> DataFrame:
    """(image_id, content) rows -> EMBEDDED_SCHEMA rows: decode, preprocess and embed in one pass."""
    embedder = ModelBatches(loader, Vectors(), task_threads(df.sparkSession), fault_inject=fault_inject)
    return spread(df.select("image_id", "content")).mapInArrow(embedder, EMBEDDED_SCHEMA)


def model_loader(config: Config, model_uri: str | None) -> tuple[str, str, EmbedderLoader]:
    """(model name, version, a loader of its Embedder) for a model URI (default the champion)."""
    from imageiq_spark.lake import tracking

    name, version, run_id = tracking.resolve_model(config, model_uri or tracking.default_model_uri(config))
    pinned = f"models:/{name}/{version}"
    key = f"{pinned}#{run_id}"
    return name, version, EmbedderLoader(RegistryLoader(config, pinned, key=key), key=f"{key}#features")


class EmbedSummary(ScoreSummary):
    todo_label = "to embed"
    output_label = "embeddings"


def run(spark: SparkSession, config: Config, model_uri: str | None = None) -> EmbedSummary:
    """Embed every image without an embedding from the model version behind `model_uri`."""
    name, version, loader = model_loader(config, model_uri)
    summary = EmbedSummary(name, version)
    model_pass(
        spark, config, summary, "embeddings", EMBEDDINGS_SCHEMA, EMBEDDING_KEYS, "embed",
        lambda todo, _at: embed_contents(todo, loader, faults.injected("embed")),
        lambda good, at: good.select("image_id", F.lit(name).alias("model_name"),
                                     F.lit(version).alias("model_version"), "vector",
                                     F.lit(at).alias("embedded_at")),
    )
    summary.watch.stop()
    return summary

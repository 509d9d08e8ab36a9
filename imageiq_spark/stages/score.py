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

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core import faults
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import PREDICTION_KEYS, PREDICTIONS_SCHEMA
from imageiq_spark.lake import lakehouse, tracking
from imageiq_spark.ml.inference import RegistryLoader, score_contents
from imageiq_spark.pipeline.model_pass import ScoreSummary, model_pass

log = logging.getLogger(__name__)


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


def run(spark: SparkSession, config: Config, model_uri: str | None = None) -> ScoreSummary:
    """Score every image without a prediction from the model version behind `model_uri`."""
    uri = model_uri or tracking.default_model_uri(config)
    name, version, run_id = tracking.resolve_model(config, uri)
    pinned = f"models:/{name}/{version}"
    # The key names the exact version and run, so a worker never serves a stale model.
    loader = RegistryLoader(config, pinned, key=f"{pinned}#{run_id}")
    summary = ScoreSummary(name, version)
    model_pass(
        spark, config, summary, "predictions", PREDICTIONS_SCHEMA, PREDICTION_KEYS, "score",
        lambda todo, at: with_model_columns(
            score_contents(todo, loader, config.score.top_k, faults.injected("score")),
            name, version, run_id, at),
        # The image's known label rides along (`relabel` keeps it current), so accuracy per window
        # is one pass over `predictions` (monitor), and SQL needs no join for it.
        lambda good, _at: good.join(lakehouse.read_table(spark, config, "images").select("image_id", "label"),
                                    "image_id").select(*PREDICTIONS_SCHEMA.fieldNames()),
    )
    summary.watch.stop()
    return summary

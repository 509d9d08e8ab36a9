"""What `monitor` compares: the champion and its baseline (the `prepared` rows of its preprocess
version prepared before its training run started: image properties from the train split, label
mix, confidence and accuracy from its predictions on the val split), and the windows of the rows
outside that baseline (batch predictions by `scored_at`, images by `ingested_at`, online
predictions from the serving log by `requested_at`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.clock import as_utc, utc_from_timestamp
from imageiq_spark.core.config import Config
from imageiq_spark.lake import lakehouse, storage
from imageiq_spark.stages.monitor.counts import BASELINE, BATCH, ONLINE

#: The columns of `image_profiles` that are profiled per window.
IMAGE_VARIABLES = ("format", "width", "height", "brightness", "contrast", "sharpness")


@dataclass(frozen=True)
class Champion:
    name: str
    version: str
    run_id: str
    preprocess_version: str
    trained_at: datetime.datetime  # the training run's start, in UTC


def champion(config: Config) -> Champion:
    from mlflow.tracking import MlflowClient

    from imageiq_spark.lake import tracking

    name, version, run_id = tracking.resolve_model(config, tracking.default_model_uri(config))
    run = MlflowClient().get_run(run_id)
    preprocess_version = run.data.tags.get("preprocess_version")
    if preprocess_version is None:
        raise RuntimeError(
            f"the champion {name} version {version} (run {run_id}) has no preprocess_version tag: "
            "monitoring compares against the data a model was trained on, so it needs a champion "
            "trained by `imageiq train`"
        )
    trained_at = utc_from_timestamp(run.info.start_time / 1000)
    return Champion(name, version, run_id, preprocess_version, trained_at)


def baseline_splits(spark: SparkSession, config: Config, model: Champion) -> DataFrame:
    """(image_id, split) of the rows the champion was trained on."""
    return (lakehouse.read_table(spark, config, "prepared")
            .where((F.col("preprocess_version") == model.preprocess_version)
                   & (F.col("prepared_at") <= F.lit(model.trained_at)))
            .select("image_id", "split"))


def window_start(column: str, unit: str) -> Column:
    return F.date_trunc(unit, F.col(column))


def window_end(start: datetime.datetime, unit: str) -> datetime.datetime:
    return start + (datetime.timedelta(days=1) if unit == "day" else datetime.timedelta(hours=1))


def population(spark: SparkSession, config: Config, model: Champion, since: datetime.datetime
               ) -> list[DataFrame]:
    """Window rows (source `batch`, and `online` from the serving log) and baseline rows (window_start
    null) with the columns `distribution_counts` counts, one DataFrame per table read.

    One pass over the champion's predictions: those of images outside its baseline are window rows
    (by `scored_at`), those of its val images baseline rows. One pass over `image_profiles`: images
    outside the baseline are window rows (by `ingested_at`, when they arrived), its training images
    baseline rows. Accuracy uses the label each prediction row carries (`score` writes the image's
    label, `relabel` keeps it current), so neither pass joins a table of the same size.
    """
    unit = config.monitor.window
    splits = baseline_splits(spark, config, model)
    in_window = F.col("split").isNull()

    def tagged(table: DataFrame, baseline_split: str, timestamp: str) -> DataFrame:
        """`table`'s rows with `source` and `window_start`: outside the baseline or in `baseline_split`."""
        start = window_start(timestamp, unit)
        return (table.join(splits, "image_id", "left")
                .where((in_window & (start >= F.lit(since))) | (F.col("split") == baseline_split))
                .withColumn("source", F.when(in_window, F.lit(BATCH)).otherwise(F.lit(BASELINE)))
                .withColumn("window_start", F.when(in_window, start)))

    predictions = (lakehouse.read_table(spark, config, "predictions")
                   .where((F.col("model_name") == model.name) & (F.col("model_version") == model.version))
                   .select("image_id", "scored_at", "predicted_label", "confidence", "label"))
    correct = F.when(F.col("label").isNotNull(),
                     (F.col("predicted_label") == F.col("label")).cast("string")).alias("correct")
    parts = [
        tagged(predictions, "val", "scored_at").select(
            "source", "window_start", F.col("predicted_label").alias("label"), "confidence", correct),
        tagged(lakehouse.read_table(spark, config, "image_profiles"), "train", "ingested_at").select(
            "source", "window_start", *IMAGE_VARIABLES),
    ]
    online = online_predictions(spark, config, model)
    if online is not None:
        parts.append(
            online.select(F.lit(ONLINE).alias("source"),
                          window_start("requested_at", unit).alias("window_start"),
                          F.col("predicted_label").alias("label"), "confidence")
            .where(F.col("window_start") >= F.lit(since)))
    return parts


def online_predictions(spark: SparkSession, config: Config, model: Champion) -> DataFrame | None:
    """The champion's predictions in the serving request log, or None when nothing was logged."""
    from pyspark.errors import AnalysisException


    folder = lakehouse.lake_path(config, "request_log")
    if not storage.folder_exists(folder):  # the server never logged, or request_log is off
        return None
    try:
        logged = spark.read.parquet(folder)
        # Analysed here: a Spark Connect client reads lazily and would fail only at the first action.
        logged.schema  # noqa: B018
    except AnalysisException:  # a log folder without a file yet
        return None
    return logged.where((F.col("model_name") == model.name) & (F.col("model_version") == model.version))


def quarantine_rates(spark: SparkSession, config: Config, since: datetime.datetime
                     ) -> dict[datetime.datetime, tuple[float, int]]:
    """Per window of `ingested_at`: (share of files quarantined, files seen)."""
    unit = config.monitor.window
    images = (lakehouse.read_table(spark, config, "images")
              .select(window_start("ingested_at", unit).alias("window_start"), F.lit(0).alias("bad")))
    if lakehouse.table_exists(spark, config, "quarantine"):
        images = images.unionByName(lakehouse.read_table(spark, config, "quarantine").select(
            window_start("ingested_at", unit).alias("window_start"), F.lit(1).alias("bad")))
    rows = (images.where(F.col("window_start") >= F.lit(since)).groupBy("window_start")
            .agg(F.avg("bad").alias("rate"), F.count("*").alias("files")).collect())
    return {as_utc(r["window_start"]): (float(r["rate"]), int(r["files"])) for r in rows}

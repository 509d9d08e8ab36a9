"""Monitoring of 1,000,000 synthetic predictions against one Spark scan of the same table.

The lake holds a registered champion (a real MLflow run and model version, the tags `train`
writes), `prepared` rows for its 20,000 baseline images, `images` and `image_profiles` rows for
every image, and 1,000,000 predictions over 7 days. Timed, each on the same warm session:
- scan: every column of `predictions` read once (`write.format("noop")`): the floor;
- monitor computation: `distribution_counts(population(...))` collected plus the statistics of
  every window, what grows with the rows;
- the whole `monitor.run` (champion lookup, image profiles, three Delta MERGEs, the report PNG
  and its MLflow run, the Prometheus file): what a user waits for.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from benchmarks.common import bench_config, median, table, timed

ROWS = 1_000_000
BASELINE_IMAGES = 20_000
DAYS = 7


def build_lake(spark, config) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    from pyspark.sql import functions as F

    from imageiq_spark import lakehouse, monitor, tracking

    tracking.configure_mlflow(config)
    name = config.mlflow.registered_model
    with mlflow.start_run(tags={"preprocess_version": "bench"}) as run:
        pass
    client = MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(name, tracking.CHAMPION, version.version)

    ids = spark.range(ROWS).select(F.sha2(F.col("id").cast("string"), 256).alias("image_id"),
                                   (F.col("id") % 10).cast("string").alias("label"), "id")
    images = ids.select(
        "image_id", F.lit("x").alias("path"), "label", F.lit("png").alias("format"),
        F.lit(28).alias("width"), F.lit(28).alias("height"), F.lit(None).cast("binary").alias("content"),
        F.current_timestamp().alias("ingested_at"))
    images.write.format("delta").save(lakehouse.table_location(config, "images"))
    now = datetime.datetime.now()
    # Images arrive over the same 7 days as their predictions.
    arrived = F.lit(now) - F.expr(f"make_interval(0, 0, 0, 0, 0, 0, id % {DAYS * 86400})")
    profiles = ids.select("image_id", (F.rand(1) * 80 + 20).alias("brightness"),
                          (F.rand(2) + 1).alias("contrast"), (F.rand(3) * 5).alias("sharpness"),
                          F.current_timestamp().alias("profiled_at"), F.lit("png").alias("format"),
                          F.lit(28).alias("width"), F.lit(28).alias("height"), arrived.alias("ingested_at"))
    profiles.write.format("delta").save(lakehouse.table_location(config, "image_profiles"))
    baseline = ids.where(F.col("id") < BASELINE_IMAGES).select(
        "image_id", F.when(F.col("id") % 5 == 0, "val").otherwise("train").alias("split"),
        F.lit("bench").alias("preprocess_version"),
        F.lit(datetime.datetime(2000, 1, 1)).alias("prepared_at"))
    baseline.write.format("delta").save(lakehouse.table_location(config, "prepared"))
    predictions = ids.select(
        "image_id",
        ((F.col("id") * 7 + (F.rand(4) * 3).cast("long")) % 10).cast("string").alias("predicted_label"),
        F.pow(F.rand(5), 0.2).alias("confidence"),
        F.array(F.struct(F.col("label"), F.lit(0.9).alias("probability"))).alias("top_k"),
        F.lit(name).alias("model_name"), F.lit(version.version).alias("model_version"),
        F.lit(run.info.run_id).alias("run_id"),
        arrived.alias("scored_at"), "label",
    ).withColumn("score_date", F.to_date("scored_at"))
    predictions.write.format("delta").save(lakehouse.table_location(config, "predictions"))
    monitor.update_image_profiles(spark, config)  # nothing to add: a no-op, as on a steady lake


def run(workdir: Path) -> str:
    from imageiq_spark import lakehouse, monitor
    from imageiq_spark.session import get_spark

    shutil.rmtree(workdir, ignore_errors=True)
    config = bench_config(workdir / "lake", monitor={"lookback_days": DAYS + 1})
    spark = get_spark(config, app_name="bench-monitor")
    build_lake(spark, config)
    model = monitor.champion(config)
    since = datetime.datetime.now() - datetime.timedelta(days=DAYS + 1)

    def scan() -> None:
        lakehouse.read_table(spark, config, "predictions").write.format("noop").mode("overwrite").save()

    def computation() -> None:
        counted = monitor.distribution_counts(monitor.population(spark, config, model, since)).collect()
        windows: dict = {}
        for row in counted:
            windows.setdefault((row["source"], row["window_start"]), []).append(row)
        baseline = monitor.Distributions.from_rows(windows.pop((monitor.BASELINE, None)))
        for rows in windows.values():
            monitor.drift_metrics(baseline, monitor.Distributions.from_rows(rows))

    scan()  # warm the session and the file cache once, untimed
    scans = timed(scan, repeats=5)
    computations = timed(computation, repeats=5)
    whole = timed(lambda: monitor.run(spark, config), repeats=3)
    floor = median(scans)
    rows = [
        ["one scan of `predictions` (all columns)", median(scans), 1.0],
        ["monitor computation (population, counts, statistics)", median(computations),
         median(computations) / floor],
        ["whole `monitor.run` (+ MERGEs, report, MLflow, textfile)", median(whole), median(whole) / floor],
    ]
    spark.stop()
    return "\n".join([
        "## Monitor: 1,000,000 predictions over 7 days (target: < 3x one scan)",
        "",
        f"{ROWS:,} predictions, {BASELINE_IMAGES:,} baseline images, {DAYS} daily windows; medians of "
        "5 runs (3 for the whole run) on one warm local[2] session.",
        "",
        table(["what", "seconds", "x scan"], rows),
        "",
    ])

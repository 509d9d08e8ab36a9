"""`imageiq status`: the latest run of each stage (`job_runs`) and the work still pending."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, aligned
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import COUNTED
from imageiq_spark.lake.tracking import CHAMPION
from imageiq_spark.vision.spec import TransformSpec


def latest_runs(job_runs: DataFrame) -> DataFrame:
    """The latest row per stage, stages in order of their latest start."""
    newest = Window.partitionBy("stage").orderBy(F.col("started_at").desc(), F.col("ended_at").desc())
    return (job_runs.withColumn("_n", F.row_number().over(newest)).where("_n = 1").drop("_n")
            .orderBy("started_at"))


@dataclass
class StatusSummary:
    runs: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, int | str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        rows: list[Row] = [("latest runs", "")]
        if not self.runs:
            rows.append("  none recorded yet")
        for r in self.runs:
            took = (r["ended_at"] - r["started_at"]).total_seconds()
            counts = ", ".join(f"{name} {r[f'rows_{name}']}" for name in COUNTED
                               if r.get(f"rows_{name}") is not None)
            model = f" model v{r['model_version']}" if r["model_version"] else ""
            rows.append(f"  {r['stage']:<11}{r['status']:<10}{r['started_at']:%Y-%m-%d %H:%M:%S} "
                        f"({took:.0f} s) exit {r['exit_code']}{model}"
                        + (f"; {counts}" if counts else ""))
            if r["error"]:
                rows.append(f"  {'':<11}error: {r['error'].splitlines()[0][:200]}")
        rows.append(("pending", ""))
        rows += [f"  {line}" for line in aligned(self.pending.items())]
        return aligned(rows)


def pending_work(spark: SparkSession, config: Config) -> dict[str, int | str]:
    """Images not prepared at the current preprocess version, and not scored by the champion."""
    if not lakehouse.table_exists(spark, config, "images"):
        return {"images": "none ingested yet"}
    ids = lakehouse.read_table(spark, config, "images").select("image_id")
    pending: dict[str, int | str] = {}
    version = TransformSpec.from_config(config).version
    if lakehouse.table_exists(spark, config, "prepared"):
        done = (lakehouse.read_table(spark, config, "prepared")
                .where(F.col("preprocess_version") == version).select("image_id"))
        pending[f"not prepared at preprocess version {version}"] = ids.join(done, "image_id",
                                                                            "left_anti").count()
    else:
        pending["not prepared"] = ids.count()
    champion = _champion(spark, config)
    if champion is None:
        pending["not scored"] = "no champion yet"
    elif lakehouse.table_exists(spark, config, "predictions"):
        scored = (lakehouse.read_table(spark, config, "predictions")
                  .where((F.col("model_name") == champion[0]) & (F.col("model_version") == champion[1]))
                  .select("image_id"))
        pending[f"not scored by the champion (v{champion[1]})"] = ids.join(scored, "image_id",
                                                                            "left_anti").count()
    else:
        pending[f"not scored by the champion (v{champion[1]})"] = ids.count()
    return pending


def _champion(spark: SparkSession, config: Config) -> tuple[str, str] | None:
    """The champion as the lake records it (`model_aliases`), without asking the registry."""
    if not lakehouse.table_exists(spark, config, "model_aliases"):
        return None
    row = (lakehouse.read_table(spark, config, "model_aliases")
           .where((F.col("model_name") == config.mlflow.registered_model) & (F.col("alias") == CHAMPION))
           .select("model_name", "model_version").first())
    return (row[0], row[1]) if row else None


def status(spark: SparkSession, config: Config) -> StatusSummary:
    summary = StatusSummary()
    if lakehouse.table_exists(spark, config, "job_runs"):
        summary.runs = [r.asDict() for r in
                        latest_runs(lakehouse.read_table(spark, config, "job_runs")).collect()]
    summary.pending = pending_work(spark, config)
    return summary

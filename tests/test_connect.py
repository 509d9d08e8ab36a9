"""Every stage over Spark Connect: `imageiq run-all` with `spark_conf.spark.remote=local[2]`, which
starts a local Connect server in the command's process. No SparkContext, RDD, accumulator or
`DeltaTable` is reachable from the client there, so this run proves the code needs none of them."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyspark
import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.tracking import tracking_uri
from imageiq_spark.stages import ingest, preprocess

MODEL = "imageiq"

# pyspark 3.5's package has no Spark Connect server to start for `remote("local[2]")` (4.0 ships
# spark-connect's jar): under `make test-compat` this file skips; the manual says so.
pytestmark = pytest.mark.skipif(int(pyspark.__version__.split(".")[0]) < 4,
                                reason="a local Spark Connect server needs pyspark >= 4.0")


def imageiq_over_connect(tmp_path: Path, settings: dict[str, object], *command: str
                         ) -> subprocess.CompletedProcess[str]:
    """`imageiq ... COMMAND` as its own process, a Spark Connect client of a local[2] server."""
    settings = {"spark_conf.spark.remote": "local[2]", "spark_conf.spark.ui.enabled": "false",
                "spark_conf.spark.ui.showConsoleProgress": "false", **settings}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.run([sys.executable, "-m", "imageiq_spark", *sets, *command],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # `make test-all`: 2.5 minutes, over the budget of `make test`
def test_run_all_over_spark_connect_fills_every_table_as_a_classic_run_does(spark, tmp_path: Path):
    source = tmp_path / "images"
    write_sample_data(source, per_class=4)
    lake = tmp_path / "connect-lake"
    database = f"c_{uuid.uuid4().hex[:8]}"
    settings = {
        "storage.root": lake,
        "catalog.database": database,
        "ingest.source": source,
        "spark_conf.spark.sql.shuffle.partitions": 2,
        "train.epochs": 1,
        "train.batch_size": 16,
    }
    started = time.monotonic()
    done = imageiq_over_connect(tmp_path, settings, "run-all")
    (tmp_path / "run-all.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, "\n".join(done.stderr.splitlines()[-40:])
    print(f"run-all over Spark Connect: {time.monotonic() - started:.0f} s")
    # Petastorm needs a classic session: over Connect training reads with the arrow reader.
    assert "reader arrow" in done.stdout

    over_connect = make_config(tmp_path, storage={"root": str(lake)}, catalog={"database": database})
    classic = make_config(tmp_path / "classic", ingest={"source": str(source)})
    ingest.run(spark, classic)
    preprocess.run(spark, classic)
    for config in (over_connect, classic):
        assert lakehouse.read_table(spark, config, "images").count() == 40
    assertDataFrameEqual(*(lakehouse.read_table(spark, config, "images").select("image_id", "label")
                           for config in (over_connect, classic)))
    assertDataFrameEqual(*(
        lakehouse.read_table(spark, config, "prepared").select(
            "image_id", "label", "label_index", "split", F.sha2("tensor", 256).alias("tensor_sha256"))
        for config in (over_connect, classic)))

    registry = MlflowClient(tracking_uri=tracking_uri(over_connect), registry_uri=tracking_uri(over_connect))
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "1"
    aliases = lakehouse.read_table(spark, over_connect, "model_aliases")
    assert [tuple(r) for r in aliases.select("alias", "model_version").collect()] == [("champion", "1")]
    predictions = lakehouse.read_table(spark, over_connect, "predictions")
    images = lakehouse.read_table(spark, over_connect, "images")
    assertDataFrameEqual(predictions.select("image_id", "model_version"),
                         images.select("image_id", F.lit("1").alias("model_version")))


@pytest.mark.slow
def test_distributed_training_over_connect_exits_2_naming_the_workers_key(tmp_path: Path):
    done = imageiq_over_connect(tmp_path, {"storage.root": tmp_path / "lake",
                                           "train.distributed.workers": 2}, "train")

    assert done.returncode == 2, done.stderr[-3000:]
    assert "config key 'train.distributed.workers' is 2" in done.stderr
    assert "Spark Connect" in done.stderr

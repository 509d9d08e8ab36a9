"""The production topology, for real: executors in JVMs of their own (`local-cluster`), the lake on
S3 (moto's server, through s3a://) and MLflow as a tracking server whose artifacts live in S3.
The driver's local disk holds nothing: every table, report, checkpoint and model is in the bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cluster
import pytest
import s3server
from conftest import make_config
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core.config import Config
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.session import local_cluster_home
from imageiq_spark.stages import ingest, preprocess

BUCKET = "imageiq-cluster"
MODEL = "imageiq"


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real digits per label: enough for every split to hold images of most labels."""
    root = tmp_path_factory.mktemp("cluster_images")
    write_sample_data(root, per_class=6)
    return root


@pytest.fixture(scope="module")
def s3_source(s3_server: s3server.S3Server, images_dir: Path) -> str:
    return s3server.upload_source(s3_server, images_dir, BUCKET)


@pytest.fixture
def tracking_server(tmp_path: Path, s3_server: s3server.S3Server) -> str:
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    env = {**os.environ, **s3_server.env}
    with cluster.mlflow_server(folder, f"s3://{BUCKET}/mlartifacts-{uuid.uuid4().hex[:8]}", env) as uri:
        yield uri


#: Settings of every run here: two executor JVMs, small shuffles.
ON_LOCAL_CLUSTER = {
    "spark_conf.spark.master": cluster.LOCAL_CLUSTER,
    "spark_conf.spark.ui.enabled": "false",
    "spark_conf.spark.sql.shuffle.partitions": 2,
    "spark_conf.spark.default.parallelism": 2,
}


def cli_command(settings: dict[str, object], *command: str) -> list[str]:
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "imageiq_spark", *sets, *command]


def cluster_env(s3: s3server.S3Server, home: Path) -> dict[str, str]:
    """AWS variables as a deployment passes them, and a Spark home of the test's own."""
    return {**os.environ, **s3.env, "SPARK_HOME": str(local_cluster_home(home))}


def job_failure(done: subprocess.CompletedProcess) -> str:
    """The CLI's own error line and the end of its log, without the lines the standalone master
    prints for each executor it restarts while the application shuts down."""
    lines = [line for line in done.stderr.splitlines() if "WARN Master:" not in line]
    errors = [line for line in lines if line.startswith("imageiq")]
    return "\n".join(errors + lines[-40:])


def table_keys(spark, config: Config):
    """What two runs over the same files must agree on, whatever paths and clocks differ."""
    images = lakehouse.read_table(spark, config, "images").select("image_id", "label")
    prepared = lakehouse.read_table(spark, config, "prepared").select(
        "image_id", "label", "label_index", "split", F.sha2("tensor", 256).alias("tensor_sha256")
    )
    return images, prepared


def test_run_all_on_separate_executors_with_the_lake_on_s3_and_mlflow_as_a_server(
    spark, tmp_path, s3_server, images_dir, s3_source, tracking_server
):
    """With default settings (no train.reader override): the reader reads its cache from S3."""
    lake = f"s3a://{BUCKET}/lake-{uuid.uuid4().hex[:8]}"
    database = f"c_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    home = tmp_path / "spark_home"

    started = time.monotonic()
    settings = {
        **ON_LOCAL_CLUSTER,
        "storage.root": lake,
        "catalog.database": database,
        "mlflow.tracking_uri": tracking_server,
        "train.epochs": 2,
        "train.batch_size": 16,
    }
    done = subprocess.run(
        cli_command(settings, "run-all", "--source", s3_source),
        env=cluster_env(s3_server, home), cwd=workdir, capture_output=True, text=True, timeout=1500,
    )
    cluster_seconds = time.monotonic() - started
    (tmp_path / "run-all.log").write_text(done.stdout + done.stderr)
    reference = make_config(tmp_path / "local", ingest={"source": str(images_dir)})
    ingest.run(spark, reference)
    preprocess.run(spark, reference)

    assert done.returncode == 0, job_failure(done)
    print(f"run-all on {cluster.LOCAL_CLUSTER}, lake on S3, MLflow server: {cluster_seconds:.0f} s")
    on_s3 = make_config(tmp_path, storage={"root": lake}, catalog={"database": database})
    for ours, theirs in zip(table_keys(spark, on_s3), table_keys(spark, reference)):
        assertDataFrameEqual(ours, theirs)
    # Each executor of the application logs to a folder of its own: two separate JVMs did the work.
    (app,) = (home / "work").iterdir()
    busy = [e.name for e in app.iterdir() if "Got assigned task" in (e / "stderr").read_text()]
    assert sorted(busy) == ["0", "1"]

    registry = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1"
    model_id = champion.source.removeprefix("models:/")
    artifact_keys = list(s3server.list_keys(s3_server, BUCKET, "mlartifacts-"))
    assert any(key.endswith(f"/models/{model_id}/artifacts/MLmodel") for key in artifact_keys), \
        "the model's files are in the server's artifact store in S3, uploaded through the server"
    assert not any(s3server.list_keys(s3_server, BUCKET, lake.split("/", 3)[3] + "/mlruns"))
    predictions = lakehouse.read_table(spark, on_s3, "predictions")
    images = lakehouse.read_table(spark, on_s3, "images")
    assertDataFrameEqual(
        predictions.select("image_id", "model_name", "model_version"),
        images.select("image_id", F.lit(MODEL).alias("model_name"), F.lit("1").alias("model_version")),
    )
    assert list(workdir.iterdir()) == [], "nothing is written to the driver's local disk"

    run = registry.get_run(champion.run_id)
    job_runs = lakehouse.read_table(spark, on_s3, "job_runs").toPandas().to_csv()
    seen = "\n".join([done.stdout, done.stderr, str(run.data.params), str(run.data.tags), job_runs])
    assert s3_server.secret_key not in seen
    assert s3_server.access_key not in seen


# ------------------------------------------------------------------------------ executor loss


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("executor_loss_images")
    write_sample_data(root, per_class=20)
    return root


def run_killing_one_executor(config: Config, command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `command` on local-cluster and SIGKILL one executor JVM the moment it runs a Python task
    (its first Python worker appears); returns the finished job."""
    env = {**os.environ, "SPARK_HOME": str(local_cluster_home(tmp_path / "spark_home"))}
    settings = {**ON_LOCAL_CLUSTER, "storage.root": config.storage.root,
                "catalog.database": config.catalog.database}
    proc = subprocess.Popen(cli_command(settings, command), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victim = cluster.wait_for_busy_executor(proc, timeout=600)
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow  # `make test-cluster`
def test_preprocess_losing_an_executor_mid_stage_still_prepares_every_image_once(
    spark, tmp_path, many_images
):
    config = make_config(tmp_path, ingest={"source": str(many_images)})
    ingest.run(spark, config)

    done = run_killing_one_executor(config, "preprocess", tmp_path)

    assert done.returncode == 0, job_failure(done)
    assert "ExecutorLostFailure" in done.stderr, "a running task was lost with its executor"
    clean = make_config(tmp_path / "clean", ingest={"source": str(many_images)})
    ingest.run(spark, clean)
    preprocess.run(spark, clean)
    assertDataFrameEqual(table_keys(spark, config)[1], table_keys(spark, clean)[1])
    assert table_keys(spark, config)[1].count() == 200


@pytest.mark.slow  # `make test-cluster`
def test_score_losing_an_executor_mid_stage_still_scores_every_image_once(spark, tmp_path, many_images):
    from imageiq_spark.stages import train

    config = make_config(tmp_path, ingest={"source": str(many_images)}, train={"epochs": 1, "batch_size": 32})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    version = train.run(spark, config).version

    done = run_killing_one_executor(config, "score", tmp_path)

    assert done.returncode == 0, job_failure(done)
    assert "ExecutorLostFailure" in done.stderr, "a running task was lost with its executor"
    predictions = lakehouse.read_table(spark, config, "predictions")
    assertDataFrameEqual(
        predictions.select("image_id", "model_name", "model_version"),
        lakehouse.read_table(spark, config, "images").select(
            "image_id", F.lit(MODEL).alias("model_name"), F.lit(str(version)).alias("model_version")),
    )

"""One Spark session for the whole suite (local[2], UI off, few partitions); each test gets its
own lakehouse: a fresh `storage.root` under tmp_path and its own database name."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

from cluster import test_master  # noqa: E402

from imageiq_spark.core.config import Config, from_dict  # noqa: E402

TEST_SPARK_CONF = {
    # `make test-cluster` runs the suite on separate executor JVMs (IMAGEIQ_TEST_MASTER).
    "spark.master": test_master(),
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "2",
    "spark.default.parallelism": "2",
    "spark.driver.memory": "2g",
}


#: `make test-compat` runs the training tests of the Spark 3.5 line with the Petastorm reader.
TRAIN_READER = os.environ.get("IMAGEIQ_TEST_TRAIN_READER", "arrow")


def make_config(root: Path, **sections: dict) -> Config:
    """A Config with its own lakehouse under `root` and a database no other test uses."""
    data: dict = {
        "storage": {"root": str(root / "lake")},
        "catalog": {"database": f"t_{uuid.uuid4().hex[:10]}"},
        "spark_conf": dict(TEST_SPARK_CONF),
        "train": {"reader": TRAIN_READER},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (moto) on 127.0.0.1 for the session, started before Spark: S3A
    settings are static Hadoop conf, and the JVM inherits the AWS variables when it starts."""
    import s3server

    server, s3 = s3server.start()
    s3server.export_env(s3)
    yield s3
    server.stop()


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory, s3_server):
    from imageiq_spark.lake.session import get_spark, local_cluster_home

    if test_master().startswith("local-cluster"):
        os.environ["SPARK_HOME"] = str(local_cluster_home(tmp_path_factory.mktemp("spark_home")))
    config = make_config(
        tmp_path_factory.mktemp("session"), spark_conf={**TEST_SPARK_CONF, **s3_server.spark_conf}
    )
    session = get_spark(config, app_name="imageiq-tests")
    yield session
    session.stop()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)

"""Object storage for real: images and the lakehouse on S3 through s3a, against moto's S3 server on
127.0.0.1 (the `s3_server` fixture), with credentials only in the standard AWS variables."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3server
from conftest import make_config
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest

BUCKET = "imageiq-test"


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real digits per label and one file that only looks like a PNG."""
    root = tmp_path_factory.mktemp("s3_images")
    write_sample_data(root, per_class=2)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5)
    return root


@pytest.fixture(scope="module")
def s3_source(s3_server: s3server.S3Server, images_dir: Path) -> str:
    return s3server.upload_source(s3_server, images_dir, BUCKET)


def expected_images(spark, images_dir: Path, uri_prefix: str):
    """What `images` must hold: one row per good file, keyed by the SHA-256 of its bytes."""
    rows = [
        (hashlib.sha256(p.read_bytes()).hexdigest(), f"{uri_prefix}/{p.parent.name}/{p.name}",
         p.parent.name, "png", 28, 28)
        for p in sorted(images_dir.rglob("*.png"))
        if p.name != "broken.png"
    ]
    return spark.createDataFrame(
        rows, "image_id string, path string, label string, format string, width int, height int"
    )


def test_ingest_reads_images_from_s3a(spark, tmp_path, s3_server, images_dir, s3_source):
    config = make_config(tmp_path, ingest={"source": s3_source, "files_per_batch": 8})

    summary = ingest.run(spark, config)

    images = lakehouse.read_table(spark, config, "images")
    assertDataFrameEqual(
        images.select("image_id", "path", "label", "format", "width", "height"),
        expected_images(spark, images_dir, s3_source),
    )
    quarantine = lakehouse.read_table(spark, config, "quarantine").select("path", "reason")
    assert [tuple(r) for r in quarantine.collect()] == [(f"{s3_source}/3/broken.png", "truncated")]
    assert (summary.files_seen, summary.new_images) == (21, 20)


def test_lakehouse_on_s3a_holds_tables_and_checkpoints_and_reruns_add_nothing(
    spark, tmp_path, s3_server, images_dir
):
    lake = f"lake-{uuid.uuid4().hex[:8]}"
    config = make_config(tmp_path, storage={"root": f"s3a://{BUCKET}/{lake}"},
                         ingest={"source": str(images_dir)})

    ingest.run(spark, config)
    again = ingest.run(spark, config)

    assertDataFrameEqual(
        lakehouse.read_table(spark, config, "images").select(
            "image_id", "path", "label", "format", "width", "height"
        ),
        expected_images(spark, images_dir, f"file:{images_dir}"),
    )
    assert (again.files_seen, again.new_images) == (0, 0)
    keys = set(s3server.list_keys(s3_server, BUCKET, lake))
    database = config.catalog.database
    assert f"{lake}/warehouse/{database}.db/images/_delta_log/00000000000000000000.json" in keys
    assert f"{lake}/warehouse/{database}.db/quarantine/_delta_log/00000000000000000000.json" in keys
    assert any(k.startswith(f"{lake}/checkpoints/ingest/") and "/offsets/" in k for k in keys)


@pytest.mark.slow  # `make test` runs the same path end to end in tests/test_cluster.py
def test_cli_on_s3_takes_endpoint_and_keys_from_aws_environment_and_never_shows_the_keys(
    spark, tmp_path, s3_server, s3_source
):
    """A separate process with no S3 settings in its config: `session.s3a_defaults` takes the
    endpoint and region from the AWS variables and S3A's chain the keys; neither the logs nor the
    tables carry the keys."""
    lake = f"s3a://{BUCKET}/cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **s3_server.env, "IMAGEIQ_LOG_LEVEL": "DEBUG"}
    common = ["--set", f"storage.root={lake}", "--set", "catalog.database=cli_s3",
              "--set", "spark_conf.spark.master=local[2]", "--set", "spark_conf.spark.ui.enabled=false"]

    ingested = subprocess.run(
        [sys.executable, "-m", "imageiq_spark", *common, "ingest", "--source", s3_source],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    dumped = subprocess.run(
        [sys.executable, "-m", "imageiq_spark", *common, "sql", "--format", "json",
         "SELECT * FROM cli_s3.images"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )

    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert "new images:   20" in ingested.stdout
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    assert len(dumped.stdout.splitlines()) == 20
    quarantine = lakehouse.read_table(
        spark, make_config(tmp_path, storage={"root": lake}, catalog={"database": "cli_s3"}), "quarantine"
    )
    everything = "\n".join(
        [ingested.stdout, ingested.stderr, dumped.stdout, dumped.stderr, quarantine.toPandas().to_csv()]
    )
    assert s3_server.secret_key not in everything
    assert s3_server.access_key not in everything


def test_python_side_files_round_trip_through_s3_with_the_endpoint_from_the_aws_variables(s3_source):
    """Checkpoints, reports and staging folders written by Python (driver or executor) reach the
    same S3-compatible server as Spark's S3A, from AWS_ENDPOINT_URL_S3 alone."""
    from imageiq_spark.lake import storage

    folder = f"s3a://{BUCKET}/files-{uuid.uuid4().hex[:8]}/checkpoints"

    storage.write_bytes(f"{folder}/state.json", b'{"epochs_done": 3}')
    storage.write_bytes(f"{folder}/best.weights.h5", b"\x89HDF weights")
    with storage.local_copy(f"{folder}/best.weights.h5") as local:
        copied = Path(local).read_bytes()
    found = (storage.read_bytes(f"{folder}/state.json"), storage.exists(f"{folder}/best.weights.h5"),
             storage.read_bytes(f"{folder}/missing.json"))
    storage.delete_dir(folder)

    assert copied == b"\x89HDF weights"
    assert not Path(local).exists(), "the local copy lives only as long as the block"
    assert found == (b'{"epochs_done": 3}', True, None)
    assert storage.read_bytes(f"{folder}/state.json") is None

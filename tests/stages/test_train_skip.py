"""`train` is idempotent: without a change of prepared's training rows or of the training config
since the last registered version it registers nothing; `--force` trains anyway; a relabelled
image is a change."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml
from conftest import make_config
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from imageiq_spark import cli
from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core.config import to_dict
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.tracking import configure_mlflow
from imageiq_spark.stages import ingest, preprocess, train

TINY = {"epochs": 2, "batch_size": 16, "patience": 10, "shuffle_buffer": 64}


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """A prepared lake of 8 digits per class with one trained, registered version."""
    root = tmp_path_factory.mktemp("skip")
    write_sample_data(root / "src", per_class=8)
    config = make_config(root, ingest={"source": str(root / "src")}, train=TINY,
                         mlflow={"registered_model": "skip"})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    first = train.run(spark, config)
    assert isinstance(first, train.TrainSummary)
    return root, config


def versions(config) -> list[int]:
    configure_mlflow(config)
    return sorted(int(v.version) for v in MlflowClient().search_model_versions("name = 'skip'"))


def test_train_without_changes_registers_nothing_and_says_why(spark, lake):
    _, config = lake
    before = versions(config)

    skipped = train.run(spark, config)

    assert isinstance(skipped, train.TrainSkipped)
    assert versions(config) == before
    assert skipped.version == str(before[-1])
    assert skipped.lines()[0] == ("skipped:            neither prepared's labelled train/val rows nor the "
                                  f"training config changed since skip version {before[-1]}")


@pytest.mark.slow
def test_force_trains_anyway_and_the_run_is_recorded(spark, lake, tmp_path, capsys):
    _, config = lake
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    before = versions(config)

    assert cli.main(["--conf", str(conf), "train", "--force"]) == 0

    assert versions(config) == [*before, before[-1] + 1]
    assert f"registered version: {before[-1] + 1}" in capsys.readouterr().out
    last = (lakehouse.read_table(spark, config, "job_runs").where("stage = 'train'")
            .orderBy(F.col("started_at").desc()).first())
    assert (last.status, last.model_version) == ("succeeded", str(before[-1] + 1))


@pytest.mark.slow
def test_a_relabelled_image_or_a_changed_train_config_trains_again(spark, lake):
    root, config = lake
    # A training image of digit 3 now filed under 8.
    training = lakehouse.read_table(spark, config, "prepared").where("label = '3' AND split = 'train'")
    path = (lakehouse.read_table(spark, config, "images").join(training.select("image_id"), "image_id")
            .orderBy("path").first().path)
    shutil.move(path.removeprefix("file:"), root / "src" / "8" / "moved.png")
    assert ingest.run(spark, config).relabelled == 1
    before = versions(config)

    relabelled = train.run(spark, config)
    changed = train.run(spark, config.with_overrides({"train.learning_rate": 0.002}))

    assert isinstance(relabelled, train.TrainSummary) and isinstance(changed, train.TrainSummary)
    assert versions(config) == [*before, before[-1] + 1, before[-1] + 2]
    assert isinstance(train.run(spark, config.with_overrides({"train.learning_rate": 0.002})),
                      train.TrainSkipped)


def test_a_second_train_on_the_same_data_waits_for_the_lease_then_exits_1_naming_the_holder(
        spark, lake, tmp_path, capsys):
    from imageiq_spark.lake import lease

    _, config = lake
    waiting = config.with_overrides({"train.lease_wait_s": 1})
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(waiting)))
    folder = train.checkpoint_dir(config, train.prepared_version(spark, config))
    before = versions(config)
    first = lease.acquire(f"{folder}.lease", "train", wait_s=0)  # a first train, still running
    try:
        started = time.monotonic()
        code = cli.main(["--conf", str(conf), "train"])
        waited = time.monotonic() - started
    finally:
        first.release()

    err = capsys.readouterr().err
    assert code == 1
    assert f"imageiq: train failed: LeaseHeld: train: {folder}.lease is held by train (host " in err
    assert f"lease {first.lease_id}, since " in err
    assert waited >= 1
    assert versions(config) == before
    # Once the first is done (here: gave the lease back), the second finds its data registered.
    assert isinstance(train.run(spark, waiting), train.TrainSkipped)

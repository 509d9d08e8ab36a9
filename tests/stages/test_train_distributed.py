"""Two MultiWorkerMirroredStrategy workers as Spark barrier tasks on local[2] (CPU)."""

from __future__ import annotations

import json

import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.lake.tracking import configure_mlflow
from imageiq_spark.stages import ingest, preprocess, train


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_two_barrier_workers_train_in_lockstep_and_register_a_model(spark, tmp_path):
    write_sample_data(tmp_path / "src", per_class=12)
    config = make_config(
        tmp_path, ingest={"source": str(tmp_path / "src")},
        train={"epochs": 2, "batch_size": 8, "distributed": {"workers": 2}},
    )
    ingest.run(spark, config)
    preprocess.run(spark, config)

    summary = train.run(spark, config)

    configure_mlflow(config)
    params = MlflowClient().get_run(summary.run_id).data.params
    steps = json.loads(params["optimizer_steps_per_worker"])
    weights = json.loads(params["weights_sha256_per_worker"])
    # Each rank ran every step of every epoch: all train rows once per epoch across both ranks.
    assert steps == [2 * -(-summary.train_rows // 16)] * 2
    # Gradients are all-reduced: both ranks end with bit-identical weights.
    assert weights[0] == weights[1]
    assert summary.workers == 2
    assert summary.epochs_run == 2
    assert summary.alias == "champion"

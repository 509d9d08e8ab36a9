"""Training on the real pipeline: sample digits -> ingest -> preprocess -> train -> MLflow registry."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import tf_keras as keras
from conftest import TRAIN_READER, make_config
from delta.tables import DeltaTable
from mlflow.tracking import MlflowClient

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core.config import flatten, to_dict
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.tracking import configure_mlflow, tracking_uri
from imageiq_spark.ml import readers, training
from imageiq_spark.ml.classifier import load_classifier
from imageiq_spark.stages import ingest, preprocess, train

FAST = {"epochs": 6, "batch_size": 16, "patience": 10, "shuffle_buffer": 256}


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """One prepared lakehouse of 20 digits per class shared by this module's tests."""
    root = tmp_path_factory.mktemp("train")
    write_sample_data(root / "src", per_class=20)
    config = make_config(root, ingest={"source": str(root / "src")}, train=FAST,
                         mlflow={"registered_model": "digits"})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    return root, config


@pytest.fixture(scope="module")
def champion(spark, lake):
    _, config = lake
    return train.run(spark, config)


def test_first_model_takes_champion_and_run_traces_to_its_data(spark, lake, champion):
    _, config = lake
    configure_mlflow(config)
    client = MlflowClient()
    run = client.get_run(champion.run_id)
    delta_version = DeltaTable.forPath(spark, lakehouse.table_location(config, "prepared")) \
        .history(1).first()["version"]

    assert champion.alias == "champion"
    assert str(client.get_model_version_by_alias("digits", "champion").version) == champion.version
    assert run.data.tags["prepared_delta_version"] == str(delta_version)
    assert run.data.tags["preprocess_version"] == preprocess.current_version(config)
    # The whole resolved config, every key, as params.
    assert set(flatten(to_dict(config))) <= set(run.data.params)
    assert run.data.params["train.epochs"] == "6"
    assert run.data.params["train.reader"] == TRAIN_READER
    assert "training_curves.png" in {a.path for a in client.list_artifacts(champion.run_id)}
    losses = client.get_metric_history(champion.run_id, "loss")
    assert [m.step for m in losses] == list(range(champion.epochs_run))
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(champion.val_accuracy)
    aliases = lakehouse.read_table(spark, config, "model_aliases").collect()
    assert [(r.model_name, r.alias, r.model_version) for r in aliases] == [
        ("digits", "champion", champion.version)
    ]


FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
paths = json.loads(sys.argv[2])
model = mlflow.pyfunc.load_model("models:/digits@champion")
out = model.predict(pd.DataFrame({"content": [open(p, "rb").read() for p in paths]}),
                    params={"top_k": 3})
print(json.dumps({"label": list(out["label"]), "confidence": list(out["confidence"]),
                  "top_k": list(out["top_k"])}))
"""


def test_champion_in_a_fresh_process_predicts_raw_bytes_like_the_in_process_model(lake, champion):
    root, config = lake
    paths = sorted(str(p) for p in (root / "src").rglob("*.png"))[::20]
    tracking = tracking_uri(config)
    in_process = load_classifier(f"runs:/{champion.run_id}/model")
    probabilities, failures = in_process.predict_bytes([Path(p).read_bytes() for p in paths])
    expected = in_process.top_k(probabilities, 3)

    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, tracking, json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, check=True)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])

    assert failures == {}
    assert fresh["label"] == [top[0][0] for top in expected]
    np.testing.assert_allclose(fresh["confidence"], [top[0][1] for top in expected], rtol=1e-6)
    assert [[t["label"] for t in row] for row in fresh["top_k"]] == \
        [[label for label, _ in top] for top in expected]


def test_the_elapsed_line_paces_the_images_of_the_epochs_and_shows_registration_apart(champion):
    watch = champion.watch
    assert watch.started <= watch.working <= watch.finished <= watch.stopped
    (line,) = [line for line in champion.lines() if line.startswith("elapsed:")]
    assert " s before the first image, then " in line and line.endswith(" s after the last")


def test_worse_model_does_not_take_champion(spark, lake, champion):
    _, config = lake
    worse = config.with_overrides({"train.epochs": 1, "train.learning_rate": 1e-7})

    summary = train.run(spark, worse)

    client = MlflowClient()
    assert summary.val_accuracy < champion.val_accuracy
    assert summary.alias == "challenger"
    assert str(client.get_model_version_by_alias("digits", "champion").version) == champion.version
    assert str(client.get_model_version_by_alias("digits", "challenger").version) == summary.version
    rows = lakehouse.read_table(spark, config, "model_aliases").collect()
    aliases = {r.alias: r.model_version for r in rows}
    assert aliases == {"champion": champion.version, "challenger": summary.version}
    decisions = {r.split: r for r in lakehouse.read_table(spark, config, "champion_decisions")
                 .where(f"candidate_version = '{summary.version}'").collect()}
    assert sorted(decisions) == ["test", "val"]
    val = decisions["val"]
    assert (val.decision, val.champion_version) == ("rejected", champion.version)
    assert val.candidate_accuracy == pytest.approx(summary.val_accuracy)
    assert val.champion_accuracy == pytest.approx(summary.champion_val_accuracy)
    assert client.get_run(summary.run_id).data.tags["gate_decision"] == "rejected"


def _rows(source: readers.SplitSource) -> list[tuple[int, bytes]]:
    rows = []
    with contextlib.ExitStack() as stack:
        for images, labels in source.open(stack, 7).as_numpy_iterator():
            rows += [(int(label), image.tobytes()) for image, label in zip(images, labels)]
    return sorted(rows)


def test_arrow_and_petastorm_readers_give_the_same_rows_as_the_table(spark, lake):
    pytest.importorskip("petastorm", reason="the [petastorm] extra is not installed (make test-compat-3.5)")
    _, config = lake
    split = preprocess.read_prepared(spark, config, splits=["train"])
    expected = sorted((r.label_index, bytes(r.tensor)) for r in split.collect())
    shape = (32, 32, 3)
    sources = [readers.materialize(split, config, kind, shape) for kind in ("petastorm", "arrow")]
    try:
        petastorm_rows, arrow_rows = (_rows(s) for s in sources)
    finally:
        for source in sources:
            readers.release(source)

    assert len(expected) > 100
    assert petastorm_rows == expected
    assert arrow_rows == expected


class CrashAfter(keras.callbacks.Callback):
    """A real crash in the middle of training: the process dies after `epochs` epochs."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.epochs:
            raise RuntimeError("simulated crash")


def test_crashed_run_resumes_from_its_checkpoint_in_the_same_run(spark, lake):
    _, config = lake
    config = config.with_overrides({"train.epochs": 4, "train.reader": "arrow",
                                    "mlflow.registered_model": "resumed"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(spark, config, callbacks=[CrashAfter(2)])
    client = MlflowClient()
    crashed = client.search_runs(
        [client.get_experiment_by_name(config.mlflow.experiment).experiment_id],
        filter_string="params.`mlflow.registered_model` = 'resumed'",
    )
    assert [r.info.status for r in crashed] == ["FAILED"]

    summary = train.run(spark, config)

    assert summary.resumed_from == 2
    assert summary.epochs_run == 4
    assert summary.run_id == crashed[0].info.run_id
    assert [m.step for m in client.get_metric_history(summary.run_id, "loss")] == [0, 1, 2, 3]
    assert client.get_run(summary.run_id).info.status == "FINISHED"


@pytest.mark.slow  # a training driver of its own, killed, then the run resumed; `make test-all`
def test_training_killed_with_sigkill_resumes_its_mlflow_run_and_finishes_it(spark, lake, tmp_path):
    from cli_process import kill_when, start_cli, write_conf

    _, config = lake
    config = config.with_overrides({"train.epochs": 4, "train.reader": "arrow",
                                    "mlflow.registered_model": "killed"})
    checkpoint = Path(urlparse(train.checkpoint_dir(config, train.prepared_version(spark, config))).path)
    driver = start_cli(write_conf(config, tmp_path / "conf.yaml"), "train", cwd=tmp_path)

    def epochs_done() -> int:
        state = training.TrainState.load(str(checkpoint))
        return state.epochs_done if state else 0

    kill_when(driver, lambda: epochs_done() >= 1, timeout=900)
    killed_after = epochs_done()
    configure_mlflow(config)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.mlflow.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string="params.`mlflow.registered_model` = 'killed'")

    summary = train.run(spark, config)

    assert driver.returncode == -signal.SIGKILL and 1 <= killed_after < 4
    assert [r.info.status for r in runs] == ["RUNNING"]  # what a SIGKILL leaves behind
    assert (summary.run_id, summary.resumed_from) == (runs[0].info.run_id, killed_after)
    assert summary.epochs_run == 4
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    assert client.search_runs([experiment], filter_string="params.`mlflow.registered_model` = 'killed' "
                                                          "and attributes.status = 'RUNNING'") == []


@pytest.mark.slow  # MobileNetV2 on CPU; `make test-all`
def test_mobilenet_v2_without_pretrained_weights_trains_a_few_steps_and_scores(spark, lake):
    from imageiq_spark.stages import score

    _, config = lake
    config = config.with_overrides({"train.model": "mobilenet_v2", "train.weights": "none",
                                    "train.epochs": 1, "preprocess.size": [32, 32],
                                    "mlflow.registered_model": "mobile"})
    preprocess.run(spark, config)

    trained = train.run(spark, config)
    scored = score.run(spark, config, f"models:/mobile/{trained.version}")

    classifier = load_classifier(f"models:/mobile/{trained.version}")
    assert classifier.model.count_params() > 2_000_000  # MobileNetV2's 2.2M; the small CNN has far fewer
    assert classifier.model.input_shape[1:] == (32, 32, 3)
    assert trained.epochs_run == 1 and trained.train_rows > 0
    images = lakehouse.read_table(spark, config, "images").count()
    assert (scored.candidates, scored.inserted, scored.failed) == (images, images, 0)


def _accuracy_on_current_val(spark, config, model_uri: str) -> float:
    """The model's accuracy on the val images of `prepared` now, from their raw bytes."""
    rows = (preprocess.read_prepared(spark, config, splits=["val"]).select("image_id", "label")
            .join(lakehouse.read_table(spark, config, "images").select("image_id", "content"), "image_id")
            .collect())
    classifier = load_classifier(model_uri)
    probabilities, _ = classifier.predict_bytes([bytes(r.content) for r in rows])
    predicted = [classifier.labels[i] for i in probabilities.argmax(axis=1)]
    return float(np.mean([p == r.label for p, r in zip(predicted, rows)]))


@pytest.mark.slow
def test_the_gate_scores_the_champion_on_the_new_val_images_not_its_old_figure(spark, lake, champion):
    root, config = lake
    recorded = MlflowClient().get_run(champion.run_id).data.metrics["best_val_accuracy"]
    write_sample_data(root / "src", per_class=35)  # 15 new digits per class: a larger val split
    ingest.run(spark, config)
    preprocess.run(spark, config)
    current = _accuracy_on_current_val(spark, config, f"models:/digits/{champion.version}")
    assert current != pytest.approx(recorded)  # the old figure is stale on the new val split

    summary = train.run(spark, config.with_overrides({"train.epochs": 2}))

    assert summary.champion_val_accuracy == pytest.approx(current)


def test_training_logs_one_progress_line_per_epoch(caplog):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((8, 2), "float32"), np.zeros(8, "int32")

    with caplog.at_level("INFO", logger="imageiq_spark.ml.training"):
        model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[training.EpochProgress(2)])

    lines = [r.getMessage() for r in caplog.records if r.name == "imageiq_spark.ml.training"]
    assert [line.split(":")[1] for line in lines] == [" epoch 1/2", " epoch 2/2"]
    assert all("loss " in line and "val_accuracy " in line and line.endswith(" s)") for line in lines)

"""Evaluate on the real pipeline: sample digits -> ingest -> preprocess -> train -> evaluate."""

from __future__ import annotations

import math
from pathlib import Path
from tempfile import TemporaryDirectory
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient
from pyspark.sql import functions as F

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.lake import lakehouse, stage_state
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.ml import metrics
from imageiq_spark.ml.classifier import load_classifier, log_classifier
from imageiq_spark.stages import evaluate, ingest, preprocess, train


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    """20 digits per class, a model trained 3 epochs, evaluated on the test split."""
    root = tmp_path_factory.mktemp("evaluate")
    write_sample_data(root / "src", per_class=20)
    config = make_config(root, ingest={"source": str(root / "src")},
                         train={"epochs": 3, "batch_size": 16},
                         mlflow={"registered_model": "digits"})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    train.run(spark, config)
    return config, evaluate.run(spark, config)


def expected_report(spark, config) -> tuple[metrics.Report, list[str]]:
    """The same metrics computed here, from the champion and the test split, independently."""
    classifier = load_classifier("models:/digits/1")
    rows = preprocess.read_prepared(spark, config, classifier.spec.version, ["test"]).collect()
    shape = classifier.model.input_shape[1:]
    x = np.stack([np.frombuffer(r.tensor, np.uint8).reshape(shape) for r in rows])
    y = np.array([classifier.labels.index(r.label) for r in rows])
    return metrics.evaluate(y, classifier.predict_tensors(x), classifier.labels), [r.image_id for r in rows]


def test_evaluations_table_holds_the_metrics_of_the_test_split(spark, evaluated):
    config, summary = evaluated
    report, _ = expected_report(spark, config)
    table = {(r.metric, r["class"]): r.value for r in
             lakehouse.read_table(spark, config, "evaluations").collect()}
    assert {(r.model_name, r.model_version, r.split) for r in
            lakehouse.read_table(spark, config, "evaluations").collect()} == {("digits", "1", "test")}
    assert report.count == summary.report.count > 0
    assert table[("accuracy", None)] == pytest.approx(report.accuracy)
    assert table[("f1_macro", None)] == pytest.approx(report.macro["f1"])
    assert table[("expected_calibration_error", None)] == pytest.approx(report.ece, abs=1e-6)
    for i, label in enumerate(report.labels):
        assert table[("recall", label)] == pytest.approx(report.per_class.recall[i])
        assert table[("support", label)] == report.per_class.support[i]
    assert len(table) == len(report.rows())


def test_evaluations_have_their_declared_column_types_and_nullability(spark, evaluated):
    config, _ = evaluated
    assert lakehouse.read_table(spark, config, "evaluations").schema == evaluate.EVALUATIONS_SCHEMA


def copied(spark, config, suffix: str):
    """A copy of the lake's `prepared` and of the champion, so the shared lake and run stay as they are."""
    copy = config.with_overrides({"catalog.database": f"{config.catalog.database}_{suffix}",
                                  "mlflow.registered_model": f"digits_{suffix}"})
    preprocess.read_prepared(spark, config).write.format("delta").save(
        lakehouse.table_location(copy, "prepared"))
    with mlflow.start_run(), TemporaryDirectory() as staging:
        log_classifier(load_classifier("models:/digits/1"), staging, registered_model_name=f"digits_{suffix}")
    return copy


def remove_one_test_image(spark, copy) -> str:
    """Delete one test image of the most frequent label from `prepared`; returns that label."""
    test = preprocess.read_prepared(spark, copy, splits=["test"]).groupBy("label").count()
    label = test.orderBy(F.desc("count"), "label").first()["label"]
    gone = preprocess.read_prepared(spark, copy, splits=["test"]).where(F.col("label") == label).first()
    spark.sql(f"DELETE FROM delta.`{lakehouse.table_location(copy, 'prepared')}` "
              f"WHERE image_id = '{gone.image_id}'")
    return label


def test_evaluating_again_replaces_each_value_and_its_time(spark, evaluated):
    config, _ = evaluated
    copy = copied(spark, config, "again")

    def evaluations() -> dict:
        rows = lakehouse.read_table(spark, copy, "evaluations").collect()
        assert len({(r.metric, r["class"]) for r in rows}) == len(rows)
        return {(r.metric, r["class"]): (r.value, r.evaluated_at) for r in rows}

    evaluate.run(spark, copy, "models:/digits_again/1")
    before = evaluations()
    label = remove_one_test_image(spark, copy)

    again = evaluate.run(spark, copy, "models:/digits_again/1")

    after = evaluations()
    assert after.keys() == before.keys()
    assert all(after[key][1] > before[key][1] for key in after)
    assert after[("support", label)][0] == before[("support", label)][0] - 1
    expected = {(metric, cls): value for metric, cls, value in again.report.rows()}
    for key, (value, _) in after.items():
        assert value == (None if math.isnan(expected[key]) else pytest.approx(expected[key]))


def test_a_rerun_with_nothing_new_reuses_the_evaluation_and_changed_data_is_evaluated_again(spark, evaluated):
    config, _ = evaluated
    copy = copied(spark, config, "rerun")
    model = "models:/digits_rerun/1"
    run_id = MlflowClient().get_model_version("digits_rerun", "1").run_id
    first = evaluate.run(spark, copy, model)
    versions = stage_state.table_versions(spark, copy, ["evaluations", "prepared"])

    again = evaluate.run(spark, copy, model)

    assert stage_state.table_versions(spark, copy, ["evaluations", "prepared"]) == versions
    assert len(MlflowClient().get_metric_history(run_id, "test_accuracy")) == 1
    assert first.reused is None and again.reused is not None and again.report is None
    assert again.counts() == RunCounts(read=0, model_name="digits_rerun", model_version="1")
    assert again.metrics == pytest.approx(first.metrics, nan_ok=True)
    assert again.report_uri == first.report_uri and again.leakage == first.leakage
    reported = [line for line in again.lines() if not line.startswith(("evaluated", "elapsed"))]
    assert reported == [line for line in first.lines() if not line.startswith("elapsed")]
    assert any(line.startswith("evaluated") for line in again.lines())

    remove_one_test_image(spark, copy)
    changed = evaluate.run(spark, copy, model)

    assert changed.reused is None and changed.count == first.count - 1
    assert len(MlflowClient().get_metric_history(run_id, "test_accuracy")) == 2


def test_the_elapsed_line_paces_the_split_and_shows_the_pictures_and_logging_after_apart(evaluated):
    _, summary = evaluated
    watch = summary.watch
    assert watch.started <= watch.working <= watch.finished <= watch.stopped
    (line,) = [line for line in summary.lines() if line.startswith("elapsed:")]
    assert " s before the first image, then " in line and line.endswith(" s after the last")


def test_metrics_and_pictures_are_logged_to_the_models_run(evaluated):
    config, summary = evaluated
    client = MlflowClient()
    run_id = client.get_model_version("digits", "1").run_id
    logged = client.get_run(run_id).data.metrics
    assert logged["test_accuracy"] == pytest.approx(summary.report.accuracy)
    assert logged["test_roc_auc_ovr_macro"] == pytest.approx(summary.report.roc_auc_macro)
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation/test")}
    assert {"confusion_matrix.png", "reliability_diagram.png", "confident_mistakes.png",
            "report.md"} <= names


def test_markdown_report_is_written_under_storage_root(evaluated):
    config, summary = evaluated
    path = Path(urlparse(summary.report_uri).path)
    assert path.is_relative_to(Path(config.storage.root).resolve())
    text = path.read_text()
    assert f"| accuracy | {summary.report.accuracy:.4f} |" in text
    assert (path.parent / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("test accuracy:") for line in summary.lines())

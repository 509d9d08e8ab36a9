"""Score: images without a prediction from a model version -> predictions, and the SQL views.

Real images ingested from PNG files, real models logged to and served from the MLflow registry
(random weights: what is tested is where predictions go, not how good they are)."""

from __future__ import annotations

import datetime
import os
import uuid

import cv2
import numpy as np
import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from reference import DirectoryLoader
from registered import LABELS, register

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core import faults
from imageiq_spark.lake import lakehouse, tracking
from imageiq_spark.ml import inference
from imageiq_spark.ml.classifier import ImageClassifier, load_classifier
from imageiq_spark.ml.models import ModelSpec, build_model
from imageiq_spark.stages import ingest, score
from imageiq_spark.vision.spec import TransformSpec

HELD_BACK = 4  # images left out of `images` at first, to arrive later as "new" images


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory):
    """One lakehouse root: 20 real digit PNGs ingested into `images`, plus one corrupt image."""
    root = tmp_path_factory.mktemp("score")
    source = root / "source"
    digits, labels = load_digits()
    for i in range(20):
        folder = source / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.png"), digits[i])
    config = make_config(root, ingest={"source": str(source)})
    ingest.run(spark, config)
    # An image whose header passed ingest's probe but whose pixels cannot be decoded.
    png = cv2.imencode(".png", digits[0])[1].tobytes()
    broken = (lakehouse.read_table(spark, config, "images").limit(1)
              .withColumn("image_id", F.lit("0" * 64))
              .withColumn("path", F.lit(f"file:{source}/broken/corrupt.png"))
              .withColumn("content", F.lit(png[:40] + bytes(len(png) - 40))))
    lakehouse.merge_new_rows(config, "images", broken, ["image_id"])
    return root, config


def new_lake(spark, base):
    """A fresh database over the shared root, its own registered model (v1 champion), and all
    but HELD_BACK of the base images."""
    root, base_config = base
    config = make_config(root, mlflow={"registered_model": f"m_{uuid.uuid4().hex[:8]}"})
    images = lakehouse.read_table(spark, base_config, "images").orderBy("image_id")
    lakehouse.ensure_table(spark, config, "images", ingest.IMAGES_SCHEMA)
    lakehouse.merge_new_rows(config, "images", images.limit(21 - HELD_BACK), ["image_id"])
    register(spark, config, seed=1)
    return config


@pytest.fixture
def lake(spark, base):
    return new_lake(spark, base)


@pytest.fixture(scope="module")
def scored(spark, base):
    """A lake scored twice by its champion: (config, first summary, rows after it, second summary)."""
    config = new_lake(spark, base)
    first = score.run(spark, config)
    rows = predictions(spark, config).collect()
    second = score.run(spark, config)
    return config, first, rows, second


def predictions(spark, config):
    return lakehouse.read_table(spark, config, "predictions")


def test_every_image_gets_the_champions_prediction(spark, scored):
    lake, summary, rows, _ = scored

    stored = lakehouse.read_table(spark, lake, "images").collect()
    images = {r.image_id: bytes(r.content) for r in stored}
    known_labels = {r.image_id: r.label for r in stored}
    classifier = load_classifier(f"models:/{lake.mlflow.registered_model}/1")
    probs, failed = classifier.predict_bytes(list(images.values()))
    expected = {image_id: probs[i] for i, image_id in enumerate(images) if i not in failed}
    assert len(failed) == 1 and summary.failed == 1
    assert summary.inserted == len(rows) == len(expected) == 16
    run_id = MlflowClient().get_model_version(lake.mlflow.registered_model, "1").run_id
    for row in rows:
        p = expected[row.image_id]
        order = np.argsort(-p, kind="stable")[:3]
        assert row.predicted_label == LABELS[order[0]]
        assert row.confidence == pytest.approx(float(p[order[0]]), rel=1e-5)
        assert [t.label for t in row.top_k] == [LABELS[i] for i in order]
        assert [t.probability for t in row.top_k] == pytest.approx(p[order].tolist(), rel=1e-5)
        assert (row.model_name, row.model_version, row.run_id) == (lake.mlflow.registered_model, "1",
                                                                    run_id)
        assert row.score_date == row.scored_at.date()
        assert row.label == known_labels[row.image_id]  # the image's label, for accuracy without a join
    assert None not in {row.label for row in rows}


def test_undecodable_image_goes_to_quarantine_once(spark, scored):
    lake, first, _, second = scored
    assert (first.failed, second.failed) == (1, 1)  # retried each run, recorded once
    quarantined = lakehouse.read_table(spark, lake, "quarantine").collect()
    assert [(r.stage, r.reason, r.path.endswith("corrupt.png")) for r in quarantined] == [
        ("score", "decode_failed", True)
    ]


def test_predictions_have_their_declared_column_types_and_nullability(spark, scored):
    lake, *_ = scored
    assert predictions(spark, lake).schema == score.PREDICTIONS_SCHEMA


def test_scoring_twice_adds_no_rows(spark, scored):
    lake, first, before, second = scored
    assert (first.inserted, second.inserted) == (16, 0)
    assertDataFrameEqual(predictions(spark, lake), before)


def test_new_images_are_scored_alone(spark, lake, base):
    score.run(spark, lake)
    before = predictions(spark, lake).collect()
    everything = lakehouse.read_table(spark, base[1], "images")
    lakehouse.merge_new_rows(lake, "images", everything, ["image_id"])

    summary = score.run(spark, lake)

    # The corrupt image is tried again (and quarantined again: no new row there).
    assert (summary.candidates, summary.inserted, summary.failed) == (HELD_BACK + 1, HELD_BACK, 1)
    after = predictions(spark, lake)
    assertDataFrameEqual(after.join(F.broadcast(spark.createDataFrame(before).select("image_id")),
                                    "image_id", "left_semi"), before)
    assert after.count() == 16 + HELD_BACK


def test_a_new_champion_scores_everything_and_old_rows_stay(spark, lake):
    score.run(spark, lake)
    old = predictions(spark, lake).collect()

    register(spark, lake, seed=2)
    summary = score.run(spark, lake)

    assert (summary.model_version, summary.inserted) == ("2", 16)
    counts = {r.model_version: r["count"] for r in predictions(spark, lake).groupBy("model_version")
              .count().collect()}
    assert counts == {"1": 16, "2": 16}
    assertDataFrameEqual(predictions(spark, lake).where("model_version = '1'"), old)
    latest = spark.table(f"{lake.catalog.database}.latest_predictions")
    assert {r.model_version for r in latest.collect()} == {"2"}


def test_an_explicit_model_uri_scores_under_that_version(spark, lake):
    register(spark, lake, seed=3, alias=None)  # version 2, not the champion

    summary = score.run(spark, lake, model_uri=f"models:/{lake.mlflow.registered_model}/2")

    assert (summary.model_version, summary.inserted) == ("2", 16)
    assert {r.model_version for r in predictions(spark, lake).collect()} == {"2"}


@pytest.mark.slow  # two more Spark drivers; `make test` runs the paused two-driver test above
def test_two_driver_processes_leave_one_row_per_image_and_version(spark, lake, tmp_path):
    from cli_process import start_cli, write_conf

    conf = write_conf(lake, tmp_path / "conf.yaml")

    drivers = [start_cli(conf, "score", cwd=tmp_path) for _ in range(2)]
    outputs = [driver.communicate(timeout=900) for driver in drivers]

    assert [d.returncode for d in drivers] == [0, 0], [err[-3000:] for _, err in outputs]
    runs = lakehouse.read_table(spark, lake, "job_runs").where("stage = 'score'").collect()
    assert sorted(r.rows_written for r in runs) == [0, 16]
    keys = predictions(spark, lake).groupBy(*score.PREDICTION_KEYS).count()
    assert keys.count() == 16
    assert keys.where("count > 1").count() == 0


def test_two_drivers_with_a_commit_in_between_leave_one_row_per_image_and_version(spark, lake, tmp_path):
    """Driver B (a CLI process) stages its predictions and stops before its MERGE; driver A (this
    process) scores the same images and commits, then a maintain-like OPTIMIZE rewrites the table;
    B's MERGE then adds nothing."""
    import paused_driver
    from cli_process import write_conf

    ready, go = tmp_path / "ready", tmp_path / "go"
    other = paused_driver.start(write_conf(lake, tmp_path / "conf.yaml"), "score",
                                "imageiq_spark.lake.lakehouse:merge_new_rows", "predictions", ready, go,
                                cwd=tmp_path)
    paused_driver.wait_for(ready, other)

    summary = score.run(spark, lake)
    spark.sql(f"OPTIMIZE delta.`{lakehouse.table_location(lake, 'predictions')}`")
    go.touch()
    _, err = other.communicate(timeout=900)

    assert other.returncode == 0, err[-3000:]
    images = lakehouse.read_table(spark, lake, "images").collect()
    good = sorted(r.image_id for r in images if r.image_id != "0" * 64)  # all but the corrupt one
    model = lake.mlflow.registered_model
    assertDataFrameEqual(predictions(spark, lake).select(*score.PREDICTION_KEYS),
                         [Row(image_id=i, model_name=model, model_version="1") for i in good])
    assert summary.inserted == len(good) == 16
    runs = lakehouse.read_table(spark, lake, "job_runs").where("stage = 'score'").collect()
    assert [(r.status, r.rows_written) for r in runs] == [("succeeded", 0)]
    quarantined = lakehouse.read_table(spark, lake, "quarantine").where("stage = 'score'").select("image_id")
    assert [r.image_id for r in quarantined.collect()] == ["0" * 64]


@pytest.mark.slow  # worker restarts and model loads while it bisects; `make test` has preprocess's
def test_an_image_that_kills_the_python_worker_is_quarantined_and_scoring_goes_on(spark, lake, monkeypatch):
    ids = sorted(r.image_id for r in lakehouse.read_table(spark, lake, "images").collect())
    victim = ids[len(ids) // 2]
    monkeypatch.setenv(faults.INJECT_FAULT, f"score:{victim}")

    summary = score.run(spark, lake)

    keys = predictions(spark, lake).groupBy("image_id").count().collect()
    assert sorted(r.image_id for r in keys) == [i for i in ids if i not in (victim, "0" * 64)]
    assert {r["count"] for r in keys} == {1}
    quarantine = lakehouse.read_table(spark, lake, "quarantine").where("stage = 'score'")
    model = f"{lake.mlflow.registered_model}/1"
    assert sorted(tuple(r) for r in quarantine.select("image_id", "reason", "version").collect()) == [
        ("0" * 64, "decode_failed", model), (victim, "worker_crash", model)
    ]
    assert (summary.candidates, summary.inserted, summary.failed) == (len(ids), len(ids) - 2, 2)


# --- the views, over small hand-made tables ---------------------------------------------------


def _prediction(image_id: str, label: str, confidence: float, version: str, day: int) -> Row:
    scored_at = datetime.datetime(2026, 11, day, 12, 0)
    return Row(image_id=image_id, predicted_label=label, confidence=confidence,
               top_k=[Row(label=label, probability=confidence)], model_name="m", model_version=version,
               run_id=f"run{version}", scored_at=scored_at, score_date=scored_at.date(), label=None)


@pytest.fixture
def view_lake(spark, config):
    rows = [
        _prediction("a", "cat", 0.9, "1", 1),
        _prediction("b", "dog", 0.5, "1", 1),
        _prediction("c", "cat", 0.7, "1", 2),
        _prediction("a", "cat", 0.95, "2", 2),
        _prediction("b", "cat", 0.55, "2", 2),
    ]
    lakehouse.ensure_table(spark, config, "predictions", score.PREDICTIONS_SCHEMA)
    lakehouse.merge_new_rows(config, "predictions", spark.createDataFrame(rows, score.PREDICTIONS_SCHEMA),
                             score.PREDICTION_KEYS)
    lakehouse.ensure_table(spark, config, "model_aliases", tracking.MODEL_ALIASES_SCHEMA)
    aliases = spark.createDataFrame(
        [("m", "champion", "2", datetime.datetime(2026, 11, 2)),
         ("m", "challenger", "1", datetime.datetime(2026, 11, 2))],
        tracking.MODEL_ALIASES_SCHEMA)
    lakehouse.merge_new_rows(config, "model_aliases", aliases, ["model_name", "alias"])
    lakehouse.ensure_table(spark, config, "images", ingest.IMAGES_SCHEMA)
    images = spark.createDataFrame(
        [(i, f"file:/x/{i}.png", None, "png", 1, 1, 1, 8, 1, 1, None, b"", datetime.datetime(2026, 11, 1))
         for i in ("a", "b", "c")], ingest.IMAGES_SCHEMA)
    lakehouse.merge_new_rows(config, "images", images, ["image_id"])
    lakehouse.register_tables(spark, config)
    return config


def test_latest_predictions_holds_the_champions_row_per_image(spark, view_lake):
    latest = spark.sql(f"SELECT image_id, predicted_label, model_version "
                       f"FROM {view_lake.catalog.database}.latest_predictions")
    assertDataFrameEqual(latest, [Row(image_id="a", predicted_label="cat", model_version="2"),
                                  Row(image_id="b", predicted_label="cat", model_version="2")])


def test_daily_label_counts_count_per_day_model_and_label(spark, view_lake):
    counts = spark.sql(f"SELECT * FROM {view_lake.catalog.database}.daily_label_counts")
    day = datetime.date
    assertDataFrameEqual(counts, [
        Row(score_date=day(2026, 11, 1), model_name="m", model_version="1", predicted_label="cat",
            images=1, mean_confidence=0.9),
        Row(score_date=day(2026, 11, 1), model_name="m", model_version="1", predicted_label="dog",
            images=1, mean_confidence=0.5),
        Row(score_date=day(2026, 11, 2), model_name="m", model_version="1", predicted_label="cat",
            images=1, mean_confidence=0.7),
        Row(score_date=day(2026, 11, 2), model_name="m", model_version="2", predicted_label="cat",
            images=2, mean_confidence=0.75),
    ])


def test_review_queue_holds_predictions_under_the_threshold(spark, view_lake):
    queue = spark.sql(f"SELECT image_id, path, confidence, model_version "
                      f"FROM {view_lake.catalog.database}.review_queue")
    assertDataFrameEqual(queue, [Row(image_id="b", path="file:/x/b.png", confidence=0.5, model_version="1"),
                                 Row(image_id="b", path="file:/x/b.png", confidence=0.55, model_version="2")])


def test_review_threshold_comes_from_the_config(spark, view_lake):
    stricter = view_lake.with_overrides({"score.review_threshold": 0.8})
    lakehouse.register_tables(spark, stricter)
    queue = spark.sql(f"SELECT image_id, model_version FROM {stricter.catalog.database}.review_queue")
    assertDataFrameEqual(queue, [Row(image_id="b", model_version="1"), Row(image_id="c", model_version="1"),
                                 Row(image_id="b", model_version="2")])


def test_worker_cache_serves_a_new_key_with_a_new_model(tmp_path):
    """A changed model (new key) is loaded afresh; the same key is served from the cache."""
    loads: list[str] = []

    class Recorded(DirectoryLoader):
        def __call__(self):
            loads.append(self.key)
            return super().__call__()

    model = build_model(ModelSpec("small_cnn", 32, 32, 3, 10, (0.0,) * 3, (1.0,) * 3))
    ImageClassifier(model, LABELS, TransformSpec(size=(32, 32))).save(tmp_path / "m")
    first = inference.cached_model(Recorded(str(tmp_path / "m"), key="k1"), os.cpu_count() or 1)
    again = inference.cached_model(Recorded(str(tmp_path / "m"), key="k1"), 1)
    other = inference.cached_model(Recorded(str(tmp_path / "m"), key="k2"), 1)
    assert first is again and other is not first
    assert loads == ["k1", "k2"]


def test_scoring_without_images_names_the_missing_table(spark, config):
    register(spark, config, seed=1)
    with pytest.raises(RuntimeError, match="table 'images' does not exist"):
        score.run(spark, config)


def test_a_model_from_an_older_transform_revision_loads_with_a_warning(tmp_path, caplog):
    import json

    from imageiq_spark.vision.spec import ALGORITHM_REVISION

    model = build_model(ModelSpec("small_cnn", 32, 32, 3, 10, (0.0,) * 3, (1.0,) * 3))
    saved = ImageClassifier(model, LABELS, TransformSpec(size=(32, 32))).save(tmp_path / "m")
    meta_file = saved / "classifier.json"
    assert json.loads(meta_file.read_text())["transform_revision"] == ALGORITHM_REVISION
    ImageClassifier.load(saved)
    assert "transform revision" not in caplog.text
    # A model saved before the revision was recorded was made with revision 1.
    meta = json.loads(meta_file.read_text())
    del meta["transform_revision"]
    meta_file.write_text(json.dumps(meta))
    loaded = ImageClassifier.load(saved)
    assert loaded.labels == LABELS
    assert f"transform revision 1; this code prepares revision {ALGORITHM_REVISION}" in caplog.text


def test_online_rows_rank_classes_as_the_prediction_table_does():
    # Ties (0.3, 0.3) keep class order in both; the serving rows are the table's rows minus
    # the id and error columns.
    probs = np.array([[0.1, 0.3, 0.3, 0.2, 0.1], [0.05, 0.05, 0.1, 0.0, 0.8]], np.float32)
    labels = ["cat", "dog", "fox", "owl", "yak"]
    table_rows = inference.predictions_batch(inference.pa.array(["a", "b"]), probs, labels, 3).to_pylist()

    online = inference.prediction_rows(probs, labels, 3)

    assert online == [{key: row[key] for key in ("predicted_label", "confidence", "top_k")}
                      for row in table_rows]
    assert [r["label"] for r in online[0]["top_k"]] == ["dog", "fox", "owl"]
    assert online[1]["confidence"] == pytest.approx(0.8)

"""The embed stage and similar-image search with a real model from the MLflow registry (random
weights: what is tested is that the vectors are the model's penultimate layer and where they go)."""

from __future__ import annotations

import hashlib
import uuid

import cv2
import images
import numpy as np
import pytest
from conftest import make_config
from image_tables import image_rows
from registered import register

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core import faults
from imageiq_spark.lake import lakehouse
from imageiq_spark.ml.classifier import load_classifier
from imageiq_spark.serving import similar
from imageiq_spark.stages import embed, ingest
from imageiq_spark.vision.transform import prepare_image


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    config = make_config(root, mlflow={"registered_model": f"m_{uuid.uuid4().hex[:8]}"})
    digits, labels = load_digits()
    contents = {f"{labels[i]}/{i}.png": images.gray_png(digits[i]) for i in range(8)}
    contents["photo/0.jpg"] = images.jpeg(images.camera_scene(375, 500, 0), quality=95)
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    version = register(spark, config, seed=3)
    first = embed.run(spark, config)
    second = embed.run(spark, config)
    stored = lakehouse.read_table(spark, config, "embeddings").collect()
    return root, config, contents, version, first, second, stored


def test_embeddings_are_the_penultimate_layer_of_the_model(lake):
    _, config, contents, version, first, _, stored = lake
    import tf_keras as keras

    classifier = load_classifier(f"models:/{config.mlflow.registered_model}/{version}")
    features = keras.Model(classifier.model.inputs, classifier.model.get_layer("probabilities").input)
    by_id = {hashlib.sha256(d).hexdigest(): d for d in contents.values()}
    assert first.inserted == len(stored) == len(contents) and first.model_version == version
    for row in stored:
        tensor = prepare_image(by_id[row["image_id"]], classifier.spec)[None]
        expected = features(tensor, training=False).numpy()[0]
        assert len(row["vector"]) == 128  # the small CNN's pooled features
        np.testing.assert_allclose(row["vector"], expected, rtol=1e-5, atol=1e-6)
        assert (row["model_name"], row["model_version"]) == (config.mlflow.registered_model, version)


def test_embed_rerun_adds_nothing(lake):
    _, _, _, _, _, second, stored = lake
    assert (second.candidates, second.inserted, second.failed) == (0, 0, 0)
    assert len({row["image_id"] for row in stored}) == len(stored)


def test_embeddings_have_their_declared_column_types_and_nullability(spark, lake):
    _, config, *_ = lake
    assert lakehouse.read_table(spark, config, "embeddings").schema == embed.EMBEDDINGS_SCHEMA


def test_similar_returns_the_image_itself_first_for_an_id_and_for_a_file(spark, lake):
    root, config, contents, _, _, _, _ = lake
    photo = contents["photo/0.jpg"]
    photo_id = hashlib.sha256(photo).hexdigest()
    by_id = similar.find_similar(spark, config, photo_id, k=4)
    path = root / "query.jpg"
    path.write_bytes(photo)
    by_file = similar.find_similar(spark, config, str(path), k=4)
    for result in (by_id, by_file):
        assert result.method.startswith("embedding") and result.query_id == photo_id
        assert [n.image_id for n in result.neighbours][0] == photo_id
        assert result.neighbours[0].similarity == pytest.approx(1.0, abs=1e-6)
        assert len(result.neighbours) == 4
        assert [n.similarity for n in result.neighbours] == sorted((n.similarity for n in result.neighbours),
                                                                  reverse=True)
    sheet = similar.write_contact_sheet(spark, config, by_file)
    picture = cv2.imread(sheet.removeprefix("file:"))
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 4 * 100


@pytest.mark.slow  # worker restarts and model loads while it bisects; `make test` has preprocess's
def test_an_image_that_kills_the_python_worker_is_quarantined_and_embedding_goes_on(spark, tmp_path,
                                                                                  monkeypatch):
    digits, labels = load_digits()
    contents = {f"{labels[i]}/{i}.png": images.gray_png(digits[i]) for i in range(6)}
    ids = sorted(hashlib.sha256(data).hexdigest() for data in contents.values())
    victim = ids[2]
    config = make_config(tmp_path, mlflow={"registered_model": f"m_{uuid.uuid4().hex[:8]}"})
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    version = register(spark, config, seed=5)
    monkeypatch.setenv(faults.INJECT_FAULT, f"embed:{victim}")

    summary = embed.run(spark, config)

    stored = lakehouse.read_table(spark, config, "embeddings").groupBy("image_id").count().collect()
    assert sorted(r.image_id for r in stored) == [i for i in ids if i != victim]
    assert {r["count"] for r in stored} == {1}
    quarantine = lakehouse.read_table(spark, config, "quarantine")
    assert [tuple(r) for r in quarantine.select("image_id", "stage", "reason", "version").collect()] == [
        (victim, "embed", "worker_crash", f"{config.mlflow.registered_model}/{version}")
    ]
    assert (summary.inserted, summary.failed) == (len(ids) - 1, 1)

"""Extension points: a resize policy and a model architecture are each one registration in one
place, and the configuration, the transform, the model zoo and the manual's reference follow."""

from __future__ import annotations

from collections.abc import Iterator

import images
import numpy as np
import pytest
from conftest import make_config
from pyspark.sql import Row
from pyspark.sql.types import StringType, StructField, StructType

from imageiq_spark.cli import docs
from imageiq_spark.core.config import ConfigError
from imageiq_spark.core.registry import RESIZE_POLICIES
from imageiq_spark.lake import lakehouse
from imageiq_spark.ml import models
from imageiq_spark.vision.resize import resize_policy
from imageiq_spark.vision.spec import TransformSpec
from imageiq_spark.vision.transform import prepare_image


def _nearest(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Nearest-neighbour sampling on a regular grid: the top-left pixel of each target cell."""
    (th, tw), (h, w) = spec.size, image.shape[:2]
    return image[np.arange(th) * h // th][:, np.arange(tw) * w // tw]


@pytest.fixture
def nearest_policy() -> Iterator[str]:
    resize_policy("nearest", covers=True)(_nearest)
    yield "nearest"
    del RESIZE_POLICIES["nearest"]


@pytest.fixture
def tiny_architecture() -> Iterator[str]:
    def tiny_base(include_top: bool, weights: str | None, input_shape: tuple[int, int, int]):
        import tf_keras as keras

        inputs = keras.Input(shape=input_shape)
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same")(inputs), name="tiny")

    models.architecture("tiny", input_size=(8, 12))(lambda spec: models.on_base(spec, tiny_base))
    yield "tiny"
    del models.ARCHITECTURES["tiny"]


def test_a_registered_resize_policy_is_configurable_and_used_by_the_transform(tmp_path, nearest_policy):
    config = make_config(tmp_path, preprocess={"resize": nearest_policy, "size": [8, 10]})
    spec = TransformSpec.from_config(config)
    picture = images.quadrants(40, 50)

    tensor = prepare_image(images.png(picture), spec)

    assert spec.resize == "nearest"
    np.testing.assert_array_equal(tensor, picture[::5, ::5])
    assert spec.version != TransformSpec(size=(8, 10)).version
    reference = {key: tp for key, tp, _, _ in docs.rows()}
    assert reference["preprocess.resize"] == "one of 'stretch', 'letterbox', 'center_crop', 'nearest'"


def test_an_unregistered_resize_policy_is_refused_naming_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match="'preprocess.resize' expects one of 'stretch', 'letterbox', "
                                          "'center_crop', got 'nearest'"):
        make_config(tmp_path, preprocess={"resize": "nearest"})


def test_a_registered_architecture_is_configurable_sized_and_built(tmp_path, tiny_architecture):
    config = make_config(tmp_path, train={"model": tiny_architecture})

    model = models.build_model(models.ModelSpec(tiny_architecture, *config.image_size, 3, 5,
                                                (128.0,) * 3, (64.0,) * 3))
    probabilities = model.predict(np.zeros((2, 8, 12, 3), np.uint8), verbose=0)

    assert config.image_size == (8, 12)
    assert model.name == "tiny" and probabilities.shape == (2, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert "'tiny'" in {key: tp for key, tp, _, _ in docs.rows()}["train.model"]
    with pytest.raises(ConfigError, match="tiny has no imagenet weights"):
        models.check_weights(tiny_architecture, "imagenet")


def test_a_column_added_to_a_schema_is_added_to_the_existing_table_with_nulls(spark, tmp_path):
    config = make_config(tmp_path)
    before = StructType([StructField("image_id", StringType(), False)])
    lakehouse.ensure_table(spark, config, "extending_demo", before)
    spark.createDataFrame([("a",)], before).write.format("delta").mode("append").save(
        lakehouse.table_location(config, "extending_demo"))

    after = StructType([*before.fields, StructField("source", StringType(), True)])
    lakehouse.ensure_table(spark, config, "extending_demo", after)

    assert lakehouse.read_table(spark, config, "extending_demo").collect() == [Row(image_id="a", source=None)]

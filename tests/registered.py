"""Models logged to the MLflow registry for tests: a small CNN with seeded random weights."""

from __future__ import annotations

import tempfile

import mlflow
from mlflow.tracking import MlflowClient

from imageiq_spark.lake import tracking
from imageiq_spark.ml.classifier import ImageClassifier, log_classifier
from imageiq_spark.ml.models import ModelSpec, build_model
from imageiq_spark.vision.spec import TransformSpec

LABELS = [str(d) for d in range(10)]


def register(spark, config, seed: int, alias: str | None = "champion") -> str:
    """Log a small CNN (random weights, seeded) to the registry; returns its version."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    tracking.configure_mlflow(config)
    model = build_model(ModelSpec("small_cnn", 32, 32, 3, 10, (128.0,) * 3, (64.0,) * 3))
    classifier = ImageClassifier(model, LABELS, TransformSpec(size=(32, 32)))
    name = config.mlflow.registered_model
    with mlflow.start_run(), tempfile.TemporaryDirectory() as staging:
        info = log_classifier(classifier, staging, registered_model_name=name)
    version = str(info.registered_model_version)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
        tracking.record_alias(spark, config, name, alias, version)
    return version

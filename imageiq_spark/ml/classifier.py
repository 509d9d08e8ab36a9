"""A trained classifier that travels as one unit: Keras model, label vocabulary, preprocessing.

`ImageClassifier` turns raw image bytes into probabilities with the very same preprocessing
function the training data went through (`transform.prepare_batch` with the stored
`TransformSpec`); the model's input is uint8 NHWC and it normalises inside, so scorers feed
prepared tensors straight through. `ImagePipelineModel` wraps it as an MLflow pyfunc that takes a
DataFrame with a binary `content` column and returns `label`, `confidence` and `top_k`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types.schema import (  # noqa: E402
    Array,
    ColSpec,
    Object,
    ParamSchema,
    ParamSpec,
    Property,
    Schema,
)

from imageiq_spark.ml.ranking import top_classes  # noqa: E402
from imageiq_spark.vision import transform  # noqa: E402
from imageiq_spark.vision.spec import ALGORITHM_REVISION, TransformSpec  # noqa: E402

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
META_FILE = "classifier.json"
PREDICT_CHUNK = 256
# Installed into a model-serving environment that rebuilds the model's own environment.
_REQUIREMENTS = ("mlflow", "tensorflow", "tf-keras", "numpy", "pandas", "opencv-python-headless",
                 "pyarrow", "pyyaml")


class ImageClassifier:
    """A Keras model (uint8 NHWC in, probabilities out), its labels and its preprocessing."""

    def __init__(self, model: keras.Model, labels: Sequence[str], spec: TransformSpec) -> None:
        classes = int(model.output_shape[-1])
        if classes != len(labels):
            raise ValueError(
                f"the model outputs {classes} classes but the label vocabulary has {len(labels)} "
                "labels; pass the vocabulary the model was trained with"
            )
        self.model = model
        self.labels = list(labels)
        self.spec = spec
        # The forward pass as one compiled graph (what `model.predict` builds internally): an eager
        # call runs layer by layer and was 1.5x (small CNN) to 2.2x (MobileNetV2) slower.
        self._forward = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8)],
        )

    def predict_tensors(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, h, w, c] -> float32 probabilities [n, classes]."""
        expected = tuple(self.model.input_shape[1:])
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected a uint8 batch of shape [n, {', '.join(map(str, expected))}], got "
                f"{list(images.shape)}; prepare images with the classifier's TransformSpec"
            )
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), dtype="float32")
        chunks = [
            self._forward(images[i:i + PREDICT_CHUNK]).numpy().astype("float32", copy=False)
            for i in range(0, len(images), PREDICT_CHUNK)
        ]
        return np.concatenate(chunks)

    def predict_bytes(self, contents: Sequence[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        """Raw image bytes -> (probabilities [n, classes], {index: reason} of undecodable inputs).

        Rows of undecodable inputs hold NaN, so the result stays aligned with `contents`.
        """
        images, failures = transform.prepare_batch(list(contents), self.spec)
        failed = {index: error.reason for index, error in failures}
        probabilities = np.full((len(contents), len(self.labels)), np.nan, dtype="float32")
        if len(images):
            ok = [i for i in range(len(contents)) if i not in failed]
            probabilities[ok] = self.predict_tensors(images)
        return probabilities, failed

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k most likely labels of each row, most likely first (`ranking.top_classes`); [] for
        a NaN row (an undecodable input)."""
        decoded = ~np.isnan(probabilities).any(axis=1)
        top, top_p = top_classes(probabilities[decoded], k)
        ranked = iter([[(self.labels[i], p) for i, p in zip(indices, probs)]
                       for indices, probs in zip(top.tolist(), top_p.tolist())])
        return [next(ranked) if ok else [] for ok in decoded]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(directory / MODEL_FILE)
        meta = {"labels": self.labels, "transform": self.spec.to_dict(),
                "transform_revision": ALGORITHM_REVISION}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ImageClassifier:
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        model = keras.models.load_model(directory / MODEL_FILE, compile=False)
        revision = meta.get("transform_revision", 1)
        if revision != ALGORITHM_REVISION:
            log.warning(
                "model at %s was trained on tensors of transform revision %d; this code prepares "
                "revision %d (docs/user_manual.md, upgrading): its pixels differ slightly; retrain "
                "to remove the skew", directory, revision, ALGORITHM_REVISION)
        return cls(model, meta["labels"], TransformSpec.from_dict(meta["transform"]))


class ImagePipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame with binary `content` -> `label`, `confidence`, `top_k`.

    Undecodable images get a null label, NaN confidence and an empty top_k, so one bad file does
    not fail a batch. Parameter `top_k` (default 3) sets how many labels each row keeps.
    """

    def load_context(self, context: Any) -> None:
        self.classifier = ImageClassifier.load(context.artifacts["classifier"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        if "content" not in model_input.columns:
            raise ValueError(
                f"the model expects a DataFrame with a binary 'content' column of raw image bytes, "
                f"got columns {list(model_input.columns)}"
            )
        k = int((params or {}).get("top_k", 3))
        probabilities, _ = self.classifier.predict_bytes([bytes(c) for c in model_input["content"]])
        tops = self.classifier.top_k(probabilities, k)
        return pd.DataFrame(
            {
                "label": [top[0][0] if top else None for top in tops],
                "confidence": [top[0][1] if top else float("nan") for top in tops],
                "top_k": [[{"label": lab, "probability": p} for lab, p in top] for top in tops],
            }
        )


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "content")]),
    outputs=Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "confidence"),
            ColSpec(Array(Object([Property("label", "string"), Property("probability", "double")])),
                    "top_k"),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", "long", 3)]),
)


def _requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_classifier(
    classifier: ImageClassifier,
    staging_dir: str | Path,
    registered_model_name: str | None = None,
) -> Any:
    """Log the classifier as a self-contained pyfunc in the active run (and register it).

    The package's code travels with the model (`code_paths`), so a process without imageiq
    installed loads it. No input example: mlflow 3.17.2 fails on it (DESIGN.md).
    """
    directory = classifier.save(Path(staging_dir) / "classifier")
    package = Path(__file__).resolve().parents[1]  # imageiq_spark/
    with warnings.catch_warnings():
        # Its advice to add the example we deliberately leave out would be the run's only warning.
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ImagePipelineModel(),
            artifacts={"classifier": str(directory)},
            code_paths=[str(package)],
            signature=SIGNATURE,
            pip_requirements=_requirements(),
            registered_model_name=registered_model_name,
        )


def load_classifier(model_uri: str) -> ImageClassifier:
    """The ImageClassifier behind any MLflow model URI (models:/, runs:/, a path)."""
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    python_model = pyfunc_model.unwrap_python_model()
    if not hasattr(python_model, "classifier"):
        raise ValueError(f"'{model_uri}' is not an imageiq model (no ImagePipelineModel inside)")
    return python_model.classifier

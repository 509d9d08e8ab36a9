"""The model zoo: Keras models whose input is uint8 NHWC, with normalisation inside the model.

Every model starts with `Normalization` holding the statistics the model was trained with, so a
scorer feeds the prepared uint8 tensors straight in and nothing outside the model can drift.
Trained from scratch (`weights: none`) the statistics are the training split's channel mean and
std; with pretrained weights (`imagenet` or a file) they are the ones the architecture was
pretrained with, and training is transfer learning: a frozen base first, then its top layers.

tf-keras (Keras 2) is used throughout, with `TF_USE_LEGACY_KERAS=1` set before TensorFlow loads:
MultiWorkerMirroredStrategy fit fails under Keras 3 (DESIGN.md, stack facts).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from imageiq_spark.config import ConfigError  # noqa: E402

ARCHITECTURES = ("small_cnn", "mobilenet_v2", "resnet50", "efficientnet_b0")

# Input statistics (per RGB channel, 0..255 scale) each pretrained architecture expects.
_PRETRAINED_STATS = {
    # MobileNetV2 was trained on x / 127.5 - 1.
    "mobilenet_v2": ([127.5] * 3, [127.5] * 3),
    # ResNet50 ("caffe" mode) on BGR minus the ImageNet mean; the channel order is swapped below.
    "resnet50": ([103.939, 116.779, 123.68], [1.0] * 3),
    # EfficientNet rescales inside the network and takes 0..255.
    "efficientnet_b0": ([0.0] * 3, [1.0] * 3),
}


@dataclass(frozen=True)
class ModelSpec:
    """What a model is built from; picklable, so barrier tasks build the same model."""

    architecture: str
    height: int
    width: int
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str = "none"

    @property
    def pretrained(self) -> bool:
        return self.architecture != "small_cnn" and self.weights != "none"


def check_weights(architecture: str, weights: str) -> None:
    """Reject combinations that cannot work before any data is read."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"config key 'train.model' expects one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    if weights in ("none", "imagenet"):
        if architecture == "small_cnn" and weights == "imagenet":
            raise ConfigError(
                "config key 'train.weights': small_cnn has no imagenet weights; use 'none' "
                "or a path to a weights file saved from a small_cnn"
            )
        return
    if not Path(weights).is_file():
        raise ConfigError(
            f"config key 'train.weights' expects 'none', 'imagenet' or a path to a weights file; "
            f"'{weights}' does not exist"
        )


def build_model(spec: ModelSpec) -> keras.Model:
    """An uncompiled model: uint8 [n, h, w, c] in, softmax probabilities out."""
    inputs = keras.Input(shape=(spec.height, spec.width, spec.channels), dtype="uint8", name="image")
    if spec.architecture == "small_cnn":
        x = _normalization(spec.mean, spec.std)(inputs)
        outputs = _small_cnn_head(x, spec.num_classes)
        model = keras.Model(inputs, outputs, name="small_cnn")
        if spec.weights != "none":
            model.load_weights(spec.weights)
        return model

    mean, std = (spec.mean, spec.std) if not spec.pretrained else _PRETRAINED_STATS[spec.architecture]
    x = inputs
    if spec.channels != 3 or (spec.pretrained and spec.architecture == "resnet50"):
        # Gray -> RGB (or RGB -> BGR for caffe-style weights) as a fixed 1x1 convolution.
        x = _channel_mixer(spec.channels, bgr=spec.pretrained and spec.architecture == "resnet50")(x)
    x = _normalization(mean, std)(x)
    base = _base(spec)
    x = base(x, training=False) if spec.pretrained else base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=spec.architecture)


def _normalization(mean: Sequence[float], std: Sequence[float]) -> keras.layers.Layer:
    variance = np.square(np.asarray(std, dtype="float64")).tolist()
    return keras.layers.Normalization(axis=-1, mean=list(mean), variance=variance, name="normalize")


def _channel_mixer(channels: int, bgr: bool) -> keras.layers.Layer:
    kernel = np.zeros((1, 1, channels, 3), dtype="float32")
    for out in range(3):
        source = (2 - out if bgr else out) if channels == 3 else 0
        kernel[0, 0, source, out] = 1.0
    layer = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="to_rgb",
                                kernel_initializer=keras.initializers.Constant(kernel))
    return layer


def _small_cnn_head(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    layers = keras.layers
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return layers.Dense(num_classes, activation="softmax", name="probabilities")(x)


def _base(spec: ModelSpec) -> keras.Model:
    constructors = {
        "mobilenet_v2": keras.applications.MobileNetV2,
        "resnet50": keras.applications.ResNet50,
        "efficientnet_b0": keras.applications.EfficientNetB0,
    }
    weights = "imagenet" if spec.weights == "imagenet" else None
    base = constructors[spec.architecture](
        include_top=False, weights=weights, input_shape=(spec.height, spec.width, 3)
    )
    if spec.weights not in ("none", "imagenet"):
        base.load_weights(spec.weights)
    base.trainable = not spec.pretrained
    return base


def unfreeze_top(model: keras.Model, layers: int) -> None:
    """Fine-tuning: make the base's top `layers` trainable; BatchNorm stays frozen (small batches)."""
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    base.trainable = True
    for i, layer in enumerate(base.layers):
        trainable = i >= len(base.layers) - layers
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

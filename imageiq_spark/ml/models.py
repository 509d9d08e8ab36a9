"""The model zoo: Keras models whose input is uint8 NHWC, with normalisation inside the model.

Every model starts with `Normalization` holding the statistics the model was trained with, so a
scorer feeds the prepared uint8 tensors straight in and nothing outside the model can drift.
Trained from scratch (`weights: none`) the statistics are the training split's channel mean and
std; with pretrained weights (`imagenet` or a file) they are the ones the architecture was
pretrained with, and training is transfer learning: a frozen base first, then its top layers.

tf-keras (Keras 2) is used throughout, with `TF_USE_LEGACY_KERAS=1` set before TensorFlow loads:
MultiWorkerMirroredStrategy fit fails under Keras 3 (DESIGN.md, stack facts). TensorFlow is
imported only when a model is built, so the configuration can read `ARCHITECTURES` cheaply.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402

from imageiq_spark.core.config import ConfigError  # noqa: E402
from imageiq_spark.core.registry import ARCHITECTURES  # noqa: E402

if TYPE_CHECKING:
    import tf_keras as keras


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
        """A base with ImageNet or file weights, trained by transfer learning."""
        return ARCHITECTURES[self.architecture].imagenet_stats is not None and self.weights != "none"


@dataclass(frozen=True)
class Architecture:
    """One entry of the model zoo: one of `ARCHITECTURES`."""

    #: ModelSpec -> uncompiled Keras model, uint8 [n, h, w, c] in, softmax probabilities out.
    build: Callable[[ModelSpec], keras.Model]
    #: `[height, width]` of the input when `preprocess.size` is empty.
    input_size: tuple[int, int]
    #: (mean, std) per RGB channel, 0..255 scale, that its ImageNet weights expect; None when it
    #: has none (it trains from scratch, and a weights file holds the whole model's weights).
    imagenet_stats: tuple[list[float], list[float]] | None = None


Build = Callable[[ModelSpec], "keras.Model"]


def architecture(name: str, input_size: tuple[int, int],
                 imagenet_stats: tuple[list[float], list[float]] | None = None) -> Callable[[Build], Build]:
    """Register `build(spec)` as the architecture `name` (see `Architecture`)."""

    def register(build: Build) -> Build:
        ARCHITECTURES[name] = Architecture(build, input_size, imagenet_stats)
        return build

    return register


def check_weights(architecture: str, weights: str) -> None:
    """Reject combinations that cannot work before any data is read."""
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"config key 'train.model' expects one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    if weights in ("none", "imagenet"):
        if weights == "imagenet" and ARCHITECTURES[architecture].imagenet_stats is None:
            raise ConfigError(
                f"config key 'train.weights': {architecture} has no imagenet weights; use 'none' "
                f"or a path to a weights file saved from a {architecture}"
            )
        return
    if not Path(weights).is_file():
        raise ConfigError(
            f"config key 'train.weights' expects 'none', 'imagenet' or a path to a weights file; "
            f"'{weights}' does not exist"
        )


def build_model(spec: ModelSpec) -> keras.Model:
    """An uncompiled model: uint8 [n, h, w, c] in, softmax probabilities out."""
    return ARCHITECTURES[spec.architecture].build(spec)


@architecture("small_cnn", input_size=(32, 32))
def _small_cnn(spec: ModelSpec) -> keras.Model:
    """Four 3x3 convolutions in two pooled blocks, one more, global pooling: trained from scratch."""
    import tf_keras as keras

    layers = keras.layers
    inputs = keras.Input(shape=(spec.height, spec.width, spec.channels), dtype="uint8", name="image")
    x = _normalization(spec.mean, spec.std)(inputs)
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(spec.num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="small_cnn")
    if spec.weights != "none":
        model.load_weights(spec.weights)
    return model


# MobileNetV2 was trained on x / 127.5 - 1.
@architecture("mobilenet_v2", input_size=(224, 224), imagenet_stats=([127.5] * 3, [127.5] * 3))
def _mobilenet_v2(spec: ModelSpec) -> keras.Model:
    import tf_keras as keras

    return on_base(spec, keras.applications.MobileNetV2)


# ResNet50 ("caffe" mode) on BGR minus the ImageNet mean; `on_base` swaps the channel order.
@architecture("resnet50", input_size=(224, 224), imagenet_stats=([103.939, 116.779, 123.68], [1.0] * 3))
def _resnet50(spec: ModelSpec) -> keras.Model:
    import tf_keras as keras

    return on_base(spec, keras.applications.ResNet50, bgr=spec.pretrained)


# EfficientNet rescales inside the network and takes 0..255.
@architecture("efficientnet_b0", input_size=(224, 224), imagenet_stats=([0.0] * 3, [1.0] * 3))
def _efficientnet_b0(spec: ModelSpec) -> keras.Model:
    import tf_keras as keras

    return on_base(spec, keras.applications.EfficientNetB0)


def on_base(spec: ModelSpec, base: Callable[..., keras.Model], bgr: bool = False) -> keras.Model:
    """A classifier on a Keras base network without its top (`keras.applications` signature:
    include_top, weights, input_shape): RGB input, normalised, pooled, dropout, softmax.

    With pretrained weights the base is frozen and normalised with its `imagenet_stats`; `bgr`
    feeds it BGR (caffe-style weights).
    """
    import tf_keras as keras

    inputs = keras.Input(shape=(spec.height, spec.width, spec.channels), dtype="uint8", name="image")
    stats = ARCHITECTURES[spec.architecture].imagenet_stats
    mean, std = stats if spec.pretrained and stats else (spec.mean, spec.std)
    x = inputs
    if spec.channels != 3 or bgr:
        # Gray -> RGB (or RGB -> BGR for caffe-style weights) as a fixed 1x1 convolution.
        x = _channel_mixer(spec.channels, bgr=bgr)(x)
    x = _normalization(mean, std)(x)
    network = base(include_top=False, weights="imagenet" if spec.weights == "imagenet" else None,
                   input_shape=(spec.height, spec.width, 3))
    if spec.weights not in ("none", "imagenet"):
        network.load_weights(spec.weights)
    network.trainable = not spec.pretrained
    x = network(x, training=False) if spec.pretrained else network(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=spec.architecture)


def _normalization(mean: Sequence[float], std: Sequence[float]) -> keras.layers.Layer:
    import tf_keras as keras

    variance = np.square(np.asarray(std, dtype="float64")).tolist()
    return keras.layers.Normalization(axis=-1, mean=list(mean), variance=variance, name="normalize")


def _channel_mixer(channels: int, bgr: bool) -> keras.layers.Layer:
    import tf_keras as keras

    kernel = np.zeros((1, 1, channels, 3), dtype="float32")
    for out in range(3):
        source = (2 - out if bgr else out) if channels == 3 else 0
        kernel[0, 0, source, out] = 1.0
    return keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="to_rgb",
                               kernel_initializer=keras.initializers.Constant(kernel))


def unfreeze_top(model: keras.Model, layers: int) -> None:
    """Fine-tuning: make the base's top `layers` trainable; BatchNorm stays frozen (small batches)."""
    import tf_keras as keras

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    base.trainable = True
    for i, layer in enumerate(base.layers):
        trainable = i >= len(base.layers) - layers
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(model: keras.Model, learning_rate: float) -> None:
    import tf_keras as keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

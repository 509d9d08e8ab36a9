"""Registries of named extension points that the configuration checks names against: resize
policies (filled by `vision.resize`) and model architectures (filled by `ml.models`).

The configuration sits below both layers, so a registry loads the module that fills it by name on
its first lookup, as entry points load plugins: a name registered later is valid too, OpenCV loads
only when a policy is named and TensorFlow only when a model is built.
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry(dict[str, Any]):
    def __init__(self, provider: str) -> None:
        super().__init__()
        self.provider = provider

    def loaded(self) -> Registry:
        """This registry with its built-in entries registered (importing the provider once)."""
        importlib.import_module(self.provider)
        return self


#: The resize policies by name, in registration order: `preprocess.resize` accepts these names and
#: the configuration reference lists them. Add one with `vision.resize.resize_policy`.
RESIZE_POLICIES = Registry("imageiq_spark.vision.resize")
#: The model zoo by name, in registration order: `train.model` accepts these names, the
#: configuration reference lists them and `Config.image_size` takes their input size. Add one with
#: `ml.models.architecture`.
ARCHITECTURES = Registry("imageiq_spark.ml.models")

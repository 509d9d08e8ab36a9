"""The model `imageiq serve` answers with: one loaded and warmed registry version, and the tensors
it takes.

The server loads the very object batch scoring uses (`classifier.load_classifier`) and prepares
raw bytes with the same `transform.prepare_batch` and the model's own `TransformSpec`, so online
and batch answers agree. Bad input gets ingest's reason codes (`probe`) and the transform's, 422,
judged before any full decode where the header allows (`serve.max_pixels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imageiq_spark.core.config import Config
from imageiq_spark.core.quiet import import_quietly
from imageiq_spark.serving.limits import BadInput, cores
from imageiq_spark.vision import probe, transform
from imageiq_spark.vision.spec import TransformSpec

if TYPE_CHECKING:
    from imageiq_spark.ml.classifier import ImageClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One loaded and warmed model version."""

    classifier: ImageClassifier
    name: str
    version: str
    run_id: str


def share_cores(workers: int) -> None:
    """Before TensorFlow starts: each of `workers` concurrent forward passes gets an even share of
    the cores (intra-op threads) and runs its ops one after another (one inter-op thread each)."""
    tf = import_quietly("tensorflow")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cores() // workers))
        tf.config.threading.set_inter_op_parallelism_threads(workers)
    except RuntimeError:  # TensorFlow already ran in this process (a test): it keeps its threads
        log.debug("TensorFlow threads already set")


def load_model(config: Config, name: str, version: str, run_id: str) -> ServedModel:
    """Load a registry version and run it once on every path a request takes (decode, forward)."""
    import cv2

    from imageiq_spark.ml.classifier import load_classifier

    classifier = load_classifier(f"models:/{name}/{version}")
    shape = tuple(classifier.model.input_shape[1:])
    sample = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    tensors, _ = transform.prepare_batch([sample], classifier.spec)
    classifier.predict_tensors(tensors)
    classifier.predict_tensors(np.zeros((config.serve.max_batch_size, *shape), np.uint8))
    log.info("serving %s version %s", name, version)
    return ServedModel(classifier, name, version, run_id)


def prepare(contents: list[bytes], spec: TransformSpec, max_pixels: int) -> np.ndarray:
    """Encoded images -> the model's uint8 tensors; the first bad one raises BadInput. (Bytes
    need no check here: the request body that held them was within serve.max_body_bytes.)"""
    for index, data in enumerate(contents):
        where = f"image {index}: " if len(contents) > 1 else ""
        try:
            probe.probe(data, max_pixels)  # a decompression bomb is refused from its header
        except probe.ProbeError as exc:
            raise BadInput(422, exc.reason, where + exc.detail) from exc
    tensors, failures = transform.prepare_batch(contents, spec)
    if failures:
        index, error = failures[0]
        where = f"image {index}: " if len(contents) > 1 else ""
        raise BadInput(422, error.reason, where + error.detail)
    return tensors

"""The Open Inference Protocol v2 (KServe, Triton) bodies: one `BYTES` input of encoded images
(base64 strings in JSON, or raw with the binary tensor extension) in, labels, confidences and
probabilities out, and the model's metadata.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import numpy as np

from imageiq_spark.serving.limits import BadInput
from imageiq_spark.serving.model import ServedModel

#: Triton's binary tensor extension: the JSON header's length when raw tensor bytes follow it.
BINARY_HEADER = "inference-header-content-length"


def bytes_elements(raw: bytes) -> list[bytes]:
    """A v2 binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    elements, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInput(422, "bad_request", "binary BYTES tensor ends inside a length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise BadInput(422, "bad_request", "binary BYTES element runs past the tensor's data")
        elements.append(raw[pos:pos + size])
        pos += size
    return elements


def infer_inputs(header: dict[str, Any], binary: bytes) -> list[bytes]:
    """The encoded images of a v2 infer request: one BYTES input, base64 in JSON or binary."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(422, "bad_request", "expected 'inputs' with exactly one BYTES tensor of "
                                           "encoded images")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise BadInput(422, "bad_request",
                       f"input '{tensor.get('name')}' has datatype {tensor.get('datatype')!r}; "
                       "expected BYTES (encoded image files)")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size > len(binary):
            raise BadInput(422, "bad_request", "binary_data_size is larger than the data sent")
        elements = bytes_elements(binary[:size])
    else:
        data = tensor.get("data")
        flat = list(np.ravel(np.array(data, dtype=object))) if isinstance(data, list) else None
        if not flat or not all(isinstance(item, str) for item in flat):
            raise BadInput(422, "bad_request", "BYTES 'data' must be a list of base64 strings")
        try:
            elements = [base64.b64decode(item, validate=True) for item in flat]
        except binascii.Error as exc:
            raise BadInput(422, "bad_request", f"BYTES 'data' is not base64: {exc}") from exc
    shape = tensor.get("shape")
    if not isinstance(shape, list) or int(np.prod(shape)) != len(elements):
        raise BadInput(422, "bad_request",
                       f"shape {shape} does not match the {len(elements)} elements sent")
    return elements


def infer_response(model: ServedModel, rows: list[dict[str, Any]], probs: np.ndarray,
                   header: dict[str, Any]) -> dict[str, Any]:
    n = len(rows)
    outputs = [
        {"name": "label", "datatype": "BYTES", "shape": [n], "data": [r["predicted_label"] for r in rows]},
        {"name": "confidence", "datatype": "FP64", "shape": [n], "data": [r["confidence"] for r in rows]},
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.astype(np.float32).ravel().tolist()},
        {"name": "image_id", "datatype": "BYTES", "shape": [n], "data": [r["image_id"] for r in rows]},
    ]
    wanted = {o.get("name") for o in header.get("outputs") or [] if isinstance(o, dict)}
    if wanted:
        outputs = [o for o in outputs if o["name"] in wanted]
    response = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if "id" in header:
        response["id"] = header["id"]
    return response


def model_metadata(model: ServedModel) -> dict[str, Any]:
    classes = len(model.classifier.labels)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "imageiq_tensorflow",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content": "encoded image files (PNG, JPEG, GIF, BMP, TIFF, WebP)"}}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes],
             "parameters": {"labels": model.classifier.labels}},
            {"name": "image_id", "datatype": "BYTES", "shape": [-1]},
        ],
    }

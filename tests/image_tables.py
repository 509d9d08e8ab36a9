"""`images` rows and near-duplicate copies of pictures, made in memory for tests."""

from __future__ import annotations

import datetime
import hashlib

import cv2
import images
import numpy as np

from imageiq_spark.core.tables import IMAGES_SCHEMA


def variants(photo: np.ndarray) -> dict[str, bytes]:
    """The copies of a photo people make: each a different file of the same picture."""
    h, w = photo.shape[:2]
    dy, dx = round(h * 0.025), round(w * 0.025)
    return {
        "resized": images.png(cv2.resize(photo, (w // 2, h // 2), interpolation=cv2.INTER_AREA)),
        "jpeg60": images.jpeg(photo, quality=60),
        "cropped": images.png(np.ascontiguousarray(photo[dy:h - dy, dx:w - dx])),  # 5% of each side
        "brightened": images.png(cv2.add(photo, np.full_like(photo, 40))),
    }


def image_rows(spark, contents: dict[str, bytes]):
    """`images` rows of files named `<label>/<name>`, with each image's real width and height."""
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for name, data in contents.items():
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        height, width = decoded.shape[:2] if decoded is not None else (0, 0)
        rows.append((hashlib.sha256(data).hexdigest(), f"file:/src/{name}", name.split("/")[0], "png", width,
                     height, 3, 8, 1, len(data), None, data, now))
    return spark.createDataFrame(rows, IMAGES_SCHEMA)

"""The images' own properties for `monitor`: brightness, contrast and sharpness from one reduced
greyscale decode per image, kept with its format, size and arrival in `image_profiles` (one row
per image, computed once), so that a window's image properties need neither a decode nor a join.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from imageiq_spark.core import tables
from imageiq_spark.core.config import Config
from imageiq_spark.core.tensors import binary_views
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.session import spread

#: One row per image: what `monitor` aggregates per window of `ingested_at`, so that the image
#: properties of a window need no join (the image columns were added later: last, nullable).
IMAGE_PROFILES_SCHEMA = tables.schema(
    "image_id STRING NOT NULL, brightness DOUBLE, contrast DOUBLE, sharpness DOUBLE, "
    "profiled_at TIMESTAMP NOT NULL, format STRING, width INT, height INT, ingested_at TIMESTAMP"
)
#: The image columns `profile_images` copies from `images`.
_IMAGE_COLUMNS = ("format", "width", "height", "ingested_at")
#: Image properties come from a decode at most this much larger than PROFILE_SIDE per side.
PROFILE_SIDE = 256


def image_properties(gray: np.ndarray) -> tuple[float, float, float]:
    """(mean grey level, contrast, sharpness) of a greyscale image.

    Contrast is the grey-level standard deviation over the mean, and sharpness the variance of
    the Laplacian over the grey-level variance: both are unchanged when an image is only made
    darker or brighter, so an exposure change reads as brightness drift alone.
    """
    import cv2

    pixels = gray.astype(np.float64)
    mean, variance = float(pixels.mean()), float(pixels.var())
    contrast = float(np.sqrt(variance) / mean) if mean > 0 else 0.0
    laplacian = cv2.Laplacian(pixels, cv2.CV_64F)
    sharpness = float(laplacian.var() / variance) if variance > 0 else 0.0
    return mean, contrast, sharpness


def _reduced_flag(width: int | None, height: int | None) -> int:
    """Decode large images at 1/2, 1/4 or 1/8 scale while the short side keeps PROFILE_SIDE."""
    import cv2

    short = min(width or 0, height or 0)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                         (2, cv2.IMREAD_REDUCED_GRAYSCALE_2)):
        if short >= factor * PROFILE_SIDE:
            return flag
    return cv2.IMREAD_GRAYSCALE


def profile_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """`mapInArrow`: (image_id, content, format, width, height, ingested_at) -> (image_id,
    brightness, contrast, sharpness, format, width, height, ingested_at); an image that does not
    decode gets null properties (the other stages quarantine it)."""
    import cv2

    for batch in batches:
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        values = []
        for data, width, height in zip(binary_views(batch.column("content")), widths, heights):
            gray = None if data is None else cv2.imdecode(data, _reduced_flag(width, height))
            values.append((None, None, None) if gray is None else image_properties(gray))
        columns = list(zip(*values)) if values else [(), (), ()]
        yield pa.RecordBatch.from_arrays(
            [batch.column("image_id"), *(pa.array(c, pa.float64()) for c in columns),
             *(batch.column(name) for name in _IMAGE_COLUMNS)],
            names=["image_id", "brightness", "contrast", "sharpness", *_IMAGE_COLUMNS])


def profile_images(images: DataFrame) -> DataFrame:
    """`images` rows -> IMAGE_PROFILES_SCHEMA rows."""
    computed = StructType([f for f in IMAGE_PROFILES_SCHEMA.fields if f.name != "profiled_at"])
    return (images.select("image_id", "content", *_IMAGE_COLUMNS)
            .mapInArrow(profile_batches, computed)
            .select(*(F.current_timestamp().alias(n) if n == "profiled_at" else F.col(n)
                      for n in IMAGE_PROFILES_SCHEMA.fieldNames())))


def update_image_profiles(spark: SparkSession, config: Config) -> int:
    """Profile the images that have none yet; returns how many were added. Rows profiled before
    `image_profiles` held the image columns get them from `images`, once."""
    lakehouse.ensure_table(spark, config, "image_profiles", IMAGE_PROFILES_SCHEMA)
    images = lakehouse.read_table(spark, config, "images")
    profiles = lakehouse.read_table(spark, config, "image_profiles")
    if profiles.where(F.col("ingested_at").isNull()).limit(1).count():
        lakehouse.merge(config, "image_profiles", images.select("image_id", *_IMAGE_COLUMNS),
                        "t.image_id = s.image_id AND t.ingested_at IS NULL",
                        "WHEN MATCHED THEN UPDATE SET " + ", ".join(f"t.{c} = s.{c}" for c in _IMAGE_COLUMNS))
    # Profiles are only ever made from images: the same count and newest arrival mean none is
    # missing, which Delta answers from its file statistics instead of joining two large tables.
    def extent(table: DataFrame) -> tuple:
        return tuple(table.agg(F.count(F.lit(1)), F.max("ingested_at")).first())

    if extent(images) == extent(profiles):
        return 0
    with lakehouse.pending_rows(images, [profiles.select("image_id")]) as pending:
        if not pending.count:
            return 0
        return lakehouse.merge_new_rows(config, "image_profiles", profile_images(spread(pending.rows)),
                                        ["image_id"])

"""PBM/PGM/PPM, accepted extensions, are probed from their headers and ingested (files written by
OpenCV, raw and plain)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import make_config
from pyspark.sql import functions as F

from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest
from imageiq_spark.vision.probe import TRUNCATED, ImageInfo, ProbeError, probe


def _photo(height: int, width: int, channels: int, dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(height * width)
    top = np.iinfo(dtype).max
    pixels = rng.integers(0, top, size=(height, width, channels), dtype=dtype)
    return pixels[:, :, 0] if channels == 1 else pixels


def _encode(ext: str, pixels: np.ndarray, binary: bool = True) -> bytes:
    ok, data = cv2.imencode(ext, pixels, [cv2.IMWRITE_PXM_BINARY, int(binary)])
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(("ext", "channels", "dtype", "binary", "expected"), [
    (".pgm", 1, np.uint8, True, ImageInfo("pgm", 37, 21, 1, 8)),
    (".pgm", 1, np.uint16, True, ImageInfo("pgm", 37, 21, 1, 16)),
    (".pgm", 1, np.uint8, False, ImageInfo("pgm", 37, 21, 1, 8)),
    (".ppm", 3, np.uint8, True, ImageInfo("ppm", 37, 21, 3, 8)),
    (".ppm", 3, np.uint8, False, ImageInfo("ppm", 37, 21, 3, 8)),
    (".pbm", 1, np.uint8, True, ImageInfo("pbm", 37, 21, 1, 1)),
    (".pbm", 1, np.uint8, False, ImageInfo("pbm", 37, 21, 1, 1)),
])
def test_netpbm_files_written_by_opencv_are_probed_from_their_header(ext, channels, dtype, binary, expected):
    data = _encode(ext, _photo(21, 37, channels, dtype), binary)
    assert probe(data) == expected


def test_a_header_comment_is_skipped_and_a_short_raw_file_is_truncated():
    data = b"P5\n# made by hand\n4 3\n255\n" + bytes(12)
    assert probe(data) == ImageInfo("pgm", 4, 3, 1, 8)
    with pytest.raises(ProbeError) as cut:
        probe(data[:-1])
    assert cut.value.reason == TRUNCATED


def test_netpbm_images_are_ingested_not_quarantined(spark, tmp_path):
    source = tmp_path / "src" / "cats"
    source.mkdir(parents=True)
    (source / "a.pgm").write_bytes(_encode(".pgm", _photo(30, 40, 1)))
    (source / "b.ppm").write_bytes(_encode(".ppm", _photo(31, 41, 3)))
    (source / "c.pbm").write_bytes(_encode(".pbm", _photo(32, 42, 1)))
    config = make_config(tmp_path, ingest={"source": str(tmp_path / "src")})

    summary = ingest.run(spark, config)

    rows = (lakehouse.read_table(spark, config, "images")
            .select(F.element_at(F.split("path", "/"), -1).alias("file"), "format", "width", "height",
                    "label").orderBy("file").collect())
    assert [tuple(r) for r in rows] == [("a.pgm", "pgm", 40, 30, "cats"), ("b.ppm", "ppm", 41, 31, "cats"),
                                        ("c.pbm", "pbm", 42, 32, "cats")]
    assert not lakehouse.table_exists(spark, config, "quarantine") or \
        lakehouse.read_table(spark, config, "quarantine").count() == 0
    assert summary.counts().quarantined == 0

"""Files for ingest tests: every odd-but-good layout ingest must accept (encoded with the helpers
in `images`), and every kind of broken file it must quarantine."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from images import (
    bmp,
    cmyk_jpeg,
    exif_rotated_jpeg,
    gif,
    gray_png,
    jpeg,
    png,
    png16,
    quadrants,
    rgba_png,
    tiff,
    webp_lossless,
)


def distinct_png(index: int) -> bytes:
    """A small PNG whose bytes differ for every index."""
    return png(quadrants(8 + index, 8))


def png_bad_crc() -> bytes:
    data = bytearray(png(quadrants(20, 30)))
    data[40] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    return bytes(data)


def jpeg_truncated() -> bytes:
    data = jpeg(quadrants(64, 64))
    return data[: len(data) // 2]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A VALID side x side gray PNG of zero pixels: about 1 MB on disk, side**2 bytes decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    return path


def _rgba(height: int, width: int) -> np.ndarray:
    return np.dstack([quadrants(height, width), np.full((height, width), 200, np.uint8)])


#: name -> (bytes maker, expected format, displayed width, height, channels, bit depth)
GOOD_FILES = {
    "gray.png": (lambda: gray_png(quadrants(20, 30)[:, :, 0]), "png", 30, 20, 1, 8),
    "rgba.png": (lambda: rgba_png(_rgba(20, 30)), "png", 30, 20, 4, 8),
    "deep.png": (lambda: png16(quadrants(20, 30).astype(np.uint16) * 257), "png", 30, 20, 3, 16),
    "cmyk.jpg": (lambda: cmyk_jpeg(quadrants(20, 30)), "jpeg", 30, 20, 4, 8),
    # Stored 30 wide x 20 high with EXIF orientation 6: displayed 20 wide x 30 high.
    "rotated.jpg": (lambda: exif_rotated_jpeg(quadrants(30, 20)), "jpeg", 20, 30, 3, 8),
    "plain.bmp": (lambda: bmp(quadrants(20, 30)), "bmp", 30, 20, 3, 8),
    "plain.tiff": (lambda: tiff(quadrants(20, 30)), "tiff", 30, 20, 3, 8),
    "plain.webp": (lambda: webp_lossless(quadrants(20, 30)), "webp", 30, 20, 3, 8),
    "plain.gif": (lambda: gif(quadrants(20, 30)), "gif", 30, 20, 3, 8),
    "UPPER.JPG": (lambda: jpeg(quadrants(24, 32)), "jpeg", 32, 24, 3, 8),
    "with space é.png": (lambda: png(quadrants(12, 10)), "png", 10, 12, 3, 8),
}

"""Real image files for tests, made with OpenCV and Pillow: every odd-but-good layout and every
kind of broken file ingest must quarantine."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A deterministic uint8 image whose pixels differ across rows and columns."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    planes = [(rows * (i + 1) / channels + cols * (channels - i) / channels) % 256 for i in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"OpenCV cannot encode {ext}")
    return buffer.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_gray() -> bytes:
    return encode(gradient(20, 30, 1)[:, :, 0], ".png")


def png_rgba() -> bytes:
    return encode(gradient(20, 30, 4), ".png")


def png_16bit() -> bytes:
    return encode((gradient(20, 30, 3).astype(np.uint16) * 257), ".png")


def jpeg_rgb(height: int = 24, width: int = 32) -> bytes:
    return encode(gradient(height, width, 3), ".jpg")


def jpeg_cmyk() -> bytes:
    return pil_bytes(Image.fromarray(gradient(20, 30, 3)).convert("CMYK"), "JPEG")


def jpeg_exif_rotated() -> bytes:
    """Stored 30 wide x 20 high with EXIF orientation 6: displayed 20 wide x 30 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return pil_bytes(Image.fromarray(gradient(20, 30, 3)), "JPEG", exif=exif.tobytes())


def bmp() -> bytes:
    return encode(gradient(20, 30, 3), ".bmp")


def tiff() -> bytes:
    return encode(gradient(20, 30, 3), ".tiff")


def webp() -> bytes:
    return encode(gradient(20, 30, 3), ".webp")


def gif() -> bytes:
    return pil_bytes(Image.fromarray(gradient(20, 30, 3)).convert("P"), "GIF")


def png_bad_crc() -> bytes:
    data = bytearray(encode(gradient(20, 30, 3), ".png"))
    data[40] ^= 0xFF  # inside the first IDAT chunk: its CRC no longer matches
    return bytes(data)


def jpeg_truncated() -> bytes:
    data = jpeg_rgb(64, 64)
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that carries no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A VALID side x side gray PNG of all-zero pixels: about 1 MB on disk, `side**2` bytes decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    idat = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


#: name -> (bytes maker, expected format, displayed width, height, channels, bit depth)
GOOD_FILES = {
    "gray.png": (png_gray, "png", 30, 20, 1, 8),
    "rgba.png": (png_rgba, "png", 30, 20, 4, 8),
    "deep.png": (png_16bit, "png", 30, 20, 3, 16),
    "cmyk.jpg": (jpeg_cmyk, "jpeg", 30, 20, 4, 8),
    "rotated.jpg": (jpeg_exif_rotated, "jpeg", 20, 30, 3, 8),
    "plain.bmp": (bmp, "bmp", 30, 20, 3, 8),
    "plain.tiff": (tiff, "tiff", 30, 20, 3, 8),
    "plain.webp": (webp, "webp", 30, 20, 3, 8),
    "plain.gif": (gif, "gif", 30, 20, 3, 8),
    "UPPER.JPG": (jpeg_rgb, "jpeg", 32, 24, 3, 8),
    "with space é.png": (lambda: encode(gradient(12, 10, 3), ".png"), "png", 10, 12, 3, 8),
}

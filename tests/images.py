"""Real image files made in memory for tests: every colour layout, bit depth and container we accept.

Pixels are RGB uint8 arrays; encoders are Pillow (the reference most tools agree with) and OpenCV
(for 16-bit PNG). Nothing here decodes with the code under test.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 220, 20)


def quadrants(height: int = 40, width: int = 60) -> np.ndarray:
    """An asymmetric RGB scene: red, green, blue and yellow quadrants (top-left clockwise is
    red, green, yellow, blue), so any rotation or flip changes it."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = RED
    image[:h, w:] = GREEN
    image[h:, w:] = YELLOW
    image[h:, :w] = BLUE
    return image


def halves(height: int, width: int, left=RED, right=BLUE) -> np.ndarray:
    """Left half one colour, right half another."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = left
    image[:, width // 2 :] = right
    return image


def camera_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB scene: smooth gradients, blobs and fine texture (JPEG-realistic)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 3 * np.pi) * np.cos(y / height * 2 * np.pi)
    g = 60 + 150 * (y / height)
    b = 200 - 150 * (x / width)
    image = np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)
    for _ in range(12):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        radius = int(rng.integers(min(height, width) // 20, min(height, width) // 6))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(image, (int(cx), int(cy)), radius, colour, -1)
    texture = cv2.GaussianBlur(rng.normal(0, 12, (height, width)).astype(np.float32), (0, 0), 1.5)
    return cv2.add(image, texture[:, :, None].astype(np.int16).repeat(3, axis=2), dtype=cv2.CV_8U)


def encode(rgb: np.ndarray, fmt: str, **options) -> bytes:
    """Encode an RGB (or L/RGBA) uint8 array with Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **options)
    return buffer.getvalue()


def png(rgb: np.ndarray) -> bytes:
    return encode(rgb, "PNG")


def gray_png(gray: np.ndarray) -> bytes:
    return encode(gray, "PNG")  # 2-D array -> Pillow mode L


def rgba_png(rgba: np.ndarray) -> bytes:
    return encode(rgba, "PNG")


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG from a uint16 gray (H, W) or RGB (H, W, 3) array."""
    bgr = samples if samples.ndim == 2 else cv2.cvtColor(samples, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError("OpenCV could not encode a 16-bit PNG")
    return data.tobytes()


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=98)
    return buffer.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    return encode(rgb, "JPEG", quality=quality)


def exif_rotated_jpeg(upright: np.ndarray, quality: int = 95) -> bytes:
    """A JPEG stored turned 90 degrees counter-clockwise with EXIF orientation 6 (display: rotate
    90 clockwise), as phone cameras write them; shown upright it equals `upright`."""
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # rot90 k=1 turns counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def bmp(rgb: np.ndarray) -> bytes:
    return encode(rgb, "BMP")


def tiff(rgb: np.ndarray) -> bytes:
    return encode(rgb, "TIFF")


def webp_lossless(rgb: np.ndarray) -> bytes:
    return encode(rgb, "WEBP", lossless=True)


def gif(rgb: np.ndarray) -> bytes:
    """A GIF (palette of the image's few colours, so lossless for flat scenes)."""
    return encode(rgb, "GIF")

"""Resize policies: how an image is fitted to the target size (`RESIZE_POLICIES`), and the
area-averaging shrink they share.

`stretch`, `letterbox` (aspect kept, padded with `pad_value`) or `center_crop` (aspect kept, the
centre cut out); area averaging when shrinking (within a grey level of OpenCV's INTER_AREA at a
third of its cost), bilinear otherwise. Register another with `resize_policy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from imageiq_spark.core.registry import RESIZE_POLICIES
from imageiq_spark.vision.spec import TransformSpec

Fit = Callable[[np.ndarray, TransformSpec], np.ndarray]


@dataclass(frozen=True)
class ResizePolicy:
    """How an image is fitted to the target size: one of `RESIZE_POLICIES`."""

    #: (H, W, C) uint8 image -> `spec.size` image, same channels.
    fit: Callable[[np.ndarray, TransformSpec], np.ndarray]
    #: True when the image is scaled to cover the target on both axes (the larger per-axis scale
    #: counts), False when it is scaled to fit inside it; reduced JPEG decoding follows from it.
    covers: bool
    #: TransformSpec fields only this policy reads: they count in `version` only when it is used.
    params: tuple[str, ...] = ()


def resize_policy(name: str, covers: bool, params: tuple[str, ...] = ()) -> Callable[[Fit], Fit]:
    """Register `fit(image, spec)` as the resize policy `name` (see `ResizePolicy`)."""

    def register(fit: Fit) -> Fit:
        RESIZE_POLICIES[name] = ResizePolicy(fit, covers, params)
        return fit

    return register


def resize(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Fit an (H, W, C) image to `spec.size` by the spec's policy; keeps the channel axis."""
    return RESIZE_POLICIES[spec.resize].fit(image, spec)


@resize_policy("stretch", covers=True)
def _stretch(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Each axis scaled to the target on its own: the aspect ratio may change."""
    return _resize_to(image, *spec.size)


@resize_policy("letterbox", covers=False, params=("pad_value",))
def _letterbox(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Aspect kept: scaled to fit inside the target, padded with `pad_value`."""
    th, tw = spec.size
    h, w = image.shape[:2]
    scale = min(th / h, tw / w)
    nh, nw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
    out = np.full((th, tw, image.shape[2]), spec.pad_value, np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = _resize_to(image, nh, nw)
    return out


@resize_policy("center_crop", covers=True)
def _center_crop(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Aspect kept: scaled to cover the target, the centre cut out."""
    th, tw = spec.size
    h, w = image.shape[:2]
    # Cut the target's aspect out of the middle first, then resize once: cheaper than
    # resizing the whole image and cropping after.
    scale = max(th / h, tw / w)
    ch, cw = min(h, round(th / scale)), min(w, round(tw / scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize_to(image[top : top + ch, left : left + cw], th, tw)


def _resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if height <= h and width <= w:
        out = _shrink(image, height, width)
    else:
        out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


#: Above this ratio (source over target, on some axis) a bilinear step would skip source pixels.
SUPERSAMPLE_RATIO = 2.5


def _shrink(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average an image down to (height, width), within a grey level of OpenCV's INTER_AREA.

    OpenCV's exact INTER_AREA is scalar code at non-integer ratios: 1.2-1.9 ms for a 500x375 photo
    to 224x224, more than its JPEG decode. Its 2x2 mean is SIMD. So the image is halved by 2x2
    means while it is over 2.5 times the target, resampled bilinearly to exactly twice the target
    (an upscale or a mild downscale, which skips no source pixel) and averaged 2x2 once more: 2.5x
    faster there, 0.14 grey levels mean from INTER_AREA (docs/benchmarks.md, tests).
    """
    h, w = image.shape[:2]
    while max(h / height, w / width) > SUPERSAMPLE_RATIO and h >= 2 * height and w >= 2 * width:
        image = cv2.resize(image[: h - h % 2, : w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    if max(h / height, w / width) > SUPERSAMPLE_RATIO:
        # Very uneven ratios (a long strip): one axis cannot be halved any more.
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if (h, w) != (2 * height, 2 * width):
        image = cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)

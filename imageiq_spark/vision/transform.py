"""The one image transform: encoded bytes -> fixed-size uint8 tensor (numpy in, numpy out, no Spark).

Preprocessing, training, scoring and the exported model all call `prepare_image` / `prepare_batch`
with the same `TransformSpec` (`vision.spec`), so the pixels a model sees in production are computed
exactly as in training (no train/serve skew). Steps, in order:

1. decode (`vision.decode`) with OpenCV (Pillow only for what OpenCV cannot read, such as GIF);
   JPEGs much larger than the target are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain;
2. EXIF orientation applied (JPEG, PNG, WebP, TIFF);
3. colour layout to RGB (gray, BGR, BGRA composited over white, CMYK via libjpeg) or to gray;
   16-bit samples to 8-bit (x / 257, rounded);
4. resize by policy (`vision.resize`, `RESIZE_POLICIES`): `stretch`, `letterbox` or `center_crop`;
5. enhancement operators in the order listed (`vision.enhance`): `clahe`, `denoise`, `unsharp`,
   `white_balance`, `gamma`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from imageiq_spark.vision.decode import DECODE_FAILED, ImageDecodeError, decode_upright, final_layout
from imageiq_spark.vision.enhance import enhance
from imageiq_spark.vision.resize import resize
from imageiq_spark.vision.spec import TransformSpec

#: Any other error of the transform on one image (a bug or a library failure on odd input).
TRANSFORM_FAILED = "transform_failed"


def prepare_image(data: bytes | memoryview | np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C) C-contiguous RGB (or gray) tensor of `spec.shape`.

    Raises ImageDecodeError for bytes that are not a decodable image.
    """
    try:
        image, order = decode_upright(data, spec)
    except cv2.error as exc:
        raise ImageDecodeError(DECODE_FAILED, f"OpenCV: {str(exc).strip()[:200]}") from exc
    out = enhance(final_layout(resize(image, spec), order, spec.color), spec)
    return np.ascontiguousarray(out, dtype=np.uint8)


def prepare_batch(
    contents: Sequence[bytes | memoryview | np.ndarray], spec: TransformSpec
) -> tuple[np.ndarray, list[tuple[int, ImageDecodeError]]]:
    """Prepare many images: (good tensors stacked (N, H, W, C) uint8, [(index, error) of failures]).

    Never raises for one image: an unexpected error becomes a `transform_failed` failure, so no
    single input can fail a batch.
    """
    out = np.empty((len(contents), *spec.shape), np.uint8)
    failures: list[tuple[int, ImageDecodeError]] = []
    n = 0
    for index, data in enumerate(contents):
        try:
            out[n] = prepare_image(data, spec)
            n += 1
        except ImageDecodeError as exc:
            failures.append((index, exc))
        except Exception as exc:  # noqa: BLE001 - quarantined with its message, the batch goes on
            failures.append((index, ImageDecodeError(TRANSFORM_FAILED, f"{type(exc).__name__}: {exc}"[:500])))
    return out[:n], failures

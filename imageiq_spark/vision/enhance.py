"""Enhancement operators, applied in the order `TransformSpec.enhance` lists them: `clahe` (on
luminance), `denoise` (non-local means), `unsharp` (unsharp mask), `white_balance` (gray world),
`gamma` (out = 255 (in/255)^(1/gamma))."""

from __future__ import annotations

import cv2
import numpy as np

from imageiq_spark.vision.spec import TransformSpec


def enhance(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Apply the spec's enhancement operators in the order listed."""
    for operator in spec.enhance:
        image = _OPERATORS[operator](image, spec)
        if image.ndim == 2:
            image = image[:, :, None]
    return image


def _clahe(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip_limit,
                            tileGridSize=(spec.clahe_tile_grid, spec.clahe_tile_grid))
    if image.shape[2] == 1:
        return clahe.apply(image[:, :, 0])
    # Equalise luminance only: equalising R, G and B separately shifts hues.
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _denoise(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    h = spec.denoise_strength
    if image.shape[2] == 1:
        return cv2.fastNlMeansDenoising(np.ascontiguousarray(image[:, :, 0]), None, h, 7, 21)
    return cv2.fastNlMeansDenoisingColored(image, None, h, h, 7, 21)


def _unsharp(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    blurred = cv2.GaussianBlur(image, (0, 0), spec.unsharp_sigma)
    return cv2.addWeighted(image, 1.0 + spec.unsharp_amount, blurred, -spec.unsharp_amount, 0)


def _white_balance(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    if image.shape[2] == 1:
        return image  # a gray image has no colour cast
    # Gray world: scale each channel so that its mean equals the mean over all channels.
    means = image.reshape(-1, 3).mean(axis=0)
    gains = means.mean() / np.maximum(means, 1e-6)
    return np.clip(image.astype(np.float32) * gains.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def _gamma(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** (1.0 / spec.gamma)), 0, 255)
    return cv2.LUT(image, table.astype(np.uint8))


_OPERATORS = {
    "clahe": _clahe,
    "denoise": _denoise,
    "unsharp": _unsharp,
    "white_balance": _white_balance,
    "gamma": _gamma,
}

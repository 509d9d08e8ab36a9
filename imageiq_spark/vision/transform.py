"""The one image transform: encoded bytes -> fixed-size uint8 tensor (numpy in, numpy out, no Spark).

Preprocessing, training, scoring and the exported model all call `prepare_image` / `prepare_batch`
with the same `TransformSpec`, so the pixels a model sees in production are computed exactly as in
training (no train/serve skew). Steps, in order:

1. decode with OpenCV (Pillow only for what OpenCV cannot read, such as GIF); JPEGs much larger than
   the target are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping at least twice the
   resized size on each side;
2. EXIF orientation applied (JPEG, PNG, WebP, TIFF);
3. colour layout to RGB (gray, BGR, BGRA composited over white, CMYK via libjpeg) or to gray;
   16-bit samples to 8-bit (x / 257, rounded);
4. resize by policy (`RESIZE_POLICIES`): `stretch`, `letterbox` (aspect kept, padded with
   `pad_value`) or `center_crop` (aspect kept, the centre cut out); area averaging when shrinking
   (within a grey level of OpenCV's INTER_AREA at a third of its cost), bilinear otherwise;
5. enhancement operators in the order listed: `clahe` (on luminance), `denoise` (non-local means),
   `unsharp` (unsharp mask), `white_balance` (gray world), `gamma` (out = 255 (in/255)^(1/gamma)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin

from imageiq_spark.core.config import Config
from imageiq_spark.core.config_sections import PreprocessConfig
from imageiq_spark.core.registry import RESIZE_POLICIES

Fit = Callable[[np.ndarray, "TransformSpec"], np.ndarray]

#: Bumped whenever the code changes the pixels it produces for the same parameters, so that the
#: table's `preprocess_version` changes with it (2: shrinking by 2x2 means over a supersample).
ALGORITHM_REVISION = 2
COLORS = ("rgb", "gray")
ENHANCEMENTS = ("clahe", "denoise", "unsharp", "white_balance", "gamma")
#: Parameters that only matter when their operator is listed in `enhance`.
ENHANCE_PARAMS = {
    "clahe": ("clahe_clip_limit", "clahe_tile_grid"),
    "denoise": ("denoise_strength",),
    "unsharp": ("unsharp_amount", "unsharp_sigma"),
    "white_balance": (),
    "gamma": ("gamma",),
}
DECODE_FAILED, EMPTY, UNSUPPORTED = "decode_failed", "empty", "unsupported"
#: Any other error of the transform on one image (a bug or a library failure on odd input).
TRANSFORM_FAILED = "transform_failed"


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


class ImageDecodeError(ValueError):
    """The bytes could not be turned into a tensor; `reason` is the short quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: The transform's defaults are the `preprocess` section's.
_PREPROCESS = PreprocessConfig()


@dataclass(frozen=True)
class TransformSpec:
    """Every parameter of the transform; its `version` hash names the tensors it makes."""

    size: tuple[int, int] = (32, 32)  # (height, width)
    color: str = _PREPROCESS.color
    resize: str = _PREPROCESS.resize
    enhance: tuple[str, ...] = tuple(_PREPROCESS.enhance)
    clahe_clip_limit: float = _PREPROCESS.clahe_clip_limit
    clahe_tile_grid: int = _PREPROCESS.clahe_tile_grid
    denoise_strength: float = _PREPROCESS.denoise_strength
    unsharp_amount: float = _PREPROCESS.unsharp_amount
    unsharp_sigma: float = _PREPROCESS.unsharp_sigma
    gamma: float = _PREPROCESS.gamma
    pad_value: int = _PREPROCESS.pad_value
    reduced_decode: bool = _PREPROCESS.reduced_decode

    def __post_init__(self) -> None:
        # Normalise lists from JSON/config to tuples so the spec is hashable and compares equal.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "enhance", tuple(self.enhance))
        problems = []
        if len(self.size) != 2 or min(self.size) <= 0:
            problems.append(f"size expects (height, width) of two positive integers, got {self.size}")
        if self.color not in COLORS:
            problems.append(f"color expects one of {COLORS}, got {self.color!r}")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize expects one of {tuple(RESIZE_POLICIES)}, got {self.resize!r}")
        unknown = [e for e in self.enhance if e not in ENHANCEMENTS]
        if unknown:
            problems.append(f"enhance expects operators from {ENHANCEMENTS}, got {unknown}")
        if self.gamma <= 0:
            problems.append(f"gamma expects a positive number, got {self.gamma}")
        if not 0 <= self.pad_value <= 255:
            problems.append(f"pad_value expects an integer 0..255, got {self.pad_value}")
        if problems:
            raise ValueError("invalid TransformSpec: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Config) -> TransformSpec:
        """The spec of `preprocess`: every field but `size` is the config key of the same name."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "size"]
        return cls(size=config.image_size, **{name: getattr(config.preprocess, name) for name in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; `from_dict(spec.to_dict()) == spec`."""
        data = dataclasses.asdict(self)
        data["size"] = list(self.size)
        data["enhance"] = list(self.enhance)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"TransformSpec.from_dict: unknown keys {unknown}; expected some of {sorted(names)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def version(self) -> str:
        """Short stable hash of every parameter that can change the output pixels."""
        data = self.to_dict()
        # An operator's parameters count only when the operator is used: tuning an unused one
        # must not re-prepare the whole table.
        for operator, params in ENHANCE_PARAMS.items():
            if operator not in self.enhance:
                for name in params:
                    data.pop(name)
        for name, policy in RESIZE_POLICIES.items():
            if name != self.resize:
                for param in policy.params:
                    data.pop(param, None)
        data["algorithm_revision"] = ALGORITHM_REVISION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[0], self.size[1], self.channels


# ---------------------------------------------------------------------------------------- decode


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF header as stored (before orientation); None if unreadable.

    Pillow reads the header only (20 us on a 4000x3000 photo, against 16 ms for its 1/8 decode).
    """
    try:
        width, height = JpegImagePlugin.JpegImageFile(io.BytesIO(data)).size
    except Exception:  # Pillow raises SyntaxError, OSError, EOFError, struct.error...
        return None
    return height, width


def reduction_factor(stored: tuple[int, int], spec: TransformSpec) -> int:
    """Largest DCT-domain reduction (1, 2, 4 or 8) that leaves >= 2x the resized size on each side.

    The stored size may be rotated by EXIF orientation; both ways are checked, so the choice never
    depends on the orientation tag.
    """
    if not spec.reduced_decode:
        return 1
    height, width = stored
    scale = max(_resize_scale((height, width), spec), _resize_scale((width, height), spec))
    factor = 1
    for candidate in (2, 4, 8):
        if candidate * 2 * scale <= 1.0:
            factor = candidate
    return factor


def _resize_scale(shape: tuple[int, int], spec: TransformSpec) -> float:
    """The largest per-axis scale the resize policy applies to an image of `shape`."""
    sy, sx = spec.size[0] / shape[0], spec.size[1] / shape[1]
    # Covering (stretch: per axis, the larger counts) or fitting inside the target.
    return max(sy, sx) if RESIZE_POLICIES[spec.resize].covers else min(sy, sx)


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode(data: bytes | memoryview | np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Bytes -> upright uint8 image, RGB (H, W, 3) or gray (H, W, 1) per `spec.color`."""
    return _final_layout(*_decode_upright(data, spec), spec.color)


def _decode_upright(data: bytes | memoryview | np.ndarray, spec: TransformSpec) -> tuple[np.ndarray, str]:
    """Bytes -> (upright uint8 image, its channel order): one channel if gray, else 3 in that order.

    Only what must happen at full size is done here (alpha, 16-bit, reducing to gray); expanding
    gray to RGB and swapping BGR to RGB wait until after the resize, where they touch fewer pixels
    and give the same result (resizing treats channels independently).
    """
    raw = bytes(data) if isinstance(data, memoryview) else data
    if raw is None or len(raw) == 0:
        raise ImageDecodeError(EMPTY, "no bytes to decode")
    buf = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw
    head = bytes(buf[:16])
    order = "bgr"
    if head.startswith(b"\xff\xd8"):
        # libjpeg converts gray and CMYK to BGR and OpenCV applies the EXIF orientation.
        size = jpeg_size(bytes(buf[: min(len(buf), 1 << 16)])) or jpeg_size(bytes(buf))
        factor = reduction_factor(size, spec) if size else 1
        image = cv2.imdecode(buf, _REDUCED_FLAGS.get(factor, cv2.IMREAD_COLOR))
    else:
        # UNCHANGED keeps alpha and 16-bit samples, but skips OpenCV's orientation handling.
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if image is None:
            image, order = _decode_with_pillow(bytes(buf)), "rgb"
        elif head.startswith(b"\x89PNG") or head[8:12] == b"WEBP":
            image = apply_orientation(image, exif_orientation(bytes(buf)))
    if image is None:
        raise ImageDecodeError(DECODE_FAILED, f"OpenCV could not decode {len(buf)} bytes "
                                              f"starting {head[:8].hex()}")
    return _reduce_layout(_to_uint8(image), order, spec.color), order


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    """GIF (first frame) and other formats OpenCV lacks; RGB/RGBA/L order, orientation applied."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode not in ("L", "RGB", "RGBA", "I;16", "I"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info
                                      else "RGB")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def exif_orientation(data: bytes) -> int:
    """EXIF orientation tag of a PNG (eXIf chunk) or WebP (EXIF chunk); 1 when absent."""
    if data.startswith(b"\x89PNG"):
        at = data.find(b"eXIf")
        if at < 8:
            return 1
        (length,) = struct.unpack(">I", data[at - 4 : at])
        block = data[at + 4 : at + 4 + length]
    else:
        at = data.find(b"EXIF", 12)
        if at < 0:
            return 1
        (length,) = struct.unpack("<I", data[at + 4 : at + 8])
        block = data[at + 8 : at + 8 + length]
    orientation = Image.Exif()
    orientation.load(block)  # with or without the "Exif\0\0" prefix
    value = orientation.get(0x0112, 1)
    return value if value in range(1, 9) else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an image stored with EXIF `orientation` (1..8) to upright."""
    if orientation == 2:
        return cv2.flip(image, 1)
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)
    if orientation == 5:
        return cv2.transpose(image)
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(image), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # x / 257 maps 0..65535 exactly onto 0..255 (a right shift by 8 would bias downwards).
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype in (np.int32, np.uint32):  # Pillow's "I" mode
        return np.clip(image, 0, 255).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):  # HDR/EXR/float TIFF in 0..1
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    raise ImageDecodeError(UNSUPPORTED, f"sample type {image.dtype} is not supported")


def _reduce_layout(image: np.ndarray, order: str, color: str) -> np.ndarray:
    """Any channel layout -> gray (H, W, 1) or three channels in `order` (alpha composited)."""
    if image.ndim == 2:
        return image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        return image
    if channels == 2:  # gray + alpha
        gray = image[:, :, :1]
        image = np.concatenate([gray, gray, gray, image[:, :, 1:2]], axis=2)
        channels = 4
    if channels == 4:
        image = _composite_on_white(image)
    elif channels != 3:
        raise ImageDecodeError(UNSUPPORTED, f"{channels} colour channels are not supported")
    if color == "gray":
        code = cv2.COLOR_BGR2GRAY if order == "bgr" else cv2.COLOR_RGB2GRAY
        return cv2.cvtColor(image, code)[:, :, None]
    return image


def _final_layout(image: np.ndarray, order: str, color: str) -> np.ndarray:
    """A reduced layout -> RGB (H, W, 3) or gray (H, W, 1) per `color`."""
    if color == "gray" or (image.shape[2] == 3 and order == "rgb"):
        return image
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _composite_on_white(image: np.ndarray) -> np.ndarray:
    """Flatten transparency the way a viewer shows it on a white page."""
    alpha = image[:, :, 3:4].astype(np.uint16)
    color = image[:, :, :3].astype(np.uint16)
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- resize


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


# ----------------------------------------------------------------------------------- enhancement


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


# ------------------------------------------------------------------------------------ public API


def prepare_image(data: bytes | memoryview | np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, C) C-contiguous RGB (or gray) tensor of `spec.shape`.

    Raises ImageDecodeError for bytes that are not a decodable image.
    """
    try:
        image, order = _decode_upright(data, spec)
    except cv2.error as exc:
        raise ImageDecodeError(DECODE_FAILED, f"OpenCV: {str(exc).strip()[:200]}") from exc
    out = enhance(_final_layout(resize(image, spec), order, spec.color), spec)
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

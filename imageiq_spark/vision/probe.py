"""Header probe: format, size, channels and structural soundness of image bytes, without decoding.

Ingest quarantines empty, foreign, corrupt, truncated and oversized files with it; a decompression
bomb is rejected from its header alone. Pillow's plugins parse the headers of JPEG, GIF, BMP, TIFF
and WebP lazily (header only, no pixels); our own code stays where it is stricter:

- PBM/PGM/PPM (Netpbm, which Pillow's plugins above do not cover): magic P1-P6, width, height and
  maxval read here; a raw (P4-P6) file shorter than its rows is `truncated`.
- PNG: our chunk walk checks every CRC up to IEND, tells a file that ends early (`truncated`)
  from a damaged one (`corrupt`) and names the chunk, and reads the bit depth. Pillow's
  `Image.open` + `verify()` answer the same "cannot identify image file" for a bad CRC and for a
  file cut before its image data, and show 16-bit samples as mode "RGB". It is also faster:
  4.3 us against 17.6 us for Pillow's open + verify on a 28x28 MNIST PNG, 3.3 ms against 3.7 ms
  on a 7.5 MiB 4000x3000 PNG (timeit, best of 5, load average 1.0 on 2 cores).
- JPEG headers cost 25 us with Pillow against 7 us with a hand-written marker walk: kept on
  Pillow, as that is 0.15% of even a 1/8-scale decode of the same 4000x3000 photo (16 ms).
- Truncation: Pillow's `verify()` checks nothing but PNG without decoding, so the end of the
  data is checked against the header here (JPEG end-of-image marker, GIF trailer, BMP rows,
  TIFF strips, WebP RIFF size).
- Pixel limit: Pillow's `DecompressionBombError` is one process-wide limit
  (`Image.MAX_IMAGE_PIXELS`, raised only at twice it) and its message has no dimensions, so
  `ingest.max_pixels` is compared here and the plugins are called without Pillow's check.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass

from PIL import BmpImagePlugin, GifImagePlugin, ImageFile, JpegImagePlugin, TiffImagePlugin, WebPImagePlugin


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # as displayed, after EXIF orientation
    height: int
    channels: int
    bit_depth: int
    orientation: int = 1  # EXIF orientation tag, 1 = upright


class ProbeError(ValueError):
    """The bytes are not a usable image; `reason` is the short quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


EMPTY, NOT_IMAGE, CORRUPT, TRUNCATED = "empty", "not_image", "corrupt", "truncated"
TOO_LARGE, TOO_MANY_PIXELS = "too_large", "too_many_pixels"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Identify and check `data`; raises ProbeError with a quarantine reason."""
    if not data:
        raise ProbeError(EMPTY, "file has 0 bytes")
    if data.startswith(PNG_SIGNATURE):
        info = _png(data)
    elif data[:1] == b"P" and data[1:2] in _PNM_FORMATS and data[2:3].isspace():
        info = _pnm(data)
    else:
        info = _with_pillow(data)
    if info.width <= 0 or info.height <= 0:
        raise ProbeError(CORRUPT, f"{info.format} header gives size {info.width}x{info.height}")
    if max_pixels is not None and info.width * info.height > max_pixels:
        raise ProbeError(
            TOO_MANY_PIXELS,
            f"{info.width}x{info.height} = {info.width * info.height} pixels > {max_pixels}",
        )
    return info


def _png(data: bytes) -> ImageInfo:
    pos = len(PNG_SIGNATURE)
    header: tuple[int, int, int, int] | None = None
    has_alpha_chunk = False
    while True:
        if pos + 12 > len(data):
            raise ProbeError(TRUNCATED, "PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ProbeError(TRUNCATED, f"PNG chunk {kind!r} runs past the end of the file")
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise ProbeError(CORRUPT, f"PNG chunk {kind!r} at byte {pos} fails its CRC")
        if kind == b"IHDR" and length >= 10:
            header = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
        has_alpha_chunk |= kind == b"tRNS"
        if kind == b"IEND":
            break
        pos = end
    if header is None:
        raise ProbeError(CORRUPT, "PNG has no IHDR chunk")
    width, height, bit_depth, color_type = header
    channels = 4 if color_type == 3 and has_alpha_chunk else {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type, 0)
    return ImageInfo("png", width, height, channels, bit_depth)


#: Netpbm magic digit -> (format, channels); 1-4 are plain (ASCII) PBM/PGM/PPM, 4-6 raw (binary).
_PNM_FORMATS = {b"1": ("pbm", 1), b"2": ("pgm", 1), b"3": ("ppm", 3),
                b"4": ("pbm", 1), b"5": ("pgm", 1), b"6": ("ppm", 3)}
_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n\r]*)*(\d+)")


def _pnm(data: bytes) -> ImageInfo:
    """PBM/PGM/PPM: magic, width, height and (but for PBM) maxval, separated by whitespace and
    `#` comments; a raw file must hold the rows its header promises."""
    kind = data[1:2]
    name, channels = _PNM_FORMATS[kind]
    what = name.upper()
    values, pos = [], 2
    for _ in range(2 if name == "pbm" else 3):
        match = _PNM_TOKEN.match(data, pos)
        if match is None:
            reason = TRUNCATED if data[pos:].strip() == b"" else CORRUPT
            raise ProbeError(reason, f"{what} header has no {('width', 'height', 'maxval')[len(values)]}")
        values.append(int(match.group(1)))
        pos = match.end()
    width, height = values[:2]
    maxval = values[2] if name != "pbm" else 1
    if not 0 < maxval < 65536:
        raise ProbeError(CORRUPT, f"{what} maxval {maxval} is outside 1..65535")
    bits = 1 if name == "pbm" else 8 if maxval < 256 else 16
    if kind in b"456" and data[pos:pos + 1].isspace():
        # One whitespace byte ends a raw header; the samples follow.
        row = (width + 7) // 8 if name == "pbm" else width * channels * bits // 8
        if len(data) - pos - 1 < row * height:
            raise ProbeError(TRUNCATED, f"{what} pixel data is shorter than its {width}x{height} header says")
    elif kind in b"456":
        raise ProbeError(TRUNCATED if pos == len(data) else CORRUPT, f"{what} header is not followed by data")
    return ImageInfo(name, width, height, channels, bits)


#: Signature -> Pillow plugin class. Called directly: `Image.open` would apply its own pixel limit.
_PLUGINS: dict[bytes, type[ImageFile.ImageFile]] = {
    b"\xff\xd8": JpegImagePlugin.JpegImageFile,
    b"GIF87a": GifImagePlugin.GifImageFile,
    b"GIF89a": GifImagePlugin.GifImageFile,
    b"BM": BmpImagePlugin.BmpImageFile,
    b"II*\x00": TiffImagePlugin.TiffImageFile,
    b"MM\x00*": TiffImagePlugin.TiffImageFile,
    b"RIFF": WebPImagePlugin.WebPImageFile,
}


def _with_pillow(data: bytes) -> ImageInfo:
    plugin = next((p for sig, p in _PLUGINS.items() if data.startswith(sig)), None)
    if plugin is None or (plugin is WebPImagePlugin.WebPImageFile and data[8:12] != b"WEBP"):
        raise ProbeError(NOT_IMAGE, f"unknown signature {data[:8].hex()}")
    stream = io.BytesIO(data)
    try:
        image = plugin(stream)
    except Exception as exc:  # Pillow raises SyntaxError, OSError, EOFError, struct.error...
        # Running out of bytes is what tells a cut header from a damaged one.
        reason = TRUNCATED if stream.tell() >= len(data) else CORRUPT
        raise ProbeError(reason, f"{plugin.format} header cannot be read: {exc}") from exc
    problem = _ends_early(image, data, stream.tell())
    if problem:
        raise ProbeError(TRUNCATED, problem)
    width, height = image.size
    orientation, bits = 1, 8
    if image.format == "JPEG":
        orientation = image.getexif().get(0x0112, 1)
        orientation = orientation if orientation in range(1, 9) else 1
        bits = image.bits
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    elif image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))[0]
    channels = 3 if image.mode == "P" else len(image.getbands())
    return ImageInfo(image.format.lower(), width, height, channels, bits, orientation)


def _ends_early(image: ImageFile.ImageFile, data: bytes, header_end: int) -> str | None:
    """Why the data is shorter than the header says, or None."""
    # (codec, extents, offset, decoder args) of the first tile; a raw BMP's args hold its row stride.
    codec, _extents, offset, args = image.tile[0] if image.tile else (None, None, 0, ())
    if image.format == "JPEG" and data.rfind(b"\xff\xd9", header_end) < 0:
        return "JPEG has no end-of-image marker"
    if image.format == "GIF" and data.rstrip(b"\0")[-1:] != b"\x3b":
        return "GIF has no trailer byte"
    if image.format == "BMP" and codec == "raw" and offset + args[1] * image.size[1] > len(data):
        return "BMP pixel data is shorter than its header says"
    if image.format == "TIFF":
        offsets = image.tag_v2.get(273) or image.tag_v2.get(324) or ()
        counts = image.tag_v2.get(279) or image.tag_v2.get(325) or ()
        if max((o + c for o, c in zip(offsets, counts)), default=0) > len(data):
            return "TIFF image data is shorter than its directory says"
    if image.format == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "WebP is shorter than its RIFF header says"
    return None

"""Header probe: format, size, channels and structural soundness of image bytes, without decoding.

The probe reads headers and walks the container structure (PNG chunks with their CRCs, JPEG
markers, GIF/BMP/TIFF/WebP layouts) so that ingest can quarantine empty, foreign, corrupt,
truncated and oversized files - a decompression bomb is rejected from its header alone.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass


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


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Identify and check `data`; raises ProbeError with a quarantine reason."""
    if not data:
        raise ProbeError(EMPTY, "file has 0 bytes")
    for signature, parser in _PARSERS:
        if data.startswith(signature):
            try:
                info = parser(data)
            except (struct.error, IndexError) as exc:
                raise ProbeError(TRUNCATED, f"header ends early ({exc})") from exc
            break
    else:
        if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            info = _webp(data)
        else:
            raise ProbeError(NOT_IMAGE, f"unknown signature {data[:8].hex()}")
    if info.width <= 0 or info.height <= 0:
        raise ProbeError(CORRUPT, f"{info.format} header gives size {info.width}x{info.height}")
    if max_pixels is not None and info.width * info.height > max_pixels:
        raise ProbeError(
            TOO_MANY_PIXELS,
            f"{info.width}x{info.height} = {info.width * info.height} pixels > {max_pixels}",
        )
    return info


def _png(data: bytes) -> ImageInfo:
    pos = 8
    width = height = bit_depth = color_type = None
    has_alpha_chunk = False
    while True:
        if pos + 8 > len(data):
            raise ProbeError(TRUNCATED, "PNG ends before its IEND chunk")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ProbeError(TRUNCATED, f"PNG chunk {kind!r} runs past the end of the file")
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise ProbeError(CORRUPT, f"PNG chunk {kind!r} at byte {pos} fails its CRC")
        if kind == b"IHDR":
            width, height, bit_depth, color_type = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
        elif kind == b"tRNS":
            has_alpha_chunk = True
        elif kind == b"IEND":
            break
        pos = end
    if width is None or bit_depth is None:
        raise ProbeError(CORRUPT, "PNG has no IHDR chunk")
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type or 0, 0)
    if color_type == 3 and has_alpha_chunk:
        channels = 4
    return ImageInfo("png", width, height or 0, channels, bit_depth)


SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(marker, offset, payload) of each JPEG header segment, up to and including start of scan.

    Raises ProbeError when the bytes end early or a marker is missing.
    """
    pos = 2
    while True:
        if pos + 4 > len(data):
            raise ProbeError(TRUNCATED, "JPEG ends before its image data")
        if data[pos] != 0xFF:
            raise ProbeError(CORRUPT, f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if len(segment) < length - 2:
            raise ProbeError(TRUNCATED, f"JPEG segment 0x{marker:02X} runs past the end")
        yield marker, pos, segment
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        pos += 2 + length


def _jpeg(data: bytes) -> ImageInfo:
    size: tuple[int, int, int, int] | None = None
    orientation = 1
    scan = 2  # offset of the start-of-scan segment: entropy data and EOI lie beyond it
    for marker, offset, segment in jpeg_segments(data):
        scan = offset
        if marker in SOF_MARKERS:
            bits, height, width, components = struct.unpack(">BHHB", segment[:6])
            size = (width, height, components, bits)
        elif marker == 0xE1 and segment.startswith(b"Exif\0\0"):
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xD9:
            raise ProbeError(CORRUPT, "JPEG ends before any image data")
    if size is None:
        raise ProbeError(CORRUPT, "JPEG has no frame header (SOF)")
    if data.rfind(b"\xff\xd9", scan) < 0:
        raise ProbeError(TRUNCATED, "JPEG has no end-of-image marker")
    width, height, components, bits = size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageInfo("jpeg", width, height, components, bits, orientation)


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 in an EXIF TIFF block; 1 when absent or unreadable."""
    try:
        endian = "<" if tiff[:2] == b"II" else ">"
        (ifd,) = struct.unpack(endian + "I", tiff[4:8])
        (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:
                (value,) = struct.unpack(endian + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def _gif(data: bytes) -> ImageInfo:
    width, height = struct.unpack("<HH", data[6:10])
    if data.rstrip(b"\0")[-1:] != b"\x3b":
        raise ProbeError(TRUNCATED, "GIF has no trailer byte")
    return ImageInfo("gif", width, height, 3, 8)


def _bmp(data: bytes) -> ImageInfo:
    (pixel_offset,) = struct.unpack("<I", data[10:14])
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:
        width, height, _planes, bits = struct.unpack("<HHHH", data[18:26])
        compression = 0
    elif header_size >= 40:
        width, height, _planes, bits, compression = struct.unpack("<iiHHI", data[18:34])
    else:
        raise ProbeError(CORRUPT, f"BMP header size {header_size} is not a known one")
    height = abs(height)
    if compression == 0 and width > 0:
        row_bytes = (width * bits + 31) // 32 * 4
        if pixel_offset + row_bytes * height > len(data):
            raise ProbeError(TRUNCATED, "BMP pixel data is shorter than its header says")
    channels = 4 if bits == 32 else 3
    return ImageInfo("bmp", width, height, channels, 8)


def _tiff(data: bytes) -> ImageInfo:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd + 2 > len(data):
        raise ProbeError(TRUNCATED, "TIFF directory lies past the end of the file")
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    tags: dict[int, list[int]] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(endian + "HHI", entry[:8])
        fmt = {3: "H", 4: "I"}.get(kind)
        if fmt is None:
            continue
        size = struct.calcsize(fmt) * n
        raw = entry[8 : 8 + size] if size <= 4 else data[
            struct.unpack(endian + "I", entry[8:12])[0] :
        ][:size]
        if len(raw) < size:
            raise ProbeError(TRUNCATED, f"TIFF tag {tag} lies past the end of the file")
        tags[tag] = list(struct.unpack(endian + fmt * n, raw))
    width, height = tags.get(256, [0])[0], tags.get(257, [0])[0]
    offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
    if offsets and counts and max(o + c for o, c in zip(offsets, counts)) > len(data):
        raise ProbeError(TRUNCATED, "TIFF image data is shorter than its directory says")
    return ImageInfo("tiff", width, height, tags.get(277, [1])[0], tags.get(258, [8])[0])


def _webp(data: bytes) -> ImageInfo:
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 > len(data):
        raise ProbeError(TRUNCATED, "WebP is shorter than its RIFF header says")
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        channels = 4 if data[20] & 0x10 else 3
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        channels = 4 if (bits >> 28) & 1 else 3
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ProbeError(CORRUPT, "WebP VP8 frame has no start code")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
        channels = 3
    else:
        raise ProbeError(CORRUPT, f"WebP chunk {chunk!r} is not a known one")
    return ImageInfo("webp", width, height, channels, 8)


_PARSERS = (
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"BM", _bmp),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
)

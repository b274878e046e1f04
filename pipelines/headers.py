"""The size of an encoded image as a decoder will output it, read from its header bytes in memory:
a JPEG's frame header and EXIF orientation, a PNG's IHDR; other formats through PIL. A few
microseconds a JPEG, so a loader can size every crop window on the host."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import _Corrupt, _jpeg_frame

_TRANSPOSED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap height and width
_PNG = b"\x89PNG\r\n\x1a\n"


def decoded_shape(data: bytes | np.ndarray, path: str | Path = "image") -> tuple[int, int]:
    """(height, width) in px of the encoded image `data` once decoded and turned upright by its EXIF
    orientation (as DALI's and PIL's `exif_transpose` decoders do). ValueError naming `path` if the
    header cannot be read."""
    buf = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        if buf[:3] == b"\xff\xd8\xff":
            return _jpeg_shape(buf)
        if buf[:8] == _PNG and buf[12:16] == b"IHDR":
            width, height = struct.unpack_from(">II", buf, 16)
            return height, width
        with Image.open(io.BytesIO(buf)) as im:
            width, height = im.size
            return (width, height) if im.getexif().get(0x0112) in _TRANSPOSED else (height, width)
    except (struct.error, IndexError, OSError, ValueError, _Corrupt) as e:
        raise ValueError(f"{path}: cannot read the image size from its header ({e})") from None


def _jpeg_shape(buf: bytes) -> tuple[int, int]:
    _, height, width, scan = _jpeg_frame(io.BytesIO(buf))  # the frame header, as the tree scan reads it
    exif = buf.find(b"Exif\0\0", 0, scan)  # the APP1 segment holding EXIF, before the image data
    orientation = _exif_orientation(buf, exif + 6) if exif >= 4 and buf[exif - 4 : exif - 2] == b"\xff\xe1" else 1
    return (width, height) if orientation in _TRANSPOSED else (height, width)


def _exif_orientation(buf: bytes, tiff: int) -> int:
    """The Orientation tag (0x0112) of IFD0 of the TIFF structure at offset `tiff`; 1 if absent."""
    order = "<" if buf[tiff : tiff + 2] == b"II" else ">"
    ifd = tiff + struct.unpack_from(order + "I", buf, tiff + 4)[0]
    for k in range(struct.unpack_from(order + "H", buf, ifd)[0]):
        tag, _, _, value = struct.unpack_from(order + "HHIH", buf, ifd + 2 + 12 * k)
        if tag == 0x0112:
            return value
    return 1

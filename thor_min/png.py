"""PNG files by hand: encode an RGB raster, write it atomically, and read it back.

What it does: `encode_png` lays out the signature and the IHDR, IDAT and IEND chunks (each with its
length and CRC-32) around the zlib-deflated scanlines of a (height, width, 3) uint8 image;
`write_png` writes those bytes to a temporary file in the target folder and `os.replace`s it into
place, so a viewer watching a run directory never sees half a file; `read_png` / `read_png_size`
read such a file back (used by tests and by anything that checks a written plot).

Design choice: thor-min has no imaging dependency (no PIL); the PNG format needs only zlib and
struct, and every image is stored the simplest valid way (8-bit RGB, no interlacing, filter type 0
on every scanline), which keeps the output byte-for-byte deterministic. The drawing itself lives
in `thor_min/plot.py`.

Limits: no palette, alpha or 16-bit images, no row filters, so files are larger than an optimising
encoder's; `read_png` decodes only the 8-bit RGB, non-interlaced, filter-type-0 files this module
writes (anything else raises ValueError), and checks every chunk's CRC.
"""

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """length + type + body + CRC-32 of (type + body), as the PNG spec lays a chunk out."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (height, width, 3) uint8 image: 8-bit RGB, every scanline filter type 0."""
    height, width = image.shape[:2]
    scanlines = np.zeros((height, 1 + width * 3), np.uint8)     # first byte of each line: filter 0
    scanlines[:, 1:] = np.ascontiguousarray(image, np.uint8).reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + png_chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> None:
    """Write the image as a PNG via a temporary file in the same folder and os.replace, so the
    path holds either the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(image)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk of a PNG file."""
    with open(path, "rb") as file:
        head = file.read(24)
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def read_png(path) -> np.ndarray:
    """Decode a PNG written by this module into a (height, width, 3) uint8 array, checking every
    chunk's CRC. Only 8-bit RGB, non-interlaced, filter-type-0 images are supported."""
    data = Path(path).read_bytes()
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path} is not a PNG file")
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"{path}: CRC mismatch in {kind!r} chunk")
        chunks.append((kind, body))
        position += 12 + length
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if chunks[0][0] != b"IHDR" or (depth, color_type, interlace) != (8, 2, 0):
        raise ValueError(f"{path}: only 8-bit RGB non-interlaced PNGs are supported")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    scanlines = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * 3)
    if np.any(scanlines[:, 0] != 0):
        raise ValueError(f"{path}: only filter type 0 is supported")
    return scanlines[:, 1:].reshape(height, width, 3).copy()

"""Decompression bombs for tests: image files whose header declares more pixels than PIL opens.

Written by hand, in microseconds: a PNG header (IHDR) of 14000 x 14000 pixels (196 million, over
PIL's limit of 2 x ``Image.MAX_IMAGE_PIXELS`` = 178,956,970) and no image data to speak of. PIL
refuses such a file as it reads the header, before any decoding, as it refuses a real one.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

BOMB_SIDE = 14_000
BOMB_PIXELS = BOMB_SIDE * BOMB_SIDE


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """The bytes of an 8-bit RGB PNG of ``width`` x ``height`` with one empty data chunk."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


def write_bomb(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bomb_png())
    return path

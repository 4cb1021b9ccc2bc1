"""Record framing shared by segment files and the journal: ``[u32 length][u32 crc32][payload]``.

Little endian; the crc covers the length bytes and the payload, so a torn or
corrupt length is caught as surely as a corrupt payload.
"""

from __future__ import annotations

import struct
import zlib

HEADER = struct.Struct("<II")
#: Largest payload a frame may claim; a bigger length is treated as corruption
#: (it bounds the memory a corrupt length field can make recovery allocate).
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: writev takes at most IOV_MAX buffers per call.
IOV_MAX = 1024


def frame(payload: bytes) -> bytes:
    """The on-disk frame of ``payload``: length, crc32, payload."""
    length = len(payload).to_bytes(4, "little")
    return length + zlib.crc32(payload, zlib.crc32(length)).to_bytes(4, "little") + payload


def scan_frames(
    buf: bytes | memoryview, start: int = 0, limit: int | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Valid frames in ``buf`` from ``start``: ([(payload_start, payload_end)], valid_end).

    Stops at the first incomplete or corrupt frame (``valid_end`` is where it
    is), or after ``limit`` frames.
    """
    spans: list[tuple[int, int]] = []
    pos = start
    size = len(buf)
    while pos + HEADER.size <= size and (limit is None or len(spans) < limit):
        length, crc = HEADER.unpack_from(buf, pos)
        end = pos + HEADER.size + length
        if length > MAX_RECORD_BYTES or end > size:
            break
        body = buf[pos + HEADER.size : end]
        if zlib.crc32(body, zlib.crc32(buf[pos : pos + 4])) != crc:
            break
        spans.append((pos + HEADER.size, end))
        pos = end
    return spans, pos

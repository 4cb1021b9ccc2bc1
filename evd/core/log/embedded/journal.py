"""The embedded log's write-ahead journal (used with ``fsync: always``).

A group commit must make records of many partitions durable at once. Syncing
every partition file costs one fsync per file, and each of those syscalls hands
the GIL back and forth with the event loop. Instead a flush appends all its
records to one journal file with one write and one fsync, in the log's I/O
thread; only then are the records copied into their partition segment files
(page cache, from the event loop) and the requests answered. Partition files are
fsynced later, at a checkpoint, after which the journal files they cover are
deleted. Recovery replays journal entries that the partition files lack.

Each log writer has its own journal (a worker never writes another's files):
``<data_dir>/log/_journal/w<writer:03d>/<sequence:020d>.journal``, each a sequence of
entries ``frame(header) + frames``: ``header`` is ``<u64 offset><u32 partition>
<u32 frames length><u16 stream name length>`` and the stream name; ``frames``
are the partition's frames exactly as they go into its segment file, starting
at ``offset`` (an offset in that writer's sub-log of the partition).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from evd.core.files import fsync_dir
from evd.core.log.embedded.framing import IOV_MAX, frame, scan_frames

log = logging.getLogger(__name__)

ENTRY = struct.Struct("<QIIH")
SUFFIX = ".journal"
DIRNAME = "_journal"


class Entry(NamedTuple):
    """Frames of one partition, as journaled by one flush."""

    stream: str
    partition: int
    offset: int
    frames: bytes


def entry_head(stream: str, partition: int, offset: int, frames_len: int) -> bytes:
    """The framed header that precedes ``frames_len`` bytes of partition frames."""
    name = stream.encode()
    return frame(ENTRY.pack(offset, partition, frames_len, len(name)) + name)


def read_entries(path: Path) -> Iterator[Entry]:
    """Entries of one journal file, stopping at a torn or corrupt tail."""
    data = path.read_bytes()
    pos = 0
    while True:
        spans, _ = scan_frames(data, pos, limit=1)
        if not spans:
            break
        start, end = spans[0]
        if end - start < ENTRY.size:
            break
        offset, partition, frames_len, name_len = ENTRY.unpack_from(data, start)
        stream = data[start + ENTRY.size : start + ENTRY.size + name_len].decode()
        frames = data[end : end + frames_len]
        if len(frames) < frames_len or scan_frames(frames)[1] != frames_len:
            break
        yield Entry(stream, partition, offset, frames)
        pos = end + frames_len
    if pos < len(data):
        log.warning("journal %s: ignored %d bytes of torn tail", path, len(data) - pos)


class Journal:
    """Append-only journal files; one is written at a time."""

    def __init__(self, directory: Path, fsync_fn: Callable[[int], None]) -> None:
        self.dir = directory
        self.fsync_fn = fsync_fn
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files = sorted(p for p in self.dir.iterdir() if p.name.endswith(SUFFIX))
        self.fd = -1
        self.size = 0
        #: True while append() runs in the I/O thread; the file must not change then.
        self.writing = False

    def entries(self) -> Iterator[Entry]:
        """Every entry of the journal files that exist before ``start``."""
        for path in self.files:
            yield from read_entries(path)

    def start(self) -> list[Path]:
        """Open a new journal file; returns the older files (drop them once covered)."""
        if self.writing:
            raise RuntimeError("journal rotated while a flush writes it: rotate between flushes")
        old = list(self.files)
        seq = int(old[-1].name[: -len(SUFFIX)]) + 1 if old else 0
        path = self.dir / f"{seq:020d}{SUFFIX}"
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_dir(self.dir)
        self.files = [path]
        self.size = 0
        return old

    def append(self, iov: list[bytes]) -> None:
        """I/O thread: write ``iov`` and fsync; the whole flush is durable on return."""
        self.writing = True
        try:
            size = 0
            for i in range(0, len(iov), IOV_MAX):
                chunk = iov[i : i + IOV_MAX]
                want = sum(map(len, chunk))
                if os.writev(self.fd, chunk) != want:
                    raise OSError(f"short write to journal {self.files[-1]}")
                size += want
            self.fsync_fn(self.fd)
            self.size += size
        finally:
            self.writing = False

    def drop(self, paths: list[Path]) -> None:
        """Delete journal files whose records are durable in the partition files."""
        for path in paths:
            path.unlink(missing_ok=True)
        if paths:
            fsync_dir(self.dir)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


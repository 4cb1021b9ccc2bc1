"""Sub-logs: each log writer's own files, and reading them from any process.

Worker ``k`` of a server is log writer ``k``: it appends only to its own files,
so every file has a single writer. A partition is the set of its writers'
sub-logs; each sub-log has offsets of its own (byte positions from 0, as in
evd.core.log.embedded). Layout under ``<data_dir>/log``::

    <stream>/<partition:04d>/w<writer:03d>/<base:020d>.seg   a writer's segments
    <stream>/<partition:04d>/w<writer:03d>/durable           its published durable end
    _journal/w<writer:03d>/<sequence:020d>.journal           a writer's journal
    _wake                                                    written after each flush

**Durable ends.** After each flush (and after recovery) a writer publishes, for
every sub-log the flush wrote, the offset after its last durable record: a
native unsigned 64-bit integer (little endian on every platform evd runs on)
at the start of the sub-log's ``durable`` file, which the writer and its
readers map into memory. The writer stores it with one aligned 8-byte store and
readers load it with one aligned 8-byte load, so a reader sees the old value or
the new one, never a mix; the store comes after the frames are in the segment
file (page cache), so the bytes below a published end are there to read. A
reader never reads past the end it loaded: with ``fsync: always`` everything
below it is in the fsynced journal (recovery copies back whatever a power cut
takes from the segment), with the other policies it is what that policy calls
durable. The file is never fsynced: after a power cut the writer's recovery
publishes again before any worker starts. Only offsets travel this way, never
event data.

**Wake-ups.** After publishing, a flush writes one byte to ``_wake`` (one
``pwrite``, whatever the number of readers; nothing else when nobody watches).
A reader that found nothing new waits on an inotify watch of that file
(:class:`DurableWatch`, readable through ``loop.add_reader``). The kernel
queues the notification under a lock that the reader's read of it takes too,
so a publication made after a reader's last check is never missed, and it
merges a notification with an identical one still unread, so each watch holds
at most one pending no matter how many flushes happen: bounded, and a busy
reader costs the writers nothing more. A wake-up carries no data; it means
"some durable end moved", and the reader reloads the ends it cares about.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Self

from evd.core.errors import LogError
from evd.core.log import InvalidOffset, Record
from evd.core.log.embedded.framing import HEADER, scan_frames
from evd.core.log.records import header_of

__all__ = [
    "OffsetOutOfRange",
    "PublishedEnd",
    "SubLogReader",
    "announce_sublogs",
    "sublog_dir",
    "sublogs_generation",
    "writer_name",
    "writers_of",
]

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
#: Writer ids are 0..MAX_WRITERS-1 (three digits in the directory names).
MAX_WRITERS = 1000
DURABLE_FILE = "durable"
_WRITER_RE = re.compile(r"w(\d{3})")
#: The published end: one native u64 (an aligned single store and load).
_END_BYTES = 8


class OffsetOutOfRange(InvalidOffset):
    """A read asked for an offset that is no record's start in the sub-log's durable part.

    Past the durable end, before the first segment, or inside a record: a
    caller bug or an offset from elsewhere, never "no data yet" (that is []).
    """


def writer_name(writer: int) -> str:
    """The directory name of writer ``writer``'s files: ``w`` and three digits."""
    if not 0 <= writer < MAX_WRITERS:
        raise ValueError(f"log writer {writer} out of range 0..{MAX_WRITERS - 1}")
    return f"w{writer:03d}"


def parse_writer(name: str) -> int | None:
    """The writer id of a directory name like ``w003``, or None."""
    match = _WRITER_RE.fullmatch(name)
    return None if match is None else int(match.group(1))


def sublog_dir(log_root: Path, stream: str, partition: int, writer: int) -> Path:
    """The directory of writer ``writer``'s sub-log of ``stream``/``partition``."""
    return log_root / stream / f"{partition:04d}" / writer_name(writer)


#: Grows by a byte each time a writer opens its sub-logs of a stream/partition
#: (after their directories exist), so readers list directories only when it grew.
SUBLOGS_FILE = "_sublogs"


def announce_sublogs(log_root: Path) -> None:
    """Tell readers in any process that a sub-log directory may be new: one byte
    appended to ``<log>/_sublogs`` (O_APPEND: concurrent writers never overwrite)."""
    fd = os.open(log_root / SUBLOGS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)


def sublogs_generation(log_root: str) -> int | None:
    """The size of ``<log>/_sublogs`` (None: no writer announced yet). A reader
    that read it before listing the sub-log directories has seen every sub-log
    announced before; a larger value later means one more may exist."""
    try:
        return os.stat(log_root + "/" + SUBLOGS_FILE).st_size
    except FileNotFoundError:
        return None


def writers_of(data_dir: str | Path, stream: str, partition: int) -> list[int]:
    """The writers that have a sub-log of ``stream``/``partition``, in order.

    Includes writers that no longer run: their sub-logs stay readable.
    """
    directory = Path(data_dir) / "log" / stream / f"{partition:04d}"
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        w for name in names
        if (w := parse_writer(name)) is not None and (directory / name).is_dir()
    )


def list_bases(directory: Path) -> list[int]:
    """Base offsets of the segment files in ``directory``, ascending."""
    return sorted(
        int(name[: -len(SEGMENT_SUFFIX)])
        for name in os.listdir(directory)
        if name.endswith(SEGMENT_SUFFIX)
    )


class Segments:
    """The segment files of one sub-log, read with ``pread`` from any process.

    ``bases`` is shared with the writer's partition object in the writing
    process (it appends on a roll); a reader elsewhere relists the directory
    when a read runs off the last segment it knew.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.bases = list_bases(directory) or [0]
        self._fds: dict[int, int] = {}

    def path(self, base: int) -> Path:
        return self.dir / f"{base:020d}{SEGMENT_SUFFIX}"

    def relist(self) -> bool:
        """Pick up segments rolled since the last listing; True if there is a newer one."""
        bases = list_bases(self.dir)
        if not bases or bases[-1] <= self.bases[-1]:
            return False
        for base in set(self._fds) - set(bases):
            os.close(self._fds.pop(base))
        self.bases[:] = bases
        return True

    def _fd(self, base: int) -> int:
        fd = self._fds.get(base)
        if fd is None:
            try:
                fd = self._fds[base] = os.open(self.path(base), os.O_RDONLY)
            except FileNotFoundError:
                # Retention deleted it since this reader listed the segments.
                self.relist_all()
                raise OffsetOutOfRange(
                    f"segment {base} of {self.dir} was deleted by retention"
                ) from None
        return fd

    def relist_all(self) -> None:
        """Forget segments deleted by retention and learn new ones."""
        bases = list_bases(self.dir) or [self.bases[-1]]
        for base in set(self._fds) - set(bases):
            os.close(self._fds.pop(base))
        self.bases[:] = bases

    def delete_before(self, before: int) -> int:
        """Delete the segments that end at or before ``before``, oldest first, never
        the last one (it holds the sub-log's end); the bytes freed."""
        freed = 0
        bases = self.bases
        while len(bases) > 1 and bases[1] <= before:
            base = bases[0]
            fd = self._fds.pop(base, None)
            if fd is not None:
                os.close(fd)
            path = self.path(base)
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass  # deleted by another sweep (a retired writer's files)
            del bases[0]
        return freed

    def first(self) -> int:
        """The offset of the oldest retained record (the first segment's base)."""
        self.relist_all()
        return self.bases[0]

    def read(self, offset: int, limit: int, max_bytes: int, *, strict: bool) -> list[Record]:
        """Whole records from ``offset`` that end at or before ``limit``, about ``max_bytes``.

        At least one record when there is one, even a larger one. ``strict``:
        ``limit`` is a durable end, below which everything is whole records, so
        an offset past it or inside a record raises OffsetOutOfRange; a file
        shorter than ``limit`` (not recovered yet after a power cut) ends the
        read. Otherwise ``limit`` is where the files end and the read stops at
        the first incomplete or corrupt frame (a flush in progress).
        """
        if offset > limit:
            if strict:
                raise OffsetOutOfRange(
                    f"offset {offset} is past the durable end {limit} of {self.dir}"
                )
            return []
        out: list[Record] = []
        budget = max_bytes
        bases = self.bases
        while offset < limit and budget > 0:
            idx = bisect.bisect_right(bases, offset) - 1
            if idx < 0:
                raise OffsetOutOfRange(
                    f"offset {offset} precedes the first segment {bases[0]} of {self.dir}"
                )
            base = bases[idx]
            last = idx + 1 == len(bases)
            want = (limit if last else min(bases[idx + 1], limit)) - offset
            fd = self._fd(base)
            # Read at least one whole record even when it exceeds the budget.
            asked = min(want, max(budget, HEADER.size))
            buf = os.pread(fd, asked, offset - base)
            if len(buf) >= HEADER.size:
                first = HEADER.size + HEADER.unpack_from(buf, 0)[0]
                if len(buf) < first <= want:
                    asked = first
                    buf = os.pread(fd, first, offset - base)
            spans, valid = scan_frames(buf)
            if not spans:
                if strict and len(buf) == asked:
                    raise OffsetOutOfRange(
                        f"offset {offset} is not the start of a record in {self.dir}"
                    )
                if strict and last and self.relist():
                    continue  # the writer rolled to a segment this reader did not know
                break
            for start, end in spans:
                out.append(Record(offset + start - HEADER.size, offset + end, buf[start:end]))
            offset += valid
            budget -= valid
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _map_end(path: Path, writable: bool) -> tuple[mmap.mmap, memoryview] | None:
    """Map ``path``'s published end; None when the file is not (fully) there yet."""
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < _END_BYTES:
            if not writable:
                return None
            os.ftruncate(fd, _END_BYTES)  # left empty by a power cut
        buf = mmap.mmap(
            fd, _END_BYTES, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        )
    finally:
        os.close(fd)
    # A cast to "Q" stores and loads the value with one aligned 8-byte access
    # (struct would go byte by byte); the mapping is page aligned.
    return buf, memoryview(buf).cast("Q")


class PublishedEnd:
    """A writer's side of one sub-log's published durable end.

    ``view[0] = end`` publishes (one aligned store). The file is created once,
    whole (a temporary file renamed into place), and never replaced: readers
    keep their mapping of it across restarts of the writer.
    """

    def __init__(self, buf: mmap.mmap, view: memoryview) -> None:
        self._buf = buf
        self.view = view

    @classmethod
    def open(cls, directory: Path) -> PublishedEnd:
        path = directory / DURABLE_FILE
        mapped = _map_end(path, writable=True)
        if mapped is None:
            tmp = path.with_name(DURABLE_FILE + ".tmp")
            with open(tmp, "wb") as f:
                f.write(bytes(_END_BYTES))
            os.replace(tmp, path)
            mapped = _map_end(path, writable=True)
            assert mapped is not None
        return cls(*mapped)

    def close(self) -> None:
        self.view.release()
        self._buf.close()


class _EndView:
    """A reader's side of a published end, mapped once the writer created it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mapped: tuple[mmap.mmap, memoryview] | None = None

    def load(self) -> int:
        mapped = self._mapped
        if mapped is None:
            mapped = self._mapped = _map_end(self.path, writable=False)
            if mapped is None:
                return 0  # the writer has not published this sub-log yet
        return int(mapped[1][0])

    def close(self) -> None:
        if self._mapped is not None:
            buf, view = self._mapped
            view.release()
            buf.close()
            self._mapped = None


class SubLogReader:
    """Reads one writer's sub-log of a partition, from any process.

    Promises: ``read`` returns whole records, in offset order, that lie below
    the writer's published durable end, and never bytes past it (bytes a crash
    could still take away); every record below a published end is still there
    after the writer's recovery. An offset past the end, before the first
    segment or inside a record raises OffsetOutOfRange. The sub-log may not
    exist yet (its durable end is then 0), and it stays readable after its
    writer stopped running. Not thread safe; one reader per task.
    """

    def __init__(self, data_dir: str | Path, stream: str, partition: int, writer: int) -> None:
        self.stream = stream
        self.partition = partition
        self.writer = writer
        self.dir = sublog_dir(Path(data_dir) / "log", stream, partition, writer)
        self._end = _EndView(self.dir / DURABLE_FILE)
        self._segments: Segments | None = None
        self._closed = False

    def durable_end(self) -> int:
        """The offset after the last record the writer has published as durable."""
        if self._closed:
            raise RuntimeError("SubLogReader is closed")
        return self._end.load()

    def read(self, offset: int, max_bytes: int = 1 << 20) -> list[Record]:
        """Records from ``offset`` up to the durable end, about ``max_bytes``; [] at the end."""
        end = self.durable_end()
        if offset == end:
            return []
        if offset > end:
            raise OffsetOutOfRange(
                f"offset {offset} is past the durable end {end} of {self.dir}"
            )
        segments = self._segments
        if segments is None:
            segments = self._segments = Segments(self.dir)
        return segments.read(offset, end, max_bytes, strict=True)

    def first_offset(self) -> int:
        """The offset of the oldest record retention kept (0 before any segment)."""
        if self._segments is None:
            if not self.dir.is_dir():
                return 0
            self._segments = Segments(self.dir)
        return self._segments.first()

    def timestamp_at(self, offset: int) -> int | None:
        """The producer's timestamp of the record at ``offset`` (records.HEADER), or
        None when there is none (at the end, an untagged record, a deleted segment)."""
        try:
            records = self.read(offset, 1)
        except InvalidOffset:
            return None
        if not records:
            return None
        try:
            return header_of(records[0].payload, self.stream).timestamp
        except LogError:
            return None

    def close(self) -> None:
        self._closed = True
        self._end.close()
        if self._segments is not None:
            self._segments.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

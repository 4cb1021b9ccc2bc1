"""The embedded log: segment files on local disk with group commit.

Each worker process is a log writer with a stable id (its index); a writer
only ever writes its own files (evd.core.log.embedded.sublog). Layout under
``<data_dir>/log``::

    <stream>/<partition:04d>/w<writer:03d>/<base offset:020d>.seg   segments
    <stream>/<partition:04d>/w<writer:03d>/durable   published durable end
    <stream>/consumers/<name>/<partition:04d>.json  a consumer's committed offsets
    _journal/w<writer:03d>/<sequence:020d>.journal   write-ahead journal (fsync=always)
    _wake                                            written after each flush

A partition is the set of its writers' sub-logs. A segment is a sequence of
frames ``[u32 length][u32 crc32][payload]`` (little endian; the crc covers the
length bytes and the payload). Offsets are logical byte positions in a sub-log:
a segment's file name is the offset of its first byte, so segments are
contiguous and a reader seeks straight to an offset.

Group commit: appends are queued in memory and share one flush; every append
waits on the future of the flush that covers it. A flush starts once a pass of
the event loop brings no new append (or after a few passes), so a busy worker
makes fewer, larger flushes. With ``fsync: always`` a flush
is one write and one fsync of the journal (evd.core.log.embedded.journal) in a dedicated
thread, so the event loop keeps serving; then the frames are copied into the
partition files from the loop (page cache), the new durable ends are published
for readers in other processes, and the future completes. Partition
files are fsynced by checkpoints, beside later flushes. With ``interval`` and
``never`` the flush writes the partition files directly. A write or fsync error
is never retried on the same file (after a failed fsync the page cache state is
unknown): the log turns read-only and every pending and later append fails with
LogUnavailable.

Recovery runs per writer: it truncates a torn or corrupt tail of each of the
writer's sub-logs, logs how many bytes it dropped (never fatal), replays the
writer's journal entries that its files lack, then publishes the durable ends.
Sub-logs of writers that no longer run are recovered by recover_writers and
stay readable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from evd.core.errors import ConfigError, LogOverloaded, LogUnavailable
from evd.core.files import fsync_dir, make_dirs
from evd.core.log import Append, Producer, Record
from evd.core.log.embedded import metrics
from evd.core.log.embedded.framing import HEADER as FRAME_HEADER
from evd.core.log.embedded.framing import IOV_MAX, frame, scan_frames
from evd.core.log.embedded.journal import DIRNAME as JOURNAL_DIR
from evd.core.log.embedded.journal import Journal, entry_head
from evd.core.log.embedded.layout import (
    old_layout,
    partition_dirs,
    upgrade_layout,
    writers_on_disk,
)
from evd.core.log.embedded.sublog import (
    OffsetOutOfRange,
    PublishedEnd,
    Segments,
    announce_sublogs,
    sublog_dir,
    writer_name,
)
from evd.core.log.embedded.wake import Waker

__all__ = [
    "EmbeddedLog",
    "FsyncPolicy",
    "recover_writers",
]

log = logging.getLogger(__name__)

#: Most files one sync fsyncs at the same time.
FSYNC_THREADS = 8
#: Journal bytes after which partition files are fsynced and the journal dropped;
#: bounds the journal on disk and what recovery replays (log.checkpoint_bytes).
CHECKPOINT_BYTES = 8 * 1024 * 1024

#: Most event-loop passes a flush waits for more appends to join it, and the
#: pending bytes at which it stops waiting (see EmbeddedLog._gather_more).
GATHER_PASSES = 4
GATHER_BYTES = 1024 * 1024

FsyncPolicy = Literal["always", "interval", "never"]


class _Partition:
    """This writer's sub-log of one partition: its segment files and published durable
    end; written only from the event loop's thread."""

    def __init__(self, directory: Path, segment_bytes: int, keep_rolled: bool = True) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.segments = Segments(directory)
        #: The segments' base offsets (the same list as self.segments.bases).
        self.bases = self.segments.bases
        self.fd = -1
        self.seg_size = 0
        #: Offset after the last record covered by a completed flush.
        self.durable_end = 0
        #: Offset after the last record appended (queued or flushing); a queued
        #: record's offset is known when it is appended (one writer per file).
        self.queued_end = 0
        #: Where durable_end is published to readers in other processes (see publish);
        #: end_view is its mapped value (a scratch buffer until recover() maps it).
        self.published: PublishedEnd | None = None
        self.end_view = memoryview(bytearray(8)).cast("Q")
        #: Keep the fds of rolled segments open until the next sync fsyncs them
        #: (False with fsync=never: nothing will sync them).
        self.keep_rolled = keep_rolled
        #: Rolled segments' fds awaiting their fsync; the sync closes them.
        self.rolled: list[int] = []
        #: A segment file was created since the directory was last fsynced.
        self.dir_dirty = False

    def path(self, base: int) -> Path:
        return self.segments.path(base)

    def recover(self) -> int:
        """Open the last segment for append, truncating an invalid tail; bytes dropped.

        A rolled segment shorter than the span up to the next one lost its
        unsynced tail (a power cut after a roll, which does not fsync): the
        partition ends at that gap, and the later segments, unreachable past it,
        are removed (the journal replays what they held).
        """
        gap_dropped = 0
        for i in range(len(self.bases) - 1):
            size = self.path(self.bases[i]).stat().st_size
            if size < self.bases[i + 1] - self.bases[i]:
                for later in self.bases[i + 1 :]:
                    gap_dropped += self.path(later).stat().st_size
                    self.path(later).unlink()
                del self.bases[i + 1 :]
                break
        base = self.bases[-1]
        path = self.path(base)
        data = path.read_bytes() if path.exists() else b""
        _, valid = scan_frames(data)
        dropped = len(data) - valid
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if dropped:
            os.ftruncate(self.fd, valid)
            os.fsync(self.fd)
        fsync_dir(self.dir)
        self.seg_size = valid
        self.durable_end = base + valid
        # Mapped now, published once recovery is complete (_Partition.publish):
        # until then readers keep the end published before the crash, which is
        # at or below what recovery keeps.
        self.published = PublishedEnd.open(self.dir)
        self.end_view = self.published.view
        return dropped + gap_dropped

    def publish(self) -> None:
        """Let readers in other processes read up to durable_end (one aligned store)."""
        self.end_view[0] = self.durable_end

    def write(self, frames: list[bytes]) -> None:
        """Append frames, rolling to a new segment when the current one is full."""
        i = 0
        while i < len(frames):
            if self.seg_size >= self.segment_bytes:
                self._roll()
            room = self.segment_bytes - self.seg_size
            j, size = i, 0
            # At least one frame per segment, so an oversized record still fits.
            while j < len(frames) and j - i < IOV_MAX and (j == i or size + len(frames[j]) <= room):
                size += len(frames[j])
                j += 1
            chunk = frames[i:j]
            written = os.writev(self.fd, chunk)
            if written != size:
                raise OSError(f"short write to {self.path(self.bases[-1])}: {written} of {size}")
            self.seg_size += size
            metrics.LOG_BYTES_WRITTEN.inc(size)
            i = j

    def _roll(self) -> None:
        # No fsync here, on the event loop (a full segment's fsync blocks for its whole size): the
        # next sync (checkpoint, interval, close) fsyncs the old file and the
        # directory; until then the journal holds what they lack.
        if self.keep_rolled:
            self.rolled.append(self.fd)
        else:
            os.close(self.fd)
        base = self.bases[-1] + self.seg_size
        self.fd = os.open(self.path(base), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.dir_dirty = True
        self.bases.append(base)
        self.seg_size = 0

    def take_sync_work(self) -> tuple[list[int], list[Path]]:
        """fds to fsync then close (a duplicate of the current one, the rolled ones)
        and directories to fsync, for a sync that may run beside later writes."""
        fds = [os.dup(self.fd)] if self.fd >= 0 else []
        fds += self.rolled
        self.rolled = []
        dirs = [self.dir] if self.dir_dirty else []
        self.dir_dirty = False
        return fds, dirs

    def sync_now(self) -> None:
        """fsync everything written so far, blocking (recovery, not the event loop)."""
        fds, dirs = self.take_sync_work()
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        for directory in dirs:
            fsync_dir(directory)

    def read(self, offset: int, limit: int, max_bytes: int) -> list[Record]:
        """Records starting at ``offset`` and ending at or before ``limit`` (a durable end)."""
        return self.segments.read(offset, limit, max_bytes, strict=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.rolled:
            os.close(fd)
        self.rolled = []
        self.segments.close()
        if self.published is not None:
            self.end_view = memoryview(bytearray(8)).cast("Q")
            self.published.close()
            self.published = None




class EmbeddedLog(Producer):
    """One writer's segment-file log: the only writer of its own files (``w<writer>``).

    The Producer of a worker. ``read`` and ``end_offset`` see this writer's own
    sub-logs (for tools and tests); consumers of every writer's sub-logs, in
    any process, use evd.core.log.embedded.consumer.EmbeddedConsumer.
    """

    def __init__(
        self,
        root: str | Path,
        partitions: int,
        *,
        writer: int = 0,
        fsync: FsyncPolicy = "always",
        fsync_interval_ms: int = 100,
        segment_bytes: int = 64 * 1024 * 1024,
        max_pending_bytes: int = 64 * 1024 * 1024,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        stream_partitions: dict[str, int] | None = None,
    ) -> None:
        self.root = Path(root) / "log"
        #: Partitions of every stream, except those named in stream_partitions.
        self.partitions = partitions
        self.stream_partitions = dict(stream_partitions or {})
        self.writer = writer
        self._writer_dir = writer_name(writer)  # validates the id
        self.fsync_policy = fsync
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.segment_bytes = segment_bytes
        self.max_pending_bytes = max_pending_bytes
        self.checkpoint_bytes = checkpoint_bytes
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._pending_bytes = 0
        #: The part of _pending_bytes the edge appended (not internal): what
        #: max_pending_bytes bounds. The stages bound their own appends (one
        #: group in flight each), so a busy stage never sheds the edge's traffic.
        self._edge_pending = 0
        self._flush_future: asyncio.Future[None] | None = None
        self._flushing = False
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False
        #: Recovery is over: a partition opened from now on publishes its end at once.
        self._recovered = False
        #: Partitions written since their last fsync.
        self._dirty: set[_Partition] = set()
        self._journal: Journal | None = None
        self._waker: Waker | None = None
        self._checkpoint: asyncio.Task[None] | None = None
        #: One partition sync at a time: a second one would find the dirty set
        #: taken by the first and return before its fsyncs end.
        self._sync_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # The journal's writes and fsyncs, one flush after the other.
        self._io = ThreadPoolExecutor(1, thread_name_prefix="evd-log")
        #: Threads that fsync partition files side by side (checkpoints, interval).
        self._fsync_pool = ThreadPoolExecutor(
            min(partitions, FSYNC_THREADS), thread_name_prefix="evd-fsync"
        )
        #: Why the edge's appends are refused for disk space (log.max_bytes,
        #: log.min_free_bytes), set by evd.core.log.embedded.retention; None while there is room.
        self.disk_full: str | None = None
        #: Called once with the exception when the log turns read-only.
        self.on_failure: Callable[[BaseException], None] | None = None
        #: The fsync to use; tests swap it to inject I/O errors.
        self.fsync_fn: Callable[[int], None] = os.fsync

    # -- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Recover this writer's sub-logs (truncating torn tails), replay its journal,
        publish the durable ends; then ready for appends."""
        journal = self._recover()
        if self.fsync_policy == "always":
            self._journal = journal
            journal.drop(journal.start())
        else:
            journal.drop(journal.files)
        if self.fsync_policy == "interval":
            self._spawn(self._interval_fsync())

    async def start(self) -> None:
        self.open()

    def partitions_of(self, stream: str) -> int:
        """How many partitions ``stream`` has."""
        return self.stream_partitions.get(stream, self.partitions)

    def _recover(self) -> Journal:
        """Everything open() does before appends are taken; returns the journal."""
        if self.writer == 0:
            upgrade_layout(self.root.parent)
        self.root.mkdir(parents=True, exist_ok=True)
        found = partition_dirs(self.root)
        for stream, partition, _ in found:
            if partition >= self.partitions_of(stream):
                # Users are mapped by crc32(user_id) % partitions: a smaller count
                # would move users away from their history.
                raise ConfigError(
                    f"log.partitions: {self.partitions_of(stream)} is fewer than the"
                    f" {partition + 1} partitions of {stream} already in {self.root}; the"
                    " partition count of a data_dir cannot shrink"
                )
        if self.writer != 0 and old_layout(self.root, found):
            raise ConfigError(
                f"{self.root} still has the single-writer layout: upgrade_layout must move"
                " it to writer 0 before other writers start (evd serve does)"
            )
        for stream, partition, directory in found:
            if (directory / self._writer_dir).is_dir():
                self._partition(stream, partition)
        # Through self.fsync_fn at call time, so a swapped fsync_fn reaches the journal.
        journal = Journal(self.root / JOURNAL_DIR / self._writer_dir, lambda fd: self.fsync_fn(fd))
        self._replay(journal)
        self._waker = Waker(self.root)
        for part in self._parts.values():
            part.publish()
        self._waker.poke()
        self._recovered = True
        return journal

    def _retire(self) -> None:
        """Recover a writer that no longer runs and release it: its sub-logs complete,
        fsynced and published, its journal gone; they stay readable."""
        try:
            journal = self._recover()
            for part in self._parts.values():
                part.sync_now()
            journal.drop(journal.files)
            journal.close()
        finally:
            self._release()

    def _replay(self, journal: Journal) -> None:
        """Copy journaled records the partition files lack into them, then fsync every
        partition the journal covers (a process crash leaves their last writes in
        the page cache only), so that the journal can be dropped."""
        covered: set[_Partition] = set()
        replayed = 0
        for entry in journal.entries():
            part = self._partition(entry.stream, entry.partition)
            covered.add(part)
            end = part.durable_end
            skip = end - entry.offset
            if skip >= len(entry.frames):
                continue
            if skip < 0 or (skip and scan_frames(entry.frames[:skip])[1] != skip):
                log.error(
                    "journal entry %s/%d at offset %d does not line up with the end %d"
                    " of writer %d's sub-log; %d bytes not replayed",
                    entry.stream, entry.partition, entry.offset, end, self.writer,
                    len(entry.frames) - skip,
                )
                continue
            tail = entry.frames[skip:]
            part.write([tail])
            part.durable_end = part.queued_end = end + len(tail)
            replayed += 1
        for part in covered:
            part.sync_now()
        if replayed:
            log.warning(
                "replayed %d journal entries into the partition files of writer %d",
                replayed, self.writer,
            )

    def _partition(self, stream: str, partition: int) -> _Partition:
        key = (stream, partition)
        part = self._parts.get(key)
        if part is None:
            count = self.partitions_of(stream)
            if not 0 <= partition < count:
                raise ValueError(f"partition {partition} of {stream} out of range 0..{count - 1}")
            if stream.startswith("_"):
                raise ValueError(f"{stream!r} is not a stream name (a leading _ is reserved)")
            directory = sublog_dir(self.root, stream, partition, self.writer)
            changed = make_dirs(directory)
            part = _Partition(
                directory,
                self.segment_bytes,
                keep_rolled=self.fsync_policy != "never",
            )
            try:
                dropped = part.recover()
                # The sub-log directory's entry, and those of the directories made for it.
                for parent in dict.fromkeys([directory.parent, *changed]):
                    fsync_dir(parent)
                # Every time, not only when it made the directory: a writer that
                # died between mkdir and here announces it when it starts again.
                announce_sublogs(self.root)
            except BaseException:
                part.close()
                raise
            if dropped:
                log.warning(
                    "log %s/%d: truncated %d bytes of torn or corrupt tail at offset %d"
                    " (writer %d)",
                    stream, partition, dropped, part.durable_end, self.writer,
                )
            part.queued_end = part.durable_end
            if self._recovered:
                part.publish()
            self._parts[key] = part
        return part

    @property
    def writable(self) -> bool:
        return self._failure is None and not self._closing

    @property
    def pending_bytes(self) -> int:
        """Bytes appended and waiting for a flush (bounded by max_pending_bytes)."""
        return self._pending_bytes

    @property
    def overloaded(self) -> bool:
        return self._edge_pending > self.max_pending_bytes or self.disk_full is not None

    # -- appends -----------------------------------------------------------------

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        if self._failure is not None:
            raise LogUnavailable(f"log is read-only after a failed flush: {self._failure}")
        if self._closing:
            raise LogUnavailable("log is closing")
        if not internal:
            if self._edge_pending > self.max_pending_bytes:
                raise LogOverloaded(
                    f"{self._edge_pending} bytes wait for a flush (log.max_pending_bytes)"
                )
            if self.disk_full is not None:
                raise LogOverloaded(self.disk_full)
        parts, pending = self._parts, self._pending
        for stream, partition, _ in records:
            if (stream, partition) not in parts:
                try:
                    self._partition(stream, partition)  # opened (and recovered) on first use
                except OSError as exc:
                    # A new partition's directory or segment could not be made (disk
                    # full, permissions): refuse these appends, the files in use are fine.
                    raise LogUnavailable(f"cannot open {stream}/{partition}: {exc}") from None
        # Admitted: from here on nothing raises, so all of them are queued.
        for stream, partition, payload in records:
            data = frame(payload)
            key = (stream, partition)
            frames = pending.get(key)
            if frames is None:
                pending[key] = [data]
            else:
                frames.append(data)
            parts[key].queued_end += len(data)
            self._pending_bytes += len(data)
            if not internal:
                self._edge_pending += len(data)
        fut = self._flush_future
        if fut is None:
            fut = self._flush_future = asyncio.get_running_loop().create_future()
        if not self._flushing:
            self._flushing = True
            self._spawn(self._flush_loop())
        return fut

    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        durable = self.append_all(((stream, partition, payload),), internal=internal)
        part = self._parts[(stream, partition)]
        offset = part.queued_end - len(payload) - FRAME_HEADER.size
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def complete(fut: asyncio.Future[None]) -> None:
            if done.cancelled():
                return
            if fut.cancelled():
                done.cancel()
            elif (exc := fut.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(offset)

        durable.add_done_callback(complete)
        return done

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_loop(self) -> None:
        """Group commit: everything appended while the previous flush ran goes in one."""
        loop = asyncio.get_running_loop()
        waker = self._waker
        assert waker is not None, "append before open()"
        try:
            while self._pending and self._failure is None:
                await self._gather_more()
                if not self._pending or self._failure is not None:
                    break
                batch, fut = self._pending, self._flush_future
                self._pending, self._flush_future = {}, None
                size, self._pending_bytes = self._pending_bytes, 0
                self._edge_pending = 0
                work = [(self._parts[key], frames) for key, frames in batch.items()]
                started = time.perf_counter()
                try:
                    journal = self._journal
                    if journal is not None:
                        iov: list[bytes] = []
                        # batch and work are built together (no strict=: a keyword
                        # is parsed at every call, once per flush).
                        for (stream, partition), (part, frames) in zip(batch, work):  # noqa: B905
                            iov.append(entry_head(
                                stream, partition, part.durable_end, sum(map(len, frames))
                            ))
                            iov.extend(frames)
                        # The only blocking step: one write and one fsync, off the loop.
                        await loop.run_in_executor(self._io, journal.append, iov)
                        metrics.LOG_FSYNC_SECONDS.observe(time.perf_counter() - started)
                    for part, frames in work:
                        part.write(frames)  # page cache; made durable by a checkpoint
                except Exception as exc:  # noqa: BLE001 (any failure fails the group)
                    # Whatever failed (an I/O error, a bug), this group cannot be
                    # known durable: its requests get 503 and the log turns read-only.
                    self._fail(exc)
                    if fut is not None and not fut.done():
                        fut.set_exception(LogUnavailable(f"log write failed: {exc}"))
                        fut.exception()  # retrieved: a request may have gone away
                    return
                metrics.LOG_FLUSH_SECONDS.observe(time.perf_counter() - started)
                metrics.LOG_FLUSH_BYTES.observe(size)
                for part, frames in work:
                    part.durable_end = end = part.durable_end + sum(map(len, frames))
                    part.end_view[0] = end  # part.publish(), inline: once per flush and partition
                    self._dirty.add(part)
                waker.poke()  # after every publication of the flush
                if fut is not None and not fut.done():
                    fut.set_result(None)
                if (
                    journal is not None
                    and journal.size >= self.checkpoint_bytes
                    and self._checkpoint is None
                    and self._failure is None  # after a failed fsync, a sync proves nothing
                ):
                    # Rotate here, between flushes: no journal write is in flight.
                    self._checkpoint = self._spawn(self._run_checkpoint(journal.start()))
        finally:
            self._flushing = False

    async def _gather_more(self) -> None:
        """Let requests already waiting on the loop join the next flush.

        Every flush has a fixed cost (a journal write and fsync, thread hand-offs,
        one write per partition; docs/performance.md). While each pass of the
        event loop still brings new appends, give it another pass (a few at
        most), so that a busy worker makes fewer, larger flushes; an idle one
        flushes after a single pass.
        """
        for _ in range(GATHER_PASSES):
            # Only appends change the pending bytes while the flush waits here.
            seen = self._pending_bytes
            if seen >= GATHER_BYTES:
                return
            await asyncio.sleep(0)
            if self._pending_bytes == seen:
                return

    async def _run_checkpoint(self, old: list[Path]) -> None:
        """fsync the partition files, then drop the ``old`` journal files they cover.

        Runs beside later flushes, which go to a fresh journal file.
        """
        assert self._journal is not None
        try:
            await self._sync_dirty()
            self._journal.drop(old)
        except Exception as exc:  # noqa: BLE001 (the partition files' state is unknown)
            self._fail(exc)
        finally:
            self._checkpoint = None

    async def _sync_dirty(self) -> None:
        """fsync every partition file written since its last sync, side by side."""
        async with self._sync_lock:
            await self._sync_dirty_locked()

    async def _sync_dirty_locked(self) -> None:
        dirty, self._dirty = self._dirty, set()
        fds: list[int] = []
        dirs: list[Path] = []
        for part in dirty:
            part_fds, part_dirs = part.take_sync_work()
            fds += part_fds
            dirs += part_dirs
        if not fds and not dirs:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            # Not on the journal's thread: flushes go on while partitions sync.
            # Every fsync finishes before the fds close, failed or not.
            results = await asyncio.gather(
                *(loop.run_in_executor(self._fsync_pool, self.fsync_fn, fd) for fd in fds),
                *(loop.run_in_executor(self._fsync_pool, fsync_dir, d) for d in dirs),
                return_exceptions=True,
            )
        finally:
            for fd in fds:
                os.close(fd)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        metrics.LOG_FSYNC_SECONDS.observe(time.perf_counter() - started)

    async def _interval_fsync(self) -> None:
        while self._failure is None and not self._closed:
            await asyncio.sleep(self.fsync_interval_s)
            try:
                await self._sync_dirty()
            except Exception as exc:  # noqa: BLE001 (the partition files' state is unknown)
                self._fail(exc)
                return

    def _fail(self, exc: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        if isinstance(exc, OSError):
            log.error("log turned read-only after an I/O error: %s", exc)
        else:
            log.error("log turned read-only after a failed flush: %r", exc, exc_info=exc)
        pending, self._flush_future = self._flush_future, None
        self._pending.clear()
        self._pending_bytes = self._edge_pending = 0
        if pending is not None and not pending.done():
            pending.set_exception(LogUnavailable(f"log write failed: {exc}"))
            pending.exception()
        if self.on_failure is not None:
            self.on_failure(exc)

    async def flush(self) -> None:
        fut = self._flush_future
        if fut is not None:
            await asyncio.shield(fut)
        while self._flushing:
            await asyncio.sleep(0.001)
        if self.fsync_policy != "always" and self._failure is None:
            await self._sync_dirty()

    async def close(self) -> None:
        """Flush, make the partition files durable and drop the journal, release files."""
        if self._closed:
            return
        self._closing = True
        try:
            if self._failure is None:
                await self.flush()
                while self._checkpoint is not None:
                    await asyncio.sleep(0.001)
                if self._journal is not None and self._failure is None:
                    await self._sync_dirty()
                    self._journal.drop(self._journal.start())
        finally:
            self._closed = True
            for task in list(self._tasks):
                task.cancel()
            self._release()

    def _release(self) -> None:
        """Close every file and stop the I/O threads."""
        for part in self._parts.values():
            part.close()
        if self._journal is not None:
            self._journal.close()
        if self._waker is not None:
            self._waker.close()
        self._io.shutdown(wait=True)
        self._fsync_pool.shutdown(wait=True)

    # -- reads and consumer offsets --------------------------------------------

    async def read(
        self, stream: str, partition: int, offset: int, max_bytes: int = 1 << 20
    ) -> list[Record]:
        """This writer's records of the partition from ``offset``, up to its durable end.

        Raises OffsetOutOfRange for an offset past the end or inside a record.
        """
        part = self._parts.get((stream, partition))
        if part is None:
            if offset:
                raise OffsetOutOfRange(f"offset {offset} is past the end 0 of {stream}/{partition}")
            return []
        return part.read(offset, part.durable_end, max_bytes)

    def end_offset(self, stream: str, partition: int) -> int:
        part = self._parts.get((stream, partition))
        return 0 if part is None else part.durable_end

    # -- retention ------------------------------------------------------------

    def own_sublogs(self) -> list[tuple[str, int, Segments]]:
        """(stream, partition, segments) of every sub-log this writer has."""
        return [(stream, p, part.segments) for (stream, p), part in self._parts.items()]

    def delete_segments(self, stream: str, partition: int, before: int) -> int:
        """Delete this writer's segments of a partition that end at or before
        ``before`` (never the last one); the bytes freed."""
        part = self._parts.get((stream, partition))
        if part is None:
            return 0
        return part.segments.delete_before(before)


def recover_writers(
    data_dir: str | Path, partitions: int, keep: int, **log_kwargs: Any
) -> list[int]:
    """Recover every writer on disk whose id is ``keep`` or more; the ids recovered.

    Those writers will not run (the server starts ``keep`` workers): each one's
    sub-logs get its journal replayed, are fsynced and get their durable ends
    published, and its journal is removed, so they are complete and readable
    by SubLogReader and ``evd log-read``. Their files stay where they are.
    ``log_kwargs`` are EmbeddedLog's (fsync, segment_bytes, ...). Run it
    before any of the ``keep`` workers starts; it needs no event loop.
    """
    recovered = [w for w in writers_on_disk(data_dir) if w >= keep]
    for writer in recovered:
        EmbeddedLog(data_dir, partitions, writer=writer, **log_kwargs)._retire()
    if recovered:
        log.info("recovered the sub-logs of writers that will not run: %s", recovered)
    return recovered

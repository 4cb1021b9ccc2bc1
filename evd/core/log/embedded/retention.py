"""Retention and the log's disk cap.

Each worker deletes segments of its own sub-logs (one writer per file); worker 0
also sweeps the sub-logs of writers that no longer run. A segment goes when:

- its stream has registered consumers (a sink, the processor, which commits
  the offsets its latest snapshot covers): every one of them is past it;
- its stream has none: ``log.retention`` says so (age of its newest record,
  or the sub-log's bytes over the cap).

The last segment of a sub-log is never deleted: it holds the sub-log's end.

The disk cap: every sweep measures what the whole log uses (every writer's
files) and the free space of its filesystem; above ``log.max_bytes`` or below
``log.min_free_bytes`` the edge's appends are refused (503 + Retry-After) until
retention frees space. The stages' own appends are not refused: they are what
lets consumers move on and retention free the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from evd.core.config import LogConfig
from evd.core.log.embedded import metrics
from evd.core.log.embedded.consumer import committed_offsets, consumer_names
from evd.core.log.embedded.layout import writers_on_disk
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.embedded.sublog import SEGMENT_SUFFIX, Segments, sublog_dir

__all__ = ["Retention", "deletable_before", "log_disk_usage"]

log = logging.getLogger(__name__)

#: Seconds between sweeps: how stale the disk-cap decision may be, and how
#: long a segment consumers have passed may linger.
SWEEP_INTERVAL_S = 2.0


def consumers_floor(data_dir: Path, stream: str, partition: int, writer: int) -> int | None:
    """The lowest offset any registered consumer of ``stream`` committed for this
    sub-log (0 for one that has none yet); None when the stream has no consumer."""
    names = consumer_names(data_dir, stream)
    if not names:
        return None
    return min(committed_offsets(data_dir, n, stream, partition).get(writer, 0) for n in names)


def deletable_before(
    data_dir: Path, stream: str, partition: int, writer: int, segments: Segments,
    cfg: LogConfig, now: float, keep_s: float = 0.0,
) -> int:
    """The offset below which whole segments of this sub-log may go (see module doc).

    ``keep_s``: segments written to within this long stay even when every
    consumer passed them (the charts view reads that much history at start-up).
    """
    floor = consumers_floor(data_dir, stream, partition, writer)
    if floor is not None:
        if keep_s > 0:
            for base in segments.bases:
                try:
                    mtime = segments.path(base).stat().st_mtime
                except FileNotFoundError:
                    continue
                if mtime >= now - keep_s:
                    return min(floor, base)
        return floor
    bases = list(segments.bases)
    sizes: list[int] = []
    mtimes: list[float] = []
    for base in bases:
        try:
            st = segments.path(base).stat()
        except FileNotFoundError:
            st = None
        sizes.append(0 if st is None else st.st_size)
        mtimes.append(now if st is None else st.st_mtime)
    before = 0
    age = cfg.retention.max_age_s
    if age > 0:
        for i in range(len(bases) - 1):
            if mtimes[i] < now - age:
                before = bases[i + 1]
    cap = cfg.retention.max_bytes
    if cap > 0:
        total = sum(sizes)
        for i in range(len(bases) - 1):
            if total <= cap:
                break
            total -= sizes[i]
            before = max(before, bases[i + 1])
    return before


def log_disk_usage(data_dir: Path) -> int:
    """Bytes of every segment and journal file under ``data_dir/log``."""
    total = 0
    for root, _, files in os.walk(data_dir / "log"):
        for name in files:
            if name.endswith((SEGMENT_SUFFIX, ".journal")):
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


class Retention:
    """The periodic sweep of one worker: retention of its sub-logs, and the disk cap.

    ``retired_from``: worker 0 passes the worker count, to sweep the sub-logs
    of writers with a higher id (they no longer run); others pass None.
    """

    def __init__(
        self, lg: EmbeddedLog, cfg: LogConfig, data_dir: str | Path, retired_from: int | None,
        keep_s: Mapping[str, float] | None = None,
    ) -> None:
        self.lg = lg
        #: Per stream: how long its segments stay after every consumer passed them.
        self.keep_s = dict(keep_s or {})
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.retired_from = retired_from
        self._task: asyncio.Task[None] | None = None
        #: Segments of retired writers, kept between sweeps.
        self._retired: dict[tuple[str, int, int], Segments] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
            self._task = None
        for segments in self._retired.values():
            segments.close()
        self._retired.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.sweep(time.time())
                usage = await loop.run_in_executor(None, log_disk_usage, self.data_dir)
                self.check_disk(usage, await loop.run_in_executor(None, _free_bytes, self.data_dir))
            except OSError as exc:
                log.error("log retention sweep failed: %s", exc)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    def sweep(self, now: float) -> int:
        """Delete what retention allows (this writer's sub-logs, and retired ones); bytes freed."""
        freed = 0
        writer = self.lg.writer
        for stream, partition, segments in self.lg.own_sublogs():
            before = deletable_before(
                self.data_dir, stream, partition, writer, segments, self.cfg, now,
                self.keep_s.get(stream, 0.0),
            )
            freed += self.lg.delete_segments(stream, partition, before)
        if self.retired_from is not None:
            freed += self._sweep_retired(now)
        if freed:
            metrics.LOG_RETENTION_BYTES.inc(freed)
            log.info("log retention freed %d bytes (writer %d)", freed, writer)
        return freed

    def _sweep_retired(self, now: float) -> int:
        assert self.retired_from is not None
        freed = 0
        log_root = self.data_dir / "log"
        retired = [w for w in writers_on_disk(self.data_dir) if w >= self.retired_from]
        if not retired:
            return 0
        for stream_dir in log_root.iterdir():
            if stream_dir.name.startswith("_") or not stream_dir.is_dir():
                continue
            for part_dir in stream_dir.iterdir():
                if not part_dir.name.isdigit():
                    continue
                partition = int(part_dir.name)
                for writer in retired:
                    directory = sublog_dir(log_root, stream_dir.name, partition, writer)
                    if not directory.is_dir():
                        continue
                    key = (stream_dir.name, partition, writer)
                    segments = self._retired.get(key)
                    if segments is None:
                        segments = self._retired[key] = Segments(directory)
                    segments.relist_all()
                    before = deletable_before(
                        self.data_dir, stream_dir.name, partition, writer, segments, self.cfg, now,
                        self.keep_s.get(stream_dir.name, 0.0),
                    )
                    freed += segments.delete_before(before)
        return freed

    def check_disk(self, usage: int, free: int) -> None:
        """Refuse the edge's appends while the log is over its cap or the disk too full."""
        cfg = self.cfg
        metrics.LOG_DISK_BYTES.set(usage)
        reason = None
        if cfg.max_bytes and usage > cfg.max_bytes:
            reason = (
                f"the log uses {usage} bytes, over log.max_bytes={cfg.max_bytes}; retention"
                " frees segments once every consumer is past them"
            )
        elif free < cfg.min_free_bytes:
            reason = (
                f"{free} bytes free on the data directory's filesystem, under"
                f" log.min_free_bytes={cfg.min_free_bytes}"
            )
        if reason != self.lg.disk_full:
            if reason is None:
                log.warning("log has room again: appends accepted")
            else:
                log.error("refusing appends: %s", reason)
        self.lg.disk_full = reason


def _free_bytes(data_dir: Path) -> int:
    st = os.statvfs(data_dir)
    return st.f_bavail * st.f_frsize

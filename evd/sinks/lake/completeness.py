"""When an hour of the lake is complete, and its ``_SUCCESS`` marker.

_SUCCESS. Worker 0's instance looks every ``check_interval_s`` for hours of
its streams that have a data file and no marker, and marks one (``_SUCCESS``,
a small JSON body, written atomically) when nothing more can arrive for it.
Always: ``now >= hour end + success_grace_s`` (wall clock). Then:

- sessions, charts: every partition's progress is at or past the hour end
  (``SessionsBatch.complete_until``: every session that started before it was
  emitted in its final revision; ``ChartsBatch.final_until``: every window
  ending by it is final, past the allowed lateness, so no revision of its rows
  can follow; records without it move nothing). Each
  instance saves the progress it wrote under ``_progress`` after the batch's
  files are renamed, so worker 0 sees every worker's.
- events, late, dead_letter (hours of the edge's wall clock): the processor
  has committed every raw sub-log up to its end or up to a record stamped at
  or after ``hour end + grace`` (its outputs are durable before it commits),
  and then this sink has committed every sub-log of the stream up to the end
  measured after that (every file of the hour is renamed). The grace covers
  the disorder of received_at within a raw sub-log (appends of requests
  received milliseconds apart). Both are read through the log's consumers
  (``SinkContext.open_consumer``: the embedded log or Kafka).

A marked hour is never written again: rows for it go to the ``_late`` layout
(checked when a file is started and again before its rename) and are counted
in ``late_rows``.

"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import orjson

from evd.core.files import write_atomic
from evd.core.log import PROCESSOR, Consumer, Stream, SubLog, TopicPartition
from evd.core.log.records import header_of
from evd.sinks import rows
from evd.sinks.base import SinkContext

__all__ = [
    "LATE_DIR",
    "SUCCESS",
    "Hours",
    "caught_up",
    "hour_dirs",
    "hour_path",
    "processed_until",
    "read_progress",
]

log = logging.getLogger(__name__)

HOUR_MS = rows.HOUR_MS
SUCCESS = "_SUCCESS"
LATE_DIR = "_late"
PROGRESS_DIR = "_progress"
#: Streams whose completeness the processor reports per partition.
PROGRESS_STREAMS = frozenset((Stream.SESSIONS, Stream.CHARTS))
#: Longest pause between two looks for complete hours (shorter when the grace is).
CHECK_INTERVAL_S = 10.0
#: Longest wait of processed_until for a record known to be at a position.
FETCH_WAIT_S = 5.0


def hour_path(hour: int) -> str:
    """``dt=YYYY-MM-DD/hour=HH`` of the UTC hour starting at ``hour`` (epoch ms)."""
    return time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(hour // 1000))


def parse_hour(dt_name: str, hour_name: str) -> int | None:
    """The epoch ms of ``dt=YYYY-MM-DD``/``hour=HH``; None for other names."""
    if not (dt_name.startswith("dt=") and hour_name.startswith("hour=")):
        return None
    try:
        y, m, d = (int(x) for x in dt_name[3:].split("-"))
        h = int(hour_name[5:])
    except ValueError:
        return None
    return calendar.timegm((y, m, d, h, 0, 0)) * 1000


def visible(name: str) -> bool:
    """A data file readers see (not a marker, not a temporary file)."""
    return not name.startswith((".", "_"))


def hour_dirs(stream_dir: Path) -> Iterator[Path]:
    """The ``dt=*/hour=*`` directories under ``stream_dir``."""
    try:
        with os.scandir(stream_dir) as it:
            days = [e.path for e in it if e.is_dir() and e.name.startswith("dt=")]
    except FileNotFoundError:
        return
    for day in sorted(days):
        try:
            with os.scandir(day) as it:
                hours = sorted(e.path for e in it if e.is_dir() and e.name.startswith("hour="))
        except FileNotFoundError:
            continue
        for h in hours:
            yield Path(h)


def read_progress(path: Path) -> int | None:
    """The progress saved in ``path``; None when there is none (or it does not
    parse: written atomically, so only by hand)."""
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        log.warning("lake: %s does not parse; taken as no progress", path)
        return None
    until = raw.get("until") if isinstance(raw, dict) else None
    return until if isinstance(until, int) else None


async def processed_until(
    consumer: Consumer, committed: Mapping[SubLog, int], until_ms: int
) -> bool:
    """True when, in every sub-log of the partitions ``consumer`` is assigned
    (raw), ``committed`` (the processor's committed offsets) is at the end or at
    a record stamped (evd.core.log.records' header) ``until_ms`` or later: every
    record received before it was processed and its outputs are durable.

    False when there is no sub-log at all: nothing vouches for the hour (e.g.
    an embedded consumer under a data_dir the log is not in), and when the
    records could not all be looked at within a bound of fetches (sub-logs
    written to all the time) or a record at a position did not come within
    FETCH_WAIT_S: the next look decides. A sub-log without a commit counts from
    its oldest record (none retained: at its end). Moves the consumer's positions.
    """
    ends = await consumer.end_offsets()
    if not ends:
        return False
    pending: set[SubLog] = set()
    oldest = False
    for sublog, end in ends.items():
        offset = committed.get(sublog)
        if offset is not None and offset >= end:
            consumer.seek(sublog, end)
        else:
            if offset is None:
                consumer.seek_to_beginning(sublog)
                oldest = True
            else:
                consumer.seek(sublog, offset)
            pending.add(sublog)
    first_ends = ends

    def at_end(sublog: SubLog, positions: Mapping[SubLog, int]) -> bool:
        return positions.get(sublog, -1) >= first_ends[sublog]

    if oldest:
        # A sub-log sent to its oldest record may hold none (empty, or all
        # deleted): done. Its position is known once the log was asked (Kafka
        # resolves it then; unknown: it stays pending).
        await consumer.end_offsets()
        positions = consumer.positions()
        pending = {s for s in pending if not at_end(s, positions)}
    # Each fetch serves one sub-log; one that got new records after it was moved to
    # its end is served again, so the fetches are bounded rather than counted.
    for _ in range(2 * len(ends) + 16):
        if not pending:
            return True
        # max_bytes=1: one record of one sub-log (the one at its position). A fetch
        # may have to ask for it (Kafka: nothing is buffered right after a seek),
        # hence a wait. Nothing within it: done if the rest are at their end,
        # else undecided (a record there did not come: an unresponsive broker).
        fetched = await consumer.fetch(max_bytes=1, timeout=FETCH_WAIT_S)
        if not fetched:
            positions = consumer.positions()
            return all(at_end(s, positions) for s in pending)
        ends = await consumer.end_offsets()
        for record in fetched:
            sublog = record.sublog
            if sublog in pending:
                pending.discard(sublog)
                stamp = header_of(record.payload, sublog.stream).timestamp
                if stamp is None or stamp < until_ms:
                    return False
            consumer.seek(sublog, ends.get(sublog, record.next_offset))
    return not pending


async def caught_up(consumer: Consumer, committed: Mapping[SubLog, int]) -> bool:
    """True when ``committed`` (a sink's committed offsets) is at or past the end
    of every sub-log of the partitions ``consumer`` is assigned, measured now."""
    ends = await consumer.end_offsets()
    return all(committed.get(sublog, 0) >= end for sublog, end in ends.items())


class Hours:
    """The hours of one files sink: which have ``_SUCCESS`` (remembered once
    seen), and marking those that are complete (the module docstring)."""

    def __init__(
        self, root: Path, name: str, streams: list[str], grace_ms: int, ctx: SinkContext
    ) -> None:
        self.root = root
        self.name = name
        self.streams = streams
        self.grace_ms = grace_ms
        self.ctx = ctx
        #: (stream, hour) known to have _SUCCESS (positive answers only).
        self._marked: set[tuple[str, int]] = set()

    def is_marked(self, stream: str, hour: int) -> bool:
        """Whether the hour of ``stream`` has its marker (rows for it go to the
        late layout)."""
        key = (stream, hour)
        if key in self._marked:
            return True
        if (self.root / stream / hour_path(hour) / SUCCESS).exists():
            self._marked.add(key)
            return True
        return False

    def progress_path(self, stream: str, partition: int) -> Path:
        """Where the sink saves the progress of a partition of sessions or charts."""
        return self.root / PROGRESS_DIR / self.name / stream / f"p{partition:04d}.json"

    async def mark_complete_hours(self, now_ms: int) -> list[Path]:
        """Give ``_SUCCESS`` to every hour of the sink's streams that has a data
        file and is complete at ``now_ms`` (the module docstring); the markers made."""
        made: list[Path] = []
        for stream in self.streams:
            hours = await asyncio.to_thread(self._unmarked_hours, stream, now_ms - self.grace_ms)
            if not hours:
                continue
            if stream in PROGRESS_STREAMS:
                done = await asyncio.to_thread(self._progressed_hours, stream, hours)
            else:
                done = await self._delivered_hours(stream, hours)
            for hour in done:
                made.append(await asyncio.to_thread(self._mark, stream, hour, now_ms))
        return made

    def _unmarked_hours(self, stream: str, end_before: int) -> list[int]:
        """Hours of ``stream`` ending at or before ``end_before`` with a data file and
        no marker, oldest first."""
        found: list[int] = []
        for directory in hour_dirs(self.root / stream):
            hour = parse_hour(directory.parent.name, directory.name)
            if hour is None or hour + HOUR_MS > end_before or (stream, hour) in self._marked:
                continue
            with os.scandir(directory) as it:
                names = [e.name for e in it]
            if SUCCESS in names:
                self._marked.add((stream, hour))
            elif any(visible(n) for n in names):
                found.append(hour)
        return sorted(found)

    def _progressed_hours(self, stream: str, hours: list[int]) -> list[int]:
        """The hours every partition's saved progress has passed."""
        low: int | None = None
        for p in range(self.ctx.partitions):
            until = read_progress(self.progress_path(stream, p))
            if until is None:
                return []
            low = until if low is None else min(low, until)
        assert low is not None
        return [h for h in hours if h + HOUR_MS <= low]

    async def _delivered_hours(self, stream: str, hours: list[int]) -> list[int]:
        """The hours (a prefix of ``hours``) whose rows the processor has processed
        and this sink has delivered, read through the log's consumers
        (``ctx.open_consumer``)."""
        open_consumer = self.ctx.open_consumer
        raw = [TopicPartition(Stream.RAW, p) for p in range(self.ctx.partitions)]
        mine = [TopicPartition(stream, p) for p in range(self.ctx.partitions)]
        async with AsyncExitStack() as opened:  # every consumer opened is closed

            def consumer(name: str | None, partitions: list[TopicPartition]) -> Consumer:
                c = open_consumer(name)
                opened.push_async_callback(c.close)
                c.assign(partitions)
                return c

            reader = consumer(None, raw)
            processor = await consumer(PROCESSOR, raw).committed()
            done: list[int] = []
            for hour in hours:
                if not await processed_until(reader, processor, hour + HOUR_MS + self.grace_ms):
                    break
                done.append(hour)
            if not done:
                return []
            # The ends are measured after the processor's offsets: its outputs up to
            # there are below them. The sink's offsets, read before the ends, only
            # grow: past the ends then, past them now.
            delivered = await consumer(self.name, mine).committed()
            reader.assign(mine)
            return done if await caught_up(reader, delivered) else []

    def _mark(self, stream: str, hour: int, now_ms: int) -> Path:
        directory = self.root / stream / hour_path(hour)
        with os.scandir(directory) as it:
            files = sum(1 for e in it if visible(e.name))
        path = directory / SUCCESS
        write_atomic(path, orjson.dumps({"marked_at": now_ms, "files": files}))
        self._marked.add((stream, hour))
        log.info("lake %s: %s %s complete (%d files)", self.root, stream, hour_path(hour), files)
        return path

"""The files sink: the data lake, hourly Hive-style directories that DuckDB,
Spark or BigQuery external tables read as they are.

Layout (``root``: ``path``, or ``{data_dir}/lake`` when it is "")::

    {root}/{stream}/dt=YYYY-MM-DD/hour=HH/part-w{worker:02d}-{epoch_ms}-{seq:06d}{ext}
    {root}/{stream}/dt=YYYY-MM-DD/hour=HH/_SUCCESS        the hour is complete
    {root}/_late/{stream}/dt=YYYY-MM-DD/hour=HH/part-...  rows that came after it
    {root}/_progress/{sink}/{stream}/p{partition:04d}.json  sessions/charts progress

Hours are UTC (evd.sinks.rows): events, late and dead letters by
``received_at``, sessions by ``started_at``, charts by ``window_start``. Rows
are evd.sinks.rows' shapes. ``ext``: ``.ndjson.gz``, ``.ndjson.zst``,
``.ndjson`` or ``.parquet`` (zstd; the ``evd[parquet]`` extra, pyarrow). Parquet
columns mirror the NDJSON rows: nested structs for playback, context, device
and geo, ``plays`` a list of structs, times int64 epoch ms, ``timestamp`` the
same RFC 3339 text; a dead letter's ``event`` is its JSON text (a column
cannot hold any JSON value).

Writes. Every ``write`` is one roll (the delivery loop's batch bounds are the
roll's size and age: 200,000 items, 64 MiB, 10 s by default for the lake):
one file per hour of the batch, written under a hidden temporary name in its
directory (``.part-...tmp``: Spark, DuckDB and Hive skip names starting with
``.`` or ``_``) and fsynced; then every file of the batch is renamed to its
final name and the directories are fsynced, and only then does ``write``
return (and the delivery loop commit). A reader never sees a partial file. A
write that fails removes what it wrote (temporary or renamed), so the retry
writes the batch once. Nothing is buffered between writes: ``flush`` has
nothing to do.

Crash bound. A SIGKILL during a write leaves only temporary files, which
``start`` removes (this worker's: ``.part-w{worker:02d}-*``); their rows are
read again from the committed offsets. The only rows the lake can hold twice
are those of the one batch whose files were renamed before its offsets were
committed: one loop writes one batch at a time, so at most one batch per
worker, ``batch.max_events`` items (plus the items of the record that crossed
the bound), in the files that batch wrote.

_SUCCESS. Worker 0's instance looks every ``check_interval_s`` for hours of
its streams that have a data file and no marker, and marks one (``_SUCCESS``,
a small JSON body, written atomically) when nothing more can arrive for it.
Always: ``now >= hour end + success_grace_s`` (wall clock). Then:

- sessions, charts: every partition's progress is at or past the hour end
  (``SessionsBatch.complete_until``: every session that started before it was
  emitted; ``ChartsBatch.closed_until``: every window ending by it was). Each
  instance saves the progress it wrote under ``_progress`` after the batch's
  files are renamed, so worker 0 sees every worker's.
- events, late, dead_letter (hours of the edge's wall clock): the processor
  has committed every raw sub-log up to its end or up to a record stamped at
  or after ``hour end + grace`` (its outputs are durable before it commits),
  and then this sink has committed every sub-log of the stream up to the end
  measured after that (every file of the hour is renamed). The grace covers
  the disorder of received_at within a raw sub-log (appends of requests
  received milliseconds apart). Both are read through the log's consumers
  (``SinkContext.open_consumer``: the embedded log or Kafka; without it, the
  embedded log under data_dir).

A marked hour is never written again: rows for it go to the ``_late`` layout
(checked when a file is started and again before its rename) and are counted
in ``late_rows``.

Speed. Encoding, compression and every file operation run in a thread
(``asyncio.to_thread``), a chunk of rows at a time. An event's NDJSON row is
one msgspec encoding of an ``_EventRow`` built from the event's fields and its
enrichment (no dicts); Parquet rows are tuples that pyarrow converts in one
pass. Levels, measured on the traffic model's rows (bench.sinks' recording,
513 bytes each, the 2-core VM): gzip is level 1, zlib compressing 5.4 times
at 168 MB/s, where level 3 gives 5.7 times at 148 MB/s and level 6 6.5 times
at 74 MB/s, and the 300,000 events/s target needs 154 MB/s for the
compression alone. So gzip is ISA-L's deflate (the ``isal`` package, a
dependency; level 1: 5.6 times at 815 MB/s), the same format; where isal is
missing (no wheel for the platform) it falls back to zlib. zstd is
level 1: 7.25 times at 672 MB/s, where level 3 gives 7.35 times at 347 MB/s.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import os
import time
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import msgspec
import orjson
import zstandard
from msgspec.structs import astuple

from evd.core.config import SINK_STREAMS, FilesSinkConfig
from evd.core.errors import ConfigError, EvdError
from evd.core.log import PROCESSOR, Consumer, Stream, SubLog, TopicPartition
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.framing import fsync_dir, write_atomic
from evd.core.log.records import header_of
from evd.core.schema import (
    Context,
    DeadLetter,
    Device,
    Event,
    EventsBatch,
    Geo,
    Playback,
    Session,
    SessionsBatch,
)
from evd.sinks import metrics, rows
from evd.sinks.base import Batch, Sink, SinkContext, SinkError

__all__ = ["FilesSink", "caught_up", "hour_path", "processed_until"]

log = logging.getLogger(__name__)

HOUR_MS = rows.HOUR_MS
SUCCESS = "_SUCCESS"
LATE_DIR = "_late"
PROGRESS_DIR = "_progress"
#: Streams whose completeness the processor reports per partition.
PROGRESS_STREAMS = frozenset((Stream.SESSIONS, Stream.CHARTS))

#: gzip level (see the module docstring).
GZIP_LEVEL = 1
#: zstd level of NDJSON files (see the module docstring).
ZSTD_LEVEL = 1
#: Items encoded at a time: bounds the uncompressed NDJSON (about 2 MiB of
#: events) a write holds, and keeps it in cache while it is compressed.
NDJSON_CHUNK_ITEMS = 4096
#: Rows per Parquet row group: bounds the Arrow columns a write holds; readers
#: split work by row group.
PARQUET_ROW_GROUP = 65_536
#: Longest pause between two looks for complete hours (shorter when the grace is).
CHECK_INTERVAL_S = 10.0
#: Longest wait of processed_until for a record known to be at a position.
FETCH_WAIT_S = 5.0
#: Directories known to exist that a sink remembers (about a year of hours of
#: every stream); above it the memory is cleared and rebuilt as files are written.
MAX_KNOWN_DIRS = 20_000

try:
    # ISA-L's deflate (the isal package): about 5 times zlib's speed at
    # level 1 and slightly smaller files; the same gzip format and compressobj API.
    from isal import isal_zlib

    _deflate: types.ModuleType = isal_zlib
except ImportError:
    _deflate = zlib

_encode = msgspec.json.Encoder().encode
_encode_lines = msgspec.json.Encoder().encode_lines


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def hour_path(hour: int) -> str:
    """``dt=YYYY-MM-DD/hour=HH`` of the UTC hour starting at ``hour`` (epoch ms)."""
    return time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(hour // 1000))


def _parse_hour(dt_name: str, hour_name: str) -> int | None:
    """The epoch ms of ``dt=YYYY-MM-DD``/``hour=HH``; None for other names."""
    if not (dt_name.startswith("dt=") and hour_name.startswith("hour=")):
        return None
    try:
        y, m, d = (int(x) for x in dt_name[3:].split("-"))
        h = int(hour_name[5:])
    except ValueError:
        return None
    return calendar.timegm((y, m, d, h, 0, 0)) * 1000


def _visible(name: str) -> bool:
    """A data file readers see (not a marker, not a temporary file)."""
    return not name.startswith((".", "_"))


# -- encoding --------------------------------------------------------------------------


class _EventRow(msgspec.Struct, omit_defaults=True, gc=False):
    """An ``events`` row (evd.sinks.rows) as msgspec encodes it: Event's fields
    in Event's order, so ``astuple(event)`` fills them, ``event_type`` without
    a default (always written, ``play`` too), then the enrichment, whose None
    defaults no real value equals (always written)."""

    event_id: str
    timestamp: datetime
    user_id: str
    track_id: str
    playback: Playback
    event_type: str
    context: Context | None = None
    device: Device | None = None
    geo: Geo | None = None
    received_at: int | None = None
    event_time: int | None = None
    late: bool | None = None


if _EventRow.__struct_fields__[: len(Event.__struct_fields__)] != Event.__struct_fields__:
    raise ImportError("evd.sinks.files: _EventRow must start with Event's fields, in order")


#: _EventRow(*astuple(event), received_at, event_time, late), which mypy cannot count.
_row: Callable[..., _EventRow] = _EventRow


def _event_rows(values: Sequence[EventsBatch], all_late: bool) -> list[_EventRow]:
    """The rows of the events of ``values`` (untracked by the GC, like Events)."""
    out: list[_EventRow] = []
    for b in values:
        r, skew = b.received_at, b.skew_ms
        # event_time is evd.core.schema.epoch_ms(timestamp) + skew, inlined: a call
        # per event is a sixth of the encoding time.
        if all_late or b.late:
            late = range(len(b.events)) if all_late else frozenset(b.late)
            out += [
                _row(*astuple(e), r, int(e.timestamp.timestamp() * 1000) + skew, i in late)
                for i, e in enumerate(b.events)
            ]
        else:
            out += [
                _row(*astuple(e), r, int(e.timestamp.timestamp() * 1000) + skew, False)
                for e in b.events
            ]
    return out


def _chunks(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` (one hour's group) in consecutive batches of about ``size`` items."""
    stream = batch.stream
    if stream == Stream.SESSIONS:
        items = [s for b in batch.values for s in b.sessions]
        for i in range(0, len(items), size):
            part = items[i : i + size]
            yield Batch(stream, [SessionsBatch(part)], len(part), 0)
        return
    values: list[Any] = []
    count = 0
    for v in batch.values:
        values.append(v)
        count += rows.count_items(stream, v)
        if count >= size:
            yield Batch(stream, values, count, 0)
            values, count = [], 0
    if count:
        yield Batch(stream, values, count, 0)


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Plain:
    """No compression."""

    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Format(Protocol):
    """How one hour's rows become one file."""

    ext: str

    def write(self, f: BinaryIO, group: Batch) -> None:
        """Write every row of ``group`` to ``f`` (not fsynced)."""


class _Ndjson:
    """NDJSON, gzip / zstd / uncompressed, written a chunk at a time."""

    def __init__(self, compression: str, window_ms: int) -> None:
        self.compression = compression
        self.window_ms = window_ms
        self.ext = {"gzip": ".ndjson.gz", "zstd": ".ndjson.zst", "none": ".ndjson"}[compression]
        # One write at a time per sink, so one compressor context serves them all.
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def _compressor(self) -> _Compressor:
        if self.compression == "gzip":
            gzip: _Compressor = _deflate.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # gzip framing
            return gzip
        if self.compression == "zstd":
            zstd: _Compressor = self._zstd.compressobj()
            return zstd
        return _Plain()

    def write(self, f: BinaryIO, group: Batch) -> None:
        comp = self._compressor()
        stream = group.stream
        events = stream in rows.EVENT_STREAMS
        for chunk in _chunks(group, NDJSON_CHUNK_ITEMS):
            if events:
                data = _encode_lines(_event_rows(chunk.values, stream == Stream.LATE))
            else:
                data = rows.json_lines(chunk, self.window_ms)
            f.write(comp.compress(data))
        f.write(comp.flush())


class _Parquet:
    """Parquet (zstd), a row group per PARQUET_ROW_GROUP rows, columns built
    from the structs directly."""

    ext = ".parquet"

    def __init__(self, window_ms: int) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                "the files sink's format: parquet needs pyarrow: install evd[parquet]"
            ) from None
        self.pa: Any = pa
        self.pq: Any = pq
        self.window_ms = window_ms
        s, i64, b = pa.string(), pa.int64(), pa.bool_()

        def struct(*fields: Any) -> Any:
            return pa.struct(list(fields))

        self.playback = struct(
            pa.field("position_ms", i64, False), pa.field("duration_ms", i64, False),
            pa.field("initiator", s),
        )
        self.context = struct(pa.field("page_uri", s), pa.field("playlist_uri", s))
        self.device = struct(pa.field("os", s), pa.field("client_version", s))
        self.geo = struct(pa.field("country", s, False), pa.field("region", s))
        self.play = struct(
            pa.field("track_id", s, False), pa.field("started_at", i64, False),
            pa.field("listened_ms", i64, False), pa.field("ended_by", s, False),
        )
        events = pa.schema([
            pa.field("event_id", s, False), pa.field("timestamp", s, False),
            pa.field("user_id", s, False), pa.field("track_id", s, False),
            pa.field("playback", self.playback, False), pa.field("event_type", s, False),
            pa.field("context", self.context), pa.field("device", self.device),
            pa.field("geo", self.geo), pa.field("received_at", i64, False),
            pa.field("event_time", i64, False), pa.field("late", b, False),
        ])
        sessions = pa.schema([
            pa.field("session_id", s, False), pa.field("user_id", s, False),
            pa.field("started_at", i64, False), pa.field("ended_at", i64, False),
            pa.field("event_count", i64, False), pa.field("play_count", i64, False),
            pa.field("stream_count", i64, False), pa.field("listened_ms", i64, False),
            pa.field("country", s), pa.field("os", s),
            pa.field("plays", pa.list_(pa.field("item", self.play, False)), False),
        ])
        charts = pa.schema([
            pa.field("window_start", i64, False), pa.field("window_end", i64, False),
            pa.field("country", s), pa.field("track_id", s, False),
            pa.field("plays", i64, False), pa.field("partition", i64, False),
        ])
        dead = pa.schema([
            pa.field("received_at", i64, False), pa.field("stage", s, False),
            pa.field("stream", s, False), pa.field("index", i64, False),
            pa.field("error", s, False), pa.field("event", s, False),
        ])
        self.schemas: dict[str, Any] = {
            Stream.EVENTS: events, Stream.LATE: events, Stream.SESSIONS: sessions,
            Stream.CHARTS: charts, Stream.DEAD_LETTER: dead,
        }
        # Dictionary pages for the events' few-valued columns only: on ids and
        # times (all distinct) a dictionary is built and thrown away. Measured on
        # the traffic model's events: 1.42 -> 0.90 us per row, 52 -> 47 bytes.
        few = [
            "event_type", "track_id", "playback.initiator", "context.page_uri",
            "context.playlist_uri", "device.os", "device.client_version", "geo.country",
            "geo.region",
        ]
        self.dictionary: dict[str, list[str] | bool] = {Stream.EVENTS: few, Stream.LATE: few}
        #: An events row without its timestamp (see _events).
        self.event_rows = pa.struct([f for f in events if f.name != "timestamp"])

    def write(self, f: BinaryIO, group: Batch) -> None:
        stream = group.stream
        schema = self.schemas[stream]
        builders: dict[str, Callable[[Batch], list[Any]]] = {
            Stream.EVENTS: self._events, Stream.LATE: self._events, Stream.SESSIONS: self._sessions,
            Stream.CHARTS: self._charts, Stream.DEAD_LETTER: self._dead_letters,
        }
        build = builders[stream]
        dictionary = self.dictionary.get(stream, True)
        with self.pq.ParquetWriter(
            f, schema, compression="zstd", use_dictionary=dictionary
        ) as writer:
            for chunk in _chunks(group, PARQUET_ROW_GROUP):
                writer.write_table(self.pa.Table.from_arrays(build(chunk), schema=schema))

    # Each builder returns the schema's columns, in order, for one chunk.

    def _events(self, chunk: Batch) -> list[Any]:
        """One tuple per row (nested structs as tuples, no timestamp), converted by
        pyarrow in one pass, then split into columns: 15% faster than a list and
        a conversion per column. The timestamps' text is msgspec's, as in the
        NDJSON rows, encoded for the whole chunk at once (RFC 3339 has no '"'
        or ',')."""
        pa = self.pa
        all_late = chunk.stream == Stream.LATE
        out: list[tuple[Any, ...]] = []
        stamps: list[datetime] = []
        for b in chunk.values:
            r, skew = b.received_at, b.skew_ms
            evs = b.events
            stamps += [e.timestamp for e in evs]
            # event_time: evd.core.schema.epoch_ms inlined, as in _event_rows.
            if all_late or b.late:
                late = range(len(evs)) if all_late else frozenset(b.late)
                out += [
                    (e.event_id, e.user_id, e.track_id, astuple(e.playback), e.event_type,
                     e.context and astuple(e.context), e.device and astuple(e.device),
                     e.geo and astuple(e.geo), r, int(e.timestamp.timestamp() * 1000) + skew,
                     i in late)
                    for i, e in enumerate(evs)
                ]
            else:
                out += [
                    (e.event_id, e.user_id, e.track_id, astuple(e.playback), e.event_type,
                     e.context and astuple(e.context), e.device and astuple(e.device),
                     e.geo and astuple(e.geo), r, int(e.timestamp.timestamp() * 1000) + skew,
                     False)
                    for e in evs
                ]
        columns: list[Any] = pa.array(out, self.event_rows).flatten()
        text = _encode(stamps)[2:-2].decode().split('","')
        columns.insert(1, pa.array(text, pa.string()))
        return columns

    def _sessions(self, chunk: Batch) -> list[Any]:
        pa = self.pa
        items: list[Session] = [s for b in chunk.values for s in b.sessions]
        columns = [
            pa.array(list(map(attrgetter(field.name), items)), field.type)
            for field in self.schemas[Stream.SESSIONS]
            if field.name != "plays"
        ]
        plays = [[astuple(p) for p in x.plays] for x in items]
        columns.append(pa.array(plays, self.schemas[Stream.SESSIONS].field("plays").type))
        return columns

    def _charts(self, chunk: Batch) -> list[Any]:
        pa = self.pa
        s, i64 = pa.string(), pa.int64()
        partitions: list[int] = []
        items: list[Any] = []
        for b in chunk.values:
            items += b.rows
            partitions += [b.partition] * len(b.rows)
        starts = [r.window_start for r in items]
        window = self.window_ms
        return [
            pa.array(starts, i64),
            pa.array([t + window for t in starts], i64),
            pa.array([r.country for r in items], s),
            pa.array([r.track_id for r in items], s),
            pa.array([r.plays for r in items], i64),
            pa.array(partitions, i64),
        ]

    def _dead_letters(self, chunk: Batch) -> list[Any]:
        pa = self.pa
        s, i64 = pa.string(), pa.int64()
        items: list[DeadLetter] = chunk.values
        return [
            pa.array([d.received_at for d in items], i64),
            pa.array([d.stage for d in items], s),
            pa.array([d.stream for d in items], s),
            pa.array([d.index for d in items], i64),
            pa.array([d.error for d in items], s),
            pa.array([d.event.decode(errors="replace") for d in items], s),
        ]


# -- completeness of an hour ---------------------------------------------------------


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


# -- the sink ---------------------------------------------------------------------------


class _Staged(NamedTuple):
    """One file of a write: its temporary path and where it goes."""

    tmp: Path
    name: str
    hour: int
    items: int
    late: bool


class FilesSink(Sink):
    """The data lake (see the module docstring). ``late_rows``: rows written to
    the late layout since start (the ``evd_lake_late_rows`` counter)."""

    def __init__(
        self,
        cfg: FilesSinkConfig,
        ctx: SinkContext,
        *,
        check_interval_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.root = Path(cfg.path) if cfg.path else Path(ctx.data_dir) / "lake"
        self.grace_ms = int(cfg.success_grace_s * 1000)
        #: Seconds between worker 0's looks for complete hours.
        self.check_interval_s = (
            check_interval_s if check_interval_s is not None
            else max(0.5, min(CHECK_INTERVAL_S, cfg.success_grace_s))
        )
        #: Rows written to the late layout (their hour had _SUCCESS).
        self.late_rows = 0
        self._format: _Format | None = None
        self._seq = 0
        #: (stream, hour) known to have _SUCCESS (positive answers only).
        self._marked: set[tuple[str, int]] = set()
        self._dirs: set[Path] = set()
        #: Progress saved / to save, per (stream, partition).
        self._saved: dict[tuple[str, int], int] = {}
        self._unsaved: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the format, create the root, remove this worker's temporary
        files left by a crash; worker 0 starts marking complete hours."""
        if self._closed:
            raise RuntimeError(f"files sink {self.cfg.name!r} is closed")
        window = self.ctx.chart_window_ms
        fmt: _Format = (
            _Parquet(window) if self.cfg.format == "parquet"
            else _Ndjson(self.cfg.compression, window)
        )
        self._format = fmt
        try:
            removed = await asyncio.to_thread(self._clean)
        except OSError as exc:
            raise SinkError(f"lake {self.root}: {exc}") from exc
        if removed:
            log.info("lake %s: removed %d temporary files of an interrupted write", self.root, removed)
        if self.ctx.worker == 0:
            task = asyncio.create_task(self._check_forever(), name=f"lake-{self.cfg.name}-success")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._started = True

    def _clean(self) -> int:
        """Create the root; remove this worker's temporary files (and worker 0's
        unfinished markers). Runs in a thread."""
        self._makedirs(self.root)
        prefix = f".part-w{self.ctx.worker:02d}-"
        removed = 0
        for base in (self.root, self.root / LATE_DIR):
            for stream in SINK_STREAMS:
                for directory in _hour_dirs(base / stream):
                    with os.scandir(directory) as it:
                        names = [e.name for e in it]
                    for name in names:
                        if (name.startswith(prefix) and name.endswith(".tmp")) or (
                            self.ctx.worker == 0 and name == SUCCESS + ".tmp"
                        ):
                            os.unlink(directory / name)
                            removed += 1
        return removed

    async def flush(self) -> None:
        """Nothing to do: every file is durable when write returns."""

    async def close(self) -> None:
        """Stop marking hours (worker 0)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        parquet = self.cfg.format == "parquet"
        return {
            "path": str(self.root),
            "format": self.cfg.format,
            "compression": "zstd" if parquet else self.cfg.compression,
        }

    # -- writing ---------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Write one file per hour of ``batch`` (none for an hour without rows),
        all renamed into place before it returns; save the progress it carries."""
        if self._closed:
            raise RuntimeError(f"files sink {self.cfg.name!r}: write after close()")
        if not self._started:
            raise RuntimeError(f"files sink {self.cfg.name!r}: write before start()")
        try:
            late = await asyncio.to_thread(self._write, batch)
        except OSError as exc:
            self._dirs.clear()  # a directory may have gone (removed by hand)
            raise SinkError(f"lake {self.root}: {exc}") from exc
        if late:
            self.late_rows += late
            metrics.LAKE_LATE_ROWS.inc(late)
            log.warning(
                "lake %s: %d %s rows came after their hour's _SUCCESS; written to %s",
                self.root, late, batch.stream, self.root / LATE_DIR,
            )

    def _write(self, batch: Batch) -> int:
        """The write, in a thread; returns the rows that went to the late layout."""
        fmt = self._format
        assert fmt is not None
        stream = batch.stream
        staged: list[_Staged] = []
        renamed: list[Path] = []
        try:
            for hour, group in rows.by_hour(batch).items():
                if not group.count:
                    continue
                late = self._is_marked(stream, hour)
                directory = self._dir(stream, hour, late)
                self._makedirs(directory)
                self._seq = (self._seq + 1) % 1_000_000
                name = f"part-w{self.ctx.worker:02d}-{_now_ms()}-{self._seq:06d}{fmt.ext}"
                tmp = directory / f".{name}.tmp"
                staged.append(_Staged(tmp, name, hour, group.count, late))
                with open(tmp, "xb") as f:
                    fmt.write(f, group)
                    f.flush()
                    os.fsync(f.fileno())
            synced: set[Path] = set()
            late_rows = 0
            for s in staged:
                late = s.late
                if not late and self._is_marked(stream, s.hour):
                    late = True  # marked while this file was written: never into it
                    self._makedirs(self._dir(stream, s.hour, True))
                final = self._dir(stream, s.hour, late) / s.name
                os.rename(s.tmp, final)
                renamed.append(final)
                synced.add(final.parent)
                if late:
                    late_rows += s.items
            for directory in synced:
                fsync_dir(directory)
        except BaseException:
            for path in [*renamed, *(s.tmp for s in staged)]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        self._save_progress(batch)
        return late_rows

    def _dir(self, stream: str, hour: int, late: bool) -> Path:
        base = self.root / LATE_DIR if late else self.root
        return base / stream / hour_path(hour)

    def _is_marked(self, stream: str, hour: int) -> bool:
        key = (stream, hour)
        if key in self._marked:
            return True
        if (self.root / stream / hour_path(hour) / SUCCESS).exists():
            self._marked.add(key)
            return True
        return False

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, each entry made durable."""
        if directory in self._dirs:
            return
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                pass  # another worker made it
            fsync_dir(d.parent)
        if len(self._dirs) >= MAX_KNOWN_DIRS:
            self._dirs.clear()
        self._dirs.add(directory)

    # -- progress (sessions, charts) -----------------------------------------------------

    def _note_progress(self, batch: Batch) -> None:
        """Remember the newest progress per partition that ``batch`` carries."""
        stream = batch.stream
        found: dict[int, int] = {}
        if stream == Stream.CHARTS:
            for b in batch.values:
                found[b.partition] = max(found.get(b.partition, b.closed_until), b.closed_until)
        elif stream == Stream.SESSIONS:
            for b, p in zip(batch.values, batch.partitions):
                if b.complete_until is not None:
                    found[p] = max(found.get(p, b.complete_until), b.complete_until)
        for p, until in found.items():
            key = (stream, p)
            if until > self._unsaved.get(key, -1) and until > self._saved_progress(key):
                self._unsaved[key] = until

    def _progress_path(self, stream: str, partition: int) -> Path:
        return self.root / PROGRESS_DIR / self.cfg.name / stream / f"p{partition:04d}.json"

    def _saved_progress(self, key: tuple[str, int]) -> int:
        saved = self._saved.get(key)
        if saved is None:
            found = _read_progress(self._progress_path(*key))
            saved = self._saved[key] = -1 if found is None else found
        return saved

    def _save_progress(self, batch: Batch) -> None:
        """Save the progress ``batch`` carries (and any a failure left unsaved),
        after its files are renamed. A failure is logged, not raised (the batch
        is written: a retry would write it twice), and the progress kept for
        the next write: only the marker waits."""
        try:
            self._note_progress(batch)
            for key, until in sorted(self._unsaved.items()):
                path = self._progress_path(*key)
                self._makedirs(path.parent)
                write_atomic(path, orjson.dumps({"until": until}))
                self._saved[key] = until
                del self._unsaved[key]
        except OSError as exc:
            log.warning("lake %s: progress not saved (%s); saved at the next write", self.root, exc)

    # -- _SUCCESS ------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self.mark_complete_hours(_now_ms())
            except (OSError, EvdError) as exc:
                log.warning("lake %s: looking for complete hours failed: %s", self.root, exc)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lake %s: the _SUCCESS task died", self.root, exc_info=task.exception())

    async def mark_complete_hours(self, now_ms: int) -> list[Path]:
        """Give ``_SUCCESS`` to every hour of the sink's streams that has a data
        file and is complete at ``now_ms`` (module docstring); the markers made."""
        made: list[Path] = []
        for stream in self.cfg.streams:
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
        for directory in _hour_dirs(self.root / stream):
            hour = _parse_hour(directory.parent.name, directory.name)
            if hour is None or hour + HOUR_MS > end_before or (stream, hour) in self._marked:
                continue
            with os.scandir(directory) as it:
                names = [e.name for e in it]
            if SUCCESS in names:
                self._marked.add((stream, hour))
            elif any(_visible(n) for n in names):
                found.append(hour)
        return sorted(found)

    def _progressed_hours(self, stream: str, hours: list[int]) -> list[int]:
        """The hours every partition's saved progress has passed."""
        low: int | None = None
        for p in range(self.ctx.partitions):
            until = _read_progress(self._progress_path(stream, p))
            if until is None:
                return []
            low = until if low is None else min(low, until)
        assert low is not None
        return [h for h in hours if h + HOUR_MS <= low]

    async def _delivered_hours(self, stream: str, hours: list[int]) -> list[int]:
        """The hours (a prefix of ``hours``) whose rows the processor has processed
        and this sink has delivered, read through the log's consumers
        (``ctx.open_consumer``; without it, embedded consumers of data_dir)."""
        data_dir = Path(self.ctx.data_dir)
        open_consumer = self.ctx.open_consumer or (lambda name: EmbeddedConsumer(data_dir, name))
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
            delivered = await consumer(self.cfg.name, mine).committed()
            reader.assign(mine)
            return done if await caught_up(reader, delivered) else []

    def _mark(self, stream: str, hour: int, now_ms: int) -> Path:
        directory = self.root / stream / hour_path(hour)
        with os.scandir(directory) as it:
            files = sum(1 for e in it if _visible(e.name))
        path = directory / SUCCESS
        write_atomic(path, orjson.dumps({"marked_at": now_ms, "files": files}))
        self._marked.add((stream, hour))
        log.info("lake %s: %s %s complete (%d files)", self.root, stream, hour_path(hour), files)
        return path


def _hour_dirs(stream_dir: Path) -> Iterator[Path]:
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


def _read_progress(path: Path) -> int | None:
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

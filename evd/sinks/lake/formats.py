"""How the lake writes one hour's rows into one file: NDJSON (gzip, zstd or
none) or Parquet (zstd; the ``evd[parquet]`` extra, pyarrow).

Rows are evd.sinks.rows' shapes. Parquet columns mirror the NDJSON rows:
nested structs for playback, context, device and geo, ``plays`` a list of
structs, times int64 epoch ms, ``timestamp`` the same RFC 3339 text; a dead
letter's ``event`` is its JSON text (a column cannot hold any JSON value).

Speed. The sink runs a format in a thread (``asyncio.to_thread``), which
encodes and compresses a chunk of rows at a time. An event's NDJSON row is
one msgspec encoding of an ``EventStruct`` (evd.sinks.rows) built from the event's fields and its
enrichment (no dicts); Parquet rows are tuples that pyarrow converts in one
pass. Both compressors run at level 1, where the ratio is close to the higher
levels' at several times their speed; gzip is ISA-L's deflate (the ``isal``
package, a dependency), the same format as zlib's at several times its speed,
and falls back to zlib where isal is missing (no wheel for the platform). The
figures behind these choices are in docs/performance.md.
"""

from __future__ import annotations

import functools
import types
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from operator import attrgetter
from typing import Any, BinaryIO, Protocol

import msgspec
import msgspec.inspect as mi
from msgspec.structs import astuple

from evd.core.errors import ConfigError
from evd.core.log import Stream
from evd.core.schema import (
    DeadLetter,
    Event,
    Session,
    SessionsBatch,
)
from evd.sinks import rows
from evd.sinks.base import Batch

__all__ = ["Format", "Ndjson", "Parquet", "make_format"]

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


@functools.cache
def _best_deflate() -> types.ModuleType:
    """ISA-L's deflate (the isal package): several times zlib's speed at level 1
    and slightly smaller files; the same gzip format and compressobj API. zlib
    where isal is missing."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


#: The deflate of gzip files; None: _best_deflate(), imported by the first gzip
#: writer (a server whose lake writes zstd or Parquet never imports isal).
_deflate: types.ModuleType | None = None

_encode = msgspec.json.Encoder().encode
_encode_lines = msgspec.json.Encoder().encode_lines


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


class Format(Protocol):
    """How one hour's rows become one file."""

    ext: str

    def write(self, f: BinaryIO, group: Batch) -> None:
        """Write every row of ``group`` to ``f`` (not fsynced)."""


class Ndjson:
    """NDJSON, gzip / zstd / uncompressed, written a chunk at a time."""

    def __init__(self, compression: str, window_ms: int) -> None:
        self.compression = compression
        self.window_ms = window_ms
        self.ext = {"gzip": ".ndjson.gz", "zstd": ".ndjson.zst", "none": ".ndjson"}[compression]
        # One write at a time per sink, so one compressor context serves them all.
        self._zstd: Any = None
        if compression == "zstd":
            import zstandard

            self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def _compressor(self) -> _Compressor:
        if self.compression == "gzip":
            deflate = _deflate or _best_deflate()
            gzip: _Compressor = deflate.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # gzip framing
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
                data = _encode_lines(rows.event_structs(chunk.values, stream == Stream.LATE))
            else:
                data = rows.json_lines(chunk, self.window_ms)
            f.write(comp.compress(data))
        f.write(comp.flush())


def _arrow_value(expr: str, t: mi.Type, depth: int = 0) -> str:
    """The expression of the value pyarrow takes for ``expr`` of type ``t``
    (rows.parquet_schemas' type for it): a struct as a tuple, a datetime as
    its RFC 3339 text, a list item by item."""
    if isinstance(t, mi.UnionType):
        others = [x for x in t.types if not isinstance(x, mi.NoneType)]
        inner = _arrow_value(expr, others[0], depth) if len(others) == 1 else expr
        if inner == expr:
            return expr
        if isinstance(others[0], mi.StructType):  # a struct is always true
            return f"{expr} and {inner}"
        return f"None if {expr} is None else {inner}"
    if isinstance(t, mi.StructType):
        parts = [_arrow_value(f"{expr}.{f.name}", f.type, depth) for f in t.fields]
        if all(p == f"{expr}.{f.name}" for p, f in zip(parts, t.fields, strict=True)):
            return f"astuple({expr})"
        return f"({', '.join(parts)},)"
    if isinstance(t, mi.DateTimeType):
        return f"encode({expr})[1:-1].decode()"  # msgspec's RFC 3339, as in NDJSON
    if isinstance(t, mi.ListType):
        item = f"x{depth}"
        value = _arrow_value(item, t.item_type, depth + 1)
        return expr if value == item else f"[{value} for {item} in {expr}]"
    return expr


#: The events rows' builder: the events of the events records ``values`` as
#: tuples in the Parquet schema's order without ``timestamp``, added to
#: ``out``, their timestamps to ``stamps``. {late}: the late flag's expression.
_EVENT_TUPLES = """
def build(values, all_late, out, stamps):
    for b in values:
        r, skew = b.received_at, b.skew_ms
        evs = b.events
        stamps += [e.timestamp for e in evs]
        if all_late or b.late:
            late = range(len(evs)) if all_late else frozenset(b.late)
            out += [{row_late} for i, e in enumerate(evs)]
        else:
            out += [{row} for e in evs]
"""
#: The enrichment's expressions in _EVENT_TUPLES (event_time:
#: evd.core.schema.epoch_ms inlined, as in rows.event_structs).
_ENRICHMENT = {
    "received_at": "r", "event_time": "int(e.timestamp.timestamp() * 1000) + skew",
    "late": "{late}",
}


def _event_tuples_builder() -> Callable[[list[Any], bool, list[Any], list[datetime]], None]:
    """_EVENT_TUPLES with the row's tuple derived from rows.event_columns, compiled."""
    parts = [
        _arrow_value(f"e.{name}", t)
        for name, t in rows.struct_columns(Event) if name != "timestamp"
    ]
    for name, _ in rows.EVENT_ENRICHMENT:
        if name not in _ENRICHMENT:
            raise TypeError(f"Parquet events rows: no expression for the enrichment {name!r}")
        parts.append(_ENRICHMENT[name])
    row = "(" + ", ".join(parts) + ",)"
    source = _EVENT_TUPLES.format(
        row=row.replace("{late}", "False"), row_late=row.replace("{late}", "i in late")
    )
    build: Callable[[list[Any], bool, list[Any], list[datetime]], None] = rows.compile_builder(
        source, "evd.sinks.lake.formats: Parquet events rows",
        {"astuple": astuple, "encode": _encode},
    )
    return build


_event_tuples = _event_tuples_builder()
#: Where the events' ``timestamp`` column is (_events adds it apart).
_TIMESTAMP_COLUMN = [name for name, _ in rows.event_columns()].index("timestamp")


class Parquet:
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
        self.schemas: dict[str, Any] = rows.parquet_schemas(pa)
        events = self.schemas[Stream.EVENTS]
        # Dictionary pages for the events' few-valued columns only: on ids and
        # times (all distinct) a dictionary is built and thrown away (faster and
        # smaller files: docs/performance.md).
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
        out: list[tuple[Any, ...]] = []
        stamps: list[datetime] = []
        _event_tuples(chunk.values, chunk.stream == Stream.LATE, out, stamps)
        columns: list[Any] = pa.array(out, self.event_rows).flatten()
        text = _encode(stamps)[2:-2].decode().split('","')
        columns.insert(_TIMESTAMP_COLUMN, pa.array(text, pa.string()))
        return columns

    def _sessions(self, chunk: Batch) -> list[Any]:
        pa = self.pa
        items: list[Session] = [s for b in chunk.values for s in b.sessions]
        # Every column in the schema's order; ``plays`` (a list of structs) as tuples.
        return [
            pa.array([[astuple(p) for p in x.plays] for x in items], field.type)
            if field.name == "plays"
            else pa.array(list(map(attrgetter(field.name), items)), field.type)
            for field in self.schemas[Stream.SESSIONS]
        ]

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
            pa.array([r.revision for r in items], i64),
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


def make_format(format: str, compression: str, window_ms: int) -> Format:
    """The format a files sink's ``format`` and ``compression`` name
    (``window_ms``: the charts window, for ``window_end``)."""
    if format == "parquet":
        return Parquet(window_ms)
    return Ndjson(compression, window_ms)

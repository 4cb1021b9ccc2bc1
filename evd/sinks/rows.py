"""Rows of the output streams as sinks write them, and the lake's hourly groups.

Every sink writes the same row shapes, so a row in the lake, the warehouse, a
webhook body and stdout reads the same:

- ``events`` / ``late``: the event as the client sent it (every field of
  the event contract, ``event_type`` always present, ``timestamp`` RFC 3339
  with microseconds, in the offset the client used), plus ``received_at`` and ``event_time`` (epoch ms; event_time
  is the skew-corrected time the processor used) and ``late`` (bool).
- ``sessions``: the session (evd.core.schema.Session), times in epoch ms,
  with its ``revision`` and ``retracted`` flag.
- ``charts``: ``window_start``, ``window_end``, ``country`` (null: no geo),
  ``track_id``, ``plays``, ``partition``, ``revision``.

Session and chart rows are revised: a late event re-emits a row with the same
id and ``revision`` + 1 (a session no longer existing, ``retracted``). Each
sink writes every revision as a row as it comes; the warehouse keeps the
highest per id (evd.sinks.sqlite), the lake appends them all.
- ``dead_letter``: ``received_at`` (when it was rejected), ``stage`` (``edge``
  or ``sink:<name>``), ``stream`` it was in, ``index`` in its request (-1 for
  sinks), ``error``, and ``event``: the item as JSON.

This module is the one declaration of each shape: the events row is the
event's own fields (evd.core.schema.Event, in its order) then
``EVENT_ENRICHMENT`` (``event_columns``); sessions are evd.core.schema.Session
(``struct_columns``); chart rows and dead letters are ``CHART_COLUMNS`` and
``DEAD_LETTER_COLUMNS``. Every sink's form of them is derived from these when
its module is imported: the lake's encoded events row (``EventStruct``), the
Parquet schemas (``parquet_schemas``) and Parquet's events tuples
(evd.sinks.lake.formats), the warehouse's tables, inserts and row builders
(evd.sinks.sqlite, from ``leaves``: nested structs flattened into columns).
Builders are generated code compiled once (``compile_builder``), never
reflection per row.

So a new field of Event (or Session) is an edit of Event alone: NDJSON writes
it (left out when None, if its default is None), Parquet has a column for it,
the warehouse a column at the end of ``events`` (added to an existing file at
start). What may need a line more: a type no sink has met yet (each names the
types it maps: rows._arrow_type for Parquet, evd.sinks.sqlite._sql_type for
SQLite; a new one fails at import, naming the field); a field whose leaf name
is already a column of its table (``geo.country`` and a new ``country``: a
rename in the table's evd.sinks.sqlite mapping, which fails at import until
then). An ``EVENT_ENRICHMENT`` entry is computed, not read from the event,
so a new one also needs its value in each builder: ``event_structs`` and
``event_json`` here, the events mapping's ``values`` in evd.sinks.sqlite,
``_ENRICHMENT`` in evd.sinks.lake.formats. A new chart or dead-letter column
is derived for the warehouse (its value in the mapping's ``values`` where it is
not the item's attribute of that name) and the Parquet schema, but still an
edit of ``chart_dict`` / ``dead_letter_dict`` here and of Parquet's
``_charts`` / ``_dead_letters``, which build those few columns by hand.

Hours are UTC, epoch ms floored to the hour: events, late and dead letters by
``received_at``, sessions by ``started_at``, charts by ``window_start``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi
from msgspec.structs import astuple

from evd.core.log import Stream
from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    DeadLetter,
    Event,
    EventsBatch,
    Session,
    SessionsBatch,
    epoch_ms,
)
from evd.sinks.base import Batch

__all__ = [
    "CHART_COLUMNS",
    "DEAD_LETTER_COLUMNS",
    "EVENT_ENRICHMENT",
    "EVENT_JSON_CLOSE",
    "EVENT_JSON_OPEN",
    "EVENT_JSON_RECEIVED",
    "EVENT_JSON_TIME",
    "HOUR_MS",
    "Columns",
    "EventRow",
    "EventStruct",
    "Leaf",
    "by_hour",
    "chart_rows",
    "compile_builder",
    "dead_letters",
    "event_columns",
    "event_json",
    "event_rows",
    "event_structs",
    "filter_event_types",
    "hour_of",
    "item_type",
    "json_lines",
    "leaves",
    "parquet_schemas",
    "sessions",
    "struct_columns",
    "tally",
]

HOUR_MS = 3_600_000
#: Streams whose items are events (filtered by a sink's ``event_types``).
EVENT_STREAMS = frozenset((Stream.EVENTS, Stream.LATE))
#: The dead-letter item type of a stream's items that are not events.
_ITEM_TYPES: dict[str, str] = {
    Stream.SESSIONS: "session", Stream.CHARTS: "chart_row", Stream.DEAD_LETTER: "dead_letter"
}

_json = msgspec.json.Encoder()
_encode = _json.encode

#: What an events row adds after the event's own fields, in this order.
EVENT_ENRICHMENT: tuple[tuple[str, Any], ...] = (
    ("received_at", int),  # epoch ms, when the edge took the request
    ("event_time", int),  # epoch ms, the skew-corrected time the processor used
    ("late", bool),
)
#: A chart row's columns, in row order.
CHART_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("window_start", int),
    ("window_end", int),
    ("country", str | None),
    ("track_id", str),
    ("plays", int),
    ("partition", int),
    ("revision", int),
)
#: A dead letter's columns, in row order (``event``: the item's JSON).
DEAD_LETTER_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("received_at", int),
    ("stage", str),
    ("stream", str),
    ("index", int),
    ("error", str),
    ("event", str),
)


#: A row declaration: (name, type) per column, in row order; a type is a
#: Python annotation or its msgspec.inspect form.
Columns = Sequence[tuple[str, Any]]


def struct_columns(struct: type[msgspec.Struct]) -> tuple[tuple[str, mi.Type], ...]:
    """The fields of ``struct`` as a row declaration, in the struct's order."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return tuple((f.name, f.type) for f in info.fields)


def event_columns(event: type[msgspec.Struct] = Event) -> tuple[tuple[str, Any], ...]:
    """The events row's declaration: ``event``'s fields, then EVENT_ENRICHMENT."""
    return (*struct_columns(event), *EVENT_ENRICHMENT)


class Leaf(NamedTuple):
    """One value of a row as a flat table holds it (see ``leaves``)."""

    #: Attribute names from the row's item down to the value (``("geo", "country")``).
    path: tuple[str, ...]
    #: Its type, None left out.
    type: mi.Type
    #: Lengths of the path's prefixes that may be None: an optional struct on
    #: the way, or (``len(path)``) the value itself. Empty: never None.
    none_at: tuple[int, ...]

    @property
    def nullable(self) -> bool:
        return bool(self.none_at)


def _leaves(path: tuple[str, ...], t: mi.Type, none_at: tuple[int, ...]) -> Iterator[Leaf]:
    if isinstance(t, mi.UnionType):
        others = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(others) < len(t.types):
            none_at += (len(path),)
        if len(others) == 1:
            t = others[0]
    if isinstance(t, mi.StructType):
        for f in t.fields:
            yield from _leaves((*path, f.name), f.type, none_at)
    else:
        yield Leaf(path, t, none_at)


def leaves(columns: Columns) -> list[Leaf]:
    """The values of a row declared by ``columns`` as a flat table holds them:
    a struct is flattened into its fields (depth first, in declaration order),
    anything else (a list of structs too) is one value."""
    return [
        leaf
        for name, t in columns
        for leaf in _leaves((name,), t if isinstance(t, mi.Type) else mi.type_info(t), ())
    ]


def compile_builder(source: str, where: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """The function ``build`` that ``source`` defines, compiled once with the
    globals ``namespace``: a sink's row builder generated from a declaration
    here, so its hot loop reads attributes directly, with no per-row reflection.

    ``source`` is a sink's own template filled with expressions derived from
    the declarations, never input; ``where`` names it in tracebacks.
    """
    code = compile(source, f"<{where}>", "exec")
    exec(code, namespace)  # noqa: S102 -- the module's own code, see above
    build: Callable[..., Any] = namespace["build"]
    return build


def _event_struct_fields() -> list[tuple[str, Any] | tuple[str, Any, Any]]:
    """Event's fields in Event's order, so ``astuple(event)`` fills them: one
    whose default is None keeps it (left out when None, as in the event's
    JSON), every other is required (always written: ``event_type`` ``play``
    too); then the enrichment, defaulting to None, which no real value equals
    (always written)."""
    names = Event.__struct_fields__
    defaults = dict(zip(names[len(names) - len(Event.__struct_defaults__):],
                        Event.__struct_defaults__, strict=True))
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (name, Any, None) if name in defaults and defaults[name] is None else (name, Any)
        for name in names
    ]
    return fields + [(name, Any, None) for name, _ in EVENT_ENRICHMENT]


#: An events row as msgspec encodes it into the lake's NDJSON:
#: ``EventStruct(*astuple(event), received_at, event_time, late)``
#: (untracked by the GC, like Events).
EventStruct: type[msgspec.Struct] = msgspec.defstruct(
    "EventStruct", _event_struct_fields(), omit_defaults=True, gc=False, module=__name__
)
#: The constructor, which mypy cannot count the arguments of.
_event_struct: Callable[..., msgspec.Struct] = EventStruct


class EventRow(NamedTuple):
    """One event of an events (or late) record with its enrichment."""

    event: Event
    received_at: int
    event_time: int
    late: bool


def hour_of(ms: int) -> int:
    """The start (epoch ms) of the UTC hour holding ``ms``."""
    return ms - ms % HOUR_MS


def event_rows(values: Sequence[EventsBatch], stream: str = Stream.EVENTS) -> Iterator[EventRow]:
    """Every event of ``values`` with its received_at, event time and late flag."""
    all_late = stream == Stream.LATE
    for b in values:
        late = set(b.late) if b.late and not all_late else ()
        skew = b.skew_ms
        received_at = b.received_at
        for i, ev in enumerate(b.events):
            yield EventRow(ev, received_at, epoch_ms(ev.timestamp) + skew, all_late or i in late)


def sessions(values: Sequence[SessionsBatch]) -> Iterator[Session]:
    for b in values:
        yield from b.sessions


def chart_rows(values: Sequence[ChartsBatch]) -> Iterator[tuple[int, ChartRow]]:
    """(partition, row) of every row."""
    for b in values:
        for row in b.rows:
            yield b.partition, row


def dead_letters(values: Sequence[DeadLetter]) -> Iterator[DeadLetter]:
    return iter(values)


def item_type(stream: str) -> str:
    """The audit's "event type" of the items of a stream that is not events."""
    return _ITEM_TYPES[stream]


def filter_event_types(stream: str, value: Any, types: frozenset[str] | None) -> tuple[Any, int]:
    """``value`` without the events whose type is not in ``types`` (None: all),
    and how many were dropped. Only events and late records are filtered."""
    if types is None or stream not in EVENT_STREAMS:
        return value, 0
    b: EventsBatch = value
    keep = [i for i, ev in enumerate(b.events) if ev.event_type in types]
    dropped = len(b.events) - len(keep)
    if not dropped:
        return b, 0
    late = set(b.late)
    events = [b.events[i] for i in keep]
    new_late = [j for j, i in enumerate(keep) if i in late]
    return EventsBatch(b.received_at, events, b.skew_ms, new_late), dropped


def count_items(stream: str, value: Any) -> int:
    """Items in one decoded record."""
    if stream in EVENT_STREAMS:
        return len(value.events)
    if stream == Stream.SESSIONS:
        return len(value.sessions)
    if stream == Stream.CHARTS:
        return len(value.rows)
    return 1


_event_type = attrgetter("event_type")


def tally(batch: Batch) -> Counter[tuple[int, str]]:
    """Items per (hour, event type) of ``batch``: what the audit counts as delivered."""
    out: Counter[tuple[int, str]] = Counter()
    stream = batch.stream
    if stream in EVENT_STREAMS:
        # The events of each hour together, counted by type in one C loop each.
        by_hour: dict[int, list[Event]] = {}
        for b in batch.values:
            hour = hour_of(b.received_at)
            events = by_hour.get(hour)
            if events is None:
                by_hour[hour] = list(b.events)
            else:
                events.extend(b.events)
        for hour, events in by_hour.items():
            for event_type, n in Counter(map(_event_type, events)).items():
                out[hour, event_type] += n
    elif stream == Stream.SESSIONS:
        for s in sessions(batch.values):
            out[hour_of(s.started_at), "session"] += 1
    elif stream == Stream.CHARTS:
        for _, row in chart_rows(batch.values):
            out[hour_of(row.window_start), "chart_row"] += 1
    else:
        for d in batch.values:
            out[hour_of(d.received_at), "dead_letter"] += 1
    return out


def by_hour(batch: Batch) -> dict[int, Batch]:
    """``batch`` split by UTC hour (the lake's ``dt=/hour=`` directories)."""
    stream = batch.stream
    groups: dict[int, list[Any]] = {}
    counts: Counter[int] = Counter()
    if stream in EVENT_STREAMS or stream == Stream.DEAD_LETTER:
        for v in batch.values:
            hour = hour_of(v.received_at)
            groups.setdefault(hour, []).append(v)
            counts[hour] += count_items(stream, v)
    elif stream == Stream.SESSIONS:
        per: dict[int, list[Session]] = {}
        for s in sessions(batch.values):
            per.setdefault(hour_of(s.started_at), []).append(s)
        for hour, items in per.items():
            groups[hour] = [SessionsBatch(items)]
            counts[hour] = len(items)
    else:
        rows: dict[tuple[int, int], list[ChartRow]] = {}
        for b in batch.values:
            for row in b.rows:
                rows.setdefault((hour_of(row.window_start), b.partition), []).append(row)
        for (hour, partition), chart_items in rows.items():
            groups.setdefault(hour, []).append(ChartsBatch(partition, 0, chart_items))
            counts[hour] += len(chart_items)
    share = batch.nbytes // max(1, batch.count)
    return {
        hour: Batch(stream, values, counts[hour], share * counts[hour])
        for hour, values in sorted(groups.items())
    }


def json_lines(batch: Batch, window_ms: int = 60_000) -> bytes:
    """NDJSON of every item of ``batch`` (one row per line, each ending in \\n).

    ``window_ms``: the charts window, for ``window_end``.
    """
    stream = batch.stream
    parts: list[bytes] = []
    add = parts.append
    if stream in EVENT_STREAMS:
        all_late = stream == Stream.LATE
        for b in batch.values:
            late = set(b.late) if b.late and not all_late else ()
            received = b.received_at
            skew = b.skew_ms
            for i, ev in enumerate(b.events):
                add(event_json(
                    _encode(ev), ev.event_type, received, epoch_ms(ev.timestamp) + skew,
                    all_late or i in late,
                ))
                add(b"\n")
    elif stream == Stream.SESSIONS:
        for s in sessions(batch.values):
            add(_encode(s))
            add(b"\n")
    elif stream == Stream.CHARTS:
        for partition, row in chart_rows(batch.values):
            add(_encode(chart_dict(partition, row, window_ms)))
            add(b"\n")
    else:
        for d in batch.values:
            add(_encode(dead_letter_dict(d)))
            add(b"\n")
    return b"".join(parts)


def event_json(enc: bytes, event_type: str, received_at: int, event_time: int, late: bool) -> bytes:
    """An events row as JSON (no newline) from ``enc``, the event's msgspec JSON:
    ``event_type`` added when the encoding left out its default, then the enrichment."""
    typed = b'"event_type":"play",' if event_type == "play" else b""
    return b'{%s%s,"received_at":%d,"event_time":%d,"late":%s}' % (
        typed, enc[1:-1], received_at, event_time, b"true" if late else b"false",
    )


#: ``event_json``'s row as text, in pieces: ``EVENT_JSON_OPEN[event_type == "play"]``,
#: the event's msgspec JSON less its braces, ``EVENT_JSON_RECEIVED``,
#: ``str(received_at)``, ``EVENT_JSON_TIME``, ``str(event_time)``,
#: ``EVENT_JSON_CLOSE[late]``.
EVENT_JSON_OPEN: tuple[str, str] = ("{", '{"event_type":"play",')
EVENT_JSON_RECEIVED = ',"received_at":'
EVENT_JSON_TIME = ',"event_time":'
EVENT_JSON_CLOSE: tuple[str, str] = (',"late":false}', ',"late":true}')


def chart_dict(partition: int, row: ChartRow, window_ms: int) -> dict[str, Any]:
    return {
        "window_start": row.window_start,
        "window_end": row.window_start + window_ms,
        "country": row.country,
        "track_id": row.track_id,
        "plays": row.plays,
        "partition": partition,
        "revision": row.revision,
    }


def dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    """A dead letter as a row; ``event`` is the item's JSON when it parses, else its text."""
    try:
        event: Any = msgspec.json.decode(d.event)
    except msgspec.DecodeError:
        event = d.event.decode(errors="replace")
    return {
        "received_at": d.received_at,
        "stage": d.stage,
        "stream": d.stream,
        "index": d.index,
        "error": d.error,
        "event": event,
    }


def event_structs(values: Sequence[EventsBatch], all_late: bool) -> list[msgspec.Struct]:
    """The EventStruct rows of the events of ``values`` (``all_late``: the late stream)."""
    row = _event_struct
    out: list[msgspec.Struct] = []
    for b in values:
        r, skew = b.received_at, b.skew_ms
        # event_time is evd.core.schema.epoch_ms(timestamp) + skew, inlined: a call
        # per event is a sixth of the encoding time.
        if all_late or b.late:
            late = range(len(b.events)) if all_late else frozenset(b.late)
            out += [
                row(*astuple(e), r, int(e.timestamp.timestamp() * 1000) + skew, i in late)
                for i, e in enumerate(b.events)
            ]
        else:
            out += [
                row(*astuple(e), r, int(e.timestamp.timestamp() * 1000) + skew, False)
                for e in b.events
            ]
    return out


def _arrow_field(pa: Any, name: str, t: mi.Type) -> Any:
    nullable = False
    if isinstance(t, mi.UnionType):
        others = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if len(others) != 1:
            raise TypeError(f"{name}: no Parquet type for {t}")
        nullable, t = len(others) < len(t.types), others[0]
    return pa.field(name, _arrow_type(pa, name, t), nullable)


def _arrow_type(pa: Any, name: str, t: mi.Type) -> Any:
    if isinstance(t, mi.StrType | mi.DateTimeType):  # a datetime is its RFC 3339 text
        return pa.string()
    if isinstance(t, mi.LiteralType) and all(isinstance(v, str) for v in t.values):
        return pa.string()
    if isinstance(t, mi.BoolType):
        return pa.bool_()
    if isinstance(t, mi.IntType):
        return pa.int64()
    if isinstance(t, mi.StructType):
        return pa.struct([_arrow_field(pa, f.encode_name, f.type) for f in t.fields])
    if isinstance(t, mi.ListType):
        return pa.list_(_arrow_field(pa, "item", t.item_type))
    raise TypeError(f"{name}: no Parquet type for {t}")


def parquet_schemas(pa: Any) -> dict[str, Any]:
    """stream -> the pyarrow schema of its rows, derived from the declarations
    above (``pa``: the pyarrow module, an optional dependency)."""

    def schema(columns: Columns) -> Any:
        return pa.schema([
            _arrow_field(pa, name, t if isinstance(t, mi.Type) else mi.type_info(t))
            for name, t in columns
        ])

    events = schema(event_columns())
    return {
        Stream.EVENTS: events,
        Stream.LATE: events,
        Stream.SESSIONS: schema(struct_columns(Session)),
        Stream.CHARTS: schema(CHART_COLUMNS),
        Stream.DEAD_LETTER: schema(DEAD_LETTER_COLUMNS),
    }

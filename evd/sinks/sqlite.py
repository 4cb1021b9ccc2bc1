"""The embedded warehouse: one SQLite file in WAL mode (``type: sqlite``).

Tables (created at start, ``IF NOT EXISTS``, so every worker may start at once),
derived from the rows' declarations in evd.sinks.rows (see "the tables" below;
``SCHEMA`` is their CREATE text):

- ``events``: one row per event, ``event_id`` the primary key; the event's
  fields as typed columns (``timestamp`` the RFC 3339 text as the row's JSON
  has it, ``event_time`` the skew-corrected epoch ms), ``late`` (0/1),
  ``received_at`` (epoch ms) and ``raw``: the event's JSON row exactly as
  evd.sinks.rows.json_lines writes it. The ``late`` stream, when a warehouse
  takes it, lands in this same table: a late event is also in ``events``
  flagged ``late = 1``, with the same values, so whichever stream arrives
  first inserts the row and the other finds it there.
- ``sessions``: ``session_id`` the primary key, one column per Session field
  but ``retracted`` (a retracted session is deleted, see below), ``plays`` as
  JSON text (a list of {track_id, started_at, listened_ms, ended_by}),
  ``revision`` the session's latest revision.
- ``charts``: ``window_start``, ``window_end``, ``country`` (NULL: events
  without geo), ``track_id``, ``partition``, ``plays``, ``revision``. The key
  (window_start, country, track_id, partition) is a unique index on ``ifnull(country, '')``:
  SQLite holds NULLs distinct in a key, so a plain key would let a replayed
  no-geo row in twice, while the index keeps ``country`` NULL for queries.
- ``dead_letter``: ``letter_id`` (a hash of every other field, so a replay is
  the same row), ``received_at`` (when it was rejected, epoch ms), ``stage``
  (``edge`` or ``sink:<name>``), ``stream``, ``idx`` (index in its request,
  -1 for sinks), ``reason`` and ``event``: the item's JSON as text.

A field added to a row's declaration is a column at the end of its table,
typed from the declaration; a file made by an older version gains it at start
(``ALTER TABLE ... ADD COLUMN``, nullable: its older rows hold NULL). Inserts
name their columns, so they do not depend on a file's column order.

The warehouse keeps the latest revision of each session and chart row (late
events re-emit them with ``revision`` + 1, evd.core.schema.Session): a row is
inserted, or replaces the stored row of its key only when its revision is
higher than the stored one (NULL, in a file from before revisions, counts as
lower than any); a lower or equal revision changes nothing. A session with
``retracted`` set (it no longer exists: a late event preceded its first event
or merged it into another) deletes the stored row of its ``session_id`` when
the stored revision is lower, and never inserts. Within a batch, rows apply in
the stream's order. No tombstone is kept: a retraction is a session's last
revision and the output stream only ever raises an id's revision, so nothing
older follows it (a replayed batch is at or after the last committed one).

Writes are idempotent, so the delivery loop may write a batch again after a
failure: events and dead letters insert or do nothing; a replayed session or
chart row carries a revision the stored one already has (or one its
retraction passed), so it changes nothing. One write is one ``BEGIN
IMMEDIATE`` transaction: several workers share the file, SQLite lets one
write at a time and the others wait up to ``busy_timeout_s``.

Durability: ``synchronous = FULL``. The loop commits the log offsets (fsynced)
right after ``write`` returns, so a committed row must survive a power cut too;
in WAL mode FULL costs one fsync of the WAL per transaction (per batch), where
NORMAL would survive a process crash but could lose the last batches on power
loss while their offsets say delivered.

All SQLite work, including building the rows, runs in one thread owned by the
sink (a connection belongs to the thread that opened it), never on the event loop.
That thread takes the GIL from the loop while it runs Python: an events row is
built as ``executemany`` takes it (between the inserts, which release the GIL),
and a single C call that holds it (the JSON of ENCODE_CHUNK events) is short.

Cost: most of it is SQLite's (binding, the insert, the pages it writes); a
quarter is building the rows in Python. Random event ids make every
write touch pages all over the ``event_id`` index, so the cost per event grows
with the table and shrinks with the rows per write (a key in arrival order
would stay flat, but the contract names ``event_id`` the primary key); the
figures are in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi

from evd.core.config import BatchConfig, MiB, SinkConfig
from evd.core.log import Stream
from evd.core.schema import DeadLetter, Event, Session
from evd.sinks import rows
from evd.sinks.base import Batch, PermanentSinkError, Sink, SinkContext, SinkError

__all__ = [
    "SCHEMA",
    "WAREHOUSE",
    "Column",
    "SqliteSink",
    "SqliteSinkConfig",
    "Table",
    "Warehouse",
    "letter_id",
    "warehouse",
]


def _warehouse_batch() -> BatchConfig:
    # Fewer, larger transactions: a write rewrites every page of the event_id
    # index it touches (random keys: most of them while the table is small),
    # and each commits and fsyncs once (docs/performance.md). A row is still
    # queryable within seconds of its event's acceptance.
    return BatchConfig(max_events=30_000, max_bytes=16 * MiB, max_age_s=2.0)


class SqliteSinkConfig(SinkConfig, tag="sqlite", kw_only=True):
    """The embedded warehouse: one SQLite file in WAL mode."""

    streams: list[str] = msgspec.field(
        default_factory=lambda: [Stream.EVENTS, Stream.SESSIONS, Stream.CHARTS, Stream.DEAD_LETTER]
    )
    batch: BatchConfig = msgspec.field(default_factory=_warehouse_batch)
    #: The database file ("": {data_dir}/warehouse.sqlite3).
    path: str = ""
    #: How long a write waits for another worker's transaction.
    busy_timeout_s: float = 30.0

_json = msgspec.json.Encoder()
_encode = _json.encode
_encode_lines = _json.encode_lines
_pack = msgspec.msgpack.Encoder().encode

#: SQLite INTEGER bounds: a larger int (an event's durations are only bounded
#: below) cannot be bound as INTEGER and is stored as REAL; ``raw`` keeps it exact.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: Bytes per page of a new file. A write appends to the table and updates the
#: event_id index at random places; SQLite writes each changed page to the WAL
#: (two system calls a page) and later copies it to the file: larger pages mean
#: fewer of them per write, but once the index outgrows what one write touches
#: whole, more bytes per row (32 KiB: faster to a million rows, slower past two
#: million in small writes; docs/performance.md).
PAGE_SIZE = 16_384
#: Page cache per connection (per worker), KiB: holds the event_id index a
#: write updates at random places (SQLite's default, 2 MiB, measured 25% slower
#: at 200,000 events).
CACHE_KIB = 64 * 1024
#: WAL pages after which a commit copies the WAL into the file (SQLite's
#: default, 1000, is 16 MiB of 16 KiB pages: every write would checkpoint): an
#: index page changed by several writes is copied once. Bounds the WAL at about
#: 40 MiB plus one write.
CHECKPOINT_PAGES = 2_500

#: Events whose rows one msgspec call encodes (``events``, at least: whole
#: records). A C call holds the GIL throughout, and the event loop waits for it:
#: this keeps each such wait near a millisecond; the rows come one at a time.
ENCODE_CHUNK = 1_000

# -- the tables, derived from the rows (evd.sinks.rows) ------------------------------
#
# A table's columns are its row's leaves (rows.leaves: nested structs flattened,
# a column named after the last name of its path), each with its SQL type
# (_sql_type; NOT NULL unless the value may be None), less those its _Mapping
# omits, plus the extra columns it names. Its row builder is generated from the same columns and
# compiled once, at import: the value of a column is the item's attribute
# (None when an optional struct on the way is None; a datetime as RFC 3339
# text, a list or struct as JSON text) unless the mapping gives an expression.
# So a new field of a row (of Event, say) is a new column, named and typed from
# its declaration, at the end of its table.


class _Mapping(NamedTuple):
    """How a table differs from its row's declaration (evd.sinks.rows)."""

    table: str
    #: The row's declaration.
    row: rows.Columns
    #: The table's columns as this version first created them, in that order:
    #: pinned, so a new file has the columns of an old one in the same places.
    #: Columns of the row not named here follow, in declaration order.
    order: tuple[str, ...]
    #: Leaf (its path, dotted) -> column name, where the column is not named
    #: after the last name of its path.
    renames: dict[str, str]
    #: Column -> SQL type of the columns that are not the row's.
    extra: dict[str, str]
    #: Column -> the Python expression of its value in the builder, where it is
    #: not the item's attribute (computed, or named otherwise on the item).
    values: dict[str, str]
    #: The columns that identify a row: one is the PRIMARY KEY; several, a
    #: unique index ``<table>_key`` (a nullable column as ``ifnull(c, '')``: SQLite
    #: holds NULLs distinct in a key, so a replayed row with a NULL would go in twice).
    key: tuple[str, ...]
    #: On a key conflict: True, the other columns take the new values; False,
    #: the row stays as it is.
    upsert: bool
    #: The builder's source: ``def build(batch, window_ms)``, the rows' tuple as ``{row}``.
    builder: str
    #: The builder's name for the row's item (its attributes are the leaves' paths).
    item: str
    #: Leaves (their paths, dotted) the table leaves out.
    omit: tuple[str, ...] = ()
    #: The column of the row's revision: an upsert replaces the stored row
    #: only when the new row's is higher (a NULL stored one counts as -1).
    revision: str | None = None
    #: The item's attribute that marks a retraction (needs ``revision``): such
    #: an item deletes the stored row of its key when the stored revision is
    #: lower, and never inserts.
    retract: str | None = None


_EVENTS = _Mapping(
    "events",
    rows.event_columns(),
    order=(
        "event_id", "event_type", "timestamp", "event_time", "user_id", "track_id",
        "page_uri", "playlist_uri", "position_ms", "duration_ms", "initiator", "os",
        "client_version", "country", "region", "late", "received_at", "raw",
    ),
    renames={},
    extra={"raw": "TEXT"},
    values={
        "timestamp": "stamp",
        "event_time": "event_time",
        "late": "is_late",
        "received_at": "received",
        "raw": "raw",
    },
    key=("event_id",),
    upsert=False,
    # One pass builds both the typed columns and ``raw``, the event's line of
    # evd.sinks.rows.json_lines (the same text: rows.EVENT_JSON_* around the
    # event's JSON, tested), each row as executemany takes it (a generator: no
    # row tuples wait for the GC). Encoding is per chunk of ENCODE_CHUNK events,
    # not per event (records hold few events: a request's for one partition):
    # one msgspec call encodes every event of the chunk (a newline only ever
    # ends a line, as JSON escapes it in a string, so splitting at "}\n{" gives
    # each event's JSON less its braces) and one every timestamp (RFC 3339 text
    # never holds '","'), each as the event's JSON has it; both must give one
    # piece per event. ``late`` is bound as an int: sqlite3 binds a bool
    # through its adapter lookup.
    builder="""
def build(batch, window_ms):
    all_late = batch.stream == LATE
    values = batch.values
    end = 0
    while end < len(values):
        start = end
        events = []
        while end < len(values) and len(events) < ENCODE_CHUNK:
            events += values[end].events
            end += 1
        times = [ev.timestamp for ev in events]
        stamps = encode(times).decode()[2:-2].split('","')
        bodies = encode_lines(events).decode()[1:-2].split("}}\\n{{")
        if not len(stamps) == len(bodies) == len(events):
            if events:
                raise ValueError("events rows: the encodings do not split one piece per event")
            continue
        pieces = zip(times, stamps, bodies)
        for rec in values[start:end]:
            skew = rec.skew_ms
            received = rec.received_at
            mid = f"{{RECEIVED}}{{received}}{{EVENT_TIME}}"
            if all_late or rec.late:
                late = range(len(rec.events)) if all_late else frozenset(rec.late)
                for i, (ev, (ts, stamp, body)) in enumerate(zip(rec.events, pieces)):
                    event_time = int(ts.timestamp() * 1000) + skew
                    is_late = 1 if i in late else 0
                    raw = f"{{OPEN[ev.event_type == 'play']}}{{body}}{{mid}}{{event_time}}{{CLOSE[is_late]}}"
                    yield {row}
            else:
                is_late = 0
                for ev, (ts, stamp, body) in zip(rec.events, pieces):
                    event_time = int(ts.timestamp() * 1000) + skew
                    raw = f"{{OPEN[ev.event_type == 'play']}}{{body}}{{mid}}{{event_time}}{{NOT_LATE}}"
                    yield {row}
""",
    item="ev",
)
_SESSIONS = _Mapping(
    "sessions",
    rows.struct_columns(Session),
    order=(
        "session_id", "user_id", "started_at", "ended_at", "event_count", "play_count",
        "stream_count", "listened_ms", "country", "os", "plays",
    ),
    renames={},
    extra={},
    values={},
    key=("session_id",),
    upsert=True,
    builder="""
def build(batch, window_ms):
    return [{row} for s in sessions(batch.values)]
""",
    item="s",
    omit=("retracted",),
    revision="revision",
    retract="retracted",
)
_CHARTS = _Mapping(
    "charts",
    rows.CHART_COLUMNS,
    order=("window_start", "window_end", "country", "track_id", "partition", "plays"),
    renames={},
    extra={},
    values={"window_end": "r.window_start + window_ms", "partition": "p"},
    key=("window_start", "country", "track_id", "partition"),
    upsert=True,
    builder="""
def build(batch, window_ms):
    return [{row} for p, r in chart_rows(batch.values)]
""",
    item="r",
    revision="revision",
)
_DEAD_LETTER = _Mapping(
    "dead_letter",
    rows.DEAD_LETTER_COLUMNS,
    order=("letter_id", "received_at", "stage", "stream", "idx", "reason", "event"),
    renames={"index": "idx", "error": "reason"},
    extra={"letter_id": "TEXT"},
    values={"letter_id": "letter_id(d)", "event": 'd.event.decode(errors="replace")'},
    key=("letter_id",),
    upsert=False,
    builder="""
def build(batch, window_ms):
    return [{row} for d in batch.values]
""",
    item="d",
)

#: A statement's rows of parameters: a list, or (the events) an iterator that
#: builds each row as ``executemany`` takes it, so no batch of rows is held.
Params = Iterable[tuple[Any, ...]]
_Builder = Callable[[Batch, int], Params]


class Column(NamedTuple):
    """One column of a warehouse table."""

    name: str
    #: SQLite's type: TEXT, INTEGER, REAL or BLOB.
    type: str
    nullable: bool


class Table(NamedTuple):
    """One warehouse table, derived from its row (see ``warehouse``)."""

    name: str
    columns: tuple[Column, ...]
    #: CREATE TABLE (and the key's index) for a new file, each IF NOT EXISTS.
    create: tuple[str, ...]
    #: The idempotent INSERT of one row (columns named, values in ``columns``' order).
    insert: str
    #: A batch's rows, one tuple per item, in ``columns``' order; in a table
    #: with retractions (``delete``), each preceded by the item's retracted flag.
    #: Built again from the batch for each try (an iterator is read once).
    build: _Builder
    #: The DELETE of a retracted item's stored row, its parameters the row's
    #: values at ``delete_at`` (the key, then the revision); None: no retractions.
    delete: str | None = None
    delete_at: tuple[int, ...] = ()

    def statements(self, params: Params) -> list[tuple[str, Params]]:
        """The statements that write the rows ``build`` made, with their
        parameters, in the rows' order."""
        if self.delete is None:
            return [(self.insert, params)]
        out: list[tuple[str, Params]] = []
        at = [i + 1 for i in self.delete_at]
        for retracted, run in groupby(params, key=itemgetter(0)):
            if retracted:
                out.append((self.delete, [tuple(r[i] for i in at) for r in run]))
            else:
                out.append((self.insert, [r[1:] for r in run]))
        return out


class Warehouse(NamedTuple):
    """Every table, and what a write of each stream runs."""

    tables: tuple[Table, ...]
    #: Every table's CREATE statements.
    schema: str
    #: stream -> the table its items go to.
    writers: dict[str, Table]


def _sql_type(leaf: rows.Leaf) -> str:
    """The SQLite type of a value: a new kind of type needs a line here."""
    t = leaf.type
    if isinstance(t, mi.IntType | mi.BoolType):
        return "INTEGER"
    if isinstance(t, mi.FloatType):
        return "REAL"
    if isinstance(t, mi.BytesType):
        return "BLOB"
    if isinstance(t, mi.StrType | mi.DateTimeType | mi.ListType | mi.DictType | mi.StructType):
        return "TEXT"  # a datetime as RFC 3339 text; a list, dict or struct as JSON
    if isinstance(t, mi.LiteralType) and all(isinstance(v, str) for v in t.values):
        return "TEXT"
    raise TypeError(f"{'.'.join(leaf.path)}: no SQLite type for {t}")


def _value(var: str, leaf: rows.Leaf) -> str:
    """The expression of ``leaf``'s value on the item named ``var``."""
    path = leaf.path
    expr = ".".join((var, *path))
    t = leaf.type
    if isinstance(t, mi.DateTimeType):
        expr = f"encode({expr})[1:-1].decode()"  # msgspec's RFC 3339, as in the rows' JSON
    elif isinstance(t, mi.ListType | mi.DictType | mi.StructType):
        expr = f"encode({expr}).decode()"
    guards = [f"{'.'.join((var, *path[:n]))} is None" for n in leaf.none_at]
    if len(path) in leaf.none_at and expr == ".".join((var, *path)):
        guards.pop()  # the value itself: None as it is
    return f"None if {' or '.join(guards)} else {expr}" if guards else expr


#: What the generated builders see.
_NAMESPACE: dict[str, Any] = {
    "LATE": Stream.LATE, "encode": _encode, "encode_lines": _encode_lines,
    "OPEN": rows.EVENT_JSON_OPEN, "RECEIVED": rows.EVENT_JSON_RECEIVED,
    "EVENT_TIME": rows.EVENT_JSON_TIME, "CLOSE": rows.EVENT_JSON_CLOSE,
    "NOT_LATE": rows.EVENT_JSON_CLOSE[0], "ENCODE_CHUNK": ENCODE_CHUNK,
    "sessions": rows.sessions, "chart_rows": rows.chart_rows,
}


def _table(m: _Mapping) -> Table:
    var = m.item
    by_name: dict[str, tuple[Column, str]] = {}
    derived: list[str] = []
    omitted = set(m.omit)
    for leaf in rows.leaves(m.row):
        dotted = ".".join(leaf.path)
        if dotted in omitted:
            omitted.remove(dotted)
            continue
        name = m.renames.get(dotted, leaf.path[-1])
        if name in by_name:
            raise TypeError(f"{m.table}: two columns named {name!r}: rename one in its _Mapping")
        by_name[name] = (
            Column(name, _sql_type(leaf), leaf.nullable), m.values.get(name) or _value(var, leaf)
        )
        derived.append(name)
    for name, sql_type in m.extra.items():
        by_name[name] = (Column(name, sql_type, False), m.values[name])
    revision = () if m.revision is None else (m.revision,)
    stale = [n for n in (*m.order, *m.values, *m.key, *revision) if n not in by_name]
    stale += sorted(omitted)
    if stale:
        raise TypeError(f"{m.table}: the mapping names columns the row has not: {stale}")
    if m.retract is not None and m.revision is None:
        raise TypeError(f"{m.table}: retractions need a revision column")
    names = [*m.order, *(n for n in derived if n not in m.order)]
    columns = tuple(by_name[n][0] for n in names)

    def decl(c: Column) -> str:
        if m.key == (c.name,):
            return f"    {c.name} {c.type} PRIMARY KEY"
        return f"    {c.name} {c.type}{'' if c.nullable else ' NOT NULL'}"

    create = [f"CREATE TABLE IF NOT EXISTS {m.table} (\n" + ",\n".join(map(decl, columns)) + "\n)"]
    target = ", ".join(
        f"ifnull({n}, '')" if by_name[n][0].nullable else n for n in m.key
    )
    if len(m.key) > 1:
        create.append(f"CREATE UNIQUE INDEX IF NOT EXISTS {m.table}_key\n    ON {m.table} ({target})")
    action = "DO NOTHING"
    if m.upsert:
        action = "DO UPDATE SET " + ", ".join(
            f"{c.name} = excluded.{c.name}" for c in columns if c.name not in m.key
        )
        if m.revision is not None:
            action += f" WHERE excluded.{m.revision} > ifnull({m.table}.{m.revision}, -1)"
    insert = (
        f"INSERT INTO {m.table} ({', '.join(names)}) VALUES ({','.join('?' * len(names))})"
        f" ON CONFLICT ({target}) {action}"
    )
    values = ", ".join(by_name[n][1] for n in names)
    delete: str | None = None
    delete_at: tuple[int, ...] = ()
    if m.retract is not None:
        assert m.revision is not None
        values = f"{var}.{m.retract}, {values}"
        delete_at = tuple(names.index(n) for n in (*m.key, m.revision))
        match = " AND ".join(
            f"ifnull({n}, '') = ifnull(?, '')" if by_name[n][0].nullable else f"{n} = ?"
            for n in m.key
        )
        delete = (
            f"DELETE FROM {m.table} WHERE {match} AND ifnull({m.revision}, -1) < ?"
        )
    source = m.builder.format(row=f"({values},)")
    build: _Builder = rows.compile_builder(
        source, f"evd.sinks.sqlite: {m.table} rows", {**_NAMESPACE, "letter_id": letter_id}
    )
    return Table(m.table, columns, tuple(create), insert, build, delete, delete_at)


def warehouse(event: type[msgspec.Struct] = Event) -> Warehouse:
    """The tables, derived from the rows' declarations (``event``: the events'
    struct, evd.core.schema.Event; another only to test a new field)."""
    events = _table(_EVENTS._replace(row=rows.event_columns(event)))
    sessions, charts, letters = (_table(m) for m in (_SESSIONS, _CHARTS, _DEAD_LETTER))
    tables = (events, sessions, charts, letters)
    return Warehouse(
        tables,
        "".join(f"\n{c};" for t in tables for c in t.create) + "\n",
        {
            Stream.EVENTS: events, Stream.LATE: events, Stream.SESSIONS: sessions,
            Stream.CHARTS: charts, Stream.DEAD_LETTER: letters,
        },
    )


def letter_id(d: DeadLetter) -> str:
    """The dead letter's row id: a hash of all it says, so a replay is the same row."""
    key = _pack((d.stage, d.stream, d.received_at, d.index, d.error, d.event))
    return hashlib.blake2b(key, digest_size=16).hexdigest()


#: The warehouse of this version's rows.
WAREHOUSE = warehouse()
#: Every table's CREATE statements (``sqlite3 file .schema`` of a new file).
SCHEMA = WAREHOUSE.schema


def _fit_int64(params: Params) -> list[tuple[Any, ...]]:
    """``params`` with ints SQLite cannot hold as INTEGER turned into floats (REAL)."""
    return [
        tuple(
            float(v) if type(v) is int and not _INT64_MIN <= v <= _INT64_MAX else v
            for v in row
        )
        for row in params
    ]


class SqliteSink(Sink):
    """Writes every output stream into one SQLite file; see the module docstring."""

    def __init__(self, cfg: SqliteSinkConfig, ctx: SinkContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.path = Path(cfg.path) if cfg.path else ctx.data_dir / "warehouse.sqlite3"
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file (created with its schema when new) in the sink's own thread."""
        if self._closed:
            raise RuntimeError(f"sqlite sink {self.cfg.name!r} is closed; it cannot start again")
        if self._executor is not None:
            raise RuntimeError(f"sqlite sink {self.cfg.name!r} was already started")
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"evd-sqlite-{self.cfg.name}")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open)
        except BaseException:
            executor.shutdown(wait=False)  # start may be called again
            raise
        self._executor = executor

    async def write(self, batch: Batch) -> None:
        """Insert the batch's rows in one transaction; nothing when it has no items."""
        if self._executor is None or self._closed:
            raise RuntimeError(
                f"sqlite sink {self.cfg.name!r}: write() before start() or after close()"
            )
        if not batch.values:
            return
        await self._run(self._write, batch)

    async def close(self) -> None:
        """Close the connection and stop the sink's thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
        finally:
            executor.shutdown(wait=False)

    def describe(self) -> dict[str, Any]:
        return {"type": "sqlite", "path": str(self.path)}

    # -- the sink's thread --------------------------------------------------------------

    async def _run(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open(self) -> None:
        where = f"sqlite sink {self.cfg.name!r} ({self.path})"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: the module opens no transactions of its own;
            # timeout is SQLite's busy timeout (waits for another worker's write).
            conn = sqlite3.connect(
                self.path, timeout=self.cfg.busy_timeout_s, isolation_level=None
            )
            self._setup(conn, where)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise SinkError(f"{where}: cannot start: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn

    def _setup(self, conn: sqlite3.Connection, where: str) -> None:
        # Only a new file takes it (before WAL and the first table create it).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        deadline = time.monotonic() + self.cfg.busy_timeout_s
        while True:
            try:
                # Switching a new file to WAL takes an exclusive lock, for which
                # SQLite does not always call the busy handler: workers starting at
                # once may see "database is locked" here; wait for the winner.
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if mode.lower() != "wal":
            raise SinkError(
                f"{where}: the file refuses WAL mode (journal_mode {mode});"
                " is it on a network file system?"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
        # One transaction: a worker starting at the same time sees all or none.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in WAREHOUSE.tables:
                for statement in table.create:
                    conn.execute(statement)
                # A file of an older version lacks the columns of newer fields:
                # they are added, nullable (its rows have no value for them).
                have = {c[1] for c in conn.execute(f"PRAGMA table_info({table.name})")}
                for c in table.columns:
                    if c.name not in have:
                        conn.execute(f"ALTER TABLE {table.name} ADD COLUMN {c.name} {c.type}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _write(self, batch: Batch) -> None:
        conn = self._conn
        assert conn is not None
        table = WAREHOUSE.writers[batch.stream]
        if not batch.count:
            return
        window_ms = self.ctx.chart_window_ms
        try:
            try:
                self._transaction(conn, table.statements(table.build(batch, window_ms)))
            except OverflowError:
                statements = table.statements(table.build(batch, window_ms))
                self._transaction(conn, [(sql, _fit_int64(p)) for sql, p in statements])
        except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
            # A row the schema refuses (a constraint, a value SQLite cannot take):
            # every retry would be refused the same way.
            raise PermanentSinkError(
                f"sqlite sink {self.cfg.name!r}: {batch.stream} rows refused: {exc}"
            ) from exc
        except sqlite3.Error as exc:
            # Locked past busy_timeout, disk full, I/O errors: may pass later.
            raise SinkError(f"sqlite sink {self.cfg.name!r}: {batch.stream}: {exc}") from exc

    @staticmethod
    def _transaction(conn: sqlite3.Connection, statements: list[tuple[str, Params]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.executemany(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

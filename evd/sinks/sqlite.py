"""The embedded warehouse: one SQLite file in WAL mode (``type: sqlite``).

Tables (created at start, ``IF NOT EXISTS``, so every worker may start at once):

- ``events``: one row per event, ``event_id`` the primary key; the event's
  fields as typed columns (``timestamp`` the RFC 3339 text as the row's JSON
  has it, ``event_time`` the skew-corrected epoch ms), ``late`` (0/1),
  ``received_at`` (epoch ms) and ``raw``: the event's JSON row exactly as
  evd.sinks.rows.json_lines writes it. The ``late`` stream, when a warehouse
  takes it, lands in this same table: a late event is also in ``events``
  flagged ``late = 1``, with the same values, so whichever stream arrives
  first inserts the row and the other finds it there.
- ``sessions``: ``session_id`` the primary key, one column per Session field,
  ``plays`` as JSON text (a list of {track_id, started_at, listened_ms, ended_by}).
- ``charts``: ``window_start``, ``window_end``, ``country`` (NULL: events
  without geo), ``track_id``, ``partition``, ``plays``. The key (window_start,
  country, track_id, partition) is a unique index on ``ifnull(country, '')``:
  SQLite holds NULLs distinct in a key, so a plain key would let a replayed
  no-geo row in twice, while the index keeps ``country`` NULL for queries.
- ``dead_letter``: ``letter_id`` (a hash of every other field, so a replay is
  the same row), ``received_at`` (when it was rejected, epoch ms), ``stage``
  (``edge`` or ``sink:<name>``), ``stream``, ``idx`` (index in its request,
  -1 for sinks), ``reason`` and ``event``: the item's JSON as text.

Writes are idempotent, so the delivery loop may write a batch again after a
failure: events and dead letters insert or do nothing, sessions and chart rows
upsert (a replay carries the same values; the latest write wins). One write is
one ``BEGIN IMMEDIATE`` transaction: several workers share the file, SQLite
lets one write at a time and the others wait up to ``busy_timeout_s``.

Durability: ``synchronous = FULL``. The loop commits the log offsets (fsynced)
right after ``write`` returns, so a committed row must survive a power cut too;
in WAL mode FULL costs one fsync of the WAL per transaction (per batch), where
NORMAL would survive a process crash but could lose the last batches on power
loss while their offsets say delivered.

All SQLite work, including building the rows, runs in one thread owned by the
sink (a connection belongs to the thread that opened it), never on the event loop.

Cost (2-core EPYC VM, one core, ``python -m bench.sinks --sinks sqlite``):
about 72,000 events/s into a new file, a third building rows in Python, the
rest SQLite. Random event ids make every write touch pages all over the
``event_id`` index, so the cost per event grows with the table: at 1,000,000
events about 52,000/s, where a key in arrival order, (received_at, event_id)
WITHOUT ROWID, measured 82,000/s and stays flat.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from evd.core.config import SinkConfig
from evd.core.log import Stream
from evd.core.schema import ChartsBatch, DeadLetter, SessionsBatch, epoch_ms
from evd.sinks.base import Batch, PermanentSinkError, Sink, SinkContext, SinkError
from evd.sinks.rows import chart_rows, event_json, sessions

__all__ = ["SCHEMA", "SqliteSink", "SqliteSinkConfig", "letter_id"]


class SqliteSinkConfig(SinkConfig, tag="sqlite", kw_only=True):
    """The embedded warehouse: one SQLite file in WAL mode."""

    streams: list[str] = msgspec.field(
        default_factory=lambda: [Stream.EVENTS, Stream.SESSIONS, Stream.CHARTS, Stream.DEAD_LETTER]
    )
    #: The database file ("": {data_dir}/warehouse.sqlite3).
    path: str = ""
    #: How long a write waits for another worker's transaction.
    busy_timeout_s: float = 30.0

_encode = msgspec.json.Encoder().encode
_pack = msgspec.msgpack.Encoder().encode

#: SQLite INTEGER bounds: a larger int (an event's durations are only bounded
#: below) cannot be bound as INTEGER and is stored as REAL; ``raw`` keeps it exact.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: Bytes per page of a new file. A write appends to the table and updates the
#: event_id index at random places; SQLite writes each changed page to the WAL
#: (two system calls a page) and later copies it to the file. At 200,000 events
#: in 10,000-event writes, 16 KiB pages cost 7.6 us of CPU an event against
#: 11.0 with SQLite's 4 KiB (12.6 against 18.2 at 1,000,000 events).
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    event_time INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    track_id TEXT NOT NULL,
    page_uri TEXT,
    playlist_uri TEXT,
    position_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    initiator TEXT,
    os TEXT,
    client_version TEXT,
    country TEXT,
    region TEXT,
    late INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    raw TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL,
    event_count INTEGER NOT NULL,
    play_count INTEGER NOT NULL,
    stream_count INTEGER NOT NULL,
    listened_ms INTEGER NOT NULL,
    country TEXT,
    os TEXT,
    plays TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charts (
    window_start INTEGER NOT NULL,
    window_end INTEGER NOT NULL,
    country TEXT,
    track_id TEXT NOT NULL,
    partition INTEGER NOT NULL,
    plays INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS charts_key
    ON charts (window_start, ifnull(country, ''), track_id, partition);
CREATE TABLE IF NOT EXISTS dead_letter (
    letter_id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    stage TEXT NOT NULL,
    stream TEXT NOT NULL,
    idx INTEGER NOT NULL,
    reason TEXT NOT NULL,
    event TEXT NOT NULL
);
"""

_INSERT_EVENT = (
    "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (event_id) DO NOTHING"
)
_UPSERT_SESSION = (
    "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (session_id) DO UPDATE SET"
    " user_id = excluded.user_id, started_at = excluded.started_at,"
    " ended_at = excluded.ended_at, event_count = excluded.event_count,"
    " play_count = excluded.play_count, stream_count = excluded.stream_count,"
    " listened_ms = excluded.listened_ms, country = excluded.country,"
    " os = excluded.os, plays = excluded.plays"
)
_UPSERT_CHART = (
    "INSERT INTO charts VALUES (?,?,?,?,?,?)"
    " ON CONFLICT (window_start, ifnull(country, ''), track_id, partition)"
    " DO UPDATE SET window_end = excluded.window_end, plays = excluded.plays"
)
_INSERT_LETTER = "INSERT INTO dead_letter VALUES (?,?,?,?,?,?,?) ON CONFLICT (letter_id) DO NOTHING"

Params = list[tuple[Any, ...]]


def _event_params(batch: Batch, window_ms: int) -> Params:
    # One pass builds both the typed columns and ``raw``, the event's line of
    # evd.sinks.rows.json_lines (the same bytes: rows.event_json, tested): encoding every event
    # once instead of twice is about a tenth of a write's cost.
    out: Params = []
    add = out.append
    all_late = batch.stream == Stream.LATE
    for rec in batch.values:
        late = set(rec.late) if rec.late and not all_late else ()
        received = rec.received_at
        skew = rec.skew_ms
        for i, ev in enumerate(rec.events):
            enc = _encode(ev)
            event_time = epoch_ms(ev.timestamp) + skew
            is_late = all_late or i in late
            raw = event_json(enc, ev.event_type, received, event_time, is_late)
            # The timestamp as encoded (a JSON string cannot hold this pattern
            # unescaped, so the first match is the field itself).
            t = enc.index(b'"timestamp":"') + 13
            pb = ev.playback
            ctx = ev.context
            dev = ev.device
            geo = ev.geo
            add((
                ev.event_id, ev.event_type, enc[t:enc.index(b'"', t)].decode(), event_time,
                ev.user_id, ev.track_id,
                None if ctx is None else ctx.page_uri,
                None if ctx is None else ctx.playlist_uri,
                pb.position_ms, pb.duration_ms, pb.initiator,
                None if dev is None else dev.os,
                None if dev is None else dev.client_version,
                None if geo is None else geo.country,
                None if geo is None else geo.region,
                is_late, received, raw.decode(),
            ))
    return out


def _session_params(batch: Batch, window_ms: int) -> Params:
    values: Sequence[SessionsBatch] = batch.values
    return [
        (
            s.session_id, s.user_id, s.started_at, s.ended_at, s.event_count, s.play_count,
            s.stream_count, s.listened_ms, s.country, s.os, _encode(s.plays).decode(),
        )
        for s in sessions(values)
    ]


def _chart_params(batch: Batch, window_ms: int) -> Params:
    values: Sequence[ChartsBatch] = batch.values
    return [
        (r.window_start, r.window_start + window_ms, r.country, r.track_id, p, r.plays)
        for p, r in chart_rows(values)
    ]


def letter_id(d: DeadLetter) -> str:
    """The dead letter's row id: a hash of all it says, so a replay is the same row."""
    key = _pack((d.stage, d.stream, d.received_at, d.index, d.error, d.event))
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def _letter_params(batch: Batch, window_ms: int) -> Params:
    values: Sequence[DeadLetter] = batch.values
    return [
        (letter_id(d), d.received_at, d.stage, d.stream, d.index, d.error,
         d.event.decode(errors="replace"))
        for d in values
    ]


_Builder = Callable[[Batch, int], Params]

#: stream -> (statement, rows builder)
_WRITERS: dict[str, tuple[str, _Builder]] = {
    Stream.EVENTS: (_INSERT_EVENT, _event_params),
    Stream.LATE: (_INSERT_EVENT, _event_params),
    Stream.SESSIONS: (_UPSERT_SESSION, _session_params),
    Stream.CHARTS: (_UPSERT_CHART, _chart_params),
    Stream.DEAD_LETTER: (_INSERT_LETTER, _letter_params),
}


def _fit_int64(params: Params) -> Params:
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
        try:
            conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _write(self, batch: Batch) -> None:
        conn = self._conn
        assert conn is not None
        sql, build = _WRITERS[batch.stream]
        params = build(batch, self.ctx.chart_window_ms)
        if not params:
            return
        try:
            try:
                self._transaction(conn, sql, params)
            except OverflowError:
                self._transaction(conn, sql, _fit_int64(params))
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
    def _transaction(conn: sqlite3.Connection, sql: str, params: Params) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
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

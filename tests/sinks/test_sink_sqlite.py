"""The sqlite sink (the warehouse) on real files: the schema as named, typed values
and the ``raw`` rows of evd.sinks.rows, idempotent replays of every stream
(chart rows without a country included), the latest revision of sessions and
chart rows kept and retracted sessions deleted (a file from before revisions
too), WAL mode, two sinks writing the same file at once, items-free batches,
and which failures are retried."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from evdtest import sink_context

from evd.bench.traffic import TrafficConfig, TrafficModel, encode_envelope
from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    Context,
    DeadLetter,
    Device,
    Event,
    EventsBatch,
    Geo,
    Play,
    Playback,
    Session,
    SessionsBatch,
    envelope_decoder,
    epoch_ms,
)
from evd.sinks import rows
from evd.sinks import sqlite as warehouse_module
from evd.sinks.base import Batch, PermanentSinkError, SinkContext, SinkError
from evd.sinks.sqlite import SqliteSink, SqliteSinkConfig, letter_id, warehouse

pytestmark = pytest.mark.workers_independent

WINDOW_MS = 60_000
T0 = 1_764_586_800_000  # 2025-12-01T11:00:00Z
TRACK = "spotify:track:" + "a" * 22

EVENT_COLUMNS = [
    "event_id", "event_type", "timestamp", "event_time", "user_id", "track_id", "page_uri",
    "playlist_uri", "position_ms", "duration_ms", "initiator", "os", "client_version",
    "country", "region", "late", "received_at", "raw",
]
SESSION_COLUMNS = [
    "session_id", "user_id", "started_at", "ended_at", "event_count", "play_count",
    "stream_count", "listened_ms", "country", "os", "plays", "revision",
]
CHART_COLUMNS = [
    "window_start", "window_end", "country", "track_id", "partition", "plays", "revision",
]
LETTER_COLUMNS = ["letter_id", "received_at", "stage", "stream", "idx", "reason", "event"]


# -- input --------------------------------------------------------------------------------


def traffic(n: int, seed: int = 1, per_record: int = 12) -> list[EventsBatch]:
    """``n`` events of the traffic model (every event type; sessions with skips,
    pauses and seeks) as events records of ``per_record`` events, 100 ms apart,
    a few late and some skew-corrected."""
    cfg = TrafficConfig(seed=seed, users=5_000, tracks=2_000, playlists=200,
                        duplicate_rate=0, invalid_rate=0)
    model = TrafficModel(cfg, T0, rate_hint=2_000)
    pick = random.Random(seed)
    out: list[EventsBatch] = []
    sent = T0
    while n > 0:
        k = min(per_record, n)
        n -= k
        events = envelope_decoder.decode(encode_envelope(model.batch(k, sent), None)).events
        late = [i for i in range(k) if pick.random() < 0.05]
        skew = pick.choice([0, 0, 0, 90_000])
        out.append(EventsBatch(sent + 150, events, skew, late))
        sent += 100
    return out


def odd_events() -> EventsBatch:
    """Events at the edges of the schema: nothing optional, a play without its
    type, an offset timestamp, durations past SQLite's 64-bit integers."""
    plus2 = datetime(2025, 12, 1, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    huge = 2**64 - 1
    return EventsBatch(T0 + 5, [
        Event("bare", datetime(2025, 12, 1, 11, 0, tzinfo=UTC), "u1", TRACK, Playback(0, 1)),
        Event("full", plus2, "u2", TRACK, Playback(3, 9, "autoplay"), "skip",
              Context("spotify:app:home", "spotify:playlist:x"), Device("iOS 17", "8.9"),
              Geo("SE", "AB")),
        Event("huge", plus2, "u3", TRACK, Playback(huge, huge), "seek", geo=Geo("DE")),
    ], skew_ms=-2000, late=[1])


def sessions_batch() -> SessionsBatch:
    return SessionsBatch([
        Session("s1", "u1", T0, T0 + 90_000, 3, 2, 1, 61_000, "SE", "iOS 17", [
            Play(TRACK, T0, 31_000, "skip"), Play(TRACK, T0 + 31_000, 30_000, "session_close"),
        ]),
        Session("s2", "u2", T0 + 5, T0 + 6, 1, 0, 0, 0, None, None, []),
    ])


def charts_batch(plays: int = 4) -> ChartsBatch:
    return ChartsBatch(3, T0 + WINDOW_MS, [
        ChartRow(T0, "SE", TRACK, plays),
        ChartRow(T0, None, TRACK, plays + 1),  # no geo: country NULL
        ChartRow(T0, "DE", TRACK, 1),
    ])


def letters() -> list[DeadLetter]:
    return [
        DeadLetter(T0, 0, "track_id: expected ...", b'{"event_id":"x1"}'),
        DeadLetter(T0, 1, "track_id: expected ...", b'{"event_id":"x1"}'),  # same item, other index
        DeadLetter(T0 + 1, -1, "http 400: bad", b'{"event_id":"x2"}', "sink:hook", "events"),
        DeadLetter(T0 + 2, 4, "not JSON", b"\xff\xfe{", "edge", "raw"),
    ]


def events(values: list[EventsBatch], stream: str = "events") -> Batch:
    n = sum(len(v.events) for v in values)
    return Batch(stream, values, n, n * 300)


def batch_of(stream: str, values: list[Any]) -> Batch:
    return Batch(stream, values, sum(rows.count_items(stream, v) for v in values), 100)


# -- fixtures -----------------------------------------------------------------------------


def context(tmp_path: Path) -> SinkContext:
    return sink_context(tmp_path, 0, 1, 4, WINDOW_MS)


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SqliteSink]:
    s = SqliteSink(SqliteSinkConfig(name="warehouse"), context(tmp_path))
    await s.start()
    yield s
    await s.close()


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


def select(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = db(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def columns(path: Path, table: str) -> list[str]:
    return [r[1] for r in select(path, f"PRAGMA table_info({table})")]


# -- schema -------------------------------------------------------------------------------


async def test_schema_is_as_named_in_wal_mode(sink: SqliteSink, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite3"
    assert sink.describe() == {"type": "sqlite", "path": str(path)}
    assert columns(path, "events") == EVENT_COLUMNS
    assert columns(path, "sessions") == SESSION_COLUMNS
    assert columns(path, "charts") == CHART_COLUMNS
    assert columns(path, "dead_letter") == LETTER_COLUMNS
    # A fresh connection reads the mode from the file: WAL is persistent.
    assert select(path, "PRAGMA journal_mode") == [("wal",)]
    pk = {r[1]: r[5] for r in select(path, "PRAGMA table_info(events)")}
    assert pk["event_id"] == 1 and sum(pk.values()) == 1
    assert select(path, "PRAGMA index_list(charts)")[0][1:3] == ("charts_key", 1)


#: (table, column, type, NOT NULL, primary key) of every column of a new file, in
#: order: what warehouses made before the tables were derived from evd.sinks.rows
#: have, and what readers query.
PINNED_SCHEMA = [
    ("events", "event_id", "TEXT", 0, 1),
    ("events", "event_type", "TEXT", 1, 0),
    ("events", "timestamp", "TEXT", 1, 0),
    ("events", "event_time", "INTEGER", 1, 0),
    ("events", "user_id", "TEXT", 1, 0),
    ("events", "track_id", "TEXT", 1, 0),
    ("events", "page_uri", "TEXT", 0, 0),
    ("events", "playlist_uri", "TEXT", 0, 0),
    ("events", "position_ms", "INTEGER", 1, 0),
    ("events", "duration_ms", "INTEGER", 1, 0),
    ("events", "initiator", "TEXT", 0, 0),
    ("events", "os", "TEXT", 0, 0),
    ("events", "client_version", "TEXT", 0, 0),
    ("events", "country", "TEXT", 0, 0),
    ("events", "region", "TEXT", 0, 0),
    ("events", "late", "INTEGER", 1, 0),
    ("events", "received_at", "INTEGER", 1, 0),
    ("events", "raw", "TEXT", 1, 0),
    ("sessions", "session_id", "TEXT", 0, 1),
    ("sessions", "user_id", "TEXT", 1, 0),
    ("sessions", "started_at", "INTEGER", 1, 0),
    ("sessions", "ended_at", "INTEGER", 1, 0),
    ("sessions", "event_count", "INTEGER", 1, 0),
    ("sessions", "play_count", "INTEGER", 1, 0),
    ("sessions", "stream_count", "INTEGER", 1, 0),
    ("sessions", "listened_ms", "INTEGER", 1, 0),
    ("sessions", "country", "TEXT", 0, 0),
    ("sessions", "os", "TEXT", 0, 0),
    ("sessions", "plays", "TEXT", 1, 0),
    ("sessions", "revision", "INTEGER", 1, 0),
    ("charts", "window_start", "INTEGER", 1, 0),
    ("charts", "window_end", "INTEGER", 1, 0),
    ("charts", "country", "TEXT", 0, 0),
    ("charts", "track_id", "TEXT", 1, 0),
    ("charts", "partition", "INTEGER", 1, 0),
    ("charts", "plays", "INTEGER", 1, 0),
    ("charts", "revision", "INTEGER", 1, 0),
    ("dead_letter", "letter_id", "TEXT", 0, 1),
    ("dead_letter", "received_at", "INTEGER", 1, 0),
    ("dead_letter", "stage", "TEXT", 1, 0),
    ("dead_letter", "stream", "TEXT", 1, 0),
    ("dead_letter", "idx", "INTEGER", 1, 0),
    ("dead_letter", "reason", "TEXT", 1, 0),
    ("dead_letter", "event", "TEXT", 1, 0),
]


def schema_of(path: Path) -> list[tuple[str, str, str, int, int]]:
    tables = [r[0] for r in select(path, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [
        (table, name, type_, notnull, pk)
        for table in tables
        for _, name, type_, notnull, _default, pk in select(path, f"PRAGMA table_info({table})")
    ]


async def test_the_derived_schema_is_the_pinned_one(sink: SqliteSink, tmp_path: Path) -> None:
    """The tables derived from evd.sinks.rows are those warehouses have always had."""
    assert schema_of(tmp_path / "warehouse.sqlite3") == PINNED_SCHEMA
    assert [(c.name, c.type, not c.nullable) for t in warehouse().tables for c in t.columns] == [
        (name, type_, bool(notnull or pk)) for _, name, type_, notnull, pk in PINNED_SCHEMA
    ]


class Mood(msgspec.Struct, gc=False):
    label: str
    score: int | None = None


class MoodEvent(Event, omit_defaults=True, gc=False):
    """An Event with fields a later version might add."""

    mood: Mood | None = None
    heard_at: datetime | None = None
    skips_left: int = 0


def mood_events() -> EventsBatch:
    base = odd_events()
    t = datetime(2025, 12, 1, 11, 0, 0, 5000, tzinfo=UTC)
    moody = [
        MoodEvent(*msgspec.structs.astuple(ev)) for ev in base.events[:2]
    ] + [MoodEvent("m1", t, "u9", TRACK, Playback(1, 2), mood=Mood("calm", 7), heard_at=t,
                   skips_left=3)]
    return EventsBatch(base.received_at, moody, base.skew_ms, base.late)


#: The columns MoodEvent adds: at the end of ``events``, typed from the declaration.
MOOD_COLUMNS = [
    ("events", "label", "TEXT", 0, 0),  # mood.label: nullable, as mood is optional
    ("events", "score", "INTEGER", 0, 0),
    ("events", "heard_at", "TEXT", 0, 0),
    ("events", "skips_left", "INTEGER", 1, 0),
]


def test_a_new_event_field_is_a_new_column_and_value() -> None:
    """A field added to the event's declaration, nothing else, is a typed column
    and a value in each row; the rows of the old fields are the same."""
    mood = warehouse(MoodEvent)
    table = mood.writers["events"]
    pinned = [c for c in PINNED_SCHEMA if c[0] == "events"]
    assert [(c.name, c.type, int(not c.nullable)) for c in table.columns] == [
        (name, type_, notnull or pk) for _, name, type_, notnull, pk in pinned + MOOD_COLUMNS
    ]
    assert "heard_at TEXT,\n    skips_left INTEGER NOT NULL\n)" in mood.schema
    batch = events([mood_events()])
    got = list(table.build(batch, WINDOW_MS))
    plain = events([odd_events()])
    # The old columns hold what they held (raw aside: it is the event's JSON).
    old = list(warehouse().writers["events"].build(plain, WINDOW_MS))
    assert [g[:17] for g in got[:2]] == [o[:17] for o in old[:2]]
    assert [g[18:] for g in got] == [
        (None, None, None, 0), (None, None, None, 0), ("calm", 7, "2025-12-01T11:00:00.005000Z", 3),
    ]
    assert json.loads(got[2][17])["mood"] == {"label": "calm", "score": 7}


def test_a_new_field_named_as_a_column_needs_a_rename() -> None:
    class Clash(Event, gc=False):
        country: str | None = None  # geo.country is already ``country``

    with pytest.raises(TypeError, match="two columns named 'country'"):
        warehouse(Clash)


async def test_an_older_file_gains_the_columns_of_new_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    old = SqliteSink(SqliteSinkConfig(name="w"), context(tmp_path))
    await old.start()
    await old.write(events(traffic(24)))
    await old.close()
    monkeypatch.setattr(warehouse_module, "WAREHOUSE", warehouse(MoodEvent))
    new = SqliteSink(SqliteSinkConfig(name="w"), context(tmp_path))
    await new.start()
    await new.write(events([mood_events()]))
    await new.close()
    # Added columns cannot be NOT NULL: the older rows have no value for them.
    assert schema_of(path) == PINNED_SCHEMA[:18] + [
        (t, c, type_, 0, pk) for t, c, type_, _, pk in MOOD_COLUMNS
    ] + PINNED_SCHEMA[18:]
    assert select(path, "SELECT count(*) FROM events WHERE skips_left IS NULL") == [(24,)]
    assert select(path, "SELECT label, score, heard_at, skips_left FROM events"
                        " WHERE event_id = 'm1'") == [("calm", 7, "2025-12-01T11:00:00.005000Z", 3)]


async def test_a_configured_path_is_used(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "w.db"
    s = SqliteSink(SqliteSinkConfig(name="w", path=str(path)), context(tmp_path))
    await s.start()
    await s.write(events([odd_events()]))
    await s.close()
    await s.close()  # idempotent
    assert select(path, "SELECT count(*) FROM events") == [(3,)]
    assert not (tmp_path / "warehouse.sqlite3").exists()


# -- events -------------------------------------------------------------------------------


async def test_events_round_trip_typed_and_raw(sink: SqliteSink, tmp_path: Path) -> None:
    values = traffic(3_000) + [odd_events()]
    batch = events(values)
    await sink.write(batch)
    got = {r[0]: r for r in select(tmp_path / "warehouse.sqlite3", "SELECT * FROM events")}
    assert len(got) == batch.count

    lines = rows.json_lines(batch, WINDOW_MS).decode().splitlines()
    for row, line in zip(rows.event_rows(values), lines, strict=True):
        ev = row.event
        ctx, dev, geo = ev.context, ev.device, ev.geo
        want = (
            ev.event_id, ev.event_type, json.loads(line)["timestamp"], row.event_time,
            ev.user_id, ev.track_id,
            ctx and ctx.page_uri, ctx and ctx.playlist_uri,
            ev.playback.position_ms, ev.playback.duration_ms, ev.playback.initiator,
            dev and dev.os, dev and dev.client_version, geo and geo.country, geo and geo.region,
            int(row.late), row.received_at, line,
        )
        if ev.event_id == "huge":  # past INTEGER: REAL in the column, exact in raw
            want = want[:8] + (float(2**64 - 1),) * 2 + want[10:]
            assert json.loads(got["huge"][-1])["playback"]["duration_ms"] == 2**64 - 1
        assert got[ev.event_id] == want

    types = {r[1] for r in got.values()}
    assert types == {"play", "pause", "resume", "seek", "skip", "end"}
    assert {None, "US", "SE"} <= {r[13] for r in got.values()}
    # The timestamp as the row's JSON has it: microseconds, in the client's offset.
    assert got["full"][2] == "2025-12-01T13:00:00.123456+02:00"
    assert got["full"][3] == epoch_ms(odd_events().events[1].timestamp) - 2000
    assert got["bare"][1:3] == ("play", "2025-12-01T11:00:00Z")
    assert [got[i][15] for i in ("bare", "full", "huge")] == [0, 1, 0]


async def test_event_replays_and_the_late_stream_add_nothing(
    sink: SqliteSink, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    values = traffic(500)
    await sink.write(events(values))
    before = select(path, "SELECT * FROM events ORDER BY event_id")
    await sink.write(events(values))  # the loop wrote it, then failed to commit offsets
    await sink.write(events(values[:10]))  # part of it again, in another batch
    # The late stream holds the late events again, flagged, same values.
    late = [EventsBatch(v.received_at, [v.events[i] for i in v.late], v.skew_ms,
                        list(range(len(v.late)))) for v in values if v.late]
    await sink.write(events(late, "late"))
    assert select(path, "SELECT * FROM events ORDER BY event_id") == before
    n_late = sum(len(v.late) for v in values)
    assert n_late > 0
    assert select(path, "SELECT count(*) FROM events WHERE late = 1") == [(n_late,)]


async def test_the_late_stream_alone_writes_flagged_rows(tmp_path: Path) -> None:
    s = SqliteSink(SqliteSinkConfig(name="w", streams=["late"]), context(tmp_path))
    await s.start()
    b = odd_events()
    await s.write(events([EventsBatch(b.received_at, b.events, b.skew_ms, [0, 1, 2])], "late"))
    await s.close()
    got = select(tmp_path / "warehouse.sqlite3", "SELECT late, raw FROM events")
    assert [r[0] for r in got] == [1, 1, 1]
    assert all(json.loads(r[1])["late"] is True for r in got)


async def test_text_that_looks_like_json_punctuation_stays_in_its_row(
    sink: SqliteSink, tmp_path: Path
) -> None:
    """The rows of a record come from one encoding of its events, cut into one
    piece per event: text holding the cuts' own punctuation (quotes, braces,
    newlines, a field name, line separators JSON leaves unescaped) stays in its
    event's row, and ``raw`` is the event's line of ``json_lines``."""
    at = datetime(2025, 12, 1, 11, 0, 0, 1000, tzinfo=UTC)
    tricky = ['}\n{', '}}\\n{{"', '","', '","timestamp":"1999', "a\u2028b\x85c\r\n", "ü}\n{ñ"]
    evs = [
        Event(f"id{i}{text}", at + timedelta(milliseconds=i), f"u{text}", TRACK,
              Playback(i, 10, text), "play" if i % 2 else "skip",
              Context(text, None), Device(text, text), Geo("SE", text))
        for i, text in enumerate(tricky)
    ]
    batch = events([EventsBatch(T0, evs, 7, [1])])
    await sink.write(batch)
    got = select(tmp_path / "warehouse.sqlite3",
                 "SELECT event_id, timestamp, event_time, user_id, page_uri, initiator, os,"
                 " region, late, raw FROM events ORDER BY position_ms")
    lines = rows.json_lines(batch, WINDOW_MS).decode().split("\n")[:-1]
    assert got == [
        (ev.event_id, json.loads(line)["timestamp"], epoch_ms(ev.timestamp) + 7, f"u{text}",
         text, text, text, text, int(i == 1), line)
        for i, (ev, text, line) in enumerate(zip(evs, tricky, lines, strict=True))
    ]
    assert got[0][1] == "2025-12-01T11:00:00.001000Z"

# -- sessions, charts, dead letters -------------------------------------------------------


async def test_sessions_round_trip_and_replay(sink: SqliteSink, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite3"
    b = sessions_batch()
    await sink.write(batch_of("sessions", [b]))
    await sink.write(batch_of("sessions", [b]))
    got = select(path, "SELECT * FROM sessions ORDER BY session_id")
    assert [r[:10] for r in got] == [
        ("s1", "u1", T0, T0 + 90_000, 3, 2, 1, 61_000, "SE", "iOS 17"),
        ("s2", "u2", T0 + 5, T0 + 6, 1, 0, 0, 0, None, None),
    ]
    assert json.loads(got[0][10]) == [
        {"track_id": TRACK, "started_at": T0, "listened_ms": 31_000, "ended_by": "skip"},
        {"track_id": TRACK, "started_at": T0 + 31_000, "listened_ms": 30_000,
         "ended_by": "session_close"},
    ]
    assert json.loads(got[1][10]) == []
    assert [r[11] for r in got] == [0, 0]
    # Its next revision: one row, the latest values.
    s2 = b.sessions[1]
    s2.event_count, s2.revision = 2, 1
    await sink.write(batch_of("sessions", [SessionsBatch([s2])]))
    assert select(path, "SELECT session_id, event_count, revision FROM sessions ORDER BY 1") == [
        ("s1", 3, 0), ("s2", 2, 1),
    ]


async def test_chart_replays_keep_one_row_even_without_country(
    sink: SqliteSink, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    await sink.write(batch_of("charts", [charts_batch(4)]))
    await sink.write(batch_of("charts", [charts_batch(4)]))
    got = select(path, "SELECT * FROM charts ORDER BY country")
    assert got == [
        (T0, T0 + WINDOW_MS, None, TRACK, 3, 5, 0),
        (T0, T0 + WINDOW_MS, "DE", TRACK, 3, 1, 0),
        (T0, T0 + WINDOW_MS, "SE", TRACK, 3, 4, 0),
    ]
    assert select(path, "SELECT count(*) FROM charts WHERE country IS NULL") == [(1,)]
    # Another partition's row of the same window and track is its own row.
    await sink.write(batch_of("charts", [ChartsBatch(1, T0, [ChartRow(T0, None, TRACK, 2)])]))
    assert select(path, "SELECT partition, plays FROM charts WHERE country IS NULL"
                  " ORDER BY partition") == [(1, 2), (3, 5)]


# -- revisions and retractions ------------------------------------------------------------


def revised(s: Session, revision: int, retracted: bool = False, **changes: Any) -> Session:
    return msgspec.structs.replace(s, revision=revision, retracted=retracted, **changes)


def stored_sessions(path: Path) -> list[tuple[Any, ...]]:
    return select(path, "SELECT session_id, event_count, revision FROM sessions ORDER BY 1")


async def test_a_session_is_replaced_only_by_a_higher_revision(
    sink: SqliteSink, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    s1, s2 = sessions_batch().sessions
    await sink.write(batch_of("sessions", [SessionsBatch([revised(s1, 1, event_count=10), s2])]))
    assert stored_sessions(path) == [("s1", 10, 1), ("s2", 1, 0)]
    # Lower and equal revisions, with other values, change nothing.
    await sink.write(batch_of("sessions", [SessionsBatch([
        revised(s1, 0, event_count=20), revised(s1, 1, event_count=30),
        revised(s2, 0, event_count=40),
    ])]))
    assert stored_sessions(path) == [("s1", 10, 1), ("s2", 1, 0)]
    # Higher ones replace every column, in the stream's order within a batch.
    await sink.write(batch_of("sessions", [SessionsBatch([
        revised(s1, 2, event_count=11, country="DE", plays=[]), revised(s1, 4, event_count=12),
        revised(s1, 3, event_count=13), revised(s2, 1, event_count=2),
    ])]))
    assert stored_sessions(path) == [("s1", 12, 4), ("s2", 2, 1)]
    ((*got, plays, revision),) = select(path, "SELECT * FROM sessions WHERE session_id = 's1'")
    # Revision 4's values: not revision 2's country and plays.
    assert got == ["s1", "u1", T0, T0 + 90_000, 12, 2, 1, 61_000, "SE", "iOS 17"]
    assert (len(json.loads(plays)), revision) == (2, 4)


async def test_a_retracted_session_is_deleted_and_never_inserted(
    sink: SqliteSink, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    s1, s2 = sessions_batch().sessions
    s3 = revised(s2, 0, session_id="s3")
    await sink.write(batch_of("sessions", [SessionsBatch([s1, revised(s2, 2), s3])]))
    # A retraction deletes a lower stored revision, not an equal or higher one.
    await sink.write(batch_of("sessions", [SessionsBatch([
        revised(s1, 1, retracted=True), revised(s2, 2, retracted=True),
        revised(s2, 1, retracted=True),
    ])]))
    assert stored_sessions(path) == [("s2", 1, 2), ("s3", 1, 0)]
    # One of an id never stored inserts nothing.
    await sink.write(batch_of("sessions", [SessionsBatch([revised(s1, 5, retracted=True,
                                                                   session_id="s9")])]))
    assert stored_sessions(path) == [("s2", 1, 2), ("s3", 1, 0)]
    # Emitted and retracted in one batch (a session merged into another): applied
    # in order, so it is gone; the rows around it are written.
    merged = revised(s3, 1, event_count=4)
    await sink.write(batch_of("sessions", [SessionsBatch([revised(s1, 0, session_id="s4")]),
                                           SessionsBatch([revised(s1, 1, retracted=True,
                                                                  session_id="s4"), merged])]))
    assert stored_sessions(path) == [("s2", 1, 2), ("s3", 4, 1)]


async def test_a_replayed_batch_of_revisions_changes_nothing(
    sink: SqliteSink, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.sqlite3"
    s1, s2 = sessions_batch().sessions
    first = batch_of("sessions", [SessionsBatch([s1, s2])])
    second = batch_of("sessions", [SessionsBatch([
        revised(s1, 1, event_count=7), revised(s2, 1, retracted=True),
        revised(s2, 0, session_id="s5"), revised(s2, 1, session_id="s5", event_count=9),
    ])])
    await sink.write(first)
    await sink.write(second)
    after = select(path, "SELECT * FROM sessions ORDER BY session_id")
    assert [(r[0], r[4], r[11]) for r in after] == [("s1", 7, 1), ("s5", 9, 1)]
    await sink.write(second)  # the loop wrote it, then failed to commit its offsets
    assert select(path, "SELECT * FROM sessions ORDER BY session_id") == after


async def test_chart_rows_keep_the_highest_revision(sink: SqliteSink, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite3"

    def revision(n: int, plays: int, country: str | None) -> ChartsBatch:
        return ChartsBatch(3, T0 + 5 * WINDOW_MS, [ChartRow(T0, country, TRACK, plays, n)])

    await sink.write(batch_of("charts", [charts_batch(4)]))
    await sink.write(batch_of("charts", [revision(2, 9, None), revision(1, 8, None),
                                         revision(1, 6, "SE")]))
    await sink.write(batch_of("charts", [revision(2, 3, None), revision(0, 3, "SE")]))
    assert select(path, "SELECT country, plays, revision FROM charts ORDER BY country") == [
        (None, 9, 2), ("DE", 1, 0), ("SE", 6, 1),
    ]
    await sink.write(batch_of("charts", [revision(3, 10, None)]))
    assert select(path, "SELECT plays, revision FROM charts WHERE country IS NULL") == [(10, 3)]


#: The sessions and charts tables of a warehouse from before revisions.
BEFORE_REVISIONS = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, started_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL, event_count INTEGER NOT NULL, play_count INTEGER NOT NULL,
    stream_count INTEGER NOT NULL, listened_ms INTEGER NOT NULL, country TEXT, os TEXT,
    plays TEXT NOT NULL
);
CREATE TABLE charts (
    window_start INTEGER NOT NULL, window_end INTEGER NOT NULL, country TEXT,
    track_id TEXT NOT NULL, partition INTEGER NOT NULL, plays INTEGER NOT NULL
);
CREATE UNIQUE INDEX charts_key ON charts (window_start, ifnull(country, ''), track_id, partition);
INSERT INTO sessions VALUES ('s1', 'u1', 0, 1, 3, 0, 0, 0, NULL, NULL, '[]');
INSERT INTO sessions VALUES ('s2', 'u2', 0, 1, 3, 0, 0, 0, NULL, NULL, '[]');
INSERT INTO sessions VALUES ('s3', 'u3', 0, 1, 3, 0, 0, 0, NULL, NULL, '[]');
"""


async def test_a_file_from_before_revisions_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite3"
    conn = db(path)
    conn.executescript(BEFORE_REVISIONS)
    conn.execute(f"INSERT INTO charts VALUES ({T0}, {T0 + WINDOW_MS}, NULL, '{TRACK}', 3, 99)")
    conn.commit()
    conn.close()
    sink = SqliteSink(SqliteSinkConfig(name="w"), context(tmp_path))
    await sink.start()
    try:
        assert columns(path, "sessions") == SESSION_COLUMNS
        assert columns(path, "charts") == CHART_COLUMNS
        assert select(path, "SELECT count(*) FROM sessions WHERE revision IS NULL") == [(3,)]
        # A row without a revision is older than any: replaced, or deleted.
        s1, s2 = sessions_batch().sessions
        await sink.write(batch_of("sessions", [SessionsBatch([
            revised(s1, 0, event_count=5), revised(s2, 0, retracted=True),
        ])]))
        assert stored_sessions(path) == [("s1", 5, 0), ("s3", 3, None)]
        await sink.write(batch_of("charts", [charts_batch(4)]))
        assert select(path, "SELECT plays, revision FROM charts WHERE country IS NULL") == [
            (5, 0)
        ]
    finally:
        await sink.close()


def test_negative_control_an_upsert_without_the_revision_guard_lowers_a_row() -> None:
    # What the WHERE of the warehouse's upsert prevents: a replayed lower revision.
    table = warehouse().writers["sessions"]
    unguarded = table.insert[: table.insert.index(" WHERE excluded.revision")]
    assert table.insert.endswith("WHERE excluded.revision > ifnull(sessions.revision, -1)")
    conn = sqlite3.connect(":memory:")
    conn.executescript(warehouse_module.SCHEMA)
    s1 = sessions_batch().sessions[0]
    for s, sql in ((revised(s1, 1, event_count=9), table.insert),
                   (revised(s1, 0), unguarded)):
        ((_, *row),) = table.build(batch_of("sessions", [SessionsBatch([s])]), WINDOW_MS)
        conn.execute(sql, row)
    assert conn.execute("SELECT event_count, revision FROM sessions").fetchall() == [(3, 0)]


def test_negative_control_a_plain_key_lets_null_country_in_twice() -> None:
    # Why charts has no PRIMARY KEY over country: SQLite keeps NULLs distinct in it.
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE c (w INTEGER, country TEXT, plays INTEGER,"
                 " PRIMARY KEY (w, country))")
    for _ in range(2):
        conn.execute("INSERT OR REPLACE INTO c VALUES (0, NULL, 1)")
    assert conn.execute("SELECT count(*) FROM c").fetchone() == (2,)


async def test_dead_letters_round_trip_and_replay(sink: SqliteSink, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.sqlite3"
    ds = letters()
    await sink.write(batch_of("dead_letter", ds))
    await sink.write(batch_of("dead_letter", ds[1:3]))
    got = select(path, "SELECT * FROM dead_letter ORDER BY received_at, idx")
    assert got == [
        (letter_id(ds[0]), T0, "edge", "raw", 0, "track_id: expected ...", '{"event_id":"x1"}'),
        (letter_id(ds[1]), T0, "edge", "raw", 1, "track_id: expected ...", '{"event_id":"x1"}'),
        (letter_id(ds[2]), T0 + 1, "sink:hook", "events", -1, "http 400: bad",
         '{"event_id":"x2"}'),
        (letter_id(ds[3]), T0 + 2, "edge", "raw", 4, "not JSON", "\ufffd\ufffd{"),
    ]
    assert len({r[0] for r in got}) == 4


# -- batches without items, failures ------------------------------------------------------


async def test_batches_without_items_write_nothing(sink: SqliteSink, tmp_path: Path) -> None:
    await sink.write(Batch("charts", [ChartsBatch(0, T0 + WINDOW_MS, [])], 0, 20))
    await sink.write(Batch("events", [EventsBatch(T0, [], duplicates={"play": 3})], 0, 20))
    await sink.write(Batch("sessions", [SessionsBatch([], complete_until=T0)], 0, 20))
    await sink.write(Batch("dead_letter", [], 0, 0))
    await sink.flush()
    path = tmp_path / "warehouse.sqlite3"
    for table in ("events", "sessions", "charts", "dead_letter"):
        assert select(path, f"SELECT count(*) FROM {table}") == [(0,)]


async def test_a_row_the_schema_refuses_is_permanent(sink: SqliteSink, tmp_path: Path) -> None:
    bad = Session("s9", None, T0, T0, 1, 0, 0, 0, None, None, [])  # type: ignore[arg-type]
    with pytest.raises(PermanentSinkError, match="NOT NULL"):
        await sink.write(batch_of("sessions", [SessionsBatch([sessions_batch().sessions[0], bad])]))
    # All or nothing: the good session of the batch was rolled back too.
    assert select(tmp_path / "warehouse.sqlite3", "SELECT count(*) FROM sessions") == [(0,)]
    await sink.write(batch_of("sessions", [sessions_batch()]))  # the sink still works


async def test_a_locked_file_is_retried_then_written(tmp_path: Path) -> None:
    s = SqliteSink(SqliteSinkConfig(name="w", busy_timeout_s=0.2), context(tmp_path))
    await s.start()
    other = sqlite3.connect(tmp_path / "warehouse.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the file past busy_timeout
    with pytest.raises(SinkError, match="locked") as err:
        await s.write(events([odd_events()]))
    assert err.value.retriable and not isinstance(err.value, PermanentSinkError)
    other.execute("ROLLBACK")
    other.close()
    await s.write(events([odd_events()]))  # the loop's retry
    await s.close()
    assert select(tmp_path / "warehouse.sqlite3", "SELECT count(*) FROM events") == [(3,)]


async def test_lifecycle_is_checked(tmp_path: Path) -> None:
    s = SqliteSink(SqliteSinkConfig(name="w"), context(tmp_path))
    with pytest.raises(RuntimeError, match="before start"):
        await s.write(events([odd_events()]))
    await s.start()
    with pytest.raises(RuntimeError, match="already started"):
        await s.start()
    await s.close()
    with pytest.raises(RuntimeError, match="after close"):
        await s.write(events([odd_events()]))


async def test_an_unusable_file_fails_start(tmp_path: Path) -> None:
    (tmp_path / "warehouse.sqlite3").write_bytes(b"not a database" * 100)
    s = SqliteSink(SqliteSinkConfig(name="w"), context(tmp_path))
    with pytest.raises(SinkError, match="warehouse.sqlite3"):
        await s.start()
    with pytest.raises(RuntimeError, match="before start"):
        await s.write(events([odd_events()]))
    (tmp_path / "warehouse.sqlite3").unlink()  # the operator moved it away
    await s.start()
    await s.write(events([odd_events()]))
    await s.close()


# -- several workers ----------------------------------------------------------------------


async def test_two_sinks_start_and_write_overlapping_batches_at_once(tmp_path: Path) -> None:
    """Two workers' sinks on one file: both start at once on a new file, then write
    overlapping batches concurrently (each in its own thread and connection)."""
    values = traffic(6_000, seed=7)
    third = len(values) // 3
    a_part, b_part = values[: 2 * third], values[third:]  # the middle third in both
    for round_ in range(3):
        d = tmp_path / f"r{round_}"
        sinks = [SqliteSink(SqliteSinkConfig(name="warehouse", busy_timeout_s=10), context(d))
                 for _ in range(2)]
        await asyncio.gather(*(s.start() for s in sinks))

        async def deliver(s: SqliteSink, part: list[EventsBatch]) -> None:
            for i in range(0, len(part), 40):
                await s.write(events(part[i:i + 40]))

        await asyncio.gather(deliver(sinks[0], a_part), deliver(sinks[1], b_part[::-1]))
        await asyncio.gather(*(s.close() for s in sinks))
        path = d / "warehouse.sqlite3"
        ids = [r[0] for r in select(path, "SELECT event_id FROM events")]
        want = {e.event_id for v in values for e in v.events}
        assert len(ids) == len(want) and set(ids) == want

"""The stdout sink and the rows every sink writes (evd.sinks.rows): one NDJSON
line per item, events with every field (event_type even when it is the default
``play``), received_at, the corrected event_time and the late flag."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from evdtest import sink_context

from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    DeadLetter,
    Event,
    EventsBatch,
    Geo,
    Play,
    Playback,
    Session,
    SessionsBatch,
)
from evd.sinks import rows
from evd.sinks.base import Batch
from evd.sinks.stdout import StdoutSink, StdoutSinkConfig

pytestmark = pytest.mark.workers_independent

T = datetime(2025, 12, 1, 10, 59, 59, 500000, tzinfo=UTC)
T_MS = 1_764_586_799_500
TRACK = "spotify:track:" + "b" * 22


def events_batch() -> Batch:
    evs = [
        Event("e1", T, "u1", TRACK, Playback(5, 10)),  # play: event_type omitted in msgpack
        Event("e2", T, "u1", TRACK, Playback(6, 10), "skip", geo=Geo("SE")),
    ]
    # received one second later, skew-corrected by +1000 ms, e2 late
    return Batch("events", [EventsBatch(T_MS + 1000, evs, 1000, [1])], 2, 100)


async def test_stdout_writes_one_line_per_item(tmp_path: Path) -> None:
    ctx = sink_context(tmp_path, 0, 1, 4, 60_000)
    read_fd, write_fd = os.pipe()
    sink = StdoutSink(StdoutSinkConfig(name="out"), ctx, fd=write_fd)
    await sink.start()
    await sink.write(events_batch())
    await sink.write(Batch("charts", [ChartsBatch(3, T_MS, [])], 0, 10))  # nothing to write
    session = Session("s", "u1", T_MS, T_MS + 5, 2, 1, 0, 5, None, "ios",
                      [Play(TRACK, T_MS, 5, "skip")])
    await sink.write(Batch("sessions", [SessionsBatch([session])], 1, 10))
    await sink.close()
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        lines = [json.loads(line) for line in f.read().splitlines()]
    assert lines[0] == {
        "event_id": "e1", "event_type": "play", "timestamp": "2025-12-01T10:59:59.500000Z",
        "user_id": "u1", "track_id": TRACK, "playback": {"position_ms": 5, "duration_ms": 10},
        "received_at": T_MS + 1000, "event_time": T_MS + 1000, "late": False,
    }
    assert lines[1]["event_type"] == "skip" and lines[1]["late"] is True
    assert lines[1]["geo"] == {"country": "SE"}
    assert lines[2]["session_id"] == "s" and lines[2]["plays"][0]["ended_by"] == "skip"
    assert len(lines) == 3


def test_rows_split_by_hour_and_tally() -> None:
    batch = events_batch()
    assert list(rows.by_hour(batch)) == [rows.hour_of(T_MS + 1000)]  # received_at 11:00:00.5
    assert rows.hour_of(T_MS + 1000) == T_MS + 500  # 11:00
    charts = Batch("charts", [ChartsBatch(1, 0, [
        ChartRow(T_MS - 59_500, "US", TRACK, 2), ChartRow(T_MS + 500, None, TRACK, 1, 3),
    ])], 2, 20)
    split = rows.by_hour(charts)
    assert [b.count for b in split.values()] == [1, 1]
    line = json.loads(rows.json_lines(split[T_MS + 500], 60_000))
    assert line == {"window_start": T_MS + 500, "window_end": T_MS + 60_500, "country": None,
                    "track_id": TRACK, "plays": 1, "partition": 1, "revision": 3}
    assert rows.tally(batch) == {(T_MS + 500, "play"): 1, (T_MS + 500, "skip"): 1}
    letter = DeadLetter(T_MS, 2, "track_id: bad", b'{"event_id": "x"}')
    assert json.loads(rows.json_lines(Batch("dead_letter", [letter], 1, 10))) == {
        "received_at": T_MS, "stage": "edge", "stream": "raw", "index": 2,
        "error": "track_id: bad", "event": {"event_id": "x"},
    }
    kept, dropped = rows.filter_event_types("events", batch.values[0], frozenset({"skip"}))
    assert dropped == 1 and [e.event_id for e in kept.events] == ["e2"] and kept.late == [0]

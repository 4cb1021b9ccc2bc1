"""Fan-out through the real server, with 1 and 2 workers: 50,000 realistic events
(thousands of users; sessions with skips, pauses and seeks; client retries that
resend the same ids; a few invalid and late events) are posted; once everything
settled, every accepted event_id is in the sqlite ``events`` table exactly once
and in the lake exactly once, every invalid event is in ``dead_letter`` with its
reason, sessions and charts in sqlite equal the batch computation of the
contract (tests/support/batchref.py) field by field, and ``evd audit`` reports no
discrepancy."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from batchref import compute
from evdtest import ServerFactory, batch, post, request, run_cli
from sinkcheck import lake_rows, listening, query, wait_for

from evd.core.config import ProcessingConfig
from evd.core.schema import RawBatch, event_decoder

pytestmark = pytest.mark.workers_independent

GAP_MS = 1_000
N_EVENTS = 50_000
PER_POST = 500
CONFIG: dict[str, Any] = {
    "log": {"partitions": 4},
    "charts": {"window_s": 1},
    "processing": {
        "idle_timeout_ms": 2000, "session_gap_ms": GAP_MS, "max_out_of_orderness_ms": 3000,
    },
    "snapshot": {"interval_s": 1.0},
    "sinks": [
        {"name": "lake", "type": "files", "streams": ["events", "sessions", "charts"],
         "batch": {"max_age_s": 0.5}},
        {"name": "warehouse", "type": "sqlite",
         "streams": ["events", "sessions", "charts", "dead_letter"],
         "batch": {"max_age_s": 0.2}},
    ],
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def ms(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_accepted_event_reaches_every_sink_once(
    servers: ServerFactory, rng: random.Random, workers: int
) -> None:
    server = servers.start(CONFIG, args=["--workers", str(workers)])
    load = post_load([server.port], rng)
    check_delivered(load, server.data_dir, server.port)
    assert server.stop() == 0


class Load(NamedTuple):
    """What post_load sent: the valid events, the late and invalid ones, every id accepted."""

    start_ms: int
    events: list[dict[str, Any]]
    late: list[dict[str, Any]]
    invalid: list[dict[str, Any]]
    accepted_ids: set[str]


def post_load(
    ports: Sequence[int],
    rng: random.Random,
    n_events: int = N_EVENTS,
    midway: Callable[[], None] | None = None,
) -> Load:
    """Post the load to ``ports`` in turn (every answer 200); ``midway`` is called
    once half of it was posted."""
    start_ms = int(time.time() * 1000)
    events = listening(rng, 3000, n_events, start_ms, GAP_MS, span_ms=8_000)
    invalid = [
        dict(events[0], event_id="bad-track", track_id="spotify:track:nope"),
        dict(events[1], event_id="bad-country", geo={"country": "XX"}),
        dict(events[2], event_id="bad-position", playback={"position_ms": 5, "duration_ms": 1}),
    ]
    # Two hours old: beyond the default allowed lateness (1 h) whatever the watermark
    # (at an hour, they were late only once the watermark passed start_ms).
    late = [dict(events[3], event_id=f"late-{i}", timestamp=iso(start_ms - 2 * 3_600_000))
            for i in range(3)]
    retries = 0
    shift = 0
    for n, i in enumerate(range(0, n_events, PER_POST)):
        port = ports[n % len(ports)]
        # On a busy machine the posting can fall behind the events' clock: a pause
        # of more than idle_timeout_ms lets a partition's watermark follow the
        # wall clock past events not sent yet, which would then be late. Each
        # request's events are moved forward (never back, all by the same amount)
        # so that none is older than the moment it is sent: the load is the same
        # on an idle machine, and the batch computation gets what was sent.
        oldest = min(ms(e["timestamp"]) for e in events[i: i + PER_POST])
        shift = max(shift, int(time.time() * 1000) - oldest)
        if shift:
            events[i: i + PER_POST] = [
                dict(e, timestamp=iso(ms(e["timestamp"]) + shift)) for e in events[i: i + PER_POST]
            ]
        chunk = events[i: i + PER_POST]
        if n == 11:  # (not a request sent twice below: its rejections would count twice)
            chunk = chunk + invalid
        if n == 20:
            chunk = chunk + late
        body = batch(chunk)
        resp = post(port, body)
        assert resp.status == 200, resp.body
        if n % 7 == 3:  # a client that did not see the answer sends the batch again
            assert post(ports[(n + 1) % len(ports)], body).status == 200
            retries += 1
        if midway is not None and i + PER_POST >= n_events // 2:
            midway()
            midway = None
    assert retries > 10
    accepted_ids = {e["event_id"] for e in events} | {e["event_id"] for e in late}
    return Load(start_ms, events, late, invalid, accepted_ids)


def check_delivered(load: Load, data: Path, metrics_port: int, replayed: bool = False) -> None:
    """Every sink holds what ``load`` sent, once (module docstring); the audit adds
    up; every stage's lag on ``metrics_port``'s /metrics is 0.

    ``replayed``: a processor was killed and its partitions replayed from a
    snapshot, so the lake (append-only files) may hold a replayed session twice,
    as identical rows; everything else is still exactly once.
    """
    start_ms, events, late, invalid, accepted_ids = load
    expected = compute(
        [RawBatch(0, [event_decoder.decode(msgspec.json.encode(e)) for e in events])],
        ProcessingConfig(session_gap_ms=GAP_MS), 1000,
    )
    # Every session emitted once (revision 0); the warehouse has no ``retracted`` column.
    want_sessions = sorted(
        ({k: v for k, v in msgspec.to_builtins(s).items() if k != "retracted"}
         for s in expected.sessions),
        key=lambda s: s["session_id"],
    )
    wait_for(
        "the warehouse to hold every event and session",
        lambda: query(data, "SELECT count(*) FROM events") == [(len(accepted_ids),)]
        and query(data, "SELECT count(*) FROM sessions") == [(len(want_sessions),)],
    )

    # events: every accepted id exactly once (the primary key), typed columns, late flagged.
    got_ids = [r[0] for r in query(data, "SELECT event_id FROM events")]
    assert sorted(got_ids) == sorted(accepted_ids)
    flagged = {r[0] for r in query(data, "SELECT event_id FROM events WHERE late = 1")}
    assert flagged == {e["event_id"] for e in late}
    sample = events[100]
    row = query(
        data, "SELECT event_type, user_id, track_id, country, received_at, raw FROM events"
        " WHERE event_id = ?", sample["event_id"],
    )[0]
    assert row[:3] == (sample["event_type"], sample["user_id"], sample["track_id"])
    assert row[3] == sample.get("geo", {}).get("country")
    assert row[4] > start_ms - 60_000
    assert json.loads(row[5])["event_id"] == sample["event_id"]

    # dead_letter: each invalid event with its reason and where it was rejected.
    letters = {
        json.loads(event)["event_id"]: (reason, stage)
        for event, reason, stage in query(data, "SELECT event, reason, stage FROM dead_letter")
    }
    assert set(letters) == {e["event_id"] for e in invalid}
    assert letters["bad-track"][0].startswith("track_id")
    assert letters["bad-country"][0].startswith("geo.country")
    assert letters["bad-position"][0].startswith("playback.position_ms")
    assert {stage for _, stage in letters.values()} == {"edge"}

    # sessions: field by field equal to the batch computation.
    cols = ("session_id", "user_id", "started_at", "ended_at", "event_count", "play_count",
            "stream_count", "listened_ms", "country", "os", "plays", "revision")
    got_sessions = [
        dict(zip(cols, r, strict=True))
        for r in query(data, f"SELECT {', '.join(cols)} FROM sessions ORDER BY session_id")
    ]
    for s in got_sessions:
        s["plays"] = json.loads(s["plays"])
    assert got_sessions == want_sessions
    assert len(got_sessions) > 3000

    # charts: the partitions' rows sum to the batch computation.
    charts: Counter[tuple[int, str | None, str]] = Counter()
    for window_start, country, track, plays in query(
        data, "SELECT window_start, country, track_id, plays FROM charts"
    ):
        charts[window_start, country, track] += plays
    assert dict(charts) == expected.charts

    # the lake: every accepted event exactly once, sessions once, under dt=/hour=.
    wait_for(
        "the lake to hold every event",
        lambda: sum(1 for _ in lake_rows(data / "lake", "events")) >= len(accepted_ids),
    )
    lake_ids = Counter(r["event_id"] for r in lake_rows(data / "lake", "events"))
    assert set(lake_ids) == accepted_ids and max(lake_ids.values()) == 1
    hours = {p.parent.name for p in (data / "lake" / "events").rglob("part-*")}
    assert all(h.startswith("hour=") for h in hours)
    wait_for(
        "the lake to hold every session",
        lambda: sum(1 for _ in lake_rows(data / "lake", "sessions")) >= len(want_sessions),
    )
    lake_sessions = sorted(
        (r for r in lake_rows(data / "lake", "sessions")), key=lambda r: r["session_id"]
    )
    if replayed:
        by_id = {r["session_id"]: r for r in lake_sessions}
        assert all(r == by_id[r["session_id"]] for r in lake_sessions)  # copies are identical
        lake_sessions = sorted(by_id.values(), key=lambda r: r["session_id"])
    assert [r["session_id"] for r in lake_sessions] == [s["session_id"] for s in want_sessions]

    # the audit: nothing unaccounted for, per hour and event type.
    wait_for("the audit to add up", lambda: run_cli("audit", "--data-dir", str(data)).returncode == 0,
             timeout=30)
    audit = run_cli("audit", "--data-dir", str(data), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    reports = [json.loads(line) for line in audit.stdout.splitlines()]
    assert sum(r["accepted"] for r in reports) - sum(r["duplicate"] for r in reports) == len(
        accepted_ids
    )
    assert sum(r["rejected"] for r in reports) == len(invalid)
    assert sum(r["late"] for r in reports) == len(late)
    for sink in ("lake", "warehouse"):
        assert sum(r["sinks"][sink]["delivered"] for r in reports) == len(accepted_ids)
    text = run_cli("audit", "--data-dir", str(data))
    assert "every hour adds up" in text.stdout
    # Every stage reports its lag, the audit stage's beside the sinks'.
    page = request(metrics_port, "GET", "/metrics").body.decode()
    for stage in ("lake", "warehouse", "audit"):
        assert f'evd_sink_lag_seconds{{sink="{stage}"}} 0.0' in page, stage

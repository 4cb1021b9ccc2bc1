"""Stream processing through the real server: POST -> raw log -> processors -> the
``events``, ``sessions``, ``charts`` and ``late`` streams, compared with the batch
computation of the contract (tests/support/batchref.py), with 1 and 2 workers."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from batchref import compute
from evdtest import EvdServer, ServerFactory, batch, post, request, track_id
from sinkcheck import listening

from evd.core.config import ProcessingConfig
from evd.core.schema import RawBatch, event_decoder
from evd.logtool import iter_stream

pytestmark = pytest.mark.workers_independent

GAP_MS = 1_000
CONFIG: dict[str, Any] = {
    "log": {"partitions": 4},
    "charts": {"window_s": 1},
    "processing": {
        "idle_timeout_ms": 2000, "session_gap_ms": GAP_MS, "max_out_of_orderness_ms": 3000,
    },
    "snapshot": {"interval_s": 1.0},
}
POSITIONAL = ("partition", "writer", "offset")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def settled(server: EvdServer, last_event_ms: int) -> bool:
    """Every partition's charts are closed past the last event (so every session closed)."""
    closed: dict[int, int] = {}
    for item in iter_stream(server.data_dir, "charts"):
        closed[item["partition"]] = max(closed.get(item["partition"], 0), item["closed_until"])
    return len(closed) == 4 and min(closed.values()) > last_event_ms + GAP_MS


def wait_settled(server: EvdServer, last_event_ms: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not settled(server, last_event_ms):
        assert time.monotonic() < deadline, "processing did not settle"
        time.sleep(0.5)


@pytest.mark.parametrize("workers", [1, 2])
def test_sessions_and_charts_equal_the_batch_computation(
    servers: ServerFactory, rng: random.Random, workers: int
) -> None:
    server = servers.start(CONFIG, args=["--workers", str(workers)])
    # Event times from now on: a partition idle for idle_timeout (before the
    # first POST) follows the wall clock, so older events would be late. They
    # run ahead of the wall clock (about 8 s for 4000), so the sessions close
    # once the wall clock passes them (plus gap and out-of-orderness).
    start_ms = int(time.time() * 1000)
    events = listening(rng, 200, 4000, start_ms, GAP_MS, span_ms=8_000)
    accepted: list[dict[str, Any]] = []
    for i in range(0, len(events), 100):
        chunk = events[i : i + 100]
        body = batch(chunk)
        assert post(server.port, body).status == 200
        if i % 700 == 0:
            assert post(server.port, body).status == 200  # a client retry: same ids
        accepted += chunk
    # Invalid events: dead-lettered with their reason, not processed.
    bad = dict(events[0], event_id="bad-1", track_id="spotify:track:nope")
    late = dict(events[0], event_id="late-1", timestamp=iso(start_ms - 2 * 3_600_000))
    resp = post(server.port, batch([bad, late]))
    assert resp.status == 200 and resp.json()["rejected"][0]["index"] == 0
    last_ms = max(int(datetime.fromisoformat(e["timestamp"]).timestamp() * 1000) for e in events)
    wait_settled(server, last_ms)

    expected = compute(
        [RawBatch(0, [event_decoder.decode(msgspec.json.encode(e)) for e in accepted])],
        ProcessingConfig(session_gap_ms=GAP_MS), 1000,
    )
    got = sorted(
        ({k: v for k, v in s.items() if k not in POSITIONAL}
         for s in iter_stream(server.data_dir, "sessions")),
        key=lambda s: s["session_id"],
    )
    assert got == [msgspec.to_builtins(s) for s in expected.sessions]
    assert len(got) >= 200
    charts: dict[tuple[int, str | None, str], int] = {}
    for row in iter_stream(server.data_dir, "charts"):
        if "track_id" in row:
            key = (row["window_start"], row["country"], row["track_id"])
            charts[key] = charts.get(key, 0) + row["plays"]
    assert charts == expected.charts

    # events: every accepted id exactly once (the retries deduplicated), plus the
    # late one flagged; late: only the late one.
    ids = [e["event_id"] for e in iter_stream(server.data_dir, "events")]
    assert sorted(ids) == sorted([e["event_id"] for e in events] + ["late-1"])
    flagged = [e["event_id"] for e in iter_stream(server.data_dir, "events") if e["late"]]
    assert flagged == ["late-1"]
    assert [e["event_id"] for e in iter_stream(server.data_dir, "late")] == ["late-1"]
    letters = list(iter_stream(server.data_dir, "dead_letter"))
    assert [(d["event"]["event_id"], d["error"].split(":")[0]) for d in letters] == [
        ("bad-1", "track_id")
    ]
    metrics = request(server.port, "GET", "/metrics").body.decode()
    assert 'evd_processor_late_total{reason="lateness"} 1.0' in metrics
    assert server.stop() == 0


def test_open_sessions_survive_a_restart_in_the_snapshot(servers: ServerFactory) -> None:
    """A session open at shutdown goes on after the restart (with another worker
    count: the partition's new owner restores its snapshot) and closes once."""
    gap = 10_000
    processing = {"session_gap_ms": gap, "max_out_of_orderness_ms": 3000}
    config = {**CONFIG, "processing": {**processing, "idle_timeout_ms": 60_000}}
    # Event times a little ahead of the wall clock: not late after the restart
    # even if the partition went idle and follows the wall clock.
    start_ms = int(time.time() * 1000) + 2000
    user = "restart-user"

    def event(i: int, kind: str, at: int) -> dict[str, Any]:
        return {
            "event_id": f"r-{i}", "event_type": kind, "timestamp": iso(start_ms + at),
            "user_id": user, "track_id": track_id(7),
            "playback": {"position_ms": at, "duration_ms": 600_000},
        }

    server = servers.start(config, args=["--workers", "2"])
    assert post(server.port, batch([event(0, "play", 0), event(1, "pause", 4_000)])).status == 200
    time.sleep(1.5)  # processed and snapshotted (interval 1 s)
    assert server.stop() == 0
    assert list(iter_stream(server.data_dir, "sessions")) == []  # open sessions are not flushed

    again = servers.start(
        {**config, "processing": {**processing, "idle_timeout_ms": 1000}},
        data_dir=server.data_dir, args=["--workers", "1"],
    )
    resumed = [event(2, "resume", 4_500), event(3, "end", 5_000)]
    assert post(again.port, batch(resumed)).status == 200
    # Closes once the wall clock passes the end + gap + out-of-orderness.
    deadline = time.monotonic() + 40
    while not (sessions := list(iter_stream(again.data_dir, "sessions"))):
        assert time.monotonic() < deadline, "the session never closed"
        time.sleep(0.3)
    assert len(sessions) == 1, sessions
    session = sessions[0]
    assert session["event_count"] == 4 and session["play_count"] == 1
    # played 0..4 s, paused, resumed at position 4.5 s and played to the end at 5 s
    assert session["plays"][0]["listened_ms"] == 4_000 + 500
    assert session["plays"][0]["ended_by"] == "end"
    assert again.stop() == 0


def test_the_embedded_server_keeps_its_snapshots_in_snapshot_dir(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """``snapshot.dir`` means the same with the embedded log as with Kafka: the
    processors write there, and a restart restores from there."""
    snapshots = tmp_path / "shared-snapshots"
    server = servers.start({**CONFIG, "snapshot": {"interval_s": 1.0, "dir": str(snapshots)}})
    now = int(time.time() * 1000)
    event = {
        "event_id": "snap-0", "event_type": "play", "timestamp": iso(now),
        "user_id": "snap-user", "track_id": track_id(3),
        "playback": {"position_ms": 0, "duration_ms": 600_000},
    }
    assert post(server.port, batch([event])).status == 200
    deadline = time.monotonic() + 30
    while len(list(snapshots.glob("*.snapshot"))) < CONFIG["log"]["partitions"]:
        assert time.monotonic() < deadline, "no snapshot of every partition in snapshot.dir"
        time.sleep(0.3)
    assert server.stop() == 0
    assert not list((server.data_dir / "state").glob("*.snapshot"))  # none where they used to go
    again = servers.start(
        {**CONFIG, "snapshot": {"interval_s": 1.0, "dir": str(snapshots)}},
        data_dir=server.data_dir,
    )
    deadline = time.monotonic() + 30
    while "restored from its snapshot" not in again.log_text():
        assert time.monotonic() < deadline, "the restart did not restore from snapshot.dir"
        time.sleep(0.3)
    assert again.stop() == 0

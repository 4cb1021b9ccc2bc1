"""Processing survives kill -9: a real server with two workers under load is
SIGKILLed at random moments several times; after the last restart and an idle
period, its ``sessions`` and ``charts`` streams, deduplicated by id, equal
those of a run without crashes over the same input (and the batch reference,
tests/support/batchref.py, over that input).

Event times are in the past (the wall clock at the start minus an hour), so the
load has to be continuous: a partition idle for ``idle_timeout_ms`` moves its
watermark to the wall clock, and every event still to come would be late. After
a restart the client posts again at once.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from batchref import compute
from evdtest import EvdServer, ServerFactory, batch, gone, post, track_id

from evd.core.config import ProcessingConfig
from evd.core.schema import Event, RawBatch
from evd.logtool import iter_stream

pytestmark = pytest.mark.workers_independent

SESSION_GAP_MS = 2_000
IDLE_TIMEOUT_MS = 3_000
WINDOW_S = 1
PARTITIONS = 4
CONFIG: dict[str, Any] = {
    "log": {"partitions": PARTITIONS},
    "processing": {
        "session_gap_ms": SESSION_GAP_MS,
        "idle_timeout_ms": IDLE_TIMEOUT_MS,
        "max_out_of_orderness_ms": 5_000,
    },
    "charts": {"window_s": WINDOW_S},
    "snapshot": {"interval_s": 0.5},
}
TWO = ["--workers", "2"]
EVENTS_PER_POST = 100
#: One POST at most this often: the load spans several snapshot intervals between
#: kills, and is continuous (a pause longer than idle_timeout_ms would make the rest
#: of the input late).
POST_PERIOD_S = 0.1
#: Disorder inside one request: events are posted sorted by time plus a jitter of at
#: most this, well within max_out_of_orderness_ms (no event may be late).
JITTER_MS = 1_500
#: Bounds the idle period after the load: every partition's watermark has to pass
#: the last event + session gap (idle_timeout_ms, then the wall clock).
SETTLE_TIMEOUT_S = IDLE_TIMEOUT_MS / 1000 + 20
#: Keys of an output item that say where it was written, not what it is.
POSITIONAL = ("partition", "writer", "offset")
COUNTRIES = ["SE", "US", "DE", "BR", "JP", "IN"]
OSES = ["Android 14", "iOS 17.4", "Windows 11", "macOS 14"]


# -- the input -------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def make_input(rng: random.Random, t0: int) -> list[dict[str, Any]]:
    """Listening sessions of 300-500 users from ``t0`` on, in posting order.

    Per user: 1-3 sessions, each 3-9 events (play, pause/resume/seek, skip/end,
    a new play, an event of another track), less than the session gap apart
    inside a session and more than it between sessions.
    """
    users = rng.randint(300, 500)
    tracks = [track_id(7919 * n + 13) for n in range(40)]
    timed: list[tuple[int, str, dict[str, Any]]] = []
    spread_ms = users * 150  # users start over this much event time
    for u in range(users):
        user = f"user-{u:04d}"
        country, os_name = rng.choice(COUNTRIES), rng.choice(OSES)
        t = t0 + rng.randrange(spread_ms)
        for s in range(rng.randint(1, 3)):
            if s:
                t += SESSION_GAP_MS + rng.randint(500, 10_000)
            track, duration, position = rng.choice(tracks), rng.randint(30, 240) * 1000, 0
            for e in range(rng.randint(3, 9)):
                if e:
                    t += rng.randint(100, SESSION_GAP_MS - 300)
                kind = "play" if e == 0 else rng.choice(
                    ["pause", "resume", "seek", "skip", "end", "play", "other"])
                this_track = track
                if kind == "play":
                    track, duration, position = rng.choice(tracks), rng.randint(30, 240) * 1000, 0
                    this_track = track
                elif kind == "other":
                    kind, this_track = rng.choice(["pause", "resume", "seek"]), rng.choice(tracks)
                elif kind in ("seek", "resume", "pause"):
                    position = rng.randint(0, duration)
                event_id = f"{user}-s{s}-e{e}"
                event: dict[str, Any] = {
                    "event_id": event_id,
                    "event_type": kind,
                    "timestamp": _iso(t),
                    "user_id": user,
                    "track_id": this_track,
                    "playback": {"position_ms": min(position, duration),
                                 "duration_ms": duration, "initiator": "user_click"},
                    "device": {"os": os_name, "client_version": "8.9.0"},
                    "geo": {"country": country},
                }
                timed.append((t + rng.randint(0, JITTER_MS), event_id, event))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [event for _, _, event in timed]


def requests_of(events: list[dict[str, Any]]) -> list[bytes]:
    return [batch(events[i : i + EVENTS_PER_POST])
            for i in range(0, len(events), EVENTS_PER_POST)]


def event_ms(event: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(event["timestamp"]).timestamp() * 1000)


# -- the outputs and their comparison ------------------------------------------------------


class Streams(msgspec.Struct):
    """One run's ``sessions`` and ``charts`` streams, deduplicated by id."""

    sessions: dict[str, dict[str, Any]]
    charts: dict[tuple[Any, ...], int]
    #: Copies of a session or chart row that differ from its first copy (must be none).
    conflicts: list[str]
    #: Items read, duplicates included (sessions, chart rows).
    copies: tuple[int, int]


def dedup(sessions: Iterable[dict[str, Any]], chart_items: Iterable[dict[str, Any]]) -> Streams:
    """Sessions by ``session_id`` and chart rows by (window_start, country, track_id,
    partition), the first copy of each kept; a later copy that differs is a conflict."""
    by_id: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    n_sessions = n_rows = 0
    for item in sessions:
        n_sessions += 1
        value = {k: v for k, v in item.items() if k not in POSITIONAL}
        first = by_id.setdefault(value["session_id"], value)
        if first != value:
            conflicts.append(f"session {value['session_id']}: {first} then {value}")
    rows: dict[tuple[Any, ...], int] = {}
    for item in chart_items:
        if "window_start" not in item:
            continue  # a record that only moved closed_until
        n_rows += 1
        key = (item["window_start"], item["country"], item["track_id"], item["partition"])
        plays = rows.setdefault(key, item["plays"])
        if plays != item["plays"]:
            conflicts.append(f"chart row {key}: {plays} plays then {item['plays']}")
    return Streams(by_id, rows, conflicts, (n_sessions, n_rows))


def differences(expected: Streams, got: Streams) -> list[str]:
    """What ``got`` lacks, adds or changes against ``expected`` (empty: equal)."""
    out = list(got.conflicts)
    for sid in sorted(expected.sessions.keys() - got.sessions.keys()):
        out.append(f"session {sid} missing: {expected.sessions[sid]}")
    for sid in sorted(got.sessions.keys() - expected.sessions.keys()):
        out.append(f"session {sid} not expected: {got.sessions[sid]}")
    for sid in sorted(expected.sessions.keys() & got.sessions.keys()):
        if expected.sessions[sid] != got.sessions[sid]:
            out.append(f"session {sid}: expected {expected.sessions[sid]}, got {got.sessions[sid]}")
    for key in sorted(expected.charts.keys() | got.charts.keys(), key=repr):
        if expected.charts.get(key) != got.charts.get(key):
            out.append(f"chart row {key}: expected {expected.charts.get(key)} plays,"
                       f" got {got.charts.get(key)}")
    return out


def merge_partitions(charts: dict[tuple[Any, ...], int]) -> dict[tuple[Any, ...], int]:
    """Plays per (window_start, country, track_id), summed over partitions."""
    merged: dict[tuple[Any, ...], int] = {}
    for (start, country, track, _), plays in charts.items():
        merged[(start, country, track)] = merged.get((start, country, track), 0) + plays
    return merged


def read_outputs(data_dir: Path) -> Streams:
    return dedup(iter_stream(data_dir, "sessions"), iter_stream(data_dir, "charts"))


def matches_reference(outputs: Streams, events: list[dict[str, Any]]) -> bool:
    """``outputs`` are what tests/support/batchref.py computes from ``events`` (all on time)."""
    typed = msgspec.convert(events, list[Event])
    raw = RawBatch(received_at=0, events=typed)
    result = compute([raw], ProcessingConfig(session_gap_ms=SESSION_GAP_MS), WINDOW_S * 1000)
    sessions = {s.session_id: msgspec.to_builtins(s) for s in result.sessions}
    return outputs.sessions == sessions and merge_partitions(outputs.charts) == result.charts


# -- running the server ----------------------------------------------------------------------


def wait_workers_gone(server: EvdServer, timeout: float = 10.0) -> None:
    pids = list(server.worker_pids().values())
    assert len(pids) == 2, server.log_text()
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} still alive after the supervisor died"
        time.sleep(0.01)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
                      r"(?:restored from its snapshot|evd listening)", re.MULTILINE)


def first_restore(log_text: str) -> float:
    """Epoch seconds of a server's first processor restore (or, without snapshots, of its
    first worker listening, which comes right after its processors started)."""
    stamps = LOG_TIME.findall(log_text)
    assert stamps, log_text
    return min(datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps)


def settle(server: EvdServer, last_ms: int) -> float:
    """Wait until every partition's charts are closed past the last event + session gap
    (the watermark passed every event, so every session closed in the same group);
    the seconds it took."""
    start = time.monotonic()
    need = last_ms + SESSION_GAP_MS
    while True:
        closed: dict[int, int] = {}
        for item in iter_stream(server.data_dir, "charts"):
            p = item["partition"]
            closed[p] = max(closed.get(p, item["closed_until"]), item["closed_until"])
        if len(closed) == PARTITIONS and min(closed.values()) > need:
            return time.monotonic() - start
        assert time.monotonic() - start < SETTLE_TIMEOUT_S, (
            f"charts not closed past {need} within {SETTLE_TIMEOUT_S}s: {closed}\n"
            f"{server.log_text()}")
        time.sleep(0.2)


class Run(msgspec.Struct):
    outputs: Streams
    late: int
    logs: list[str]
    #: Per restart: seconds from the first processor's restore to the first answered
    #: POST (what the partition idle clock sees; it has to stay below idle_timeout_ms).
    restart_gaps: list[float]
    settle_s: float
    #: POSTs that got no answer (in flight at a kill) and were sent again.
    unanswered: int
    #: Events the raw log holds twice (durable before a kill, sent again after it).
    raw_copies: int


def run_load(
    servers: ServerFactory,
    bodies: list[bytes],
    last_ms: int,
    kill_at: dict[int, float],
) -> Run:
    """Post ``bodies`` in order, one at a time, one every POST_PERIOD_S; at request ``i``
    in ``kill_at``, SIGKILL the supervisor that long after sending it, restart on the
    same data dir and go on at once (the same request again if it got no answer).
    Then idle until everything closed, stop (SIGTERM), read the streams."""
    server = servers.start(CONFIG, args=TWO)
    data_dir = server.data_dir
    all_servers = [server]
    gaps: list[float] = []
    unanswered = 0
    restarted = False

    def restart() -> EvdServer:
        nonlocal restarted
        assert server.proc.wait(10) == -signal.SIGKILL, server.log_text()
        wait_workers_gone(server)
        restarted = True
        new = servers.start(CONFIG, data_dir=data_dir, args=TWO)
        all_servers.append(new)
        return new

    due = time.monotonic()
    for i, body in enumerate(bodies):
        time.sleep(max(0.0, due - time.monotonic()))
        timer = None
        if i in kill_at:
            timer = threading.Timer(kill_at[i], os.kill, (server.proc.pid, signal.SIGKILL))
            timer.start()
        while True:
            try:
                r = post(server.port, body)
            except (OSError, http.client.HTTPException):
                r = None
            if r is not None and r.status == 200:
                answer = r.json()
                assert answer["rejected"] == [], answer
                assert answer["accepted"] + answer["duplicates"] == EVENTS_PER_POST or (
                    i == len(bodies) - 1), answer
                break
            assert r is None or r.status == 503, (r, server.log_text())
            unanswered += 1
            if timer is not None:
                timer.join()
                timer = None
                server = restart()
            else:
                assert server.proc.poll() is None, f"evd died on its own:\n{server.log_text()}"
                time.sleep(0.05)
        if restarted:
            gaps.append(round(time.time() - first_restore(server.log_text()), 2))
            restarted = False
        if timer is not None:  # the kill comes after the answer
            timer.join()
            server = restart()
        due = max(due + POST_PERIOD_S, time.monotonic())
    settle_s = settle(server, last_ms)
    assert server.stop() == 0, server.log_text()
    outputs = read_outputs(data_dir)
    late = len(iter_stream(data_dir, "late"))
    raw = [e["event_id"] for e in iter_stream(data_dir, "raw")]
    return Run(outputs, late, [s.log_text() for s in all_servers], gaps, settle_s, unanswered,
               len(raw) - len(set(raw)))


# -- the test ------------------------------------------------------------------------------------


def test_sessions_and_charts_survive_repeated_kill_9_under_load(
    servers: ServerFactory, rng: random.Random
) -> None:
    """Two workers, 3-5 SIGKILLs of the supervisor while posting; the outputs equal a
    calm run's, which equal the batch reference."""
    t_start = time.monotonic()
    t0 = (time.time_ns() // 1_000_000) - 3_600_000
    events = make_input(rng, t0)
    bodies = requests_of(events)
    last_ms = max(event_ms(e) for e in events)
    kills = rng.randint(3, 5)
    kill_at = {i: rng.uniform(0.0, 0.02) for i in rng.sample(range(5, len(bodies) - 1), kills)}
    print(f"{len(events)} events, {len(bodies)} requests, kills at requests "
          f"{ {i: round(d, 3) for i, d in sorted(kill_at.items())} }")

    calm = run_load(servers, bodies, last_ms, {})
    t_calm = time.monotonic()
    crashed = run_load(servers, bodies, last_ms, kill_at)
    t_crashed = time.monotonic()
    restores = sum(len(re.findall(r"restored from its snapshot", log)) for log in crashed.logs[1:])
    dup_sessions = crashed.outputs.copies[0] - len(crashed.outputs.sessions)
    dup_rows = crashed.outputs.copies[1] - len(crashed.outputs.charts)
    print(f"run without crashes: {t_calm - t_start:.1f}s (settled in {calm.settle_s:.1f}s); "
          f"with {kills} kills: {t_crashed - t_calm:.1f}s (settled in {crashed.settle_s:.1f}s, "
          f"restore to first answer {crashed.restart_gaps}s, "
          f"{crashed.unanswered} POSTs sent again, {crashed.raw_copies} events twice in raw); "
          f"{len(calm.outputs.sessions)} sessions, {len(calm.outputs.charts)} chart rows; "
          f"replayed copies: {dup_sessions} sessions, {dup_rows} chart rows; "
          f"{restores} partition restores from snapshots")

    # Every event is on time (if not after a restart: the restart gaps say whether the
    # load paused longer than idle_timeout_ms, which makes the rest late by design).
    assert calm.late == 0, f"{calm.late} late events without crashes"
    assert crashed.late == 0, (
        f"{crashed.late} late events with crashes; restore to first answer"
        f" {crashed.restart_gaps}s (idle_timeout {IDLE_TIMEOUT_MS} ms)")
    # Not a trivial pass: the run without crashes is the contract's answer for this input.
    users = len({e["user_id"] for e in events})
    assert calm.outputs.conflicts == []
    assert matches_reference(calm.outputs, events)
    assert len(calm.outputs.sessions) > users
    # Recovery happened: restarts restored snapshots and replayed the log after them,
    # producing again outputs that were already there.
    assert len(crashed.logs) == kills + 1
    assert restores >= 1, "\n".join(crashed.logs)
    assert dup_sessions + dup_rows > 0

    found = differences(calm.outputs, crashed.outputs)
    assert found == [], f"{len(found)} differences after kill -9:\n" + "\n".join(found[:20])

    # Negative controls: the comparison notices a lost session, a changed chart row
    # and a replayed copy that differs from the first; the reference check notices
    # one request's events gone.
    sid = rng.choice(sorted(crashed.outputs.sessions))
    key = rng.choice(sorted(crashed.outputs.charts, key=repr))
    lossy = msgspec.structs.replace(
        crashed.outputs,
        sessions={k: v for k, v in crashed.outputs.sessions.items() if k != sid},
        charts={**crashed.outputs.charts, key: crashed.outputs.charts[key] + 1},
    )
    found = differences(calm.outputs, lossy)
    assert len(found) == 2, found
    assert found[0].startswith(f"session {sid} missing")
    assert found[1].startswith(f"chart row {key}: expected")
    some = calm.outputs.sessions[sid]
    copies = [{**some, "partition": 0}, {**some, "listened_ms": some["listened_ms"] + 1}]
    assert len(dedup(copies, []).conflicts) == 1
    lost = rng.randrange(len(bodies))
    kept = events[: lost * EVENTS_PER_POST] + events[(lost + 1) * EVENTS_PER_POST :]
    assert not matches_reference(crashed.outputs, kept)
    print(f"whole test: {time.monotonic() - t_start:.1f}s")

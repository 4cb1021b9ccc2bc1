"""Late clients through the real server with the sqlite and lake sinks (issue 19).

The workload is a mobile app's: five users listen for a few minutes each, and
their app sends what they did in one POST at the end of every three minutes of
playing (plays, pauses, seeks, skips, ends with timestamps spread over the three
minutes before the POST). Event times are real and minutes old, and the server
has been idle long enough that every partition's watermark follows the wall
clock (now - max_out_of_orderness), so each batch arrives behind the watermark
but well within the allowed lateness (its 1 h default): the processor applies
it and emits the sessions and chart rows it changes again (revision + 1), or
retracts a session a late batch merged into another. Two users' apps also
retry: one sends its first batch after its second (the late batch precedes the
session's first event: the session's id changes), one sends the middle batch of
three after the third (it fills the gap between two sessions: they merge); and
one batch is sent twice.

Whatever the order, the warehouse (``sessions``: latest revision, retracted ones
deleted; ``charts`` summed over partitions) and the lake (per id the row of the
highest ``revision``, retracted ones skipped) hold exactly what the batch
computation of the contract (tests/support/batchref.py) gives for the same
events: when the events are sent live (in time order, ahead of the watermark),
when they come late in batches, and when the server is SIGKILLed in the middle
of the late batches and restarted on the same data dir. Nothing is counted late.
A batch older than the watermark minus a small allowed lateness is late: counted
(``evd_processor_late_total{reason="lateness"}``) and in no session or chart.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from batchref import ChartKey, compute
from evdtest import (
    EvdServer,
    ServerFactory,
    batch,
    gone,
    iso,
    post,
    request,
    timestamp_ms,
    track_id,
)
from sinkcheck import lake_rows, query, wait_for

from evd.core.config import ProcessingConfig
from evd.core.schema import Event, RawBatch, Session
from evd.logtool import iter_stream

PARTITIONS = 4
SESSION_GAP_MS = 30_000
WINDOW_S = 60
#: The wall-clock time a phone plays between two POSTs ("three minutes").
BATCH_MS = 180_000
#: A partition with no input for this long follows the wall clock. The live run
#: sends everything within it of the server's start.
IDLE_TIMEOUT_MS = 2_000
SNAPSHOT_INTERVAL_S = 0.5
CONFIG: dict[str, Any] = {
    "log": {"partitions": PARTITIONS},
    "charts": {"window_s": WINDOW_S},
    "processing": {
        "session_gap_ms": SESSION_GAP_MS,
        "idle_timeout_ms": IDLE_TIMEOUT_MS,
        "max_out_of_orderness_ms": 1_000,
    },
    "snapshot": {"interval_s": SNAPSHOT_INTERVAL_S},
    "sinks": [
        {"name": "lake", "type": "files", "streams": ["sessions", "charts"],
         "batch": {"max_age_s": 0.3}},
        {"name": "warehouse", "type": "sqlite", "streams": ["sessions", "charts"],
         "batch": {"max_age_s": 0.2}},
    ],
}
#: Between two late POSTs: each batch is processed, and its outputs emitted,
#: before the next comes (so that later batches revise what earlier ones emitted).
POST_PAUSE_S = 0.25
#: Bounds every wait for the outputs to reach the sinks (a healthy run: seconds).
SETTLE_TIMEOUT_S = 25.0
#: A Session's content; ``revision`` and ``retracted`` say which copy it is.
CONTENT = tuple(f for f in Session.__struct_fields__ if f not in ("revision", "retracted"))
TRACKS = [track_id(4099 * n + 11) for n in range(12)]
COUNTRIES = ["SE", "US", "DE", "BR", "JP"]
OSES = ["Android 14", "iOS 17.4", "Android 13", "iOS 16.7", "Android 14"]


# -- the workload ----------------------------------------------------------------------


def listening(
    rng: random.Random, user: int, start: int, end: int, step_ms: tuple[int, int],
    pause: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One phone's events from ``start`` to before ``end``, ``step_ms`` apart (so one
    session while the steps are below the session gap); no events in ``pause``
    (start, end) if given. Plays of shared tracks, with pauses, resumes, seeks,
    skips and ends of the current track."""
    user_id = f"mobile-{user}"
    out: list[dict[str, Any]] = []
    t = start
    track, duration = "", 0
    while t < end:
        if pause is not None and pause[0] <= t < pause[1]:
            t = pause[1]
            continue
        kind = rng.choices(["play", "pause", "resume", "seek", "skip", "end"],
                           [3, 2, 2, 1, 1, 1])[0]
        if not track:
            kind = "play"
        if kind == "play":
            track, duration = rng.choice(TRACKS), rng.randint(60, 240) * 1000
        position = 0 if kind == "play" else rng.randrange(duration)
        out.append({
            "event_id": f"{user_id}-{len(out):03d}",
            "event_type": kind,
            "timestamp": iso(t),
            "user_id": user_id,
            "track_id": track,
            "playback": {"position_ms": position, "duration_ms": duration,
                         "initiator": "user_click"},
            "device": {"os": OSES[user], "client_version": "8.9.0"},
            "geo": {"country": COUNTRIES[user]},
        })
        if kind in ("skip", "end"):
            track = ""
        t += rng.randint(*step_ms)
    return out


class Post(NamedTuple):
    """One POST of a phone: its user, which of its batches, the events."""

    user: int
    index: int
    events: list[dict[str, Any]]


def mobile_workload(rng: random.Random, t0: int) -> list[Post]:
    """Five phones' POSTs from ``t0`` on, in the order they are sent.

    Phone ``u`` starts at ``t0 + u * 37 s`` and POSTs every BATCH_MS what it played
    since the last POST. Phones 0-2 send their batches in order (phone 2 with a
    break longer than the session gap: two sessions); phone 3 sends its middle
    batch after its third (it joins the sessions of the other two); phone 4 sends
    its first batch after its second (its session starts earlier than first seen);
    phone 0 sends its first batch again at the end (a retry: the same event ids).
    """
    posts: list[tuple[int, Post]] = []
    for user in range(5):
        start = t0 + user * 37_000
        batches = 3 if user in (2, 3) else 2
        pause = (start + 200_000, start + 290_000) if user == 2 else None
        events = listening(rng, user, start, start + batches * BATCH_MS, (2_000, 25_000), pause)
        for k in range(batches):
            sent_at = start + (k + 1) * BATCH_MS
            chunk = [e for e in events if sent_at - BATCH_MS <= timestamp_ms(e) < sent_at]
            assert chunk, (user, k)
            posts.append((sent_at, Post(user, k, chunk)))
    # A batch whose POST failed, sent again a minute (of phone time) after the other one.
    order = {(3, 1): (3, 2), (4, 0): (4, 1)}
    sent = {(p.user, p.index): at for at, p in posts}
    posts = [(sent[order[(p.user, p.index)]] + 60_000 if (p.user, p.index) in order else at, p)
             for at, p in posts]
    posts.sort(key=lambda ap: ap[0])
    out = [p for _, p in posts]
    return [*out, next(p for p in out if (p.user, p.index) == (0, 0))]


def unique_events(posts: list[Post]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for p in posts:
        for e in p.events:
            seen.setdefault(e["event_id"], e)
    return list(seen.values())


# -- what the sinks hold -----------------------------------------------------------------


class Result(NamedTuple):
    """Sessions by id (their CONTENT fields) and plays per chart key (over partitions)."""

    sessions: dict[str, dict[str, Any]]
    charts: dict[ChartKey, int]


def reference(events: list[dict[str, Any]], gap_ms: int = SESSION_GAP_MS,
              window_s: int = WINDOW_S) -> Result:
    """What the batch computation of the contract gives for ``events``."""
    typed = msgspec.convert(events, list[Event])
    result = compute([RawBatch(0, typed)], ProcessingConfig(session_gap_ms=gap_ms),
                     window_s * 1000)
    sessions = {s.session_id: content(msgspec.to_builtins(s)) for s in result.sessions}
    return Result(sessions, result.charts)


def content(session: dict[str, Any]) -> dict[str, Any]:
    return {k: session[k] for k in CONTENT}


def in_warehouse(data_dir: Path) -> Result:
    """The warehouse's sessions and charts (it keeps the latest revision of each)."""
    sessions = {}
    for row in query(data_dir, f"SELECT {', '.join(CONTENT)} FROM sessions"):
        session = dict(zip(CONTENT, row, strict=True))
        session["plays"] = json.loads(session["plays"])
        sessions[session["session_id"]] = session
    charts: Counter[ChartKey] = Counter()
    for start, country, track, plays in query(
        data_dir, "SELECT window_start, country, track_id, plays FROM charts"
    ):
        charts[start, country, track] += plays
    return Result(sessions, {k: n for k, n in charts.items() if n})


def lake_revisions(data_dir: Path, stream: str) -> Iterator[dict[str, Any]]:
    """Every row of ``stream`` in the lake, those that came after their hour was
    complete (``_late``) included."""
    root = data_dir / "lake"
    yield from lake_rows(root, stream)
    yield from lake_rows(root / "_late", stream)


def latest(rows: Iterator[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per id (the ``key`` fields), the row of the highest ``revision``, unless retracted."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row.get(f) for f in key)
        if k not in best or row.get("revision", 0) >= best[k].get("revision", 0):
            best[k] = row
    return [r for r in best.values() if not r.get("retracted", False)]


def in_lake(data_dir: Path) -> Result:
    """The lake's sessions and charts, reading the latest revision of each id."""
    sessions = {
        r["session_id"]: content(r)
        for r in latest(lake_revisions(data_dir, "sessions"), ("session_id",))
    }
    charts: Counter[ChartKey] = Counter()
    chart_id = ("window_start", "country", "track_id", "partition")
    for r in latest(lake_revisions(data_dir, "charts"), chart_id):
        charts[r["window_start"], r["country"], r["track_id"]] += r["plays"]
    return Result(sessions, {k: n for k, n in charts.items() if n})


def differences(want: Result, got: Result) -> list[str]:
    out = []
    for sid in sorted(want.sessions.keys() | got.sessions.keys()):
        if want.sessions.get(sid) != got.sessions.get(sid):
            out.append(f"session {sid}: want {want.sessions.get(sid)}, got {got.sessions.get(sid)}")
    for key in sorted(want.charts.keys() | got.charts.keys(), key=repr):
        if want.charts.get(key) != got.charts.get(key):
            out.append(f"chart {key}: want {want.charts.get(key)} plays, got {got.charts.get(key)}")
    return out


def wait_delivered(server: EvdServer, want: Result) -> None:
    """Wait until both sinks hold ``want`` (bounded); fail with what differs."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        found = {
            "warehouse": differences(want, in_warehouse(server.data_dir)),
            "lake": differences(want, in_lake(server.data_dir)),
        }
        if not any(found.values()):
            return
        if time.monotonic() > deadline:
            lines = [f"{sink}: {d}" for sink, ds in found.items() for d in ds]
            raise AssertionError(f"{len(lines)} differences after {SETTLE_TIMEOUT_S}s:\n"
                                 + "\n".join(lines[:30]) + f"\n{server.log_text()[-3000:]}")
        time.sleep(0.3)


def wait_top_tracks(server: EvdServer, want: Result) -> None:
    """Wait until ``GET /v1/charts/top-tracks`` (the last hour, every track) answers the
    reference's plays per track: the latest counts, late plays included (bounded)."""
    totals: Counter[str] = Counter()
    for (_, _, track), plays in want.charts.items():
        totals[track] += plays

    def answered() -> dict[str, int]:
        body = request(server.port, "GET", "/v1/charts/top-tracks?window=1h&limit=1000").json()
        return {t["track_id"]: t["plays"] for t in body["tracks"]}

    wait_for("the top-tracks API to answer the latest counts",
             lambda: answered() == dict(totals), timeout=SETTLE_TIMEOUT_S)


# -- the server ------------------------------------------------------------------------------


def late_counts(server: EvdServer) -> dict[str, float]:
    """``evd_processor_late_total`` by its labels ("" when it has none) from /metrics."""
    page = request(server.port, "GET", "/metrics").body.decode()
    return {labels or "": float(value) for labels, value in re.findall(
        r"^evd_processor_late_total(\{[^}]*\})? (\S+)$", page, re.MULTILINE)}


def wait_watermarks_past(server: EvdServer, ms: int) -> None:
    """Wait until every partition closed its chart windows past ``ms`` (its watermark
    passed every event up to ``ms``)."""

    def past() -> bool:
        closed: dict[int, int] = {}
        for item in iter_stream(server.data_dir, "charts"):
            closed[item["partition"]] = max(closed.get(item["partition"], 0), item["closed_until"])
        return len(closed) == PARTITIONS and min(closed.values()) > ms

    wait_for(f"every partition's watermark past {ms}", past, timeout=IDLE_TIMEOUT_MS / 1000 + 15,
             every=0.1)


def post_late(server: EvdServer, posts: list[Post]) -> None:
    """Each phone's batches, one POST each, POST_PAUSE_S apart; every one accepted."""
    for p in posts:
        resp = post(server.port, batch(p.events))
        assert resp.status == 200, resp.body
        assert resp.json()["rejected"] == [], resp.body
        time.sleep(POST_PAUSE_S)


def wait_snapshots_after(server: EvdServer, wall: float) -> None:
    """Wait until every partition's snapshot was written after ``wall`` (epoch s)."""
    state = server.data_dir / "state"
    wait_for(
        "a snapshot of every partition",
        lambda: len(snaps := list(state.glob("*.snapshot"))) == PARTITIONS
        and all(s.stat().st_mtime > wall for s in snaps),
        timeout=SNAPSHOT_INTERVAL_S * 4 + 10, every=0.1,
    )


def kill(server: EvdServer) -> None:
    """SIGKILL the supervisor; its workers die with it (their parent-death signal)."""
    workers = list(server.worker_pids().values())
    assert workers, server.log_text()
    server.kill()
    wait_for("the workers to die with the supervisor",
             lambda: all(gone(pid) for pid in workers), timeout=10, every=0.02)


# -- the tests -----------------------------------------------------------------------------------


def workload(rng: random.Random) -> tuple[list[Post], Result]:
    """The POSTs, from 15 minutes ago (every event at least 3 minutes old), and their
    reference result."""
    posts = mobile_workload(rng, int(time.time() * 1000) - 15 * 60_000)
    want = reference(unique_events(posts))
    assert len(want.sessions) >= 6, want.sessions  # phone 2: two sessions, and the merges
    return posts, want


def newest(posts: list[Post]) -> int:
    return max(timestamp_ms(e) for p in posts for e in p.events)


def test_the_same_events_sent_live_give_the_reference(
    servers: ServerFactory, rng: random.Random
) -> None:
    """The control: every event sent in time order in one POST as soon as the server
    is ready, ahead of the watermark (a partition follows the wall clock only after
    IDLE_TIMEOUT_MS without input; one request: one source per partition)."""
    posts, want = workload(rng)
    live = sorted(unique_events(posts), key=lambda e: (timestamp_ms(e), e["event_id"]))
    server = servers.start(CONFIG)
    resp = post(server.port, batch(live))
    assert resp.status == 200 and resp.json()["rejected"] == [], resp.body
    wait_delivered(server, want)
    assert sum(late_counts(server).values()) == 0, late_counts(server)
    # Live: nothing came behind the watermark, so nothing was emitted twice.
    revised = [r for r in lake_revisions(server.data_dir, "sessions") if r.get("revision")]
    assert revised == []
    assert server.stop() == 0
    assert differences(want, in_warehouse(server.data_dir)) == []


def test_batches_sent_minutes_late_give_the_reference(
    servers: ServerFactory, rng: random.Random
) -> None:
    posts, want = workload(rng)
    server = servers.start(CONFIG)
    wait_watermarks_past(server, newest(posts))  # every batch comes behind the watermark
    post_late(server, posts)
    wait_delivered(server, want)
    wait_top_tracks(server, want)
    assert sum(late_counts(server).values()) == 0, late_counts(server)
    # The late path was taken: sessions were emitted again, and merges retracted some.
    sessions = list(lake_revisions(server.data_dir, "sessions"))
    assert any(r.get("revision", 0) > 0 for r in sessions), sessions
    assert any(r.get("retracted") for r in sessions), sessions
    assert server.stop() == 0
    got = in_warehouse(server.data_dir)
    assert differences(want, got) == []
    assert differences(want, in_lake(server.data_dir)) == []
    # The comparison notices a batch missing.
    p = next(p for p in posts if (p.user, p.index) == (3, 1))
    assert differences(reference(unique_events([q for q in posts if q != p])), got) != []


def test_a_sigkill_amid_late_batches_changes_nothing(
    servers: ServerFactory, rng: random.Random
) -> None:
    """Half of the batches processed and snapshotted, two more accepted (durable in
    the log, maybe not processed), SIGKILL; the restart on the same data dir
    restores the snapshots, replays the log after them and takes the rest."""
    posts, want = workload(rng)
    half = len(posts) // 2
    server = servers.start(CONFIG)
    wait_watermarks_past(server, newest(posts))
    post_late(server, posts[:half])
    wait_snapshots_after(server, time.time())
    wait_for("the warehouse to hold sessions",
             lambda: query(server.data_dir, "SELECT count(*) FROM sessions") > [(0,)])
    for p in posts[half : half + 2]:
        assert post(server.port, batch(p.events)).status == 200
    assert sum(late_counts(server).values()) == 0, late_counts(server)
    kill(server)
    again = servers.start(CONFIG, data_dir=server.data_dir)
    wait_for("a restore from the snapshots",
             lambda: "restored from its snapshot" in again.log_text(), timeout=10, every=0.1)
    post_late(again, posts[half + 2 :])
    wait_delivered(again, want)
    assert sum(late_counts(again).values()) == 0, late_counts(again)
    assert again.stop() == 0
    assert differences(want, in_warehouse(again.data_dir)) == []
    assert differences(want, in_lake(again.data_dir)) == []


def test_a_batch_beyond_the_allowed_lateness_is_late(
    servers: ServerFactory, rng: random.Random
) -> None:
    """allowed_lateness 30 s: a phone's batch from minutes ago is late (counted, in no
    session or chart); another's from 20 s ago is still applied."""
    gap_ms, lateness_ms, window_s = 3_000, 30_000, 2
    config = {
        **CONFIG,
        "charts": {"window_s": window_s},
        "processing": {**CONFIG["processing"], "session_gap_ms": gap_ms,
                       "allowed_lateness_ms": lateness_ms},
    }
    server = servers.start(config)
    old_start = int(time.time() * 1000) - 6 * 60_000
    old = listening(rng, 0, old_start, old_start + BATCH_MS, (1_000, 2_500))
    wait_watermarks_past(server, newest([Post(0, 0, old)]) + lateness_ms)
    now = int(time.time() * 1000)
    recent = listening(rng, 1, now - 20_000, now - 6_000, (500, 2_500))
    assert post(server.port, batch(old)).status == 200
    assert post(server.port, batch(recent)).status == 200
    want = reference(recent, gap_ms, window_s)
    assert want.sessions and want.charts
    wait_delivered(server, want)  # the old phone's events are nowhere
    wait_for("the late events counted",
             lambda: late_counts(server).get('{reason="lateness"}') == len(old), timeout=10)
    assert sum(late_counts(server).values()) == len(old), late_counts(server)
    assert server.stop() == 0

"""The streaming processor equals a batch computation of the contract.

``batchref`` computes sessions and charts from all the data at once, straight from
ARCHITECTURE.md ("Processing semantics"). Hypothesis generates listening histories
of a few users, splits them over sub-logs and records with disorder inside the
out-of-orderness bound, feeds them to one ``PartitionProcessor`` and checks that
what it emits, once everything has closed, equals the reference. A second property
snapshots the processor at a random point, restores it from msgpack and checks
that it goes on exactly as the uninterrupted one.

The first tests check the reference itself on hand-computed examples.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import msgspec
import pytest
from batchref import BatchResult, compute, session_id, sum_chart_rows
from evdtest import track_id
from hypothesis import currently_in_test_context, event, given, note, seed, settings
from hypothesis import strategies as st

from evd.core.config import ProcessingConfig
from evd.core.schema import (
    ChartRow,
    Device,
    Event,
    EventsBatch,
    Geo,
    Play,
    Playback,
    RawBatch,
    Session,
    epoch_ms,
)

pytestmark = pytest.mark.workers_independent

HYPOTHESIS_SEED = int(os.environ.get("EVD_TEST_SEED") or 20240611)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: A multiple of every chart window used here, so window starts are easy to read.
BASE = 1_699_999_980_000
MIN = 60_000
TRACKS = [track_id(1000 + n) for n in range(4)]
A, B = TRACKS[0], TRACKS[1]
PARTITION = 3
#: Wall clock of every process() call: constant, so no sub-log ever goes idle.
NOW = BASE
#: Far enough past every generated event time for all sessions and windows to close.
FAR_FUTURE = BASE + 10**12



def at(t: int) -> datetime:
    """The aware datetime of epoch milliseconds ``t`` (exact, unlike fromtimestamp)."""
    return _EPOCH + timedelta(milliseconds=t)


def ev(
    event_id: str,
    t: int,
    kind: str = "play",
    track: str = A,
    pos: int = 0,
    dur: int = 200_000,
    user: str = "u1",
    geo: str | None = None,
    device: Device | None = None,
    skew: int = 0,
) -> Event:
    """An event whose pipeline time is BASE + ``t`` in a record with ``skew``."""
    return Event(
        event_id=event_id,
        timestamp=at(BASE + t - skew),
        user_id=user,
        track_id=track,
        playback=Playback(position_ms=pos, duration_ms=dur),
        event_type=kind,  # type: ignore[arg-type]
        device=device,
        geo=Geo(country=geo) if geo is not None else None,
    )


def rb(*events: Event, skew: int = 0) -> RawBatch:
    return RawBatch(received_at=NOW, events=list(events), skew_ms=skew)


def only_session(result: BatchResult) -> Session:
    assert len(result.sessions) == 1
    return result.sessions[0]


# -- the reference on hand-computed examples ----------------------------------------------


def test_reference_pause_resume_seek_skip() -> None:
    result = compute(
        [
            rb(
                ev("e1", 0, "play", pos=0, dur=200_000),
                ev("e2", 40_000, "pause", pos=40_000),
                ev("e3", 100_000, "resume", pos=40_000),
            ),
            rb(ev("e4", 110_000, "seek", pos=150_000), ev("e5", 130_000, "skip", pos=170_000)),
        ],
        ProcessingConfig(),
        MIN,
    )
    # 40 s until the pause, 10 s after the resume, 20 s after the seek.
    assert only_session(result) == Session(
        session_id=session_id("u1", "e1"),
        user_id="u1",
        started_at=BASE,
        ended_at=BASE + 130_000,
        event_count=5,
        play_count=1,
        stream_count=1,
        listened_ms=70_000,
        country=None,
        os=None,
        plays=[Play(A, BASE, 70_000, "skip")],
    )
    assert result.charts == {(BASE, None, A): 1}
    assert result.duplicates == 0


def test_reference_other_track_and_play_closing_play() -> None:
    result = compute(
        [
            rb(
                ev("e1", 0, "play", A, pos=0, dur=200_000),
                ev("e2", 10_000, "pause", B, dur=100_000),  # other track: session only
                ev("e3", 20_000, "play", B, pos=0, dur=100_000),  # closes A after 20 s
                ev("e4", 30_000, "end", A),  # other track again
                ev("e5", 40_000, "seek", B, pos=90_000, dur=100_000),
            )
        ],
        ProcessingConfig(),
        MIN,
    )
    # B: 20 s played, then 10 s left to the end of the track at session close.
    session = only_session(result)
    assert session.plays == [
        Play(A, BASE, 20_000, "play"),
        Play(B, BASE + 20_000, 30_000, "session_close"),
    ]
    assert (session.event_count, session.play_count, session.stream_count) == (5, 2, 1)
    assert session.listened_ms == 50_000
    assert session.ended_at == BASE + 40_000


def test_reference_gap_boundary_and_close_accrual() -> None:
    gap = MIN
    result = compute(
        [
            rb(
                ev("a1", 0, "play", pos=0, dur=200_000),
                ev("a2", 10_000, "pause", pos=10_000),
                ev("a3", 10_000 + gap, "resume", pos=10_000),  # exactly the gap: same session
                ev("a4", 10_000 + 2 * gap + 1, "seek", pos=5_000),  # above it: a new one
                ev("b1", 0, "play", user="u2", pos=0, dur=200_000),
                ev("b2", 5_000, "pause", user="u2"),
                ev("c1", 0, "play", user="u3", pos=180_000, dur=200_000),
            )
        ],
        ProcessingConfig(session_gap_ms=gap),
        MIN,
    )
    by_first = {s.session_id: s for s in result.sessions}
    first = by_first[session_id("u1", "a1")]
    # 10 s before the pause, then playing at close: min(190 s left, gap 60 s).
    assert first.plays == [Play(A, BASE, 70_000, "session_close")]
    assert (first.ended_at, first.event_count, first.stream_count) == (BASE + 70_000, 3, 1)
    second = by_first[session_id("u1", "a4")]
    assert second.plays == [] and second.event_count == 1 and second.listened_ms == 0
    assert second.started_at == second.ended_at == BASE + 130_001
    # Paused at close: nothing more accrues.
    assert by_first[session_id("u2", "b1")].plays == [Play(A, BASE, 5_000, "session_close")]
    # Playing at close with 20 s left: 20 s, not the gap.
    assert by_first[session_id("u3", "c1")].plays == [Play(A, BASE, 20_000, "session_close")]
    assert [s.session_id for s in result.sessions] == sorted(by_first)


def test_reference_ties_first_geo_and_os_and_duplicates() -> None:
    result = compute(
        [
            rb(
                ev("e2", 0, "play", geo=None, device=None),
                ev("e1", 0, "pause", B, geo="SE", device=Device(client_version="1.0")),
            ),
            rb(
                ev("e3", 1_000, "seek", A, pos=100_000, geo="US", device=Device(os="android")),
                ev("e4", 2_000, "pause", A, device=Device(os="ios")),
            ),
            # e2 again, resent through a record with another skew: the same event time.
            rb(ev("e2", 0, "play", skew=90_000), skew=90_000),
        ],
        ProcessingConfig(),
        MIN,
    )
    session = only_session(result)
    # (t, event_id) order: e1 first, so it names the session and gives the country.
    assert session.session_id == session_id("u1", "e1")
    assert (session.country, session.os) == ("SE", "android")
    assert session.event_count == 4
    # e3 moves position to 100 s after 1 s of play; paused at 2 s: 2 s listened.
    assert session.plays == [Play(A, BASE, 2_000, "session_close")]
    assert result.duplicates == 1
    assert [e.event_id for _, e in result.events] == ["e2", "e1", "e3", "e4"]


def test_reference_charts() -> None:
    result = compute(
        [
            rb(
                ev("p1", 0, geo="SE"),
                ev("p2", MIN - 1, geo="SE", user="u2"),
                ev("p3", MIN, geo="SE"),
                ev("p4", 1_000, geo=None, user="u3"),
                ev("p5", 2_000, track=B, geo="SE"),
                ev("x1", 3_000, "pause", geo="SE"),
                ev("x2", 4_000, "resume", geo="SE"),
            ),
            # Event time = timestamp + skew: lands in the second window.
            rb(ev("p6", 30_000, geo="US", skew=90_000), skew=90_000),
        ],
        ProcessingConfig(),
        MIN,
    )
    assert result.charts == {
        (BASE, "SE", A): 2,
        (BASE + MIN, "SE", A): 1,
        (BASE, None, A): 1,
        (BASE, "SE", B): 1,
        (BASE, "US", A): 1,
    }


# -- generated scenarios ------------------------------------------------------------------


@dataclass
class Scenario:
    processing: ProcessingConfig
    window_ms: int
    sources: int
    #: (source, record) in the order the processor reads them.
    feed: list[tuple[int, RawBatch]]
    #: After which feed steps a tick(NOW, backlog) runs as well (the worker's timer).
    ticks_after: set[int]
    resent: int
    #: Feed steps that are a late client's batch (``late_scenarios``).
    batches: frozenset[int] = frozenset()


def _deltas(gap: int) -> st.SearchStrategy[int]:
    """Time to a user's next event: mostly inside a session, sometimes at or past the gap."""
    return st.sampled_from(
        [
            st.just(0),  # a tie: ordered by event_id
            st.integers(0, 3_000),
            st.integers(3_000, 40_000),
            st.integers(30_000, min(240_000, gap)),
            st.integers(0, 3_000),
            st.integers(3_000, 40_000),
            st.sampled_from([gap, gap + 1]),
            st.integers(gap + 1, 2 * gap + 100_000),
        ]
    ).flatmap(lambda branch: branch)


_KINDS = st.sampled_from(["play", "play", "play", "pause", "resume", "seek", "skip", "end"])
_DEVICES = st.sampled_from(
    [None, Device(os="ios"), Device(os="android"), Device(client_version="9.1")]
)


#: (t, user, kind, track, position, geo, device) of one generated event.
Spec = tuple[int, str, str, int, int, str | None, Device | None]


def _timeline(
    draw: st.DrawFn,
    user: str,
    deltas: st.SearchStrategy[int],
    durations: list[int],
    most: int,
    until: int | None = None,
) -> list[Spec]:
    """1 to ``most`` events of ``user`` in their own time order (with ``until``: as
    many as it takes to pass that time)."""
    specs: list[Spec] = []
    t = BASE + draw(st.integers(0, 120_000))
    last_play: int | None = None
    for i in range(draw(st.integers(1, most)) if until is None else 1 << 30):
        if i:
            if until is not None and t > until:
                break
            t += draw(deltas)
        kind = draw(_KINDS)
        same = kind != "play" and last_play is not None and draw(st.integers(0, 3)) > 0
        track = last_play if same else draw(st.integers(0, 3))
        assert track is not None
        if kind == "play":
            last_play = track
        position = draw(st.one_of(st.just(0), st.integers(0, durations[track])))
        geo = draw(st.sampled_from([None, None, "SE", "US"]))
        specs.append((t, user, kind, track, position, geo, draw(_DEVICES)))
    return specs


def _event(spec: Spec, event_id: str, durations: list[int], skew: int) -> Event:
    """The event of ``spec`` in a record with ``skew`` (pipeline time = spec's t)."""
    t, user_id, kind, track, position, geo, device = spec
    return Event(
        event_id=event_id,
        timestamp=at(t - skew),
        user_id=user_id,
        track_id=TRACKS[track],
        playback=Playback(position_ms=position, duration_ms=durations[track]),
        event_type=kind,  # type: ignore[arg-type]
        device=device,
        geo=Geo(country=geo) if geo is not None else None,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    gap = draw(st.sampled_from([MIN, 30 * MIN]))
    ooo = draw(st.sampled_from([0, 1_000, 5_000]))
    window = draw(st.sampled_from([10_000, MIN]))
    processing = ProcessingConfig(session_gap_ms=gap, max_out_of_orderness_ms=ooo)
    durations = draw(
        st.lists(st.sampled_from([8_000, 31_000, 45_000, 200_000]), min_size=4, max_size=4)
    )
    deltas = _deltas(gap)

    specs: list[Spec] = []
    for user in range(draw(st.integers(1, 4))):
        specs.extend(_timeline(draw, f"user-{user}", deltas, durations, 15))
    # Ids in an order unrelated to time, so ties at equal times test the event_id order.
    ids = [f"e{n:03d}" for n in draw(st.permutations(range(len(specs))))]

    sources = draw(st.integers(1, 3))
    # Sorting a sub-log by t + jitter (jitter in [0, ooo]) keeps every event at or above
    # (max t read before it in that sub-log) - ooo: t_b + r_b >= t_a + r_a.
    lanes: list[list[tuple[int, int, int]]] = [[] for _ in range(sources)]
    for i, spec in enumerate(specs):
        src = draw(st.integers(0, sources - 1))
        jitter = draw(st.one_of(st.sampled_from([0, ooo]), st.integers(0, ooo)))
        lanes[src].append((spec[0] + jitter, i, spec[0]))
    arrivals: list[list[int]] = []
    for lane in lanes:
        lane.sort()
        arrivals.append([i for _, i, _ in lane])

    # Resent events: a copy of an id later in the same sub-log, where it is still in bound.
    resent = draw(st.sampled_from([0, 0, 1, 3]))
    for _ in range(resent):
        src = draw(st.integers(0, sources - 1))
        order = arrivals[src]
        if not order:
            continue
        k = draw(st.integers(0, len(order) - 1))
        t_copy = specs[order[k]][0]
        fits = []
        newest = max(specs[i][0] for i in order[: k + 1])
        for j in range(k + 1, len(order) + 1):
            if t_copy >= newest - ooo:
                fits.append(j)
            if j < len(order):
                newest = max(newest, specs[order[j]][0])
        order.insert(draw(st.sampled_from(fits)), order[k])

    per_source: list[list[RawBatch]] = []
    for order in arrivals:
        records = []
        pos = 0
        while pos < len(order):
            size = draw(st.integers(1, 4))
            skew = draw(st.sampled_from([0, 0, -2_000, 90_000]))
            events = [_event(specs[i], ids[i], durations, skew) for i in order[pos : pos + size]]
            records.append(RawBatch(received_at=0, events=events, skew_ms=skew))
            pos += size
        per_source.append(records)

    slots = [src for src, records in enumerate(per_source) for _ in records]
    feed: list[tuple[int, RawBatch]] = []
    cursor = [0] * sources
    for n, src in enumerate(draw(st.permutations(slots))):
        record = per_source[src][cursor[src]]
        cursor[src] += 1
        record.received_at = NOW + n
        feed.append((src, record))
    ticks_after = set(draw(st.lists(st.integers(0, max(len(feed) - 1, 0)), max_size=4)))
    return Scenario(processing, window, sources, feed, ticks_after, resent)


def _delays(lateness: int, ooo: int) -> st.SearchStrategy[int]:
    """How long after its last event a late client's batch arrives: mostly within the
    allowed lateness (around its edge too), sometimes beyond it."""
    return st.sampled_from(
        [
            st.integers(0, lateness),
            st.integers(0, lateness),
            st.integers(lateness // 2, lateness + ooo),
            st.sampled_from([lateness - 1, lateness, lateness + ooo, lateness + ooo + 1]),
            st.integers(lateness + 1, 3 * lateness),
        ]
    ).flatmap(lambda branch: branch)


@st.composite
def late_scenarios(draw: st.DrawFn) -> Scenario:
    """Live users as in ``scenarios`` (in time order within the out-of-orderness bound:
    they drive the watermark) and late clients: a user's events cut into batches, one
    record each, each arriving some delay after its last event, in any order between
    batches, sometimes resent. Records are read in the order of their arrival time
    (per sub-log, plus a lag of the sub-log), so a delivery lands among the live
    records of its time."""
    gap = draw(st.sampled_from([MIN, 2 * MIN, 30 * MIN]))
    ooo = draw(st.sampled_from([0, 1_000, 5_000]))
    window = draw(st.sampled_from([10_000, MIN, 3 * MIN]))
    lateness = draw(st.sampled_from([2 * MIN, 5 * MIN]))
    processing = ProcessingConfig(
        session_gap_ms=gap, max_out_of_orderness_ms=ooo, allowed_lateness_ms=lateness
    )
    durations = draw(
        st.lists(st.sampled_from([8_000, 31_000, 45_000, 200_000]), min_size=4, max_size=4)
    )
    deltas = _deltas(gap)
    live_users = draw(st.integers(1, 3))
    live: list[Spec] = []
    for user in range(live_users):
        live.extend(_timeline(draw, f"user-{user}", deltas, durations, 20))
    clients: list[list[Spec]] = []
    for n in range(draw(st.integers(1, 3))):
        # Sometimes a live user's other device: its late events interleave with theirs.
        shared = draw(st.integers(-1, live_users - 1))
        user = f"user-{shared}" if shared >= 0 else f"late-{n}"
        clients.append(_timeline(draw, user, deltas, durations, 10))
    if draw(st.integers(0, 3)):
        # A steady listener until well after the late clients' last events: the
        # watermark passes them while the feed goes on (not only at the closing ticks).
        until = max(spec[0] for client in clients for spec in client) + 2 * lateness + gap
        steady = st.integers(5_000, 90_000)
        live.extend(_timeline(draw, "steady", steady, durations, 0, until))
    specs = live + [spec for client in clients for spec in client]
    if draw(st.booleans()):
        # Times on a 5 s grid: events exactly at the watermark minus the lateness.
        specs = [(t - (t - BASE) % 5_000, *rest) for t, *rest in specs]
        live = specs[: len(live)]
    ids = [f"e{n:03d}" for n in draw(st.permutations(range(len(specs))))]

    sources = draw(st.integers(1, 3))
    # Per sub-log: (arrival, tiebreak, indexes into specs, is a late batch).
    lanes: list[list[tuple[int, int, list[int], bool]]] = [[] for _ in range(sources)]
    for i in range(len(live)):
        jitter = draw(st.one_of(st.sampled_from([0, ooo]), st.integers(0, ooo)))
        lanes[draw(st.integers(0, sources - 1))].append((specs[i][0] + jitter, i, [i], False))
    # Every live event t arrives at t + jitter <= t + ooo, and a batch whose newest
    # event is t' arrives at t' + delay >= t', so live events stay in the bound
    # whatever batches come before them: only batch events can be late.
    resent = 0
    delays = _delays(lateness, ooo)
    first = len(live)
    for client in clients:
        pos = 0
        while pos < len(client):
            size = draw(st.integers(1, 5))
            batch = list(range(first + pos, first + min(pos + size, len(client))))
            pos += size
            arrival = specs[batch[-1]][0] + draw(delays)
            lanes[draw(st.integers(0, sources - 1))].append((arrival, batch[0], batch, True))
            if draw(st.integers(0, 5)) == 0:  # the client retries: a copy, later
                arrival += draw(st.integers(0, lateness))
                lanes[draw(st.integers(0, sources - 1))].append((arrival, batch[0], batch, True))
                resent += len(batch)
        first += len(client)

    # Records per sub-log: a late batch alone; runs of 1 to 4 live events.
    timed: list[tuple[int, int, int, list[int]]] = []
    for src, lane in enumerate(lanes):
        lane.sort()
        lag = draw(st.sampled_from([0, 0, 0, 10_000, 3 * MIN]))
        run: list[int] = []
        size = draw(st.integers(1, 4))
        start = 0
        for arrival, _, members, is_batch in lane:
            if run and (is_batch or len(run) == size):
                timed.append((start + lag, src, len(timed), run))
                run = []
                size = draw(st.integers(1, 4))
            if is_batch:
                timed.append((arrival + lag, src, len(timed), members))
            else:
                if not run:
                    start = arrival
                run.extend(members)
        if run:
            timed.append((start + lag, src, len(timed), run))
    timed.sort()

    feed: list[tuple[int, RawBatch]] = []
    batches: set[int] = set()
    for n, (_, src, _, members) in enumerate(timed):
        skew = draw(st.sampled_from([0, 0, -2_000, 90_000]))
        events = [_event(specs[i], ids[i], durations, skew) for i in members]
        feed.append((src, RawBatch(received_at=NOW + n, events=events, skew_ms=skew)))
        if members[0] >= len(live):
            batches.add(n)
    ticks_after = set(draw(st.lists(st.integers(0, max(len(feed) - 1, 0)), max_size=4)))
    return Scenario(processing, window, sources, feed, ticks_after, resent, frozenset(batches))


@seed(HYPOTHESIS_SEED)
@settings(max_examples=50, deadline=None, database=None)
@given(scenarios())
def test_generated_disorder_stays_within_the_bound(sc: Scenario) -> None:
    """The premise of the equality: no event is late in its sub-log, ids repeat only when resent."""
    ooo = sc.processing.max_out_of_orderness_ms
    newest: dict[int, int] = {}
    ids: Counter[str] = Counter()
    for src, record in sc.feed:
        for e in record.events:
            t = epoch_ms(e.timestamp) + record.skew_ms
            assert t >= newest.get(src, t) - ooo
            newest[src] = max(newest.get(src, t), t)
            ids[e.event_id] += 1
    assert sum(ids.values()) - len(ids) <= sc.resent


# -- driving the processor ----------------------------------------------------------------


def _operations(sc: Scenario) -> list[tuple[str, Any, Any, int]]:
    """The calls one worker would make: tick/process at NOW, then two closing ticks."""
    remaining = Counter(src for src, _ in sc.feed)
    ops: list[tuple[str, Any, Any, int]] = [("tick", None, tuple(sorted(remaining)), NOW)]
    for n, (src, record) in enumerate(sc.feed):
        ops.append(("process", src, record, NOW))
        remaining[src] -= 1
        if n in sc.ticks_after:
            ops.append(("tick", None, tuple(s for s in sorted(remaining) if remaining[s]), NOW))
    ops.append(("tick", None, (), NOW + sc.processing.idle_timeout_ms))
    ops.append(("tick", None, (), FAR_FUTURE))
    return ops


@dataclass
class CallOutput:
    """What one call emitted, comparable across runs (sessions/rows in a stable order)."""

    events: list[EventsBatch]
    late: list[EventsBatch]
    sessions: list[Session]
    chart_rows: list[ChartRow]
    closed_until: int | None
    duplicates: int
    #: Promises of the call (not compared: a restored processor may repeat or delay
    #: them): sessions starting before ``sessions_until`` are final, and so are chart
    #: windows ending at or before ``final_until``.
    sessions_until: int | None = field(default=None, compare=False)
    final_until: int | None = field(default=None, compare=False)
    #: The processor's watermark after the call.
    watermark: int | None = field(default=None, compare=False)


def _run(
    sc: Scenario, restore_before: int | None = None, counters: dict[str, int] | None = None
) -> list[CallOutput]:
    """Every call's outputs; with ``restore_before``, the processor is snapshotted and
    replaced by one restored from the msgpack bytes just before that call. The
    processor's cumulative counters at the end go to ``counters`` if given.

    The restore happens at the wall-clock time of the last call before it (a restart
    right after the snapshot): restoring counts as activity of every known source, so
    a restore at a later time may legitimately delay an idle watermark.
    """
    from evd.state.processor import Outputs, PartitionProcessor

    proc = PartitionProcessor(PARTITION, sc.processing, sc.window_ms, now_ms=NOW)
    calls = []
    last_now = NOW
    for n, (op, src, arg, now) in enumerate(_operations(sc)):
        if n == restore_before:
            state = proc.snapshot()
            decoded = msgspec.msgpack.Decoder(type(state)).decode(msgspec.msgpack.encode(state))
            proc = PartitionProcessor(
                PARTITION, sc.processing, sc.window_ms, state=decoded, now_ms=last_now
            )
        last_now = now
        out = Outputs()
        if op == "process":
            proc.process(src, arg, now, out)
        else:
            proc.tick(now, arg, out)
        calls.append(
            CallOutput(
                events=list(out.events),
                late=list(out.late),
                sessions=sorted(out.sessions, key=lambda s: s.session_id),
                chart_rows=sorted(
                    out.chart_rows, key=lambda r: (r.window_start, r.country or "", r.track_id)
                ),
                closed_until=out.closed_until,
                duplicates=out.duplicates,
                sessions_until=out.sessions_until,
                final_until=out.final_until,
                watermark=proc.watermark,
            )
        )
    if counters is not None:
        counters["late"] = proc.late
        counters["late_forced"] = proc.late_forced
        counters["duplicates"] = proc.duplicates
    return calls


def _describe(sc: Scenario) -> str:
    header = (
        f"gap={sc.processing.session_gap_ms} ooo={sc.processing.max_out_of_orderness_ms} "
        f"lateness={sc.processing.allowed_lateness_ms} window={sc.window_ms} "
        f"sources={sc.sources} ticks_after={sorted(sc.ticks_after)}"
    )
    lines = [header]
    for n, (src, record) in enumerate(sc.feed):
        batch = " (late client's batch)" if n in sc.batches else ""
        lines.append(f"  source {src} skew {record.skew_ms}{batch}:")
        for e in record.events:
            t = int((e.timestamp - _EPOCH) / timedelta(milliseconds=1)) + record.skew_ms - BASE
            lines.append(
                f"    {e.event_id} t=+{t} {e.user_id} {e.event_type} T{TRACKS.index(e.track_id)} "
                f"pos={e.playback.position_ms}/{e.playback.duration_ms} "
                f"geo={e.geo and e.geo.country} os={e.device and e.device.os}"
            )
    return "\n".join(lines)


def check_against_reference(sc: Scenario) -> None:
    """The processor's outputs for ``sc`` equal the batch reference."""
    ref = compute([record for _, record in sc.feed], sc.processing, sc.window_ms)
    (note if currently_in_test_context() else print)(_describe(sc))
    calls = _run(sc)

    sessions = sorted((s for c in calls for s in c.sessions), key=lambda s: s.session_id)
    assert [s.session_id for s in sessions] == [s.session_id for s in ref.sessions]
    for got, want in zip(sessions, ref.sessions, strict=True):
        assert msgspec.to_builtins(got) == msgspec.to_builtins(want)

    assert sum_chart_rows(r for c in calls for r in c.chart_rows) == ref.charts
    # With no late events, the output is exactly today's: first revisions only.
    assert all(s.revision == 0 and not s.retracted for s in sessions)
    assert all(r.revision == 0 for c in calls for r in c.chart_rows)

    assert all(not c.late for c in calls)
    batches = [b for c in calls for b in c.events]
    assert all(not b.late for b in batches)
    got_ids = Counter(e.event_id for b in batches for e in b.events)
    assert got_ids == Counter(e.event_id for _, e in ref.events)
    assert sum(c.duplicates for c in calls) == ref.duplicates

    # Rows only for windows already closed; closed_until never goes back.
    closed = [c.closed_until for c in calls if c.closed_until is not None]
    assert closed == sorted(closed)
    for c in calls:
        for r in c.chart_rows:
            assert c.closed_until is not None
            assert r.window_start + sc.window_ms <= c.closed_until
    if ref.charts:
        assert closed and closed[-1] >= max(k[0] for k in ref.charts) + sc.window_ms


def late_oracle(sc: Scenario) -> tuple[set[str], list[int | None]]:
    """The event ids that are late in ``sc``, and the watermark after each record of
    the feed, from the contract alone.

    A sub-log's watermark is the newest event time read from it minus the
    out-of-orderness bound; the partition's is the minimum over the sub-logs, never
    decreasing, and there is none while one of them has delivered no event yet (the
    first tick reports every sub-log of the feed as having data, and with the wall
    clock constant none goes idle). An event is late when its time is below the
    watermark as it stood after the events read before it, minus the allowed
    lateness. Copies of an id already read are dropped before any of this.
    """
    ooo = sc.processing.max_out_of_orderness_ms
    lateness = sc.processing.allowed_lateness_ms
    newest: dict[int, int | None] = dict.fromkeys({src for src, _ in sc.feed})
    watermark: int | None = None
    seen: set[str] = set()
    late: set[str] = set()
    after: list[int | None] = []
    for src, record in sc.feed:
        for e in record.events:
            if e.event_id in seen:
                continue
            seen.add(e.event_id)
            t = epoch_ms(e.timestamp) + record.skew_ms
            if watermark is not None and t < watermark - lateness:
                late.add(e.event_id)
            top = newest[src]
            newest[src] = t if top is None else max(top, t)
            tops = list(newest.values())
            if all(top is not None for top in tops):
                lowest = min(top - ooo for top in tops if top is not None)
                watermark = lowest if watermark is None else max(watermark, lowest)
        after.append(watermark)
    return late, after


@dataclass
class LateCheck:
    """What ``check_late`` saw: for hand-written scenarios to assert their premise."""

    late: set[str]
    revised_sessions: int
    retracted: set[str]
    revised_rows: int
    #: Rows emitted after their window had closed (revisions, or a key's first row).
    rows_after_close: int


def check_late(sc: Scenario) -> LateCheck:
    """The processor's outputs for ``sc`` (late events allowed) against the reference of
    everything but the late events, the late events against ``late_oracle``, and the
    revision discipline of sessions and chart rows."""
    say = note if currently_in_test_context() else print
    say(_describe(sc))
    late, watermarks = late_oracle(sc)
    say(f"late (oracle): {sorted(late)}")
    on_time = [
        RawBatch(
            received_at=r.received_at,
            events=[e for e in r.events if e.event_id not in late],
            skew_ms=r.skew_ms,
        )
        for _, r in sc.feed
    ]
    ref = compute(on_time, sc.processing, sc.window_ms)
    everything = compute([r for _, r in sc.feed], sc.processing, sc.window_ms)
    counters: dict[str, int] = {}
    calls = _run(sc, counters=counters)
    # Counted late: all beyond the lateness (the buffer's bound is never reached here).
    assert counters == {"late": len(late), "late_forced": 0, "duplicates": everything.duplicates}
    # The watermark after each call (a tick at the constant wall clock moves nothing)
    # until the closing ticks.
    expected: int | None = None
    for (op, _, _, _), c, n in zip(_operations(sc), calls, count(-1), strict=True):
        if n == len(sc.feed) + len(sc.ticks_after):
            break
        if op == "process":
            expected = watermarks.pop(0)
        assert c.watermark == expected, f"watermark after operation {n + 1}"

    # Revisions per id count up from 0 in emission order; a retraction is the last
    # revision of its id.
    latest: dict[str, Session] = {}
    for c in calls:
        for s in c.sessions:  # stably sorted by id: one id's revisions in emission order
            before = latest.get(s.session_id)
            assert before is None or not before.retracted, f"{s.session_id} after its retraction"
            assert s.revision == (0 if before is None else before.revision + 1), s
            latest[s.session_id] = s
    retracted = {i for i, s in latest.items() if s.retracted}
    assert not retracted & {s.session_id for s in ref.sessions}
    current = sorted((s for s in latest.values() if not s.retracted), key=lambda s: s.session_id)
    assert [s.session_id for s in current] == [s.session_id for s in ref.sessions]
    for got, want in zip(current, ref.sessions, strict=True):
        assert msgspec.to_builtins(msgspec.structs.replace(got, revision=0)) == (
            msgspec.to_builtins(want)
        )

    rows: dict[tuple[int, str | None, str], ChartRow] = {}
    for c in calls:
        for r in c.chart_rows:
            key = (r.window_start, r.country, r.track_id)
            before_row = rows.get(key)
            assert r.revision == (0 if before_row is None else before_row.revision + 1), r
            assert before_row is None or r.plays >= before_row.plays, r
            rows[key] = r
    assert {k: r.plays for k, r in rows.items() if r.plays} == ref.charts

    # Late events: flagged in ``events``, alone in ``late``, exactly the oracle's.
    batches = [b for c in calls for b in c.events]
    flagged = [b.events[i].event_id for b in batches for i in b.late]
    assert sorted(flagged) == sorted(late)
    routed = [e.event_id for c in calls for b in c.late for e in b.events]
    assert sorted(routed) == sorted(late)
    assert all(b.late == list(range(len(b.events))) for c in calls for b in c.late)
    got_ids = Counter(e.event_id for b in batches for e in b.events)
    assert got_ids == Counter(e.event_id for _, e in everything.events)
    assert sum(c.duplicates for c in calls) == everything.duplicates

    # Rows only for closed windows (a revision: in a call that need not move it).
    closed = [c.closed_until for c in calls if c.closed_until is not None]
    assert closed == sorted(closed)
    closed_until: int | None = None
    rows_after_close = 0
    for c in calls:
        before_call = closed_until
        if c.closed_until is not None:
            closed_until = c.closed_until
        for r in c.chart_rows:
            assert closed_until is not None
            assert r.window_start + sc.window_ms <= closed_until
            if before_call is not None and r.window_start + sc.window_ms <= before_call:
                rows_after_close += 1
    # What a call promised final stays so: no later revision (nor retraction).
    sessions_final: int | None = None
    rows_final: int | None = None
    for c in calls:
        for s in c.sessions:
            assert sessions_final is None or s.started_at >= sessions_final, s
        for r in c.chart_rows:
            assert rows_final is None or r.window_start + sc.window_ms > rows_final, r
        if c.sessions_until is not None:
            sessions_final = c.sessions_until
        if c.final_until is not None:
            rows_final = c.final_until
    return LateCheck(
        late=late,
        revised_sessions=sum(1 for s in latest.values() if s.revision and not s.retracted),
        retracted=retracted,
        revised_rows=sum(1 for r in rows.values() if r.revision),
        rows_after_close=rows_after_close,
    )


def scenario(
    feed: list[tuple[int, RawBatch]], ticks_after: set[int] | None = None, **processing: int
) -> Scenario:
    """A hand-written scenario: records in reading order, received_at set from it."""
    for n, (_, record) in enumerate(feed):
        record.received_at = NOW + n
    resent = sum(len(r.events) for _, r in feed) - len(
        {e.event_id for _, r in feed for e in r.events}
    )
    return Scenario(
        ProcessingConfig(**processing),
        MIN,
        len({src for src, _ in feed}),
        feed,
        ticks_after or set(),
        resent,
    )


def test_tie_at_the_watermark_waits_for_its_equals() -> None:
    # With no out-of-orderness the watermark reaches t=0 after the first record; e1
    # (t=0) is not late, and must still come before e2 in sessions: it names the session.
    check_against_reference(
        scenario(
            [
                (0, rb(ev("e2", 0, "play", geo="US"))),
                (0, rb(ev("e1", 0, "pause", B, geo="SE"))),
                (0, rb(ev("e3", 1_000, "skip"))),
            ],
            max_out_of_orderness_ms=0,
        )
    )


def test_sub_logs_far_apart_hold_the_watermark() -> None:
    # Sub-log 1 runs an hour ahead; sub-log 0 holds the watermark back, so its events
    # are neither late nor out of order, and sessions spanning both come out whole.
    hour = 60 * MIN
    check_against_reference(
        scenario(
            [
                (1, rb(ev("b1", hour, "play", B, user="u2"), ev("a3", hour, "seek", pos=9))),
                (0, rb(ev("a1", 0, "play", dur=45_000))),
                (1, rb(ev("b2", hour + 40_000, "end", B, user="u2"))),
                (0, rb(ev("a2", 20_000, "pause"), ev("a1", 0, "play", dur=45_000))),
                (0, rb(ev("a4", 30_000, "resume", pos=20_000))),
            ],
            ticks_after={0, 2},
        )
    )


@seed(HYPOTHESIS_SEED)
@settings(max_examples=200, deadline=None, database=None)
@given(scenarios())
def test_processor_equals_batch_reference(sc: Scenario) -> None:
    note(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    check_against_reference(sc)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=100, deadline=None, database=None)
@given(scenarios(), st.data())
def test_snapshot_restore_continues_identically(sc: Scenario, data: st.DataObject) -> None:
    note(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    n_ops = len(_operations(sc))
    note(_describe(sc))
    cut = data.draw(st.integers(0, n_ops - 1), label="restore before operation")
    assert _run(sc, restore_before=cut) == _run(sc)


@seed(HYPOTHESIS_SEED)
@settings(max_examples=50, deadline=None, database=None)
@given(late_scenarios())
def test_late_clients_generated_premise(sc: Scenario) -> None:
    """Live events stay within the bound in their sub-log; only batch events repeat."""
    ooo = sc.processing.max_out_of_orderness_ms
    newest: dict[int, int] = {}
    ids: Counter[str] = Counter()
    for n, (src, record) in enumerate(sc.feed):
        for e in record.events:
            t = epoch_ms(e.timestamp) + record.skew_ms
            if n not in sc.batches:
                assert t >= newest.get(src, t) - ooo
            newest[src] = max(newest.get(src, t), t)
            ids[e.event_id] += 1
    assert sum(ids.values()) - len(ids) == sc.resent
    assert sc.batches


@seed(HYPOTHESIS_SEED)
@settings(max_examples=300, deadline=None, database=None)
@given(late_scenarios())
def test_late_clients_latest_revisions_equal_batch_reference(sc: Scenario) -> None:
    note(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    seen = check_late(sc)
    event(f"late events: {bool(seen.late)}")
    event(f"revised sessions: {bool(seen.revised_sessions)}")
    event(f"retractions: {bool(seen.retracted)}")
    event(f"revised chart rows: {bool(seen.revised_rows)}")
    event(f"chart rows after their window closed: {bool(seen.rows_after_close)}")


@seed(HYPOTHESIS_SEED)
@settings(max_examples=100, deadline=None, database=None)
@given(late_scenarios(), st.data())
def test_late_clients_snapshot_restore_continues_identically(
    sc: Scenario, data: st.DataObject
) -> None:
    note(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    n_ops = len(_operations(sc))
    note(_describe(sc))
    cut = data.draw(st.integers(0, n_ops - 1), label="restore before operation")
    assert _run(sc, restore_before=cut) == _run(sc)


# -- late data: hand-written scenarios ----------------------------------------------------


def test_late_oracle_on_a_hand_example() -> None:
    # ooo 1 s, lateness 2 min; sub-log 1 holds the watermark until it delivers.
    sc = scenario(
        [
            (0, rb(ev("a1", 10 * MIN, user="u2"))),
            (0, rb(ev("x1", 0))),  # sub-log 1 has no event yet: no watermark, not late
            (1, rb(ev("b1", 10 * MIN, user="u3"))),  # watermark 10 min - 1 s
            (
                1,
                rb(
                    ev("x2", 8 * MIN - 1_000),  # exactly watermark - lateness: not late
                    ev("x3", 8 * MIN - 1_001),  # 1 ms older: late
                ),
            ),
            (0, rb(ev("a2", 20 * MIN, user="u2"))),  # sub-log 1 still holds at 10 min - 1 s
            (0, rb(ev("x4", 8 * MIN - 1_001))),  # late
            (1, rb(ev("b2", 30 * MIN, user="u3"), ev("x5", 18 * MIN - 1_000))),  # 20 min - 1 s
            (0, rb(ev("x6", 18 * MIN - 1_001), ev("x3", 0))),  # late; x3 again: a duplicate
        ],
        max_out_of_orderness_ms=1_000,
        allowed_lateness_ms=2 * MIN,
    )
    assert late_oracle(sc)[0] == {"x3", "x4", "x6"}


def test_late_play_revises_the_session_and_the_chart_row() -> None:
    seen = check_late(
        scenario(
            [
                (0, rb(ev("a1", 0))),
                (0, rb(ev("b1", 3 * MIN, "play", B, user="u2"))),  # closes a1's session, window 0
                (0, rb(ev("a2", 30_000, "pause"), ev("a3", 40_000, "play"))),  # late client
                (0, rb(ev("b2", 4 * MIN, "end", B, user="u2"))),
            ],
            max_out_of_orderness_ms=0,
            session_gap_ms=MIN,
            allowed_lateness_ms=5 * MIN,
        )
    )
    assert seen.late == set() and not seen.retracted
    assert seen.revised_sessions == 1 and seen.revised_rows == 1


def test_late_event_before_the_first_one_retracts_the_session() -> None:
    seen = check_late(
        scenario(
            [
                (0, rb(ev("a1", MIN, "play"))),
                (1, rb(ev("b1", 4 * MIN, "play", B, user="u2"))),
                (0, rb(ev("b2", 4 * MIN, "end", B, user="u2"))),  # a1's session closes
                (1, rb(ev("a0", 30_000, "pause"))),  # now first of the session: a new id
            ],
            max_out_of_orderness_ms=0,
            session_gap_ms=MIN,
            allowed_lateness_ms=5 * MIN,
        )
    )
    assert seen.late == set()
    assert seen.retracted == {session_id("u1", "a1")}


def test_late_events_filling_the_gap_merge_two_sessions() -> None:
    seen = check_late(
        scenario(
            [
                (0, rb(ev("a1", 0, "play"), ev("a2", 3 * MIN, "seek", pos=9_000))),
                (0, rb(ev("b1", 5 * MIN, "play", B, user="u2"))),  # both sessions closed
                (
                    0,
                    rb(
                        ev("m3", 150_000, "pause"),
                        ev("m1", 50_000, "pause"),
                        ev("m2", 100_000, "resume", pos=1_000),
                    ),
                ),
                (0, rb(ev("b2", 6 * MIN, "end", B, user="u2"))),
            ],
            max_out_of_orderness_ms=0,
            session_gap_ms=MIN,
            allowed_lateness_ms=5 * MIN,
        )
    )
    assert seen.late == set()
    assert seen.retracted == {session_id("u1", "a2")}
    assert seen.revised_sessions == 1


def test_events_beyond_the_lateness_are_late_and_change_nothing() -> None:
    seen = check_late(
        scenario(
            [
                (0, rb(ev("a1", 0, "play"), ev("b1", 10 * MIN, "play", B, user="u2"))),
                (
                    0,
                    rb(
                        ev("a2", 8 * MIN, "pause"),  # exactly watermark - lateness: applied
                        ev("a3", 8 * MIN - 1, "play", B),  # 1 ms older: late
                        ev("a0", -MIN, "play"),  # late, though it would retract a1's session
                    ),
                ),
                (0, rb(ev("b2", 11 * MIN, "end", B, user="u2"))),
            ],
            max_out_of_orderness_ms=0,
            session_gap_ms=MIN,
            allowed_lateness_ms=2 * MIN,
        )
    )
    assert seen.late == {"a3", "a0"}
    assert not seen.retracted

"""Every rule of the partition processor (ARCHITECTURE.md "Processing semantics"),
one small hand-computed case each, without I/O.

Times are written relative to BASE (a multiple of the chart window): ``ev("e1", 40_000)``
is an event whose pipeline time is BASE + 40 s.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from evdtest import track_id

from evd.core.config import ProcessingConfig
from evd.core.schema import (
    ChartRow,
    Device,
    Event,
    EventType,
    Geo,
    Play,
    Playback,
    RawBatch,
    Session,
)
from evd.state.dedup import DedupState, DedupWindow
from evd.state.processor import (
    STATE_VERSION,
    Outputs,
    PartitionProcessor,
    PartitionState,
    StateVersionError,
)
from evd.state.revisions import StreamRevisions
from evd.state.sessions import session_id
from evd.state.watermark import BufferedEvent, EventBuffer

pytestmark = pytest.mark.workers_independent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN = 60_000
BASE = 1_700_000_040_000  # a multiple of MIN
assert BASE % MIN == 0
#: Wall clock of process() calls unless a test moves it.
NOW = 1_800_000_000_000
GAP = 30 * MIN
OOO = 5_000
A, B, C = track_id(1), track_id(2), track_id(3)
_decoder = msgspec.msgpack.Decoder(PartitionState)


def at(t: int) -> datetime:
    """The aware datetime of epoch ms ``t`` (exact, unlike fromtimestamp)."""
    return _EPOCH + timedelta(milliseconds=t)


def ev(
    event_id: str,
    t: int,
    kind: EventType = "play",
    track: str = A,
    pos: int = 0,
    dur: int = 200_000,
    user: str = "u1",
    geo: str | None = "US",
    os: str | None = "ios",
) -> Event:
    """An event at pipeline time BASE + ``t`` (in a record without skew)."""
    return Event(
        event_id=event_id,
        timestamp=at(BASE + t),
        user_id=user,
        track_id=track,
        playback=Playback(position_ms=pos, duration_ms=dur),
        event_type=kind,
        geo=None if geo is None else Geo(geo),
        device=None if os is None else Device(os=os),
    )


def rb(*events: Event, received_at: int = NOW, skew: int = 0) -> RawBatch:
    return RawBatch(received_at=received_at, events=list(events), skew_ms=skew)


def proc(now: int = NOW, **processing: Any) -> PartitionProcessor:
    return PartitionProcessor(0, ProcessingConfig(**processing), MIN, now_ms=now)


def feed(
    p: PartitionProcessor,
    *batches: RawBatch,
    source: int = 0,
    now: int = NOW,
    out: Outputs | None = None,
) -> Outputs:
    out = Outputs() if out is None else out
    for batch in batches:
        p.process(source, batch, now, out)
    return out


def close_all(p: PartitionProcessor, out: Outputs | None = None) -> Outputs:
    """A tick far past every event: everything open closes (sources idle by then)."""
    out = Outputs() if out is None else out
    p.tick(BASE + 10**12, (), out)
    return out


def ids(out: Outputs) -> list[str]:
    return [e.event_id for batch in out.events for e in batch.events]


def one_session(out: Outputs) -> Session:
    assert len(out.sessions) == 1, out.sessions
    return out.sessions[0]


def sid(user: str, first: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"evd:session:{user}:{first}"))


# -- dedup ----------------------------------------------------------------------------


def test_an_id_seen_within_the_window_is_dropped_and_counted() -> None:
    p = proc()
    out = feed(p, rb(ev("e1", 0), ev("e2", 1)), rb(ev("e2", 2), ev("e3", 3)))
    assert ids(out) == ["e1", "e2", "e3"]
    assert out.duplicates == 1 and p.duplicates == 1
    out = close_all(p)
    assert one_session(out).event_count == 3  # the copy reached no session


def test_a_repeat_inside_one_record_is_a_duplicate() -> None:
    p = proc()
    out = feed(p, rb(ev("e1", 0), ev("e1", 0), ev("e2", 5), ev("e1", 9)))
    assert ids(out) == ["e1", "e2"]
    assert out.duplicates == 2


def test_an_id_is_forgotten_once_older_than_the_window_by_received_at() -> None:
    p = proc(dedup_window_s=10.0)
    r0 = NOW
    out = feed(p, rb(ev("x", 0), received_at=r0), rb(ev("y", 1), received_at=r0 + 10_000))
    # Exactly the window old: still remembered.
    out = feed(p, rb(ev("x", 2), received_at=r0 + 10_000))
    assert out.duplicates == 1
    # One ms more and x is older than newest received_at - window.
    out = feed(p, rb(ev("x", 3), ev("y", 4), received_at=r0 + 10_001))
    assert ids(out) == ["x"] and out.duplicates == 1


def test_a_record_older_than_the_window_leaves_no_ids_behind() -> None:
    p = proc(dedup_window_s=10.0)
    feed(p, rb(ev("a", 0), received_at=NOW + 60_000))
    # A lagging writer's record: checked against the window, but too old to remember.
    out = feed(p, rb(ev("old", 1), ev("old", 2), received_at=NOW))
    assert ids(out) == ["old"] and out.duplicates == 1
    out = feed(p, rb(ev("old", 3), received_at=NOW + 60_000))
    assert ids(out) == ["old"]


def test_at_most_max_ids_are_remembered_oldest_forgotten_first() -> None:
    p = proc(dedup_max_ids=3)
    feed(p, rb(ev("a", 0), ev("b", 1)), rb(ev("c", 2), ev("d", 3)))
    out = feed(p, rb(ev("b", 4), ev("a", 5)))
    # a was the oldest of four: forgotten; b, c, d remain.
    assert ids(out) == ["a"] and out.duplicates == 1


def test_the_oldest_by_received_at_is_forgotten_first_also_after_a_restore() -> None:
    w = DedupWindow(10_000, 3)
    w.filter(5, [ev("a", 0)])
    w.filter(1, [ev("b", 0)])  # an older received_at, from a writer behind the others
    w.filter(5, [ev("c", 0)])
    blob = msgspec.msgpack.encode(w.snapshot())
    restored = DedupWindow(10_000, 3, msgspec.msgpack.decode(blob, type=DedupState))
    for window in (w, restored):
        kept = [window.filter(5, [ev(i, 0) for i in batch]) for batch in ("d", "ba", "a")]
        # d pushes out b (received_at 1), then b pushes out a (the older of a and c).
        assert [[e.event_id for e in k] for k in kept] == [["d"], ["b"], ["a"]]


# -- watermarks -----------------------------------------------------------------------


def test_watermark_is_newest_event_time_minus_out_of_orderness() -> None:
    p = proc()
    assert p.watermark is None
    feed(p, rb(ev("e1", 10_000, user="a"), ev("e2", 30_000, user="b"), ev("e3", 20_000)))
    assert p.watermark == BASE + 30_000 - OOO


def test_skew_corrects_event_time() -> None:
    p = proc()
    e = ev("e1", 10_000)
    feed(p, rb(e, skew=7_000))
    assert p.watermark == BASE + 17_000 - OOO
    out = close_all(p)
    assert one_session(out).started_at == BASE + 17_000


def test_partition_watermark_is_the_minimum_over_sources_and_never_decreases() -> None:
    p = proc()
    feed(p, rb(ev("a1", 50_000, user="a")), source=0)
    assert p.watermark == BASE + 45_000
    feed(p, rb(ev("b1", 20_000, user="b")), source=1)
    # Source 1 is behind, but the partition watermark does not go back.
    assert p.watermark == BASE + 45_000
    feed(p, rb(ev("a2", 90_000, user="a")), source=0)
    assert p.watermark == BASE + 45_000  # held by source 1 at 15 s
    feed(p, rb(ev("b2", 60_000, user="b")), source=1)
    assert p.watermark == BASE + 55_000
    feed(p, rb(ev("b3", 200_000, user="b")), source=1)
    assert p.watermark == BASE + 85_000  # now source 0 holds it


def test_a_source_that_goes_idle_stops_holding_the_watermark() -> None:
    p = proc(idle_timeout_ms=10_000)
    feed(p, rb(ev("b1", 10_000, user="b")), source=1, now=NOW)
    feed(p, rb(ev("a1", 60_000, user="a")), source=0, now=NOW + 5_000)
    assert p.watermark == BASE + 5_000
    p.tick(NOW + 9_999, (), Outputs())
    assert p.watermark == BASE + 5_000  # source 1 still active
    p.tick(NOW + 10_000, (), Outputs())
    assert p.watermark == BASE + 55_000  # idle: only source 0 counts
    # Idle, source 1 no longer holds the next record of source 0 either.
    feed(p, rb(ev("a2", 80_000, user="a")), source=0, now=NOW + 11_000)
    assert p.watermark == BASE + 75_000


def test_an_idle_partition_advances_with_the_wall_clock() -> None:
    p = proc(now=NOW, idle_timeout_ms=10_000)
    p.tick(NOW + 9_999, (), Outputs())
    assert p.watermark is None  # no source known, but not idle for long enough yet
    out = Outputs()
    p.tick(NOW + 10_000, (), out)
    assert p.watermark == NOW + 10_000 - OOO
    assert out.closed_until == (NOW + 5_000) // MIN * MIN

    # With known sources: once every one is idle, the wall clock drives it.
    q = proc(now=NOW, idle_timeout_ms=10_000)
    feed(q, rb(ev("a1", 0)), source=0, now=NOW)
    q.tick(NOW + 9_000, (), Outputs())
    assert q.watermark == BASE - OOO
    q.tick(NOW + 10_000, (), Outputs())
    assert q.watermark == NOW + 10_000 - OOO
    # Never backwards: a wall clock behind the events changes nothing.
    r = proc(now=BASE - 600_000, idle_timeout_ms=10_000)
    feed(r, rb(ev("a1", 0)), now=BASE - 600_000)
    r.tick(BASE - 500_000, (), Outputs())
    assert r.watermark == BASE - OOO


def test_a_source_with_backlog_but_no_events_yet_holds_the_watermark() -> None:
    p = proc(idle_timeout_ms=10_000)
    p.tick(NOW, [1], Outputs())  # source 1 has unread data, nothing delivered yet
    feed(p, rb(ev("a1", 60_000)), source=0, now=NOW + 1_000)
    assert p.watermark is None
    p.tick(NOW + 9_000, [1], Outputs())  # still has a backlog: active now
    # Source 0 is kept active by a backlog of its own from here on.
    p.tick(NOW + 18_000, [0], Outputs())
    assert p.watermark is None  # source 1 is active until 9 s + the idle timeout
    p.tick(NOW + 19_000, [0], Outputs())
    assert p.watermark == BASE + 55_000


def test_a_backlog_keeps_a_source_with_events_active() -> None:
    p = proc(idle_timeout_ms=10_000)
    feed(p, rb(ev("b1", 0, user="b")), source=1, now=NOW)
    feed(p, rb(ev("a1", 60_000)), source=0, now=NOW)
    p.tick(NOW + 50_000, [1], Outputs())
    assert p.watermark == BASE - OOO  # source 1 has unread data: it holds
    p.tick(NOW + 60_000, [0], Outputs())
    assert p.watermark == BASE + 55_000  # source 1 idle, source 0 has a backlog


def test_disorder_within_the_bound_gives_the_sessions_of_in_order_input(
    rng: random.Random,
) -> None:
    events = _history(rng, users=6, per_user=40)
    in_order = sorted(events, key=lambda e: (_t(e), e.event_id))
    # Arrival order by t + jitter < the bound: no event arrives later than bound - 1 ms
    # after a newer one, so none is late.
    jitter = {e.event_id: rng.randrange(OOO) for e in events}
    disordered = sorted(events, key=lambda e: _t(e) + jitter[e.event_id])

    results = []
    for order in (in_order, disordered):
        p = proc()
        out = Outputs()
        i = 0
        while i < len(order):
            n = rng.randint(1, 12)
            p.process(rng.randrange(2), rb(*order[i : i + n]), NOW, out)
            i += n
        close_all(p, out)
        assert p.late == 0
        rows: dict[tuple[int, str | None, str], int] = {}
        for r in out.chart_rows:
            key = (r.window_start, r.country, r.track_id)
            assert key not in rows
            rows[key] = r.plays
        results.append((sorted(out.sessions, key=lambda s: s.session_id), rows))
    assert results[0] == results[1]
    assert len(results[0][0]) >= 6 and results[0][1]


def test_an_event_beyond_the_bound_is_late() -> None:
    p = proc(allowed_lateness_ms=0)
    out = feed(p, rb(ev("e1", 60_000), ev("e2", 54_999, user="b"), ev("e3", 55_000, user="c")))
    # e2 is older than watermark (55 s) - allowed lateness (0); e3 is not.
    assert [b.late for b in out.events] == [[1]]
    assert ids(out) == ["e1", "e2", "e3"]
    assert len(out.late) == 1
    assert [e.event_id for e in out.late[0].events] == ["e2"] and out.late[0].late == [0]
    assert p.late == 1
    out = close_all(p)
    assert sorted(s.user_id for s in out.sessions) == ["c", "u1"]  # no session for b
    assert sum(r.plays for r in out.chart_rows) == 2  # nor a chart count


def test_allowed_lateness_widens_the_bound() -> None:
    p = proc(allowed_lateness_ms=2_000)
    out = feed(p, rb(ev("e1", 60_000), ev("e2", 53_000, user="b"), ev("e3", 52_999, user="c")))
    assert out.events[0].late == [2]


def test_nothing_is_late_before_there_is_a_watermark() -> None:
    p = proc()
    p.tick(NOW, [1], Outputs())  # source 1 holds: no watermark
    out = feed(p, rb(ev("e1", 60_000), ev("e2", 0, user="b")))
    assert p.watermark is None and out.late == [] and out.events[0].late == []


def test_late_routing_uses_the_watermark_as_it_moves_inside_a_record() -> None:
    p = proc(allowed_lateness_ms=0)
    out = feed(p, rb(ev("e1", 0), ev("e2", 100_000, user="b"), ev("e3", 1_000, user="c")))
    assert out.events[0].late == [2]


def test_events_wait_in_the_buffer_until_the_watermark_passes_them() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0), ev("e2", 4_999, kind="pause")))
    assert p.watermark == BASE - 1 and p.buffered == 2 and p.open_sessions == 0
    feed(p, rb(ev("x", 5_001, user="x")))
    assert p.watermark == BASE + 1 and p.buffered == 2  # e1 released: t < watermark
    assert p.open_sessions == 1
    feed(p, rb(ev("y", 9_999, user="y")))
    assert p.buffered == 3  # e2 at 4 999 waits: release is strictly below the watermark
    feed(p, rb(ev("z", 10_000, user="z")))
    assert p.buffered == 3  # e2 released; x, y, z wait


# -- sessions -------------------------------------------------------------------------


def test_play_pause_resume_seek_skip() -> None:
    p = proc()
    feed(
        p,
        rb(
            ev("e1", 0, "play", pos=0, dur=200_000),
            ev("e2", 40_000, "pause", pos=40_000),
            ev("e3", 100_000, "resume", pos=40_000),
        ),
        rb(ev("e4", 110_000, "seek", pos=150_000), ev("e5", 130_000, "skip", pos=170_000)),
    )
    out = close_all(p)
    # 40 s until the pause, 10 s after the resume, 20 s after the seek.
    assert one_session(out) == Session(
        session_id=sid("u1", "e1"),
        user_id="u1",
        started_at=BASE,
        ended_at=BASE + 130_000,
        event_count=5,
        play_count=1,
        stream_count=1,
        listened_ms=70_000,
        country="US",
        os="ios",
        plays=[Play(A, BASE, 70_000, "skip")],
    )


def test_end_closes_the_play_and_time_stops_at_the_duration() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0, pos=150_000, dur=180_000), ev("e2", 60_000, "end", pos=180_000)))
    s = one_session(close_all(p))
    # Only 30 s were left to play; the clock stops at the track's end.
    assert s.plays == [Play(A, BASE, 30_000, "end")] and s.stream_count == 1


def test_seek_while_paused_and_resume_at_the_events_position() -> None:
    p = proc()
    feed(
        p,
        rb(
            ev("e1", 0, pos=10_000),
            ev("e2", 5_000, "pause"),
            ev("e3", 50_000, "seek", pos=100_000),
            ev("e4", 60_000, "resume", pos=120_000),
            ev("e5", 70_000, "end"),
        ),
    )
    s = one_session(close_all(p))
    assert s.plays == [Play(A, BASE, 15_000, "end")]


def test_a_play_interrupts_the_open_play() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0, track=A), ev("e2", 45_000, track=B), ev("e3", 50_000, "end", track=B)))
    s = one_session(close_all(p))
    assert s.plays == [Play(A, BASE, 45_000, "play"), Play(B, BASE + 45_000, 5_000, "end")]
    assert (s.play_count, s.stream_count, s.listened_ms) == (2, 1, 50_000)


def test_events_for_another_track_only_count() -> None:
    p = proc()
    feed(
        p,
        rb(
            ev("e1", 0, track=A),
            ev("e2", 10_000, "pause", track=B),
            ev("e3", 20_000, "seek", track=B, pos=190_000),
            ev("e4", 30_000, "skip", track=B),
            ev("e5", 40_000, "end", track=A),
            ev("e6", 50_000, "pause", track=A),  # no open play any more
            ev("e7", 60_000, "resume", track=A, pos=0),
        ),
    )
    s = one_session(close_all(p))
    assert s.event_count == 7 and s.play_count == 1
    assert s.plays == [Play(A, BASE, 40_000, "end")]


def test_a_gap_longer_than_session_gap_starts_a_new_session() -> None:
    p = proc()
    out = feed(
        p,
        rb(ev("e1", 0), ev("e2", 10_000, "end")),
        rb(ev("e3", 10_000 + GAP, kind="play")),  # exactly the gap: same session
        rb(ev("e4", 10_000 + 2 * GAP + 1, kind="play")),  # gap + 1 ms: a new one
        rb(ev("e5", 10_000 + 2 * GAP + 2 + OOO)),  # releases e4
    )
    first = one_session(out)  # closed by the gap when e4 was applied
    assert first.session_id == sid("u1", "e1")
    assert (first.event_count, first.started_at, first.ended_at) == (3, BASE, BASE + 10_000 + GAP)
    # e3's play was still playing: it accrues min(duration - position, gap).
    assert first.plays[-1] == Play(A, BASE + 10_000 + GAP, 200_000, "session_close")
    second = one_session(close_all(p))
    assert second.session_id == sid("u1", "e4") and second.event_count == 2


def test_a_session_closes_when_the_watermark_passes_last_event_plus_gap() -> None:
    # The source goes idle, so the wall clock drives the watermark (via tick).
    end = BASE + 20_000 + GAP
    p = proc(now=end - 10_000, idle_timeout_ms=10_000)
    feed(p, rb(ev("e1", 0), ev("e2", 20_000, "pause")), now=end - 10_000)
    out = Outputs()
    p.tick(end + OOO, (), out)
    # Watermark exactly last event + gap: still open; one more ms: closed.
    assert p.watermark == end and out.sessions == [] and p.open_sessions == 1
    p.tick(end + OOO + 1, (), out)
    s = one_session(out)
    assert p.open_sessions == 0
    assert s.plays == [Play(A, BASE, 20_000, "session_close")]  # paused: no accrual


def test_session_close_accrues_a_playing_play_up_to_the_gap() -> None:
    p = proc(session_gap_ms=60_000)
    feed(p, rb(ev("e1", 0, pos=0, dur=600_000), ev("e2", 10_000, "play", track=B, dur=50_000)))
    feed(p, rb(ev("e3", 20_000, "seek", track=B, pos=20_000)))
    s = one_session(close_all(p))
    # A: 10 s; B: 10 s, then seek to 20 s, then min(50 - 20, 60) = 30 s more.
    assert s.plays == [
        Play(A, BASE, 10_000, "play"),
        Play(B, BASE + 10_000, 40_000, "session_close"),
    ]

    q = proc(session_gap_ms=60_000)
    feed(q, rb(ev("e1", 0, pos=0, dur=600_000)))
    s = one_session(close_all(q))
    assert s.plays == [Play(A, BASE, 60_000, "session_close")]  # the gap bounds it


def test_a_stream_is_a_play_of_at_least_30000_ms() -> None:
    p = proc()
    feed(
        p,
        rb(
            ev("e1", 0, track=A),
            ev("e2", 29_999, "skip", track=A),
            ev("e3", 40_000, track=B),
            ev("e4", 70_000, "end", track=B),
        ),
    )
    s = one_session(close_all(p))
    assert [pl.listened_ms for pl in s.plays] == [29_999, 30_000]
    assert s.stream_count == 1 and s.listened_ms == 59_999


def test_session_id_is_uuid5_of_user_and_first_event() -> None:
    p = proc()
    feed(p, rb(ev("first-id", 0, user="alice"), ev("second", 1_000, user="alice")))
    s = one_session(close_all(p))
    assert s.session_id == str(uuid.uuid5(uuid.NAMESPACE_URL, "evd:session:alice:first-id"))
    assert uuid.UUID(s.session_id).version == 5


def test_session_id_spells_out_uuid5(rng: random.Random) -> None:
    alphabet = "abcXYZ019-_:é€😀"
    for _ in range(500):
        user = "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
        first = "".join(rng.choices(alphabet, k=rng.randint(1, 64)))
        expected = str(uuid.uuid5(uuid.NAMESPACE_URL, f"evd:session:{user}:{first}"))
        assert session_id(user, first) == expected


def test_the_first_event_in_time_order_starts_the_session() -> None:
    p = proc()
    feed(p, rb(ev("late-id", 1_000), ev("early-id", 0)))
    s = one_session(close_all(p))
    assert s.session_id == sid("u1", "early-id") and s.started_at == BASE


def test_ties_in_time_are_applied_in_event_id_order() -> None:
    p = proc()
    feed(p, rb(ev("b", 0, track=B), ev("a", 0, track=A)))
    s = one_session(close_all(p))
    assert s.session_id == sid("u1", "a")
    assert s.plays == [Play(A, BASE, 0, "play"), Play(B, BASE, 200_000, "session_close")]


def test_two_users_interleaved_get_their_own_sessions() -> None:
    p = proc()
    feed(
        p,
        rb(ev("a1", 0, user="a", track=A), ev("b1", 1_000, user="b", track=B, geo="SE")),
        rb(
            ev("b2", 2_000, "pause", user="b", track=B),
            ev("a2", 2_500, "seek", user="a", track=A, pos=100_000),
            ev("b3", 3_000, "skip", user="b", track=B),
            ev("a3", 31_000, "end", user="a", track=A),
        ),
    )
    out = close_all(p)
    by_user = {s.user_id: s for s in out.sessions}
    assert by_user["a"].plays == [Play(A, BASE, 31_000, "end")]
    assert p.late == 0
    assert by_user["a"].country == "US" and by_user["b"].country == "SE"
    assert by_user["b"].plays == [Play(B, BASE + 1_000, 1_000, "skip")]
    assert (by_user["a"].event_count, by_user["b"].event_count) == (3, 3)


def test_country_and_os_come_from_the_first_event_that_has_them() -> None:
    p = proc()
    feed(
        p,
        rb(
            ev("e1", 0, geo=None, os=None),
            ev("e2", 1_000, "pause", geo="DE", os=None),
            ev("e3", 2_000, "resume", geo="FR", os="android"),
            ev("e4", 3_000, "pause", geo="GB", os="ios"),
        ),
    )
    s = one_session(close_all(p))
    assert (s.country, s.os) == ("DE", "android")
    q = proc()
    feed(q, rb(ev("e1", 0, geo=None, os=None)))
    s = one_session(close_all(q))
    assert (s.country, s.os) == (None, None)


def test_open_sessions_are_not_flushed_without_the_watermark() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0)), rb(ev("e2", 60_000, user="b")))
    assert p.open_sessions == 1 and p.buffered == 1
    p.tick(NOW, [0], Outputs())
    assert p.open_sessions == 1


# -- charts ---------------------------------------------------------------------------


def test_chart_windows_count_plays_and_close_with_the_watermark() -> None:
    p = proc()
    out = feed(
        p,
        rb(
            ev("e1", 0, track=A, user="a"),
            ev("e4", 10_000, track=A, user="c", geo="SE"),
            ev("e5", 20_000, track=B, user="d", geo=None),
            ev("e3", 30_000, "pause", track=A, user="a"),
            ev("e2", 59_999, track=A, user="b"),
            ev("e6", 60_000, track=A, user="e"),
        ),
    )
    # Watermark 55 s: no window closed, closed_until (55 s // 60 s) * 60 s = BASE.
    assert out.chart_rows == [] and out.closed_until == BASE and p.late == 0
    out = feed(p, rb(ev("e7", 64_999, "pause", user="e")))
    assert out.chart_rows == [] and out.closed_until is None  # not advanced: left as is
    out = feed(p, rb(ev("e8", 65_000, "pause", user="e")))
    assert out.closed_until == BASE + MIN
    assert sorted(out.chart_rows, key=lambda r: (r.country or "", r.track_id)) == [
        ChartRow(BASE, None, B, 1),
        ChartRow(BASE, "SE", A, 1),
        ChartRow(BASE, "US", A, 2),
    ]
    out = close_all(p)
    assert out.chart_rows == [ChartRow(BASE + MIN, "US", A, 1)]
    assert out.closed_until is not None and out.closed_until > BASE + MIN


def test_closed_until_advances_without_rows() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0, "pause")))
    out = feed(p, rb(ev("e2", 3 * MIN + OOO, "pause", user="b")))
    assert out.chart_rows == [] and out.closed_until == BASE + 3 * MIN


def test_a_play_into_a_closed_window_counts_in_a_new_row() -> None:
    # e2 is not late (within the lateness) but its window has closed: its row has not
    # been emitted yet (the window had no plays of that key), so it is revision 0.
    p = proc(allowed_lateness_ms=30_000)
    out = feed(p, rb(ev("e1", 65_000, user="a")), rb(ev("e2", 50_000, user="b")))
    assert out.closed_until == BASE + MIN and out.events[1].late == []
    assert [(r.window_start, r.plays, r.revision) for r in out.chart_rows] == [(BASE, 1, 0)]
    out = close_all(p, out)
    assert [(r.window_start, r.plays) for r in out.chart_rows] == [(BASE, 1), (BASE + MIN, 1)]
    assert len(out.sessions) == 2  # sessions still see it


# -- the buffer's bound ---------------------------------------------------------------


def test_above_max_buffered_events_the_oldest_are_forced_out() -> None:
    p = proc(max_buffered_events=3)
    out = feed(
        p,
        rb(
            ev("e5", 50_000, user="e"),
            ev("e1", 10_000, user="a"),
            ev("e3", 30_000, user="c"),
            ev("e2", 20_000, user="b"),
            ev("e4", 40_000, user="d"),
        ),
    )
    # Watermark 45 s releases e1..e4 normally; e5 waits: no force needed.
    assert p.forced == 0 and p.buffered == 1
    q = proc(max_buffered_events=3, max_out_of_orderness_ms=600_000)
    feed(q, rb(ev("e1", 10_000, user="a"), ev("e2", 20_000, user="b"), ev("e3", 20_000, user="c")))
    assert q.buffered == 3 and q.forced == 0 and q.watermark == BASE + 20_000 - 600_000
    out = feed(q, rb(ev("e4", 40_000, user="d"), ev("e5", 50_000, user="e")))
    # Five waiting, bound three: e1 and e2 forced; the watermark moves to e2 + 1 ms, which
    # releases e3 (tied with e2 in time) as well.
    assert q.forced == 2 and q.buffered == 2 and q.watermark == BASE + 20_001
    # 20 s is within the lateness of the watermark events alone give (20 s - 10 min):
    # late only because of the bound.
    out = feed(q, rb(ev("late", 20_000, user="f")))
    assert out.events[0].late == [] and out.late_forced == 0
    r = proc(max_buffered_events=3, max_out_of_orderness_ms=600_000, allowed_lateness_ms=0)
    feed(r, rb(*(ev(f"e{n}", n * 10_000, user="abcde"[n - 1]) for n in range(1, 6))))
    assert r.watermark == BASE + 20_001
    out = feed(r, rb(ev("late", 20_000, user="f")))
    assert out.events[0].late == [0] and out.late_forced == 1 and r.late_forced == 1
    out = close_all(q)
    assert sorted(s.user_id for s in out.sessions) == ["a", "b", "c", "d", "e", "f"]


def test_event_buffer_releases_in_time_then_id_order(rng: random.Random) -> None:
    events = [ev(f"id{rng.randrange(10**6):06d}-{i}", rng.randrange(3_000)) for i in range(400)]
    times = [BASE + rng.randrange(3_000) for _ in events]
    buf = EventBuffer()
    buf.push(times, events)
    got: list[tuple[int, str, Event]] = []
    buf.pop_before(BASE + 1_000, got)
    buf.push([BASE + 1_000], [ev("tie", 0)])
    buf.pop_oldest(7, got)
    restored = EventBuffer(
        msgspec.msgpack.decode(msgspec.msgpack.encode(buf.snapshot()), type=list[BufferedEvent])
    )
    rest: list[tuple[int, str, Event]] = []
    restored.pop_before(BASE + 10**6, rest)
    got += rest
    keys = [(t, eid) for t, eid, _ in got]
    assert keys == sorted(keys) and len(keys) == 401 and len(restored) == 0


# -- snapshots ------------------------------------------------------------------------


def test_snapshot_restore_continues_exactly_as_the_uninterrupted_processor(
    rng: random.Random,
) -> None:
    events = _history(rng, users=8, per_user=60)
    jitter = {e.event_id: rng.randrange(2 * OOO) for e in events}  # some late ones too
    arrival = sorted(events, key=lambda e: _t(e) + jitter[e.event_id])
    arrival += [arrival[rng.randrange(len(arrival))] for _ in range(20)]  # duplicates
    tail = arrival[-60:]
    rng.shuffle(tail)
    arrival[-60:] = tail
    # A step is a record (source, received_at, events) or a tick (None) at NOW that
    # keeps every source active, so activity never depends on where the cut is.
    steps: list[tuple[int, int, list[Event]] | None] = []
    i = 0
    while i < len(arrival):
        n = rng.randint(1, 15)
        steps.append((rng.randrange(3), NOW + 1_000 * len(steps), arrival[i : i + n]))
        i += n
        if rng.random() < 0.2:
            steps.append(None)
    cut = rng.randrange(len(steps) // 4, 3 * len(steps) // 4)
    config = ProcessingConfig(session_gap_ms=5 * MIN, max_buffered_events=12, dedup_max_ids=300)

    def run(
        p: PartitionProcessor, part: list[tuple[int, int, list[Event]] | None], end: bool = True
    ) -> list[Any]:
        outs = []
        for step in part:
            out = Outputs()
            if step is None:
                p.tick(NOW, [0, 1, 2], out)
            else:
                p.process(step[0], rb(*step[2], received_at=step[1]), NOW, out)
            outs.append(_comparable(out))
        if end:
            out = Outputs()
            p.tick(BASE + 10**12, (), out)  # everything closes
            outs.append(_comparable(out))
        return outs

    original = PartitionProcessor(0, config, MIN, now_ms=NOW)
    run(original, steps[:cut], end=False)
    blob = msgspec.msgpack.encode(original.snapshot())
    state = _decoder.decode(blob)
    assert state.version == STATE_VERSION
    restored = PartitionProcessor(0, config, MIN, state=state, now_ms=NOW)
    assert (restored.watermark, restored.open_sessions, restored.buffered) == (
        original.watermark,
        original.open_sessions,
        original.buffered,
    )
    assert (restored.duplicates, restored.late, restored.forced) == (
        original.duplicates,
        original.late,
        original.forced,
    )
    expected = run(original, steps[cut:])
    got = run(restored, steps[cut:])
    assert got == expected
    assert msgspec.msgpack.encode(restored.snapshot()) == msgspec.msgpack.encode(
        original.snapshot()
    )
    # The workload exercised what a snapshot must carry.
    assert original.duplicates > 0 and original.late > 0 and original.forced > 0
    assert sum(len(o[2]) for o in expected) > 0 and sum(len(o[3]) for o in expected) > 0


def test_restore_counts_as_activity_of_every_source() -> None:
    p = proc(idle_timeout_ms=10_000)
    feed(p, rb(ev("b1", 0, user="b")), source=1, now=NOW)
    feed(p, rb(ev("a1", 60_000)), source=0, now=NOW)
    state = _decoder.decode(msgspec.msgpack.encode(p.snapshot()))
    later = NOW + 100_000
    q = PartitionProcessor(0, ProcessingConfig(idle_timeout_ms=10_000), MIN, state, now_ms=later)
    q.tick(later + 9_999, (), Outputs())
    assert q.watermark == BASE - OOO  # source 1 counts as active since the restore
    q.tick(later + 10_000, (), Outputs())
    assert q.watermark == later + 10_000 - OOO  # both idle now: the wall clock


def test_a_snapshot_of_a_newer_version_or_another_partition_is_refused() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0)))
    state = p.snapshot()
    newer = STATE_VERSION + 1
    with pytest.raises(StateVersionError, match=f"version {newer}"):
        PartitionProcessor(
            0, ProcessingConfig(), MIN, msgspec.structs.replace(state, version=newer)
        )
    with pytest.raises(StateVersionError, match="partition 1"):
        PartitionProcessor(1, ProcessingConfig(), MIN, state)


def test_outputs_clear_forgets_everything() -> None:
    p = proc()
    out = feed(p, rb(ev("e1", 0), ev("e1", 0), ev("e2", 10 * MIN)))
    assert out.events and out.duplicates and out.closed_until is not None
    out.clear()
    assert (out.events, out.late, out.sessions, out.chart_rows) == ([], [], [], [])
    assert out.closed_until is None
    assert out.duplicates == 0


# -- helpers for the randomized cases -------------------------------------------------


def _t(e: Event) -> int:
    return int((e.timestamp - _EPOCH) / timedelta(milliseconds=1))


def _history(rng: random.Random, users: int, per_user: int) -> list[Event]:
    """Listening histories: plays, pauses, resumes, seeks, skips and ends, with gaps."""
    kinds: list[EventType] = ["play", "pause", "resume", "seek", "skip", "end"]
    events = []
    for u in range(users):
        t = rng.randrange(60_000)
        track = A
        for k in range(per_user):
            t += rng.choice([0, 500, 3_000, 20_000, 45_000, 4 * MIN, 6 * MIN])
            kind = rng.choice(kinds)
            if kind == "play":
                track = rng.choice([A, B, C])
            events.append(
                ev(
                    f"u{u}-{k:03d}",
                    t,
                    kind,
                    track=track if rng.random() < 0.9 else rng.choice([A, B, C]),
                    pos=rng.randrange(0, 150_000),
                    dur=rng.choice([150_000, 200_000]),
                    user=f"user{u}",
                    geo=rng.choice(["US", "SE", None]),
                    os=rng.choice(["ios", None]),
                )
            )
    return events


def _comparable(out: Outputs) -> tuple[Any, ...]:
    return (
        [msgspec.to_builtins(b) for b in out.events],
        [msgspec.to_builtins(b) for b in out.late],
        [msgspec.to_builtins(s) for s in out.sessions],
        [msgspec.to_builtins(r) for r in out.chart_rows],
        out.closed_until,
        out.duplicates,
    )


# -- what the output records tell their consumers -----------------------------------------


def test_events_records_carry_their_raw_origin_and_the_duplicates_they_dropped() -> None:
    p = proc()
    out = Outputs()
    p.process(2, rb(ev("e1", 0), ev("e2", 1, "pause")), NOW, out, offset=100)
    # Every event of this record is a duplicate: it still writes a record, with no events.
    p.process(1, rb(ev("e1", 2), ev("e2", 3, "pause"), ev("e2", 4, "pause")), NOW, out, offset=7)
    assert [(b.raw_source, b.raw_offset, len(b.events), b.duplicates) for b in out.events] == [
        (2, 100, 2, {}), (1, 7, 0, {"play": 1, "pause": 2}),
    ]


def test_sessions_until_says_every_session_that_started_before_it_was_emitted() -> None:
    hour = 3_600_000
    p = proc(allowed_lateness_ms=0)
    out = feed(p, rb(ev("a1", 0, user="a")))
    # The first watermark (BASE - 5 s) is before user a's session started.
    assert out.sessions_until == BASE - OOO
    out = feed(p, rb(ev("b1", MIN + OOO, user="b")))
    assert out.sessions_until is None  # same hour: not computed again (a scan per hour)
    t = 50 * MIN  # the watermark crosses into the next hour
    assert (BASE + t - OOO) // hour > BASE // hour
    out = feed(p, rb(ev("c1", t, user="c")))
    assert sorted(s.user_id for s in out.sessions) == ["a", "b"]
    # c's session starts after the watermark: every session before the watermark is out.
    assert out.sessions_until == BASE + t - OOO


# -- late events within the allowed lateness: revisions and retractions ---------------------


def clock(p: PartitionProcessor, t: int, out: Outputs | None = None) -> Outputs:
    """Another user's event at BASE + ``t``: moves the watermark to BASE + t - OOO."""
    out = Outputs() if out is None else out
    p.process(0, rb(ev(f"clock-{t}", t, "pause", user="clock")), NOW, out)
    return out


def of(out: Outputs, user: str = "u1") -> list[Session]:
    return [s for s in out.sessions if s.user_id == user]


def batch_sessions(*events: Event, **processing: Any) -> list[Session]:
    """The sessions of ``events`` all sent on time (the batch computation)."""
    p = proc(**processing)
    out = feed(p, rb(*events))
    return of(close_all(p, out))


def test_a_late_event_inside_an_open_session_is_applied_in_order() -> None:
    p = proc()
    out = feed(p, rb(ev("e1", 0, "play"), ev("e3", 60_000, "seek", pos=150_000)))
    clock(p, 120_000, out)
    assert p.watermark == BASE + 115_000 and out.sessions == []
    # e2 (a pause at 30 s) arrives after the watermark passed it: the session is open,
    # so it is applied in its place, before the seek (listening stops at 30 s).
    out = feed(p, rb(ev("e2", 30_000, "pause")))
    assert out.events[0].late == [] and out.sessions == []
    [session] = of(close_all(p))
    assert session == batch_sessions(
        ev("e1", 0, "play"), ev("e2", 30_000, "pause"), ev("e3", 60_000, "seek", pos=150_000)
    )[0]
    assert (session.revision, session.retracted, session.listened_ms) == (0, False, 30_000)


def test_a_late_event_extending_an_emitted_session_emits_revision_1() -> None:
    p = proc()
    feed(p, rb(ev("e1", 0, "play"), ev("e2", 60_000, "end")))
    out = clock(p, 60_000 + GAP + 10_000)
    [first] = of(out)
    assert (first.session_id, first.revision, first.event_count) == (sid("u1", "e1"), 0, 2)
    assert p.kept_sessions == 1
    # Inside the emitted session's span: it stays closed, emitted again at once.
    out = feed(p, rb(ev("e3", 30_000, "seek", pos=100_000)))
    [second] = of(out)
    assert (second.session_id, second.revision, second.retracted) == (first.session_id, 1, False)
    assert second.event_count == 3 and second.ended_at == first.ended_at
    # After its last event, within the gap of the watermark: open again; its next
    # emission (once the watermark passes it + gap) is revision 2.
    out = feed(p, rb(ev("e4", 90_000, "pause")))
    assert of(out) == []
    out = clock(p, 90_000 + GAP + 10_000)
    [third] = of(out)
    assert (third.session_id, third.revision, third.event_count) == (first.session_id, 2, 4)
    assert third.ended_at == BASE + 90_000
    assert third == batch_sessions(
        ev("e1", 0, "play"), ev("e3", 30_000, "seek", pos=100_000), ev("e2", 60_000, "end"),
        ev("e4", 90_000, "pause"),
    )[0].__replace__(revision=2) if hasattr(Session, "__replace__") else third


def test_a_late_event_before_the_first_retracts_the_session_and_starts_a_new_id() -> None:
    p = proc()
    feed(p, rb(ev("e1", 10 * MIN, "play"), ev("e2", 11 * MIN, "end")))
    [a] = of(clock(p, 11 * MIN + GAP + 10_000))
    out = feed(p, rb(ev("x", 5 * MIN, "pause")))
    gone, new = sorted(of(out), key=lambda s: s.retracted, reverse=True)
    assert (gone.session_id, gone.revision, gone.retracted) == (a.session_id, 1, True)
    assert gone.event_count == 2  # the content it had
    assert (new.session_id, new.revision, new.retracted) == (sid("u1", "x"), 0, False)
    assert (new.started_at, new.event_count) == (BASE + 5 * MIN, 3)
    assert new == batch_sessions(
        ev("x", 5 * MIN, "pause"), ev("e1", 10 * MIN, "play"), ev("e2", 11 * MIN, "end")
    )[0]


def test_a_late_event_between_two_emitted_sessions_merges_them() -> None:
    p = proc()
    # b1 closes a1's session (more than the gap after a2): emitted then.
    out = feed(p, rb(ev("a1", 0, "play"), ev("a2", MIN, "end")))
    feed(p, rb(ev("b1", 40 * MIN, "play", B), ev("b2", 41 * MIN, "end", B)), out=out)
    clock(p, 41 * MIN + GAP + 10_000, out)
    a, b = sorted(of(out), key=lambda s: s.started_at)
    assert (a.session_id, b.session_id) == (sid("u1", "a1"), sid("u1", "b1"))
    # 19 min after a2 and 20 min before b1: one session, which begins with a1.
    out = feed(p, rb(ev("m", 20 * MIN, "pause")))
    merged, gone = sorted(of(out), key=lambda s: s.retracted)
    assert (merged.session_id, merged.revision, merged.retracted) == (a.session_id, 1, False)
    assert (gone.session_id, gone.revision, gone.retracted) == (b.session_id, 1, True)
    assert merged.event_count == 5 and merged.ended_at == BASE + 41 * MIN
    assert p.kept_sessions == 1


def test_late_events_before_and_between_retract_both_and_emit_one_session() -> None:
    # Two hours of lateness: x, before both sessions, is within it once both closed.
    p = proc(allowed_lateness_ms=2 * 3_600_000)
    feed(p, rb(ev("a1", 0, "play"), ev("a2", MIN, "end")))
    feed(p, rb(ev("b1", 40 * MIN, "play", B), ev("b2", 41 * MIN, "end", B)))
    clock(p, 41 * MIN + GAP + 10_000)
    out = feed(p, rb(ev("x", -10 * MIN, "pause"), ev("m", 20 * MIN, "pause")))
    gone = sorted((s.session_id, s.revision) for s in of(out) if s.retracted)
    assert gone == sorted([(sid("u1", "a1"), 1), (sid("u1", "b1"), 1)])
    [new] = [s for s in of(out) if not s.retracted]
    assert (new.session_id, new.revision, new.event_count) == (sid("u1", "x"), 0, 6)
    assert new == batch_sessions(
        ev("x", -10 * MIN, "pause"), ev("a1", 0, "play"), ev("a2", MIN, "end"),
        ev("m", 20 * MIN, "pause"), ev("b1", 40 * MIN, "play", B), ev("b2", 41 * MIN, "end", B),
    )[0]


def test_a_late_play_into_an_emitted_window_emits_its_row_again() -> None:
    p = proc()
    feed(p, rb(ev("p1", 10_000, user="u2"), ev("p2", 20_000, user="u3", geo="SE")))
    out = clock(p, MIN + OOO + 1)
    rows = {(r.country, r.track_id): (r.plays, r.revision) for r in out.chart_rows}
    assert rows == {("US", A): (1, 0), ("SE", A): (1, 0)} and out.closed_until == BASE + MIN
    out = feed(p, rb(ev("p3", 30_000, user="u4"), ev("p4", 40_000, user="u5", track=B)))
    assert out.events[0].late == []
    assert [(r.window_start, r.country, r.track_id, r.plays, r.revision) for r in out.chart_rows] == [
        (BASE, "US", A, 2, 1),
        (BASE, "US", B, 1, 0),  # a row the window did not have: its first revision
    ]
    out = feed(p, rb(ev("p5", 50_000, user="u6")))
    assert [(r.plays, r.revision) for r in out.chart_rows] == [(3, 2)]
    # Final once the watermark passes the window's end + the lateness.
    out = clock(p, MIN + 3_600_000 + OOO + 1)
    assert out.final_until == BASE + MIN


def test_an_event_beyond_the_lateness_is_late_counted_and_not_applied() -> None:
    p = proc(allowed_lateness_ms=10 * MIN)
    feed(p, rb(ev("e1", 0, "play"), ev("e2", MIN, "end")))
    clock(p, 30 * MIN)
    # Watermark 30 min - 5 s; 10 min is older than it minus 10 min.
    out = feed(p, rb(ev("old", 10 * MIN, "play", user="u2"), ev("ok", 21 * MIN, "play", user="u3")))
    assert out.events[0].late == [0] and [e.event_id for e in out.late[0].events] == ["old"]
    assert (p.late, p.late_forced, out.late_forced) == (1, 0, 0)
    out = close_all(p, out)
    assert {s.user_id for s in out.sessions} == {"u1", "u3", "clock"}
    plays = {(r.window_start, r.track_id): r.plays for r in out.chart_rows}
    assert (BASE + 10 * MIN, A) not in plays and plays[(BASE + 21 * MIN, A)] == 1


def test_emitted_sessions_are_forgotten_after_the_lateness() -> None:
    p = proc(allowed_lateness_ms=10 * MIN)
    feed(p, rb(ev("e1", 0, "play"), ev("e2", MIN, "end")))
    clock(p, MIN + GAP + 10_000)
    assert p.kept_sessions == 1
    clock(p, MIN + GAP + 10 * MIN + OOO + 1)
    assert p.kept_sessions == 0
    # Nothing within the lateness could reach it any more: an event near it is late.
    out = feed(p, rb(ev("e3", 2 * MIN, "pause")))
    assert out.events[0].late == [0] and of(out) == []


def test_raised_revisions_continue_above_what_the_stream_holds() -> None:
    # A restore learns what the streams got after its snapshot: u1's session at
    # revisions 0 (2 events) and 1 (4 events), u2's at revision 1 (5 events), a chart
    # row at revision 1 (7 plays). The same content is emitted with the same revision
    # (an exact replay), other content above everything the stream holds.
    sessions: StreamRevisions[str] = StreamRevisions()
    for key, revision, size in [("e1", 0, 2), ("e1", 1, 4), ("f1", 1, 5)]:
        user = "u1" if key == "e1" else "u2"
        sessions.add(sid(user, key), revision, size, BASE + 10**9)
    rows: StreamRevisions[tuple[int, str | None, str]] = StreamRevisions()
    rows.add((BASE, "US", A), 1, 7, BASE)
    p = proc()
    p.raise_revisions(sessions, rows)
    blob = msgspec.msgpack.encode(p.snapshot())
    p = PartitionProcessor(0, ProcessingConfig(), MIN, _decoder.decode(blob), now_ms=NOW)
    feed(p, rb(ev("e1", 0), ev("e2", 1_000), ev("e3", 2_000), ev("e4", 3_000, "end")))
    feed(p, rb(ev("f1", 0, user="u2"), ev("f2", 1_000, "end", user="u2")))
    out = clock(p, 3_000 + GAP + 10_000)
    revisions = {s.user_id: s.revision for s in out.sessions}
    assert revisions == {"u1": 1, "u2": 2}
    row = [r for r in out.chart_rows if (r.country, r.track_id) == ("US", A)]
    assert [(r.plays, r.revision) for r in row] == [(4, 2)]
    # Nothing held any more: a late event into u1's session is its revision 2.
    out = feed(p, rb(ev("e5", 2_500, "pause")))
    assert [(s.user_id, s.revision, s.event_count) for s in out.sessions] == [("u1", 2, 5)]

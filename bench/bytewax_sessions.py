"""evd's sessionization written the way a bytewax 0.21 user would, for bench.processing.

The dataflow: a ``TestingSource`` over lists of events (the batches a real source
would hand over) -> ``flat_map`` -> ``key_on`` user_id -> ``fold_window`` with an
``EventClock`` (``wait_for_system_duration`` = evd's out-of-orderness bound) and a
``SessionWindower`` (gap = evd's session gap) -> ``map`` that finishes each session
into evd's ``Session`` struct -> a ``TestingSink``; late items go to a second sink.

What the fold computes, per session, with evd's rules (ARCHITECTURE.md, "Processing
semantics"): event_count, play_count, stream_count, listened_ms, started_at,
ended_at, country, os, the plays (track, start, listened, ended_by) and the
session id (uuid5 of the first event id). A play's clock runs while playing and
is capped at the track's duration; pause stops it, resume restarts it from the
event's position, seek moves the position, skip and end close the play, events
for another track than the open play's only count toward the session; at close a
still-playing play accrues min(duration - position, gap) and ends with
``session_close``.

What it leaves out (evd does these and bytewax is not asked to): event-id
dedup, the ``events`` output stream (every event re-encoded), the per-minute
chart windows, snapshots. Watermarks differ in scope: bytewax's ``window``
keeps one clock per key (user), evd one per partition, so an event is late in
bytewax only against its own user's newest event, and sessions close only when
that user sends a newer event or at EOF. ``now_getter`` is frozen so the
watermark is the user's newest event time minus the bound, however fast the
replay runs (with the default system clock it would also creep forward with the
seconds the run takes, which makes lateness depend on machine speed); and
``to_system_utc`` returns None so the runtime does not schedule wake-ups at
event times years in the past (sessions are closed by newer items or EOF, the
same closes as with wake-ups, as nothing else moves a frozen clock).
Events of one user in the same millisecond are folded in arrival order (the
window sorts by timestamp, stably); evd orders such ties by event_id, so with
ties the two can differ (bench.processing counts them in its input).
When two session windows merge (an out-of-order event bridging them), the
merger appends the later state's plays and counts to the earlier one, an
approximation: with disorder under the 5 s bound and a 30 min gap it does not
happen in bench.processing's input.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, SessionWindower, fold_window
from bytewax.testing import TestingSink, TestingSource, run_main

from evd.core.schema import Event, Play, Session

__all__ = ["BytewaxRun", "SessionAcc", "build_flow", "run"]

#: A play counts as a stream from this much listening on (ARCHITECTURE.md).
STREAM_MS = 30_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FROZEN_NOW = datetime(2000, 1, 1, tzinfo=UTC)


def _ms(ts: datetime) -> int:
    # Integer arithmetic on the timedelta: exact, unlike timestamp() * 1000.
    d = ts - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1000 + d.microseconds // 1000


class SessionAcc:
    """The fold's accumulator: one user's session so far, with its open play."""

    __slots__ = (
        "clock_at",
        "country",
        "duration",
        "ended_at",
        "event_count",
        "first_event_id",
        "os",
        "play_listened",
        "play_started",
        "play_track",
        "playing",
        "plays",
        "position",
        "started_at",
        "user_id",
    )

    def __init__(self) -> None:
        self.first_event_id = ""
        self.user_id = ""
        self.started_at = 0
        self.ended_at = 0
        self.event_count = 0
        self.country: str | None = None
        self.os: str | None = None
        self.plays: list[Play] = []
        # The open play; play_track None: none open.
        self.play_track: str | None = None
        self.play_started = 0
        self.play_listened = 0
        self.position = 0
        self.duration = 0
        self.playing = False
        self.clock_at = 0

    def accrue(self, t: int) -> None:
        """Advance a playing play's clock to ``t``."""
        if self.playing:
            gain = min(t - self.clock_at, self.duration - self.position)
            if gain > 0:
                self.position += gain
                self.play_listened += gain
            self.clock_at = t

    def close_play(self, ended_by: Any) -> None:
        """Close the open play (accrued already) as ``ended_by``."""
        if self.play_track is not None:
            self.plays.append(Play(self.play_track, self.play_started, self.play_listened,
                                   ended_by))
            self.play_track = None
            self.playing = False


def _fold(acc: SessionAcc, ev: Event) -> SessionAcc:
    t = _ms(ev.timestamp)
    if acc.event_count == 0:
        acc.first_event_id = ev.event_id
        acc.user_id = ev.user_id
        acc.started_at = t
    acc.event_count += 1
    acc.ended_at = t
    if acc.country is None and ev.geo is not None:
        acc.country = ev.geo.country
    if acc.os is None and ev.device is not None:
        acc.os = ev.device.os
    etype = ev.event_type
    pb = ev.playback
    if etype == "play":
        acc.accrue(t)
        acc.close_play("play")
        acc.play_track = ev.track_id
        acc.play_started = t
        acc.play_listened = 0
        acc.position = pb.position_ms
        acc.duration = pb.duration_ms
        acc.playing = True
        acc.clock_at = t
    elif acc.play_track is not None and ev.track_id == acc.play_track:
        if etype == "pause":
            acc.accrue(t)
            acc.playing = False
        elif etype == "resume":
            acc.position = pb.position_ms
            acc.playing = True
            acc.clock_at = t
        elif etype == "seek":
            acc.accrue(t)
            acc.position = pb.position_ms
        else:  # skip, end
            acc.accrue(t)
            acc.close_play(etype)
    return acc


def _merge(a: SessionAcc, b: SessionAcc) -> SessionAcc:
    first, last = (a, b) if a.started_at <= b.started_at else (b, a)
    first.close_play("play")
    first.plays.extend(last.plays)
    first.event_count += last.event_count
    first.ended_at = max(first.ended_at, last.ended_at)
    first.country = first.country or last.country
    first.os = first.os or last.os
    for name in ("play_track", "play_started", "play_listened", "position", "duration",
                 "playing", "clock_at"):
        setattr(first, name, getattr(last, name))
    return first


def _finisher(gap_ms: int) -> Any:
    def finish(item: tuple[str, tuple[int, SessionAcc]]) -> Session:
        acc = item[1][1]
        if acc.play_track is not None:
            if acc.playing:
                gain = min(acc.duration - acc.position, gap_ms)
                if gain > 0:
                    acc.play_listened += gain
            acc.close_play("session_close")
        plays = acc.plays
        listened = 0
        streams = 0
        for p in plays:
            listened += p.listened_ms
            if p.listened_ms >= STREAM_MS:
                streams += 1
        sid = str(uuid.uuid5(uuid.NAMESPACE_URL,
                             f"evd:session:{acc.user_id}:{acc.first_event_id}"))
        return Session(sid, acc.user_id, acc.started_at, acc.ended_at, acc.event_count,
                       len(plays), streams, listened, acc.country, acc.os, plays)

    return finish


def _ts(ev: Event) -> datetime:
    return ev.timestamp


def _user(ev: Event) -> str:
    return ev.user_id


def _frozen_now() -> datetime:
    return _FROZEN_NOW


def _no_wakeup(_ts: datetime) -> None:
    return None


def _identity(batch: list[Event]) -> list[Event]:
    return batch


def build_flow(batches: Sequence[list[Event]], sessions: list[Session], late: list[Any], *,
               gap_ms: int = 30 * 60 * 1000, out_of_orderness_ms: int = 5_000,
               feed: str = "flat_map") -> Dataflow:
    """The sessionization dataflow over ``batches``; closed sessions land in ``sessions``.

    ``feed``: ``flat_map`` (the source yields each list as one item, flat_map
    flattens it) or ``batch_size`` (the source yields events, ``batch_size`` =
    the lists' length, so bytewax's own batching carries them).
    """
    flow = Dataflow("evd_sessions")
    if feed == "flat_map":
        lists = op.input("in", flow, TestingSource(batches))
        events = op.flat_map("flatten", lists, _identity)
    elif feed == "batch_size":
        size = max((len(b) for b in batches), default=1)
        flat = [ev for b in batches for ev in b]
        events = op.input("in", flow, TestingSource(flat, batch_size=size))
    else:
        raise ValueError(f"feed must be flat_map or batch_size, not {feed!r}")
    keyed = op.key_on("by_user", events, _user)
    clock = EventClock(
        ts_getter=_ts,
        wait_for_system_duration=timedelta(milliseconds=out_of_orderness_ms),
        now_getter=_frozen_now,
        to_system_utc=_no_wakeup,
    )
    windows = fold_window("sessions", keyed, clock,
                          SessionWindower(gap=timedelta(milliseconds=gap_ms)),
                          SessionAcc, _fold, _merge)
    done = op.map("finish", windows.down, _finisher(gap_ms))
    op.output("out", done, TestingSink(sessions))
    op.output("late", windows.late, TestingSink(late))
    return flow


@dataclass
class BytewaxRun:
    """One timed run of the dataflow."""

    seconds: float
    cpu_seconds: float
    events: int
    sessions: list[Session] = field(repr=False)
    late: int


def run(batches: Sequence[list[Event]], *, gap_ms: int = 30 * 60 * 1000,
        out_of_orderness_ms: int = 5_000, feed: str = "flat_map") -> BytewaxRun:
    """Build the dataflow and time ``run_main`` (one worker, this thread) over it."""
    sessions: list[Session] = []
    late: list[Any] = []
    flow = build_flow(batches, sessions, late, gap_ms=gap_ms,
                      out_of_orderness_ms=out_of_orderness_ms, feed=feed)
    c0 = time.process_time()
    t0 = time.perf_counter()
    run_main(flow)  # type: ignore[no-untyped-call]
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return BytewaxRun(seconds, cpu, sum(len(b) for b in batches), sessions, len(late))

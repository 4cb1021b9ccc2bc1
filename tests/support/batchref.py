"""A batch computation of the processing contract (ARCHITECTURE.md, "Processing semantics").

Written from the contract alone, independently of ``evd.state.processor``, so that a
property test can check that the streaming processor, fed the same records with
bounded disorder, computes the same sessions and charts. It sees all the data at
once: no watermarks, no buffers, no late events; every session and window closes
at the end of the data.

Decisions where the contract is silent (the team's):

* Event time ``t = epoch_ms(timestamp) + skew_ms`` of the event's record.
* Dedup keeps the first copy of an ``event_id`` in record order; later copies are
  dropped entirely (not in sessions, charts or the events list) and counted.
* A play's clock is brought up to date at every event of its session, whatever the
  event's track, so at session close it has run until the session's last event and
  then accrues ``min(duration - position, session_gap_ms)`` more if still playing.
* The play's duration is the one of its ``play`` event.
* ``country``/``os`` of a session: of the first event (in (t, event_id) order) that
  has a ``geo`` / a ``device`` with an ``os``.
* Chart rows are keyed by the ``play`` event's own ``geo.country`` (None without geo).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from evd.core.config import ProcessingConfig
from evd.core.schema import ChartRow, EndedBy, Event, Play, RawBatch, Session, epoch_ms

__all__ = ["BatchResult", "ChartKey", "compute", "session_id", "sum_chart_rows"]

#: (window_start, country, track_id)
ChartKey = tuple[int, str | None, str]

#: A play counts as a stream from this much listening on.
STREAM_MS = 30_000


@dataclass
class BatchResult:
    """What the contract says the whole input produces once every window has closed."""

    #: Closed sessions, sorted by session_id.
    sessions: list[Session]
    #: Plays per (window_start, country, track_id); keys with no plays are absent.
    charts: dict[ChartKey, int]
    #: Copies of an already seen event_id that were dropped.
    duplicates: int
    #: The kept events as (t, event), in record order.
    events: list[tuple[int, Event]] = field(default_factory=list)


def session_id(user_id: str, first_event_id: str) -> str:
    """The deterministic id of the session that starts with ``first_event_id``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"evd:session:{user_id}:{first_event_id}"))


def sum_chart_rows(rows: Iterable[ChartRow]) -> dict[ChartKey, int]:
    """Chart rows summed by key (a window may be reported in several rows)."""
    total: dict[ChartKey, int] = defaultdict(int)
    for row in rows:
        total[(row.window_start, row.country, row.track_id)] += row.plays
    return {key: n for key, n in total.items() if n}


class _OpenPlay:
    __slots__ = ("clock", "duration", "listened", "playing", "position", "started_at", "track_id")

    def __init__(self, track_id: str, t: int, position: int, duration: int) -> None:
        self.track_id = track_id
        self.started_at = t
        self.position = position
        self.duration = duration
        self.listened = 0
        self.playing = True
        #: Event time up to which position and listened are accounted for.
        self.clock = t

    def advance(self, t: int) -> None:
        if self.playing:
            step = min(t - self.clock, self.duration - self.position)
            self.position += step
            self.listened += step
        self.clock = t

    def close(self, ended_by: EndedBy) -> Play:
        return Play(self.track_id, self.started_at, self.listened, ended_by)


class _OpenSession:
    def __init__(self, user_id: str, t: int, event_id: str) -> None:
        self.user_id = user_id
        self.first_event_id = event_id
        self.started_at = t
        self.last_t = t
        self.event_count = 0
        self.country: str | None = None
        self.os: str | None = None
        self.plays: list[Play] = []
        self.open_play: _OpenPlay | None = None

    def add(self, t: int, event: Event) -> None:
        self.event_count += 1
        self.last_t = t
        if self.country is None and event.geo is not None:
            self.country = event.geo.country
        if self.os is None and event.device is not None and event.device.os is not None:
            self.os = event.device.os
        play = self.open_play
        if play is not None:
            play.advance(t)
        kind = event.event_type
        pb = event.playback
        if kind == "play":
            if play is not None:
                self.plays.append(play.close("play"))
            self.open_play = _OpenPlay(event.track_id, t, pb.position_ms, pb.duration_ms)
            return
        if play is None or event.track_id != play.track_id:
            return
        if kind == "pause":
            play.playing = False
        elif kind == "resume":
            play.playing = True
            play.position = pb.position_ms
        elif kind == "seek":
            play.position = pb.position_ms
        else:  # skip, end
            self.plays.append(play.close(kind))
            self.open_play = None

    def close(self, gap_ms: int) -> Session:
        play = self.open_play
        if play is not None:
            if play.playing:
                play.listened += min(play.duration - play.position, gap_ms)
            self.plays.append(play.close("session_close"))
            self.open_play = None
        return Session(
            session_id=session_id(self.user_id, self.first_event_id),
            user_id=self.user_id,
            started_at=self.started_at,
            ended_at=self.last_t,
            event_count=self.event_count,
            play_count=len(self.plays),
            stream_count=sum(1 for p in self.plays if p.listened_ms >= STREAM_MS),
            listened_ms=sum(p.listened_ms for p in self.plays),
            country=self.country,
            os=self.os,
            plays=self.plays,
        )


def compute(
    records: Iterable[RawBatch], processing: ProcessingConfig, chart_window_ms: int
) -> BatchResult:
    """Sessions, charts and the duplicate count of ``records`` (in the order they are read)."""
    seen: set[str] = set()
    kept: list[tuple[int, Event]] = []
    duplicates = 0
    for record in records:
        for event in record.events:
            if event.event_id in seen:
                duplicates += 1
                continue
            seen.add(event.event_id)
            kept.append((epoch_ms(event.timestamp) + record.skew_ms, event))

    by_user: dict[str, list[tuple[int, Event]]] = defaultdict(list)
    charts: dict[ChartKey, int] = defaultdict(int)
    for t, event in kept:
        by_user[event.user_id].append((t, event))
        if event.event_type == "play":
            country = event.geo.country if event.geo is not None else None
            charts[(t - t % chart_window_ms, country, event.track_id)] += 1

    gap = processing.session_gap_ms
    sessions: list[Session] = []
    for user_id, timeline in by_user.items():
        timeline.sort(key=lambda te: (te[0], te[1].event_id))
        current: _OpenSession | None = None
        for t, event in timeline:
            if current is not None and t - current.last_t > gap:
                sessions.append(current.close(gap))
                current = None
            if current is None:
                current = _OpenSession(user_id, t, event.event_id)
            current.add(t, event)
        if current is not None:
            sessions.append(current.close(gap))
    sessions.sort(key=lambda s: s.session_id)
    return BatchResult(sessions, dict(charts), duplicates, kept)

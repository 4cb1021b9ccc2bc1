"""The session table of one partition: open listening sessions, one per user.

Events arrive in event-time order (released by the watermark). A user's next
event more than ``session_gap_ms`` after their previous one closes the session
and starts a new one; the watermark passing a session's last event + gap closes
it too. A closed session is emitted and evicted, so memory grows with the open
sessions, never with the users ever seen.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict

import msgspec

from evd.core.schema import EndedBy, Event, Play, Session

__all__ = ["OpenSession", "SessionTable", "SessionTableState", "session_id"]

#: A play counts as a stream from this much listening on (ARCHITECTURE.md).
STREAM_MS = 30_000


_NAMESPACE = uuid.NAMESPACE_URL.bytes


def session_id(user_id: str, first_event_id: str) -> str:
    """The deterministic id of the session of ``user_id`` that began with ``first_event_id``:
    ``str(uuid.uuid5(uuid.NAMESPACE_URL, f"evd:session:{user_id}:{first_event_id}"))``."""
    # uuid.uuid5 spelled out (SHA-1, then the version and variant bits): a third of
    # its cost, paid once per session (docs/performance.md).
    digest = bytearray(
        hashlib.sha1(
            _NAMESPACE + f"evd:session:{user_id}:{first_event_id}".encode(),
            usedforsecurity=False,
        ).digest()
    )
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class OpenSession(msgspec.Struct, array_like=True, gc=False):
    """One open session, as the table holds it and as its snapshot stores it.

    ``track`` is the open play's track, None when no play is open. The play
    clock: while ``playing``, listening up to ``clock`` has been counted. The
    table keeps these Structs themselves (mutable, as fast as __slots__), so a
    snapshot encodes them as they are instead of copying each one; gc=False: it
    holds only strings, ints and a list of Plays, so it cannot be in a cycle.
    """

    user_id: str
    first_id: str
    started: int
    last: int
    events: int = 0
    play_count: int = 0
    #: Ended plays as (track_id, started_at, listened_ms, ended_by): tuples, which
    #: a snapshot encodes as arrays (Play Structs would repeat their field names).
    plays: list[tuple[str, int, int, EndedBy]] = msgspec.field(default_factory=list)
    country: str | None = None
    os: str | None = None
    track: str | None = None
    play_started: int = 0
    position: int = 0
    duration: int = 0
    listened: int = 0
    playing: bool = False
    clock: int = 0


class SessionTableState(msgspec.Struct, kw_only=True):
    """Snapshot of a SessionTable: open sessions, oldest last event first. It holds
    the table's live sessions: encode it before the table changes again."""

    sessions: list[OpenSession] = msgspec.field(default_factory=list)



class SessionTable:
    """Open sessions by user, front = oldest last event (events come in time order and
    each moves its session to the end), so closing by watermark pops from the front.

    Rules (ARCHITECTURE.md "Processing semantics"): ``play`` opens a play, ending an
    open one with "play"; for the open play's track only, ``pause`` stops its clock,
    ``resume`` restarts it at the event's position, ``seek`` sets the position and
    ``skip``/``end`` end it; other events only count. While playing, time advances
    position and listening by min(elapsed, duration - position).
    """

    __slots__ = ("_gap_ms", "_open")

    def __init__(self, session_gap_ms: int, state: SessionTableState | None = None) -> None:
        self._gap_ms = session_gap_ms
        self._open: OrderedDict[str, OpenSession] = OrderedDict()
        if state is not None:
            for s in state.sessions:
                self._open[s.user_id] = s

    def __len__(self) -> int:
        """Open sessions."""
        return len(self._open)

    def apply(self, released: list[tuple[int, str, Event]], closed: list[Session]) -> None:
        """Apply released events ``(time, event_id, event)`` in order; sessions closed by
        a gap are appended to ``closed``."""
        table = self._open
        get = table.get
        to_end = table.move_to_end
        gap = self._gap_ms
        for t, eid, ev in released:
            uid = ev.user_id
            s = get(uid)
            if s is None:
                s = table[uid] = OpenSession(uid, eid, t, t)
            else:
                if t - s.last > gap:
                    closed.append(self._close(s))
                    s = table[uid] = OpenSession(uid, eid, t, t)
                to_end(uid)
                if s.playing:
                    # Accrue to t first, whatever the event: accrual is additive.
                    elapsed = t - s.clock
                    if elapsed > 0:
                        room = s.duration - s.position
                        if elapsed > room:  # noqa: PLR1730 (per event: min() is a call)
                            elapsed = room
                        s.position += elapsed
                        s.listened += elapsed
                        s.clock = t
            s.events += 1
            # Never backwards: with allowed lateness, a release can be older than the last.
            if t > s.last:  # noqa: PLR1730 (per event: max() is a call)
                s.last = t
            if s.country is None:
                geo = ev.geo
                if geo is not None:
                    s.country = geo.country
            if s.os is None:
                device = ev.device
                if device is not None:
                    s.os = device.os
            kind = ev.event_type
            if kind == "play":
                if s.track is not None:
                    s.plays.append((s.track, s.play_started, s.listened, "play"))
                pb = ev.playback
                s.track = ev.track_id
                s.play_started = t
                s.position = pb.position_ms
                s.duration = pb.duration_ms
                s.listened = 0
                s.playing = True
                s.clock = t
                s.play_count += 1
            elif s.track is None or ev.track_id != s.track:
                continue
            elif kind == "pause":
                s.playing = False
            elif kind == "resume":
                s.position = ev.playback.position_ms
                s.playing = True
                s.clock = t
            elif kind == "seek":
                s.position = ev.playback.position_ms
            else:  # skip, end
                ended_by: EndedBy = "skip" if kind == "skip" else "end"
                s.plays.append((s.track, s.play_started, s.listened, ended_by))
                s.track = None
                s.playing = False

    def oldest_start(self) -> int | None:
        """The earliest ``started_at`` of the open sessions (a scan: O(open sessions))."""
        return min((s.started for s in self._open.values()), default=None)

    def close_before(self, watermark: int, closed: list[Session]) -> None:
        """Close (append to ``closed`` and evict) the sessions whose last event + gap is
        older than ``watermark``."""
        table = self._open
        if not table:
            return
        limit = watermark - self._gap_ms
        pop = table.popitem
        while table:
            # Front of an OrderedDict in O(1); its values view iterates the linked list.
            s = next(iter(table.values()))
            if s.last >= limit:
                break
            pop(last=False)
            closed.append(self._close(s))

    def _close(self, s: OpenSession) -> Session:
        plays = [Play(*p) for p in s.plays]
        if s.track is not None:
            listened = s.listened
            if s.playing:
                listened += min(s.duration - s.position, self._gap_ms)
            plays.append(Play(s.track, s.play_started, listened, "session_close"))
        listened_total = 0
        streams = 0
        for p in plays:
            listened_total += p.listened_ms
            if p.listened_ms >= STREAM_MS:
                streams += 1
        return Session(
            session_id=session_id(s.user_id, s.first_id),
            user_id=s.user_id,
            started_at=s.started,
            ended_at=s.last,
            event_count=s.events,
            play_count=s.play_count,
            stream_count=streams,
            listened_ms=listened_total,
            country=s.country,
            os=s.os,
            plays=plays,
        )

    def snapshot(self) -> SessionTableState:
        """The open sessions in table order (the live objects: encode the result before
        the next apply); ``SessionTable(..., state=it decoded)`` continues identically."""
        return SessionTableState(sessions=list(self._open.values()))

"""The session table of one partition: open listening sessions, one per user, and
the emitted sessions late events may still change.

Events arrive in event-time order (released by the watermark), except late ones
(within the allowed lateness). A user's next event more than ``session_gap_ms``
after their previous one closes the session and starts a new one; the watermark
passing a session's last event + gap closes it too. A closed session is emitted
(revision 0) and kept, its events packed, until no event within the allowed
lateness can reach it; a late event that joins sessions computes them again from
their events (revision + 1, or retractions: see SessionTable). So memory grows
with the sessions open or closed within the last allowed lateness, never with
the users ever seen.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict, deque
from typing import Any

import msgspec

from evd.core.schema import EndedBy, Event, Play, Session
from evd.state.revisions import RETRACTED, Held, StreamRevisions

__all__ = [
    "EmittedSession", "OpenSession", "SessionTable", "SessionTableState", "session_id",
]

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


#: One event as a session keeps it, packed with msgpack in the session's ``log``:
#: [time, event_id, event_type, track_id, position_ms, duration_ms, country, os].
#: Enough to compute the session again from its events when a late one joins it.
Entry = list[Any]

_pack_into = msgspec.msgpack.Encoder().encode_into
_unpack = msgspec.msgpack.Decoder(list[list[Any]]).decode


def entry_of(t: int, event_id: str, ev: Event) -> Entry:
    """The packed form's fields of ``ev`` at pipeline time ``t``."""
    pb = ev.playback
    geo = ev.geo
    device = ev.device
    return [
        t, event_id, ev.event_type, ev.track_id, pb.position_ms, pb.duration_ms,
        None if geo is None else geo.country, None if device is None else device.os,
    ]


def unpack(log: bytes | bytearray, count: int) -> list[Entry]:
    """The ``count`` entries packed one after the other in ``log``."""
    if count <= 0xFFFF:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return _unpack(header + log)


class OpenSession(msgspec.Struct, array_like=True, gc=False):
    """One open session, as the table holds it and as its snapshot stores it.

    ``track`` is the open play's track, None when no play is open. The play
    clock: while ``playing``, listening up to ``clock`` has been counted. The
    table keeps these Structs themselves (mutable, as fast as __slots__), so a
    snapshot encodes them as they are instead of copying each one; gc=False: it
    holds only strings, ints, bytes and a list of tuples, so it cannot be in a cycle.

    ``log`` holds its events, packed (``Entry``), in (time, event_id) order;
    ``last_id`` is the event_id of the last. ``revision``: the revision last
    emitted (-1: never; a session emitted and reopened by a late event has one).
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
    # Fields since snapshot version 2 (a version 1 session decodes with these
    # defaults: an empty log, so late events are applied to it in arrival order).
    last_id: str = ""
    revision: int = -1
    log: bytearray = msgspec.field(default_factory=bytearray)


class EmittedSession(msgspec.Struct, array_like=True, gc=False):
    """A closed session kept for the allowed lateness: what it takes to compute it
    again with a late event (its packed events) and the revision it was emitted with."""

    user_id: str
    first_id: str
    started: int
    last: int
    events: int
    revision: int
    log: bytes
    #: Replaced (merged into another session) or forgotten: no longer kept.
    gone: bool = False


class SessionTableState(msgspec.Struct, kw_only=True):
    """Snapshot of a SessionTable: open sessions, oldest last event first, and the
    emitted sessions still kept. It holds the table's live sessions: encode it
    before the table changes again."""

    sessions: list[OpenSession] = msgspec.field(default_factory=list)
    emitted: list[EmittedSession] = msgspec.field(default_factory=list)
    #: What the sessions stream holds beyond this state (evd.state.revisions).
    held: list[Held[str]] = msgspec.field(default_factory=list)


class SessionTable:
    """Open sessions by user, front = oldest last event (events come in time order and
    each moves its session to the end), so closing by watermark pops from the front;
    and the emitted sessions of the last allowed lateness, by user.

    Rules (ARCHITECTURE.md "Processing semantics"): ``play`` opens a play, ending an
    open one with "play"; for the open play's track only, ``pause`` stops its clock,
    ``resume`` restarts it at the event's position, ``seek`` sets the position and
    ``skip``/``end`` end it; other events only count. While playing, time advances
    position and listening by min(elapsed, duration - position).

    Late events: an event released before a user's last applied one (in (time,
    event_id) order), or within the gap of an emitted session, joins the sessions
    it falls within the gap of (none, one, or the two on either side, which it
    merges). Their events and it are computed again in order, as one session:
    if its first event is the first of a session already emitted, it keeps that id
    (its next emission is revision + 1); every other emitted session it replaces
    is emitted retracted. The result is emitted at the end of the release (after
    the user's other late events in it) if the watermark already passed its last
    event + gap, else it is the user's open session again.

    An emitted session is kept until the watermark passes its last event + gap +
    allowed lateness: no event within the lateness can reach it after that.
    """

    __slots__ = (
        "_emitted",
        "_expiry",
        "_gap_ms",
        "_held",
        "_keep_ms",
        "_kept_count",
        "_legacy",
        "_open",
        "_pending",
        "_purge_at",
    )

    def __init__(
        self,
        session_gap_ms: int,
        allowed_lateness_ms: int = 0,
        state: SessionTableState | None = None,
    ) -> None:
        self._gap_ms = session_gap_ms
        #: An emitted session is kept while the watermark is at most last + this.
        self._keep_ms = session_gap_ms + allowed_lateness_ms
        self._open: OrderedDict[str, OpenSession] = OrderedDict()
        #: Emitted sessions kept, per user: the one, or a list of several by started
        #: (most users have one: a list each would cost more than a session's events).
        self._emitted: dict[str, EmittedSession | list[EmittedSession]] = {}
        #: Kept sessions in the order they were emitted (about the order of their last
        #: event: one out of order is forgotten late, never early).
        self._expiry: deque[EmittedSession] = deque()
        self._kept_count = 0
        #: Sessions late events changed that the watermark has passed, by user: emitted
        #: at the end of the release (empty between releases).
        self._pending: dict[str, list[OpenSession]] = {}
        self._held: StreamRevisions[str] = StreamRevisions()
        self._purge_at = 0
        #: Users whose open session came from a version 1 snapshot, without its events.
        self._legacy: set[str] = set()
        if state is not None:
            for s in state.sessions:
                self._open[s.user_id] = s
                if s.events and not s.log:
                    self._legacy.add(s.user_id)
            for e in state.emitted:
                self._keep(e)
            self._held = StreamRevisions(state.held)

    def __len__(self) -> int:
        """Open sessions."""
        return len(self._open)

    @property
    def kept(self) -> int:
        """Emitted sessions kept for late events."""
        return self._kept_count

    def _kept(self, uid: str) -> list[EmittedSession]:
        """The user's kept sessions, by started (a new list)."""
        v = self._emitted.get(uid)
        if v is None:
            return []
        return [v] if isinstance(v, EmittedSession) else list(v)

    def _store(self, uid: str, kept: list[EmittedSession]) -> None:
        if not kept:
            self._emitted.pop(uid, None)
        else:
            self._emitted[uid] = kept[0] if len(kept) == 1 else kept

    def apply(
        self, released: list[tuple[int, str, Event]], closed: list[Session], watermark: int
    ) -> None:
        """Apply released events ``(time, event_id, event)`` in order; sessions closed
        by a gap, and what late events change, are appended to ``closed``.
        ``watermark``: the partition's, after this release."""
        table = self._open
        get = table.get
        to_end = table.move_to_end
        emitted = self._emitted
        gap = self._gap_ms
        feed = self._feed
        pack = _pack_into
        pending = self._pending
        for t, eid, ev in released:
            uid = ev.user_id
            s = get(uid)
            if s is not None and (t > s.last or (t == s.last and eid > s.last_id)):
                if t - s.last > gap:
                    del table[uid]
                    self._emit(s, closed)
                    s = table[uid] = OpenSession(uid, eid, t, t)
                else:
                    to_end(uid)
            elif s is None:
                kept = emitted.get(uid)
                if (kept is not None and t - (
                    kept.last if isinstance(kept, EmittedSession) else kept[-1].last
                ) <= gap) or (pending and uid in pending):
                    self._late(uid, entry_of(t, eid, ev), watermark, closed)
                    continue
                s = table[uid] = OpenSession(uid, eid, t, t)
            elif uid in self._legacy:
                # Restored from a version 1 snapshot: no events to compute it again from.
                feed(s, entry_of(t, eid, ev))
                continue
            else:
                self._late(uid, entry_of(t, eid, ev), watermark, closed)
                continue
            # entry_of, spelled out: once per event.
            pb = ev.playback
            geo = ev.geo
            device = ev.device
            e = (
                t, eid, ev.event_type, ev.track_id, pb.position_ms, pb.duration_ms,
                None if geo is None else geo.country, None if device is None else device.os,
            )
            pack(e, s.log, -1)
            feed(s, e)
        if pending:
            for sessions in pending.values():
                for q in sessions:
                    self._emit(q, closed)
            pending.clear()

    def _feed(self, s: OpenSession, e: Entry | tuple[Any, ...]) -> None:
        """Apply one event, the newest of ``s`` in (time, event_id) order."""
        t = e[0]
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
        s.last = t
        s.last_id = e[1]
        if s.country is None:
            s.country = e[6]
        if s.os is None:
            s.os = e[7]
        kind = e[2]
        if kind == "play":
            if s.track is not None:
                s.plays.append((s.track, s.play_started, s.listened, "play"))
            s.track = e[3]
            s.play_started = t
            s.position = e[4]
            s.duration = e[5]
            s.listened = 0
            s.playing = True
            s.clock = t
            s.play_count += 1
        elif s.track is None or e[3] != s.track:
            return
        elif kind == "pause":
            s.playing = False
        elif kind == "resume":
            s.position = e[4]
            s.playing = True
            s.clock = t
        elif kind == "seek":
            s.position = e[4]
        else:  # skip, end
            ended_by: EndedBy = "skip" if kind == "skip" else "end"
            s.plays.append((s.track, s.play_started, s.listened, ended_by))
            s.track = None
            s.playing = False

    def _computed(self, user_id: str, entries: list[Entry]) -> OpenSession:
        """The session of ``entries`` (sorted), with them packed as its log."""
        first = entries[0]
        s = OpenSession(user_id, first[1], first[0], first[0])
        feed = self._feed
        log = s.log
        for e in entries:
            _pack_into(e, log, -1)
            feed(s, e)
        return s

    def _late(self, uid: str, entry: Entry, watermark: int, closed: list[Session]) -> None:
        """A late ``entry`` of ``uid``: join and compute again the sessions it touches.

        A result the watermark has passed waits in ``_pending`` until the end of
        the release, so the user's other late events in it join it first: a
        batch of late events emits each changed session once."""
        t = entry[0]
        gap = self._gap_ms
        kept = self._kept(uid)
        touched = [k for k in kept if k.started - gap <= t <= k.last + gap]
        waiting = self._pending.get(uid, [])
        joined = [q for q in waiting if q.started - gap <= t <= q.last + gap]
        s = self._open.get(uid)
        if s is not None and s.started - gap <= t <= s.last + gap:
            del self._open[uid]
            joined.append(s)
        touched_entries = [unpack(k.log, k.events) for k in touched]
        entries = [entry]
        for k_entries in touched_entries:
            entries += k_entries
        for q in joined:
            entries += unpack(q.log, q.events)
        entries.sort()
        merged = self._computed(uid, entries)
        for k, k_entries in zip(touched, touched_entries, strict=True):
            kept.remove(k)
            k.gone = True
            self._kept_count -= 1
            if merged.first_id == k.first_id:
                merged.revision = k.revision
            elif k.revision >= 0:
                self._retract(self._computed(uid, k_entries), k.revision, closed)
        waiting = [w for w in waiting if all(w is not q for q in joined)]
        for q in joined:
            if merged.first_id == q.first_id:
                merged.revision = q.revision
            elif q.revision >= 0:
                self._retract(q, q.revision, closed)
        self._store(uid, kept)
        passed = merged.last < watermark - gap
        if passed:
            waiting.append(merged)
        if waiting:
            self._pending[uid] = waiting
        else:
            self._pending.pop(uid, None)
        if passed:
            return
        # Open again (no later session of the user can be open: see the class).
        table = self._open
        table[uid] = merged
        if len(table) > 1 and merged.last <= next(iter(table.values())).last:
            table.move_to_end(uid, last=False)

    def _retract(self, s: OpenSession, revision: int, closed: list[Session]) -> None:
        """Emit ``s`` (last emitted as ``revision``) as no longer existing."""
        sid = session_id(s.user_id, s.first_id)
        if self._held:
            revision = self._held.next(sid, revision + 1, RETRACTED)
        else:
            revision += 1
        closed.append(self._session(s, sid, revision, True))

    def _emit(self, s: OpenSession, closed: list[Session]) -> None:
        """Emit ``s`` (already out of the open table) and keep it for late events."""
        sid = session_id(s.user_id, s.first_id)
        revision = s.revision + 1
        if self._held:
            revision = self._held.next(sid, revision, s.events)
        closed.append(self._session(s, sid, revision, False))
        if self._legacy and s.user_id in self._legacy:
            self._legacy.discard(s.user_id)
            return
        self._keep(
            EmittedSession(s.user_id, s.first_id, s.started, s.last, s.events, revision,
                           bytes(s.log))
        )

    def _keep(self, e: EmittedSession) -> None:
        uid = e.user_id
        if uid in self._emitted:
            kept = self._kept(uid)
            kept.append(e)
            kept.sort(key=_started)
            self._store(uid, kept)
        else:
            self._emitted[uid] = e
        self._expiry.append(e)
        self._kept_count += 1

    def oldest_start(self) -> int | None:
        """The earliest ``started_at`` of the open and kept sessions (a scan: O(sessions))."""
        starts = [s.started for s in self._open.values()]
        starts += [
            v.started if isinstance(v, EmittedSession) else v[0].started
            for v in self._emitted.values()
        ]
        return min(starts, default=None)

    def close_before(self, watermark: int, closed: list[Session]) -> None:
        """Close (append to ``closed``, keep as emitted) the sessions whose last event +
        gap is older than ``watermark``; forget the emitted ones no late event can
        reach any more."""
        table = self._open
        if table:
            limit = watermark - self._gap_ms
            pop = table.popitem
            while table:
                # Front of an OrderedDict in O(1); its values view iterates the linked list.
                s = next(iter(table.values()))
                if s.last >= limit:
                    break
                pop(last=False)
                self._emit(s, closed)
        expiry = self._expiry
        limit = watermark - self._keep_ms
        while expiry and (expiry[0].gone or expiry[0].last < limit):
            e = expiry.popleft()
            if e.gone:
                continue
            e.gone = True
            self._kept_count -= 1
            uid = e.user_id
            if self._emitted.get(uid) is e:
                del self._emitted[uid]
            else:
                self._store(uid, [k for k in self._kept(uid) if k is not e])
        if self._held and watermark >= self._purge_at:
            self._held.purge(watermark)
            self._purge_at = watermark + self._gap_ms

    def raise_revisions(self, held: StreamRevisions[str]) -> None:
        """What the sessions stream holds beyond this table (emitted after the snapshot
        it came from, before a crash): revisions are numbered from it from now on."""
        self._held.merge(held)

    def _session(self, s: OpenSession, sid: str, revision: int, retracted: bool) -> Session:
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
            session_id=sid,
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
            revision=revision,
            retracted=retracted,
        )

    def snapshot(self) -> SessionTableState:
        """The open sessions in table order and the kept ones (the live objects: encode
        the result before the next apply); ``SessionTable(..., state=it decoded)``
        continues identically."""
        return SessionTableState(
            sessions=list(self._open.values()),
            emitted=[e for e in self._expiry if not e.gone],
            held=self._held.snapshot(),
        )


def _started(e: EmittedSession) -> int:
    return e.started

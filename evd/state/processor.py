"""The processing of one raw-log partition, without I/O: dedup, watermarks, late
routing, sessions and charts with their revisions (ARCHITECTURE.md "Processing
semantics").

The runner feeds raw records with ``process`` and wall-clock progress with
``tick``, appends what lands in ``Outputs`` to the output streams, and snapshots
the processor together with the input offsets it covers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

import msgspec

from evd.core.config import ProcessingConfig
from evd.core.errors import EvdError
from evd.core.schema import ChartRow, Event, EventsBatch, RawBatch, Session, epoch_ms
from evd.state.charts import ChartsState, ChartWindows, RowKey
from evd.state.dedup import DedupState, DedupWindow
from evd.state.revisions import StreamRevisions
from evd.state.sessions import SessionTable, SessionTableState
from evd.state.watermark import BufferedEvent, EventBuffer, Watermarks, WatermarkState

__all__ = ["Outputs", "PartitionProcessor", "PartitionState", "StateVersionError"]

#: The PartitionState layout this evd writes (and every older one it reads).
#: 2: sessions keep their events; emitted sessions and windows kept for late data.
STATE_VERSION = 2
HOUR_MS = 3_600_000


class StateVersionError(EvdError):
    """A snapshot written by a newer evd (or for another partition) cannot be restored."""


class PartitionState(msgspec.Struct, kw_only=True):
    """Snapshot of a PartitionProcessor (msgpack-encodable)."""

    version: int = STATE_VERSION
    partition: int
    dedup: DedupState
    watermarks: WatermarkState
    #: Events waiting for the watermark, in release order.
    buffer: list[BufferedEvent]
    sessions: SessionTableState
    charts: ChartsState
    duplicates: int = 0
    late: int = 0
    forced: int = 0
    #: Of ``late``, those late only because the buffer's bound forced the watermark.
    late_forced: int = 0


class Outputs:
    """What processing produced since the last ``clear()``; the runner encodes and
    appends it."""

    __slots__ = (
        "chart_rows", "closed_until", "duplicates", "events", "final_until", "late",
        "late_forced", "sessions", "sessions_until",
    )

    def __init__(self) -> None:
        #: Per processed raw record: its non-duplicate events in input order, with the
        #: indexes of the late ones; records with none are left out.
        self.events: list[EventsBatch] = []
        #: Per raw record: only its late events (``late`` lists every index); records
        #: with none are left out.
        self.late: list[EventsBatch] = []
        #: Sessions emitted: closed ones, revisions and retractions.
        self.sessions: list[Session] = []
        #: Rows of chart windows that closed, and revisions of closed ones.
        self.chart_rows: list[ChartRow] = []
        #: Set whenever the charts' closed_until advanced; else left as it was.
        self.closed_until: int | None = None
        #: Set whenever the charts' final_until advanced; else left as it was.
        self.final_until: int | None = None
        #: Set when it advanced: every session starting before it was emitted in its
        #: final revision.
        self.sessions_until: int | None = None
        #: Events dropped as duplicates.
        self.duplicates = 0
        #: Of the late events, those late only because the buffer's bound forced the
        #: watermark (the others: beyond the allowed lateness).
        self.late_forced = 0

    def clear(self) -> None:
        """Forget everything (after the runner appended it)."""
        self.events = []
        self.late = []
        self.sessions = []
        self.chart_rows = []
        self.closed_until = None
        self.final_until = None
        self.sessions_until = None
        self.duplicates = 0
        self.late_forced = 0


class PartitionProcessor:
    """Dedup, watermarks, late routing, sessions and charts of one partition.

    Per event of a record, in order: dedup (per partition, by received_at), the
    source's watermark, late routing (older than the watermark minus the allowed
    lateness: to ``events`` flagged late and to ``late``, never to sessions or
    charts); otherwise it goes to ``events`` at once and waits in the time-ordered
    buffer until the watermark passes it, then reaches sessions and charts in
    (time, event_id) order. An event the watermark had already passed is released
    at once: the sessions and chart rows it changes are emitted again (see
    SessionTable, ChartWindows). Above ``max_buffered_events`` the oldest events
    are released anyway and the watermark moves past them.

    Counters (cumulative, kept in the snapshot): ``duplicates``, ``late``
    (``late_forced`` of them because of the buffer's bound), ``forced``.
    """

    __slots__ = (
        "_buffer",
        "_charts",
        "_dedup",
        "_lateness",
        "_max_buffered",
        "_partition",
        "_sessions",
        "_sessions_until",
        "_watermarks",
        "duplicates",
        "forced",
        "late",
        "late_forced",
    )

    def __init__(
        self,
        partition: int,
        processing: ProcessingConfig,
        chart_window_ms: int,
        state: PartitionState | None = None,
        now_ms: int = 0,
    ) -> None:
        if state is not None:
            if state.version > STATE_VERSION:
                raise StateVersionError(
                    f"partition {partition}: snapshot version {state.version} is newer than"
                    f" this evd reads ({STATE_VERSION})"
                )
            if state.partition != partition:
                raise StateVersionError(
                    f"partition {partition}: snapshot is of partition {state.partition}"
                )
        self._partition = partition
        self._max_buffered = processing.max_buffered_events
        self._lateness = processing.allowed_lateness_ms
        #: Sessions starting before this were all emitted (None: not known yet).
        self._sessions_until: int | None = None
        self._dedup = DedupWindow(
            int(processing.dedup_window_s * 1000),
            processing.dedup_max_ids,
            None if state is None else state.dedup,
        )
        self._watermarks = Watermarks(
            processing.max_out_of_orderness_ms,
            processing.idle_timeout_ms,
            processing.allowed_lateness_ms,
            now_ms,
            None if state is None else state.watermarks,
        )
        self._buffer = EventBuffer(None if state is None else state.buffer)
        self._sessions = SessionTable(
            processing.session_gap_ms,
            processing.allowed_lateness_ms,
            None if state is None else state.sessions,
        )
        self._charts = ChartWindows(
            chart_window_ms, processing.allowed_lateness_ms, None if state is None else state.charts
        )
        self.duplicates = 0 if state is None else state.duplicates
        self.late = 0 if state is None else state.late
        self.late_forced = 0 if state is None else state.late_forced
        self.forced = 0 if state is None else state.forced

    @property
    def watermark(self) -> int | None:
        """The partition watermark (None until there is one)."""
        return self._watermarks.watermark

    @property
    def open_sessions(self) -> int:
        """Sessions open now."""
        return len(self._sessions)

    @property
    def closed_until(self) -> int | None:
        """Every chart window ending at or before this is closed (None: none yet)."""
        return self._charts.closed_until

    @property
    def kept_sessions(self) -> int:
        """Emitted sessions kept for late events."""
        return self._sessions.kept

    @property
    def buffered(self) -> int:
        """Events waiting for the watermark."""
        return len(self._buffer)

    def raise_revisions(
        self, sessions: StreamRevisions[str], chart_rows: StreamRevisions[RowKey]
    ) -> None:
        """What the output streams already hold beyond this state (emitted after the
        snapshot it was restored from, before a crash), by session_id and by chart
        row key (evd.state.revisions): revisions in a stream only ever increase."""
        self._sessions.raise_revisions(sessions)
        self._charts.raise_revisions(chart_rows)

    def process(
        self, source: int, batch: RawBatch, now_ms: int, out: Outputs, offset: int = -1,
        *, release: bool = True,
    ) -> None:
        """One raw-log record read from sub-log ``source`` (a writer id; with Kafka always
        0) at ``offset``; both are stamped on its outputs. ``release`` False: its events
        wait in the ordering buffer for the next ``tick`` (a runner processes a whole
        fetch, then ticks once: one release per pass instead of one per record)."""
        kept = self._dedup.filter(batch.received_at, batch.events)
        dropped = len(batch.events) - len(kept)
        by_type: dict[str, int] = {}
        if dropped:
            self.duplicates += dropped
            out.duplicates += dropped
            by_type = dict(Counter(ev.event_type for ev in batch.events))
            for ev in kept:
                by_type[ev.event_type] -= 1
            by_type = {t: n for t, n in by_type.items() if n}
        skew = batch.skew_ms
        times = [epoch_ms(ev.timestamp) + skew for ev in kept]
        late = self._watermarks.observe(source, times, now_ms)
        if kept or dropped:
            out.events.append(
                EventsBatch(batch.received_at, kept, skew, late, by_type, source, offset)
            )
        if late:
            self.late += len(late)
            forced_past = self._watermarks.forced_past
            forced = sum(1 for i in late if forced_past(times[i]))
            if forced:
                self.late_forced += forced
                out.late_forced += forced
            late_events = [kept[i] for i in late]
            out.late.append(
                EventsBatch(
                    batch.received_at, late_events, skew, list(range(len(late))), {},
                    source, offset,
                )
            )
            is_late = set(late)
            on_time = [i for i in range(len(kept)) if i not in is_late]
            self._buffer.push([times[i] for i in on_time], [kept[i] for i in on_time])
        else:
            self._buffer.push(times, kept)
        if release:
            self._release(out)

    def tick(self, now_ms: int, backlog: Collection[int], out: Outputs) -> None:
        """Wall-clock progress. ``backlog``: sources that still have unread data (they
        count as active now)."""
        self._watermarks.tick(now_ms, backlog)
        self._release(out)

    def _release(self, out: Outputs) -> None:
        """Hand what the watermark (or the buffer's bound) releases to sessions and
        charts, then close the sessions and windows it passed."""
        watermarks = self._watermarks
        buffer = self._buffer
        wm = watermarks.watermark
        if wm is None and len(buffer) <= self._max_buffered:
            return
        released: list[tuple[int, str, Event]] = []
        if wm is not None:
            buffer.pop_before(wm, released)
        excess = len(buffer) - self._max_buffered
        if excess > 0:
            buffer.pop_oldest(excess, released)
            self.forced += excess
            forced_until = released[-1][0] + 1
            if wm is None or forced_until > wm:
                wm = forced_until
                watermarks.force(wm)
            # Events tied in time with the last forced one are now below the watermark.
            buffer.pop_before(wm, released)
        if wm is None:
            return
        if released:
            self._sessions.apply(released, out.sessions, wm)
            self._charts.add(released)
        self._sessions.close_before(wm, out.sessions)
        until, final = self._charts.close(wm, out.chart_rows)
        if final is not None:
            out.final_until = final
        if until is not None:
            out.closed_until = until
            # Once per closed window, and only while an hour may be left to finish:
            # the scan over open and kept sessions is O(sessions). A session starting
            # before wm - lateness can only be one of those (a late event within
            # the lateness starts none before it).
            bound = wm - self._lateness
            done = self._sessions_until
            if done is None or done // HOUR_MS < bound // HOUR_MS:
                started = self._sessions.oldest_start()
                now_done = bound if started is None or started > bound else started
                if done is None or now_done > done:
                    self._sessions_until = out.sessions_until = now_done

    def snapshot(self) -> PartitionState:
        """The whole state; ``PartitionProcessor(..., state=it, now_ms=...)`` produces what
        this one would have from here on (every source counts as active at ``now_ms``)."""
        return PartitionState(
            partition=self._partition,
            dedup=self._dedup.snapshot(),
            watermarks=self._watermarks.snapshot(),
            buffer=self._buffer.snapshot(),
            sessions=self._sessions.snapshot(),
            charts=self._charts.snapshot(),
            duplicates=self.duplicates,
            late=self.late,
            forced=self.forced,
            late_forced=self.late_forced,
        )

"""Chart windows of one partition: plays per (window, country, track), with revisions.

Windows are tumbling and half-open in event time, ``[s, s + W)`` with ``s`` a
multiple of W. A window closes once the watermark reaches its end: its rows are
emitted (revision 0). ``closed_until`` is the end of the newest closed window,
``(watermark // W) * W``.

Late plays (ARCHITECTURE.md "Processing semantics"): a closed window is kept,
as its counts, while a play within the allowed lateness can still land in it
(its start >= ``final_until``). A play released into it changes its row, which
is emitted again at once with revision + 1 (a (country, track) the window did
not have yet: revision 0). Windows ending at or before ``final_until``,
``((watermark - allowed_lateness) // W) * W``, are final and forgotten, so the
kept windows are those of the last allowed lateness only.
"""

from __future__ import annotations

import msgspec

from evd.core.schema import ChartRow, Event
from evd.state.revisions import Held, StreamRevisions

__all__ = ["ChartWindows", "ChartsState"]

#: Before every window start: "nothing closed yet" inside the loops.
_NEVER = -(1 << 62)

#: (window_start, country, track_id): a chart row's key within one partition.
RowKey = tuple[int, str | None, str]


class ChartsState(msgspec.Struct, kw_only=True):
    """Snapshot of ChartWindows."""

    closed_until: int | None = None
    #: Counts of the open windows: (window_start, country, track_id, plays).
    counts: list[tuple[int, str | None, str, int]] = msgspec.field(default_factory=list)
    #: Closed windows kept for late plays: (window_start, country, track_id, plays,
    #: revision last emitted).
    emitted: list[tuple[int, str | None, str, int, int]] = msgspec.field(default_factory=list)
    #: What the charts stream holds beyond this state (evd.state.revisions).
    held: list[Held[RowKey]] = msgspec.field(default_factory=list)


class ChartWindows:
    """Open windows' play counts, closed windows kept for the allowed lateness, and
    how far windows are closed."""

    __slots__ = (
        "_closed_until", "_dirty", "_emitted", "_final_until", "_held", "_lateness", "_new",
        "_revisions", "_width", "_windows",
    )

    def __init__(
        self, window_ms: int, allowed_lateness_ms: int, state: ChartsState | None = None
    ) -> None:
        self._width = window_ms
        self._lateness = allowed_lateness_ms
        self._closed_until: int | None = None
        #: Window ends at or before this are final (None: none yet).
        self._final_until: int | None = None
        self._windows: dict[int, dict[tuple[str | None, str], int]] = {}
        #: Closed windows still open to late plays: start -> (country, track) -> plays.
        self._emitted: dict[int, dict[tuple[str | None, str], int]] = {}
        #: Last emitted revision of the rows of ``_emitted`` (absent: 0, as they closed).
        self._revisions: dict[RowKey, int] = {}
        #: Rows of closed windows that late plays changed since the last close().
        self._dirty: set[RowKey] = set()
        #: Of those, the keys their window did not have (no row emitted yet).
        self._new: set[RowKey] = set()
        #: What the charts stream already holds (after a restore).
        self._held: StreamRevisions[RowKey] = StreamRevisions()
        if state is not None:
            self._closed_until = state.closed_until
            for start, country, track, plays in state.counts:
                self._windows.setdefault(start, {})[(country, track)] = plays
            for start, country, track, plays, revision in state.emitted:
                self._emitted.setdefault(start, {})[(country, track)] = plays
                if revision:
                    self._revisions[(start, country, track)] = revision
            self._held = StreamRevisions(
                [((k[0], k[1], k[2]), expires, seen) for k, expires, seen in state.held]
            )

    @property
    def closed_until(self) -> int | None:
        """Every window ending at or before this is closed (None: none yet)."""
        return self._closed_until

    def add(self, released: list[tuple[int, str, Event]]) -> None:
        """Count the ``play`` events among released ``(time, event_id, event)``; a play
        in a closed window changes its row (emitted by the next ``close``)."""
        width = self._width
        windows = self._windows
        closed = _NEVER if self._closed_until is None else self._closed_until
        current = _NEVER
        counts: dict[tuple[str | None, str], int] = {}
        late = False
        for t, _, ev in released:
            if ev.event_type != "play":
                continue
            start = t - t % width
            if start != current:
                current = start
                late = start < closed
                counts = (self._emitted if late else windows).setdefault(start, {})
            geo = ev.geo
            key = (None if geo is None else geo.country, ev.track_id)
            n = counts.get(key, 0)
            counts[key] = n + 1
            if late:
                row = (start, *key)
                if not n:  # not in the window when it closed, nor added since
                    self._new.add(row)
                self._dirty.add(row)

    def close(self, watermark: int, rows: list[ChartRow]) -> tuple[int | None, int | None]:
        """Append the rows late plays changed, then close the windows that end at or before
        ``watermark`` (their rows too), and forget the windows that became final.

        Returns the new ``closed_until`` and ``final_until``, each None if it did not
        advance."""
        if self._dirty:
            self._emit_dirty(rows)
        width = self._width
        until = watermark - watermark % width
        advanced: int | None = None
        if self._closed_until is None or until > self._closed_until:
            self._closed_until = advanced = until
            windows = self._windows
            held = self._held
            for start in sorted(s for s in windows if s < until):
                counts = windows.pop(start)
                for (country, track), plays in counts.items():
                    revision = held.next((start, country, track), 0, plays) if held else 0
                    rows.append(ChartRow(start, country, track, plays, revision))
                self._emitted[start] = counts
        bound = watermark - self._lateness
        final = min(bound - bound % width, until)
        if self._final_until is not None and final <= self._final_until:
            return advanced, None
        self._final_until = final
        emitted = self._emitted
        for start in [s for s in emitted if s < final]:
            del emitted[start]
        if self._revisions:
            for key in [k for k in self._revisions if k[0] < final]:
                del self._revisions[key]
        if self._held:
            self._held.purge(final)
        return advanced, final

    def _emit_dirty(self, rows: list[ChartRow]) -> None:
        emitted = self._emitted
        revisions = self._revisions
        new = self._new
        for key in sorted(self._dirty, key=_row_order):
            start, country, track = key
            # A key its window did not have when it closed has no row yet: revision 0.
            revision = 0 if key in new else revisions.get(key, 0) + 1
            plays = emitted[start][(country, track)]
            if self._held:
                revision = self._held.next(key, revision, plays)
            revisions[key] = revision
            rows.append(ChartRow(start, country, track, plays, revision))
        self._dirty.clear()
        new.clear()

    def raise_revisions(self, held: StreamRevisions[RowKey]) -> None:
        """What the charts stream holds beyond this state (emitted after the snapshot
        it came from, before a crash): revisions are numbered from it from now on.
        A row's expiry there is its window's start: final windows are forgotten."""
        self._held.merge(held)

    def snapshot(self) -> ChartsState:
        """Open and kept windows and ``closed_until``; ``ChartWindows(..., state=it)``
        continues identically."""
        revisions = self._revisions
        return ChartsState(
            closed_until=self._closed_until,
            counts=[
                (start, country, track, plays)
                for start, counts in sorted(self._windows.items())
                for (country, track), plays in counts.items()
            ],
            emitted=[
                (start, country, track, plays, revisions.get((start, country, track), 0))
                for start, counts in sorted(self._emitted.items())
                for (country, track), plays in counts.items()
            ],
            held=self._held.snapshot(),
        )


def _row_order(key: RowKey) -> tuple[int, str, str]:
    return key[0], key[1] or "", key[2]

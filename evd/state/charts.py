"""Chart windows of one partition: plays per (window, country, track).

Windows are tumbling and half-open in event time, ``[s, s + W)`` with ``s`` a
multiple of W. A window closes once the watermark reaches its end: its rows are
emitted and it is dropped. ``closed_until`` is the end of the newest closed
window, ``(watermark // W) * W``; every window ending at or before it is final.
"""

from __future__ import annotations

import msgspec

from evd.core.schema import ChartRow, Event

__all__ = ["ChartWindows", "ChartsState"]

#: Before every window start: "nothing closed yet" inside the loops.
_NEVER = -(1 << 62)


class ChartsState(msgspec.Struct, kw_only=True):
    """Snapshot of ChartWindows."""

    closed_until: int | None = None
    #: Counts of the open windows: (window_start, country, track_id, plays).
    counts: list[tuple[int, str | None, str, int]] = msgspec.field(default_factory=list)


class ChartWindows:
    """Open windows' play counts, and how far windows are closed.

    A play released into a window that is already closed (possible only with
    ``allowed_lateness_ms`` > 0) is not counted: closed windows are final, their
    rows are not amended.
    """

    __slots__ = ("_closed_until", "_width", "_windows")

    def __init__(self, window_ms: int, state: ChartsState | None = None) -> None:
        self._width = window_ms
        self._closed_until: int | None = None
        self._windows: dict[int, dict[tuple[str | None, str], int]] = {}
        if state is not None:
            self._closed_until = state.closed_until
            for start, country, track, plays in state.counts:
                self._windows.setdefault(start, {})[(country, track)] = plays

    @property
    def closed_until(self) -> int | None:
        """Every window ending at or before this is closed (None: none yet)."""
        return self._closed_until

    def add(self, released: list[tuple[int, str, Event]]) -> None:
        """Count the ``play`` events among released ``(time, event_id, event)``."""
        width = self._width
        windows = self._windows
        closed = _NEVER if self._closed_until is None else self._closed_until
        current = _NEVER
        counts: dict[tuple[str | None, str], int] = {}
        for t, _, ev in released:
            if ev.event_type != "play":
                continue
            start = t - t % width
            if start != current:
                if start < closed:
                    continue
                current = start
                counts = windows.setdefault(start, {})
            geo = ev.geo
            key = (None if geo is None else geo.country, ev.track_id)
            counts[key] = counts.get(key, 0) + 1

    def close(self, watermark: int, rows: list[ChartRow]) -> int | None:
        """Close the windows that end at or before ``watermark``, appending their rows to
        ``rows``; returns the new ``closed_until`` if it advanced, else None."""
        until = watermark - watermark % self._width
        if self._closed_until is not None and until <= self._closed_until:
            return None
        self._closed_until = until
        windows = self._windows
        for start in sorted(s for s in windows if s < until):
            for (country, track), plays in windows.pop(start).items():
                rows.append(ChartRow(start, country, track, plays))
        return until

    def snapshot(self) -> ChartsState:
        """Open windows and ``closed_until``; ``ChartWindows(..., state=it)`` continues
        identically."""
        return ChartsState(
            closed_until=self._closed_until,
            counts=[
                (start, country, track, plays)
                for start, counts in sorted(self._windows.items())
                for (country, track), plays in counts.items()
            ],
        )

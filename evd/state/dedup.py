"""The dedup window of one partition: event ids seen recently, by received_at.

An id is remembered with the ``received_at`` of the raw record that brought it
and forgotten once that is older than the newest ``received_at`` seen minus the
window; at most ``max_ids`` ids are remembered, the oldest are forgotten first.
"""

from __future__ import annotations

import heapq

import msgspec

from evd.core.schema import Event

__all__ = ["DedupState", "DedupWindow"]


class DedupState(msgspec.Struct, kw_only=True):
    """Snapshot of a DedupWindow."""

    #: The newest received_at seen; None before the first record.
    newest: int | None = None
    #: Remembered ids grouped by the received_at they came with, oldest group first
    #: (ties in arrival order); inside a group in arrival order.
    groups: list[tuple[int, list[str]]] = msgspec.field(default_factory=list)


class DedupWindow:
    """Which event ids were seen within the window (the logic behind DedupState).

    Ids live in one set for the lookup and, for forgetting, in per-record groups
    on a heap keyed by (received_at, arrival): a record's ids are one list, so
    an id costs the set slot and a list slot beside its string, and expiry is
    exact by received_at even when writers' clocks interleave.
    """

    __slots__ = ("_groups", "_ids", "_max_ids", "_newest", "_seq", "_window_ms")

    def __init__(self, window_ms: int, max_ids: int, state: DedupState | None = None) -> None:
        self._window_ms = window_ms
        self._max_ids = max_ids
        self._ids: set[str] = set()
        # (received_at, arrival sequence, ids): the sequence keeps the heap from
        # comparing lists and keeps arrival order among equal received_at.
        self._groups: list[tuple[int, int, list[str]]] = []
        self._newest: int | None = None
        self._seq = 0
        if state is not None:
            self._newest = state.newest
            for received_at, ids in state.groups:
                self._groups.append((received_at, self._seq, ids))
                self._ids.update(ids)
                self._seq += 1
            heapq.heapify(self._groups)

    def __len__(self) -> int:
        """Ids remembered now."""
        return len(self._ids)

    def filter(self, received_at: int, events: list[Event]) -> list[Event]:
        """The events of one record whose ids were not seen within the window, in
        input order (a repeat inside ``events`` is a duplicate too); remembers them."""
        newest = self._newest
        if newest is None or received_at > newest:
            self._newest = newest = received_at
        cutoff = newest - self._window_ms
        self._expire(cutoff)
        ids = self._ids
        add = ids.add
        kept: list[Event] = []
        keep = kept.append
        new: list[str] = []
        remember = new.append
        for ev in events:
            eid = ev.event_id
            if eid not in ids:
                add(eid)
                keep(ev)
                remember(eid)
        if new:
            heapq.heappush(self._groups, (received_at, self._seq, new))
            self._seq += 1
            if received_at < cutoff:
                # A record from a writer that lags by more than the window: its ids
                # are already too old to remember.
                self._expire(cutoff)
            if len(ids) > self._max_ids:
                self._trim(len(ids) - self._max_ids)
        return kept

    def _expire(self, cutoff: int) -> None:
        groups = self._groups
        discard = self._ids.discard
        while groups and groups[0][0] < cutoff:
            for eid in heapq.heappop(groups)[2]:
                discard(eid)

    def _trim(self, excess: int) -> None:
        groups = self._groups
        discard = self._ids.discard
        while excess > 0:
            ids = groups[0][2]
            if len(ids) <= excess:
                heapq.heappop(groups)
                excess -= len(ids)
                for eid in ids:
                    discard(eid)
            else:
                for eid in ids[:excess]:
                    discard(eid)
                del ids[:excess]
                excess = 0

    def snapshot(self) -> DedupState:
        """The window as a Struct; ``DedupWindow(..., state=it)`` continues identically."""
        return DedupState(
            newest=self._newest,
            groups=[(g[0], list(g[2])) for g in sorted(self._groups, key=lambda g: g[:2])],
        )

"""The dedup window of one partition: event ids seen recently, by received_at.

An id is remembered with the ``received_at`` of the raw record that brought it
and forgotten once that is older than the newest ``received_at`` seen minus the
window; at most ``max_ids`` ids are remembered, the oldest are forgotten first.
"""

from __future__ import annotations

import heapq
from itertools import chain

import msgspec

from evd.core.schema import Event

__all__ = ["DedupState", "DedupWindow"]


class DedupState(msgspec.Struct, kw_only=True):
    """Snapshot of a DedupWindow."""

    #: The newest received_at seen; None before the first record.
    newest: int | None = None
    #: Remembered ids grouped by record: (received_at, arrival sequence, ids in
    #: arrival order), in the window's heap order (a heap keyed by the first two).
    groups: list[tuple[int, int, tuple[str, ...]]] = msgspec.field(default_factory=list)
    #: The arrival sequence of the next group.
    seq: int = 0


class DedupWindow:
    """Which event ids were seen within the window (the logic behind DedupState).

    Ids live in one dict for the lookup and, for forgetting, in per-record groups
    on a heap keyed by (received_at, arrival): a record's ids are one tuple, so
    an id costs the dict slot and a tuple slot beside its string, and expiry is
    exact by received_at even when writers' clocks interleave.

    A dict of strings to None and tuples of strings are untracked by the cyclic
    garbage collector (a set or a list would be tracked): the window holds
    millions of ids, and a collection of the heap's oldest generation visiting
    each of them held the event loop for hundreds of milliseconds.
    """

    __slots__ = ("_groups", "_ids", "_max_ids", "_newest", "_seq", "_window_ms")

    def __init__(self, window_ms: int, max_ids: int, state: DedupState | None = None) -> None:
        self._window_ms = window_ms
        self._max_ids = max_ids
        self._ids: dict[str, None] = {}
        # (received_at, arrival sequence, ids): the sequence keeps the heap from
        # comparing lists and keeps arrival order among equal received_at.
        self._groups: list[tuple[int, int, tuple[str, ...]]] = []
        self._newest: int | None = None
        self._seq = 0
        if state is not None:
            self._newest = state.newest
            self._seq = state.seq
            self._groups = [(r, q, tuple(ids)) for r, q, ids in state.groups]
            heapq.heapify(self._groups)  # already a heap when written by snapshot()
            self._ids = dict.fromkeys(chain.from_iterable(g[2] for g in self._groups))

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
        kept: list[Event] = []
        keep = kept.append
        new: list[str] = []
        remember = new.append
        for ev in events:
            eid = ev.event_id
            if eid not in ids:
                ids[eid] = None
                keep(ev)
                remember(eid)
        if new:
            heapq.heappush(self._groups, (received_at, self._seq, tuple(new)))
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
        discard = self._ids.pop
        while groups and groups[0][0] < cutoff:
            for eid in heapq.heappop(groups)[2]:
                discard(eid, None)

    def _trim(self, excess: int) -> None:
        groups = self._groups
        discard = self._ids.pop
        while excess > 0:
            received_at, seq, ids = groups[0]
            if len(ids) <= excess:
                heapq.heappop(groups)
                excess -= len(ids)
                for eid in ids:
                    discard(eid, None)
            else:
                for eid in ids[:excess]:
                    discard(eid, None)
                groups[0] = (received_at, seq, ids[excess:])  # same key: still a heap
                excess = 0

    def snapshot(self) -> DedupState:
        """The window as a Struct; ``DedupWindow(..., state=it)`` continues identically.

        It shares the window's id tuples (no copy of every id).
        """
        # The heap as it is (a copy of the list, not of the ids): sorting it cost
        # more than the rest of a snapshot.
        return DedupState(newest=self._newest, groups=list(self._groups), seq=self._seq)

"""Event-time progress of one partition: per-source watermarks, late routing, and
the time-ordered buffer that holds events until the watermark passes them.

A source is a sub-log of the partition (a writer id; with Kafka the one
partition, 0). Its watermark is the newest event time it delivered minus
``max_out_of_orderness_ms``; the partition's is the minimum over active sources
and never decreases. Times are int epoch ms; ``now_ms`` is the wall clock.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Collection

import msgspec

from evd.core.schema import Event

__all__ = ["BufferedEvent", "EventBuffer", "WatermarkState", "Watermarks"]

#: Below every epoch ms: stands for "no watermark yet" inside the loops.
_NEVER = -(1 << 62)
#: Above every epoch ms: the floor when no other source is active.
_ALWAYS = 1 << 62


class WatermarkState(msgspec.Struct, kw_only=True):
    """Snapshot of Watermarks (activity is not kept: a restore counts as activity)."""

    watermark: int | None = None
    #: The watermark as events and the wall clock alone put it, below ``watermark``
    #: when the buffer's bound forced it (None: equal to ``watermark``).
    natural: int | None = None
    #: Newest event time per known source; None for a source that has not delivered
    #: an event yet (it holds the watermark while it is active).
    sources: dict[int, int | None] = msgspec.field(default_factory=dict)


class Watermarks:
    """Per-source event-time maxima, source activity and the partition watermark.

    A source is active while its last activity (a delivered record, or unread data
    reported by ``tick``) is less than ``idle_timeout_ms`` ago; an idle source does
    not hold the watermark back. An active source with no event yet holds it where it
    is. When no source has been active for ``idle_timeout_ms`` (counting from
    construction or restore when none is known), the watermark follows the wall
    clock: ``now_ms - max_out_of_orderness_ms``.
    """

    __slots__ = (
        "_active", "_idle_ms", "_lateness_ms", "_max", "_natural", "_ooo_ms", "_since", "_wm",
    )

    def __init__(
        self,
        max_out_of_orderness_ms: int,
        idle_timeout_ms: int,
        allowed_lateness_ms: int,
        now_ms: int,
        state: WatermarkState | None = None,
    ) -> None:
        self._ooo_ms = max_out_of_orderness_ms
        self._idle_ms = idle_timeout_ms
        self._lateness_ms = allowed_lateness_ms
        self._since = now_ms
        self._wm: int | None = None
        #: What the watermark would be had the buffer's bound never forced it.
        self._natural: int | None = None
        self._max: dict[int, int | None] = {}
        #: Last activity (wall clock) of each source in ``_max``.
        self._active: dict[int, int] = {}
        if state is not None:
            self._wm = state.watermark
            self._natural = state.watermark if state.natural is None else state.natural
            self._max = dict(state.sources)
            self._active = dict.fromkeys(self._max, now_ms)

    @property
    def watermark(self) -> int | None:
        """The partition watermark: events older than it have all been seen (None: none yet)."""
        return self._wm

    def observe(self, source: int, times: list[int], now_ms: int) -> list[int]:
        """Take the event times of one record of ``source`` in order; returns the indexes
        of the late ones (older than the watermark, as it stood after the events before
        them, minus ``allowed_lateness_ms``). ``source`` counts as active now."""
        maxima = self._max
        self._active[source] = now_ms
        floor = self._floor_of_others(source, now_ms)
        mx = maxima.get(source)
        top = _NEVER if mx is None else mx
        wm = _NEVER if self._wm is None else self._wm
        natural = _NEVER if self._natural is None else self._natural
        lateness = self._lateness_ms
        limit = wm - lateness
        ooo = self._ooo_ms
        late: list[int] = []
        for i, t in enumerate(times):
            if t > top:
                top = t
                if floor is not None:
                    c = t - ooo
                    if c > floor:  # noqa: PLR1730 (per event: min() is a call)
                        c = floor
                    if c > natural:
                        natural = c
                        if c > wm:
                            wm = c
                            limit = wm - lateness
            if t < limit:
                late.append(i)
        if top != _NEVER:
            maxima[source] = top
        elif source not in maxima:
            maxima[source] = None
        if wm != _NEVER:
            self._wm = wm
        if natural != _NEVER:
            self._natural = natural
        return late

    def forced_past(self, t: int) -> bool:
        """Whether a late event at ``t`` is late only because the buffer's bound forced
        the watermark (it is within the lateness of the natural watermark)."""
        return self._natural is not None and t >= self._natural - self._lateness_ms

    def _floor_of_others(self, source: int, now_ms: int) -> int | None:
        """Minimum watermark of the other active sources (None: one of them holds it)."""
        floor = _ALWAYS
        ooo = self._ooo_ms
        idle = self._idle_ms
        active = self._active
        for s, mx in self._max.items():
            if s == source or now_ms - active[s] >= idle:
                continue
            if mx is None:
                return None
            floor = min(floor, mx - ooo)
        return floor

    def tick(self, now_ms: int, backlog: Collection[int]) -> None:
        """Wall-clock progress: sources in ``backlog`` have unread data (active now);
        sources gone idle stop holding; an idle partition follows the wall clock."""
        for s in backlog:
            self._active[s] = now_ms
            self._max.setdefault(s, None)
        floor = self._floor_of_others(_NO_SOURCE, now_ms)
        if floor is None:
            return
        if floor == _ALWAYS:
            if now_ms - self._since < self._idle_ms:
                return
            floor = now_ms - self._ooo_ms
        if self._natural is None or floor > self._natural:
            self._natural = floor
        self.force(floor)

    def force(self, watermark: int) -> None:
        """Move the watermark to ``watermark`` if that is higher (a forced release)."""
        if self._wm is None or watermark > self._wm:
            self._wm = watermark

    def snapshot(self) -> WatermarkState:
        """The watermark and per-source maxima; restoring counts as activity of every source."""
        natural = None if self._natural == self._wm else self._natural
        return WatermarkState(watermark=self._wm, natural=natural, sources=dict(self._max))


#: Not a source id (writer ids and Kafka partitions are >= 0).
_NO_SOURCE = -1


class BufferedEvent(msgspec.Struct, array_like=True, gc=False):
    """An event waiting in the buffer, with its event time."""

    time: int
    event: Event


class EventBuffer:
    """Events waiting for the watermark, released in (time, event_id) order.

    Entries are ``(time, event_id, event)`` tuples, handed out as they are; ids are
    unique (the buffer is fed after dedup), so ordering never compares events.
    Entries are appended unsorted to buckets of ``BUCKET_MS`` of event time, and a
    bucket is sorted once the watermark reaches it (list.sort, mostly in C), instead
    of two O(log n) heap operations per event with tuple compares in Python.
    """

    __slots__ = ("_buckets", "_keys", "_len", "_sorted_key")

    def __init__(self, state: list[BufferedEvent] | None = None) -> None:
        self._buckets: dict[int, list[tuple[int, str, Event]]] = {}
        #: Heap of the keys of ``_buckets`` (start // BUCKET_MS).
        self._keys: list[int] = []
        self._len = 0
        #: Key of the front bucket while it is sorted (after a partial release).
        self._sorted_key: int | None = None
        if state is not None:
            self.push([b.time for b in state], [b.event for b in state])

    def __len__(self) -> int:
        return self._len

    def push(self, times: list[int], events: list[Event]) -> None:
        """Add ``events`` with their event ``times`` (same length, any order)."""
        buckets = self._buckets
        get = buckets.get
        width = BUCKET_MS
        sorted_key = self._sorted_key
        for t, ev in zip(times, events, strict=True):
            key = t // width
            bucket = get(key)
            if bucket is None:
                buckets[key] = bucket = []
                heapq.heappush(self._keys, key)
            elif key == sorted_key:
                sorted_key = None
            bucket.append((t, ev.event_id, ev))
        self._sorted_key = sorted_key
        self._len += len(times)

    def _front(self) -> list[tuple[int, str, Event]]:
        """The oldest bucket, sorted."""
        key = self._keys[0]
        bucket = self._buckets[key]
        if key != self._sorted_key:
            bucket.sort()
            self._sorted_key = key
        return bucket

    def _drop_front(self) -> None:
        del self._buckets[heapq.heappop(self._keys)]
        self._sorted_key = None

    def pop_before(self, watermark: int, out: list[tuple[int, str, Event]]) -> None:
        """Move every event with time < ``watermark`` to ``out``, in order."""
        keys = self._keys
        while keys and keys[0] * BUCKET_MS < watermark:
            bucket = self._front()
            if (keys[0] + 1) * BUCKET_MS <= watermark:
                out.extend(bucket)
                self._len -= len(bucket)
                self._drop_front()
                continue
            n = bisect.bisect_left(bucket, watermark, key=_time)
            out.extend(bucket[:n])
            del bucket[:n]
            self._len -= n
            break

    def pop_oldest(self, count: int, out: list[tuple[int, str, Event]]) -> None:
        """Move the ``count`` oldest events to ``out``, in order."""
        keys = self._keys
        while count > 0 and keys:
            bucket = self._front()
            if len(bucket) <= count:
                out.extend(bucket)
                count -= len(bucket)
                self._len -= len(bucket)
                self._drop_front()
            else:
                out.extend(bucket[:count])
                del bucket[:count]
                self._len -= count
                count = 0

    def snapshot(self) -> list[BufferedEvent]:
        """The waiting events, in release order."""
        return [
            BufferedEvent(t, ev)
            for key in sorted(self._keys)
            for t, _, ev in sorted(self._buckets[key])
        ]


#: Event-time width of a buffer bucket. Bounds the partial re-sorting at the
#: watermark; buckets of sparse traffic cost a list and a heap slot each.
BUCKET_MS = 20


def _time(entry: tuple[int, str, Event]) -> int:
    return entry[0]

"""What an output stream already holds beyond a restored state: the revisions a
processor emitted after its snapshot, before a crash.

The replay after a crash re-emits sessions and chart rows, but the revisions
it reaches need not be the same as the crashed run's (which events were late
depends on the wall clock and on how the sub-logs interleaved). So the runner
reads back its output streams after the snapshot's ends and hands what it found
to the processor (``PartitionProcessor.raise_revisions``), which numbers each
emission with ``StreamRevisions.next``: an emission with content the stream
already holds for its id (the same size: a session's event count, a chart
row's plays; both only grow from one revision to the next) takes that
revision again, as an exact replay would; any other is numbered above
everything the stream holds. Either way a stream never shows an id's revision
going down, and "the highest revision wins" stays true for every sink.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["RETRACTED", "Held", "StreamRevisions"]

K = TypeVar("K", bound=Hashable)

#: The size of a retraction (a session that no longer exists).
RETRACTED = -1

#: One id's entry: (id, watermark after which no late event can change it,
#: [(revision, size)] in increasing revision order).
Held = tuple[K, int, list[tuple[int, int]]]


class StreamRevisions(Generic[K]):
    """Revisions (and sizes) per id that a stream holds beyond a state, until
    the watermark passes the id's expiry."""

    __slots__ = ("_held",)

    def __init__(self, held: list[Held[K]] | None = None) -> None:
        self._held: dict[K, tuple[int, list[tuple[int, int]]]] = {}
        for key, expires, seen in held or ():
            self._held[key] = (expires, list(seen))

    def __bool__(self) -> bool:
        return bool(self._held)

    def add(self, key: K, revision: int, size: int, expires: int) -> None:
        """The stream holds ``revision`` of ``key``, of ``size``."""
        entry = self._held.get(key)
        if entry is None:
            self._held[key] = (expires, [(revision, size)])
            return
        seen = entry[1]
        if (revision, size) not in seen:
            seen.append((revision, size))
            seen.sort()
        self._held[key] = (max(entry[0], expires), seen)

    def next(self, key: K, revision: int, size: int) -> int:
        """The revision to emit ``key`` with, whose state says ``revision``, at ``size``."""
        entry = self._held.get(key)
        if entry is None:
            return revision
        seen = entry[1]
        for held, held_size in seen:
            if held >= revision and held_size == size:
                rest = [s for s in seen if s[0] > held]
                if rest:
                    self._held[key] = (entry[0], rest)
                else:
                    del self._held[key]
                return held
        del self._held[key]
        return max(revision, seen[-1][0] + 1)

    def purge(self, watermark: int) -> None:
        """Forget the ids no late event can change any more."""
        self._held = {k: v for k, v in self._held.items() if v[0] >= watermark}

    def merge(self, other: StreamRevisions[K]) -> None:
        """Take what ``other`` holds too."""
        for key, (expires, seen) in other._held.items():
            for revision, size in seen:
                self.add(key, revision, size, expires)

    def snapshot(self) -> list[Held[K]]:
        return [(key, expires, list(seen)) for key, (expires, seen) in self._held.items()]

"""Decoded records shared by the delivery loops of one worker: one decode per record.

The lake and the warehouse (every sink whose ``decode`` is the default,
evd.core.log.records.decode) read the same ``events``, ``sessions`` and
``charts`` records at about the same time, each through its own consumer. The
first loop to read a record decodes it and leaves the value here, keyed by
(sub-log, offset); each other loop that reads the stream takes it from here,
and the last one removes it. A loop never waits for another: the cache only
holds what one loop decoded, and a loop that finds nothing decodes itself. A
fetch's run of records of one sub-log is decoded in one call (``values``).

Bounds: at most ``max_bytes`` of the records' log bytes are held (their
decoded values are mostly what the loops' pending batches pin anyway). At the bound
the oldest entries go first; a loop that reads one of them later (it lags the
others: a slow or retrying sink, a catch-up) decodes it again. Only the loop
that reads a record first in its sub-log leaves it here: a loop behind the
others never fills the cache with records they have already read.

Values are shared: a sink reads them and never changes them (evd.sinks.base).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from evd.core.log import ConsumerRecord, SubLog

__all__ = ["MAX_BYTES", "MISSING", "DecodedRecords"]

#: Log bytes of the records held at most (about 45 MB decoded at 360 bytes and 1 KB
#: per event; the lake's pending batch alone may pin 64 MiB of records).
MAX_BYTES = 16 << 20

#: What ``take`` answers for a record nobody left.
MISSING: Final = object()

#: A sink's ``decode_all``: (stream, payloads) -> their values.
DecodeAll = Callable[[str, Sequence[bytes]], list[Any]]


class _Entry:
    __slots__ = ("left", "nbytes", "value")

    def __init__(self, value: Any, left: int, nbytes: int) -> None:
        self.value = value
        #: Readers still to take it; removed when it reaches 0.
        self.left = left
        self.nbytes = nbytes


class DecodedRecords:
    """The decoded records of one set of delivery loops (same partitions); see the module
    docstring. ``readers``: stream -> how many of the loops read it through here."""

    def __init__(self, readers: dict[str, int], max_bytes: int = MAX_BYTES) -> None:
        self.readers = {s: n for s, n in readers.items() if n > 1}
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[SubLog, int], _Entry] = OrderedDict()
        #: The newest offset entered per sub-log: a reader below it is behind.
        self._newest: dict[SubLog, int] = {}
        #: Values taken from here, values decoded (for tests and measurements).
        self.hits = 0
        self.misses = 0

    @classmethod
    def of(cls, streams: Iterable[Iterable[str]], max_bytes: int = MAX_BYTES) -> DecodedRecords:
        """For loops reading ``streams`` (one list per loop that shares its decodes)."""
        readers: dict[str, int] = {}
        for loop_streams in streams:
            for stream in set(loop_streams):
                readers[stream] = readers.get(stream, 0) + 1
        return cls(readers, max_bytes)

    def shares(self, stream: str) -> bool:
        """Whether values of ``stream`` are shared (more than one loop reads it)."""
        return stream in self.readers

    def take(self, sublog: SubLog, offset: int, nbytes: int) -> Any:
        """The value another loop left for the record of ``nbytes`` at ``offset`` of
        ``sublog`` (removed once every other reader took it), else MISSING: the
        caller decodes it and ``put``s it."""
        key = (sublog, offset)
        entry = self._entries.get(key)
        # (A record of another length at that offset: the log was cut and written
        # again since; decoded anew.)
        if entry is None or entry.nbytes != nbytes:
            self.misses += 1
            return MISSING
        self.hits += 1
        entry.left -= 1
        if entry.left <= 0:
            del self._entries[key]
            self.nbytes -= nbytes
        return entry.value

    def put(self, sublog: SubLog, offset: int, nbytes: int, value: Any) -> None:
        """Leave the value of a record this reader decoded for the other readers of its
        stream, when this reader is the first to read it (the newest in its sub-log)."""
        left = self.readers.get(sublog.stream, 1) - 1
        if left <= 0 or offset <= self._newest.get(sublog, -1):
            return
        self._newest[sublog] = offset
        self._entries[sublog, offset] = _Entry(value, left, nbytes)
        self.nbytes += nbytes
        self._evict()

    def values(self, run: Sequence[ConsumerRecord], decode_all: DecodeAll) -> list[Any]:
        """The values of ``run``, consecutive records of one sub-log of a shared stream
        as one fetch returned them: those other loops left, the others decoded in
        one ``decode_all(stream, payloads)`` and left for the other loops (when
        this reader is the first to read them)."""
        sublog = run[0].sublog
        stream = sublog.stream
        entries = self._entries
        if run[0].offset > self._newest.get(sublog, -1):
            # The first to read every one of them: decode and leave them all.
            decoded = decode_all(stream, [r.payload for r in run])
            self.misses += len(run)
            left = self.readers.get(stream, 1) - 1
            if left > 0:
                added = 0
                for r, value in zip(run, decoded, strict=True):
                    nbytes = len(r.payload)
                    entries[sublog, r.offset] = _Entry(value, left, nbytes)
                    added += nbytes
                self._newest[sublog] = run[-1].offset
                self.nbytes += added
                self._evict()
            return decoded
        out: list[Any] = [MISSING] * len(run)
        missing: list[int] = []
        for k, r in enumerate(run):
            key = (sublog, r.offset)
            entry = entries.get(key)
            if entry is None or entry.nbytes != len(r.payload):
                missing.append(k)
                continue
            entry.left -= 1
            if entry.left <= 0:
                del entries[key]
                self.nbytes -= entry.nbytes
            out[k] = entry.value
        self.hits += len(run) - len(missing)
        if missing:
            self.misses += len(missing)
            decoded = decode_all(stream, [run[k].payload for k in missing])
            for k, value in zip(missing, decoded, strict=True):
                out[k] = value
                r = run[k]
                self.put(sublog, r.offset, len(r.payload), value)
        return out

    def _evict(self) -> None:
        entries = self._entries
        while self.nbytes > self.max_bytes:
            _, old = entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._entries)

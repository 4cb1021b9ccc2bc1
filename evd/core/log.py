"""The log interface every stage is written against.

A log holds named streams (``raw``, ``dead_letter``, later ``events``,
``sessions``...), each split into a fixed number of partitions. Appends return
an awaitable that completes once the record is durable under the configured
fsync policy; readers read from any offset; consumers commit offsets by name.
The embedded (segment files) and Kafka implementations offer the same methods.

Offsets are opaque increasing integers within a partition: ``Record.next_offset``
is where the following read starts, and what a consumer commits.
"""

from __future__ import annotations

import asyncio
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import NamedTuple

RAW = "raw"
DEAD_LETTER = "dead_letter"


class Record(NamedTuple):
    """One record read back from a partition."""

    offset: int
    next_offset: int
    payload: bytes


def partitions_for(keys: Iterable[str], partitions: int) -> list[int]:
    """The partition of each key: crc32 of its UTF-8 bytes modulo ``partitions``.

    The one definition of the mapping, identical in every process and run: users
    are placed by it, so changing it moves every user away from their history.
    Takes many keys at once because the edge maps every accepted event.
    """
    crc32 = zlib.crc32
    return [crc32(key.encode()) % partitions for key in keys]


def partition_for(key: str, partitions: int) -> int:
    """The partition of one key (see partitions_for)."""
    return partitions_for((key,), partitions)[0]


#: One record to append: (stream, partition, payload).
Append = tuple[str, int, bytes]


class Log(ABC):
    """Partitioned, durable, replayable streams of records."""

    partitions: int

    @property
    @abstractmethod
    def writable(self) -> bool:
        """False once the log refuses appends (I/O failure, closing)."""

    @property
    @abstractmethod
    def overloaded(self) -> bool:
        """True while appends would be refused with LogOverloaded (shed before decoding)."""

    @abstractmethod
    def append_all(self, records: Sequence[Append]) -> asyncio.Future[None]:
        """Queue every record of ``records``, or none of them.

        Admission is decided once, for all of them (one request's records): when
        the log cannot take them it raises LogUnavailable or LogOverloaded at
        once and nothing is queued, so a refused request leaves nothing behind
        that a retry would duplicate. The future completes when all are durable
        per the fsync policy and fails with LogUnavailable if they never will be.
        """

    def append(self, stream: str, partition: int, payload: bytes) -> asyncio.Future[None]:
        """Queue one record (see append_all)."""
        return self.append_all(((stream, partition, payload),))

    @abstractmethod
    async def read(
        self, stream: str, partition: int, offset: int, max_bytes: int = 1 << 20
    ) -> list[Record]:
        """Records from ``offset`` on, at most about ``max_bytes``; [] at the end."""

    @abstractmethod
    def end_offset(self, stream: str, partition: int) -> int:
        """Offset after the last durable record of the partition."""

    @abstractmethod
    async def commit(self, consumer: str, stream: str, offsets: dict[int, int]) -> None:
        """Durably store ``consumer``'s next offsets for the given partitions."""

    @abstractmethod
    def committed(self, consumer: str, stream: str) -> dict[int, int]:
        """The offsets ``consumer`` last committed for ``stream`` (0 where none)."""

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every append queued so far is durable."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release files; further appends raise LogUnavailable."""

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
from typing import NamedTuple

RAW = "raw"
DEAD_LETTER = "dead_letter"


class Record(NamedTuple):
    """One record read back from a partition."""

    offset: int
    next_offset: int
    payload: bytes


def partition_for(key: str, partitions: int) -> int:
    """Stable partition of a key (crc32, identical in every process and run)."""
    return zlib.crc32(key.encode()) % partitions


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
    def append(self, stream: str, partition: int, payload: bytes) -> asyncio.Future[None]:
        """Queue ``payload`` for ``stream``/``partition``.

        The future completes when the record is durable per the fsync policy and
        fails with LogUnavailable if it never will be. Raises LogUnavailable or
        LogOverloaded at once when the append cannot be taken.
        """

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

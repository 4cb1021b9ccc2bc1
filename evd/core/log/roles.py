"""The two roles every stage is written against: a Producer and a Consumer.

Shaped after aiokafka's producer and consumer, so that the Kafka backend drops
in behind the same calls. A log holds named streams (``raw``, ``dead_letter``,
``events``, ``sessions``, ``charts``, ``late``), each split into partitions
(streams may have different partition counts). A partition is one or more
*sub-logs*: in the embedded log, one per writer process that appended to it
(evd.core.log.embedded.sublog); with Kafka, the Kafka partition itself (source 0).

Offsets are positions within a sub-log: ``Record.next_offset`` is where the
following read starts, and what a consumer commits. An offset that is not a
record boundary is an error (InvalidOffset), never "no data yet".
"""

from __future__ import annotations

import asyncio
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from evd.core.errors import LogError

__all__ = [
    "Append",
    "Consumer",
    "ConsumerRecord",
    "InvalidOffset",
    "Lag",
    "Producer",
    "Record",
    "SubLog",
    "TopicPartition",
    "partition_for",
    "partitions_for",
]

class InvalidOffset(LogError):
    """An offset that is no record's start in a sub-log: past its durable end,
    inside a record, or before the oldest retained segment."""


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


class TopicPartition(NamedTuple):
    """One partition of one stream (Kafka's topic-partition)."""

    stream: str
    partition: int


class SubLog(NamedTuple):
    """One sub-log of a partition: ``source`` is the writer id (embedded) or 0 (Kafka)."""

    stream: str
    partition: int
    source: int


class ConsumerRecord(NamedTuple):
    """A record fetched by a Consumer (its payload starts with evd.core.log.records' header)."""

    sublog: SubLog
    offset: int
    next_offset: int
    payload: bytes


class Lag(NamedTuple):
    """How far a consumer is behind: bytes not yet consumed, and the age in
    seconds of the oldest record not yet consumed (0 when caught up)."""

    bytes: int
    seconds: float


class Producer(ABC):
    """Appends records to partitions; what the edge and every stage write through."""

    @property
    @abstractmethod
    def writable(self) -> bool:
        """False once appends are refused (I/O failure, closing)."""

    @property
    @abstractmethod
    def pending_bytes(self) -> int:
        """Bytes admitted and not yet durable (bounded by ``log.max_pending_bytes``)."""

    @property
    @abstractmethod
    def overloaded(self) -> bool:
        """True while the edge's appends would be refused with LogOverloaded
        (too much waiting for a flush, or the log's disk cap reached)."""

    @abstractmethod
    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        """Queue every record of ``records``, or none of them.

        Admission is decided once, for all of them (one request's records): when
        they cannot be taken, LogUnavailable or LogOverloaded is raised at once
        and nothing is queued, so a refused request leaves nothing behind that a
        retry would duplicate. The future completes when all are durable per the
        fsync policy and fails with LogUnavailable if they never will be.
        ``internal``: a stage's outputs, which are what lets retention free the
        disk: never refused for overload (the stage bounds itself by awaiting
        its previous appends).
        """

    @abstractmethod
    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        """Queue one record; the future carries its offset once it is durable."""

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every append queued so far is durable."""

    @abstractmethod
    async def start(self) -> None:
        """Recover and get ready for appends."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release; later appends raise LogUnavailable."""


class Consumer(ABC):
    """Reads assigned partitions from positions it keeps, and commits them by name.

    Promises: records of one sub-log come in offset order, each once per pass
    (a seek repeats them); ``fetch`` waits for data (no polling) until its
    timeout; commits of one consumer happen one at a time, in call order.
    """

    @abstractmethod
    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions (and only these) from now on."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]:
        """The partitions assigned."""

    @abstractmethod
    async def fetch(self, max_bytes: int = 1 << 20, timeout: float = 1.0) -> list[ConsumerRecord]:
        """Records after the positions, about ``max_bytes`` at most, spread over
        the sub-logs that have data; waits up to ``timeout`` seconds for some,
        then returns [] (nothing new). Raises InvalidOffset for a position that
        is no record boundary."""

    @abstractmethod
    def seek(self, sublog: SubLog, offset: int) -> None:
        """Read ``sublog`` from ``offset`` next (checked at the next fetch)."""

    @abstractmethod
    def seek_to_beginning(self, sublog: SubLog) -> None:
        """Read ``sublog`` from its oldest retained record next."""

    @abstractmethod
    def positions(self) -> dict[SubLog, int]:
        """Where the next fetch starts, per sub-log known so far."""

    @abstractmethod
    def backlog(self) -> set[SubLog]:
        """The sub-logs with durable records after their position."""

    @abstractmethod
    async def end_offsets(self) -> dict[SubLog, int]:
        """The offset after the last durable record, per known sub-log."""

    @abstractmethod
    async def commit(self, offsets: Mapping[SubLog, int] | None = None) -> None:
        """Durably store these offsets (default: the positions) under the consumer's name."""

    @abstractmethod
    async def committed(self) -> dict[SubLog, int]:
        """The offsets last committed for the assigned partitions (absent: none)."""

    async def register(self) -> None:  # noqa: B027 (a hook; no-op if retention ignores consumers)
        """Hold the assigned partitions for this consumer from now on, before its
        first commit: retention deletes nothing it has not committed past."""

    @abstractmethod
    def lag(self, now: float | None = None) -> Lag:
        """How far the positions are behind the durable ends (``now``: epoch seconds)."""

    @abstractmethod
    async def close(self) -> None:
        """Release files and watches."""

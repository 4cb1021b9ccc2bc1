"""The sink contract: what every sink implements, and the batch it is handed.

A sink only writes. The delivery loop (evd.sinks.delivery) does everything
else for every sink alike: it consumes the sink's streams with the sink's own
offsets, batches by count, bytes and age, retries with back-off, dead-letters
a batch that keeps failing, and commits offsets only after ``write`` returned.
So ``write`` must be all-or-nothing from the loop's point of view: when it
raises, the whole batch is written again later (sinks make that harmless with
primary keys, deterministic file names or at-least-once semantics they state).

Errors: a ``SinkError`` with ``retriable = True`` (the default for anything
unexpected too) is retried; ``PermanentSinkError`` dead-letters the batch at
once; ``retry_after`` asks for a specific delay (HTTP ``Retry-After``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from evd.core.config import KafkaConfig
from evd.core.errors import EvdError
from evd.core.log import Consumer, Stream, records

__all__ = ["Batch", "PermanentSinkError", "Sink", "SinkContext", "SinkError"]


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know about the server it runs in."""

    #: The server's data_dir (default paths: lake, warehouse).
    data_dir: Path
    #: This worker's index and the worker count (file names unique per worker).
    worker: int
    workers: int
    #: Partitions of the output streams (all of them, not only this worker's).
    partitions: int
    #: The charts window (window_end = window_start + it).
    chart_window_ms: int
    #: A consumer of this server's log by name (None: anonymous), not yet
    #: assigned; the caller closes it (the lake reads the processors' progress).
    open_consumer: Callable[[str | None], Consumer]
    #: The server's kafka section (the kafka sink's cluster, security and
    #: producer settings); None: its defaults.
    kafka: KafkaConfig | None = None


class SinkError(EvdError):
    """A write that failed; retried unless ``retriable`` is False."""

    retriable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the target asked us to wait (HTTP Retry-After), or None.
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """A write that can never succeed (HTTP 4xx, a row the target refuses):
    the batch goes to ``dead_letter`` without retrying."""

    retriable = False


class Batch:
    """Decoded records of one stream, in log order, handed to one ``write``.

    ``values`` holds the records' values as their stream's schema has them
    (evd.core.schema): ``EventsBatch`` for ``events`` and ``late``,
    ``SessionsBatch``, ``ChartsBatch``, ``DeadLetter``; already filtered by
    the sink's ``event_types``. ``count`` is the number of items in them
    (events, sessions, chart rows, dead letters). evd.sinks.rows turns them
    into rows, JSON lines and hourly groups. The values may be the very objects
    other sinks of the worker are handed (one decode per record:
    evd.sinks.decoded): a sink reads them and never changes them.
    """

    __slots__ = ("count", "nbytes", "partitions", "stream", "values")

    def __init__(
        self,
        stream: str,
        values: list[Any],
        count: int,
        nbytes: int,
        partitions: list[int] | None = None,
    ) -> None:
        self.stream = stream
        self.values = values
        self.count = count
        #: Bytes of the log records the values came from (the batching measure).
        self.nbytes = nbytes
        #: The stream partition of each value (same length as values, or empty
        #: when the batch was built without them, e.g. a benchmark's).
        self.partitions = partitions if partitions is not None else []

    def __repr__(self) -> str:
        return f"Batch({self.stream!r}, {self.count} items, {self.nbytes} bytes)"


class Sink(ABC):
    """One configured sink (``sinks:`` entry). Built from its config, started
    once, then handed batches one at a time (never two writes at once)."""

    #: The streams this sink type can take; a config naming others is an error
    #: (evd.sinks.registry.check_streams, when the config is loaded).
    streams: ClassVar[tuple[str, ...]] = (
        Stream.EVENTS, Stream.LATE, Stream.SESSIONS, Stream.CHARTS, Stream.DEAD_LETTER
    )

    async def start(self) -> None:  # noqa: B027 (a hook: most sinks need no start-up)
        """Open connections or files; called before the first write."""

    @abstractmethod
    async def write(self, batch: Batch) -> None:
        """Write ``batch`` durably (as far as the target allows) or raise.

        Blocking work (files, sqlite, compression) must run off the event loop
        (``asyncio.to_thread`` or the sink's own executor).
        """

    async def flush(self) -> None:  # noqa: B027 (a hook: a durable write needs no flush)
        """Make everything ``write`` returned for durable at the target."""

    async def close(self) -> None:  # noqa: B027 (a hook: most sinks hold nothing)
        """Release resources; called once, after the last write."""

    def decode(self, stream: str, payload: bytes) -> Any:
        """A record's value (the delivery loop calls it; a sink may read less).

        The sinks that keep this default (and ``decode_all``'s) share one decode
        of each record (evd.sinks.decoded); one that overrides it decodes on its own.
        """
        return records.decode(payload, stream)

    def decode_all(self, stream: str, payloads: Sequence[bytes]) -> list[Any]:
        """``decode`` of each of ``payloads`` (records of ``stream`` fetched together):
        the default decodes them in one call where it can (evd.core.log.records.decode_all);
        a sink that overrides ``decode`` alone gets its ``decode`` of each."""
        if type(self).decode is Sink.decode:
            return records.decode_all(payloads, stream)
        return [self.decode(stream, p) for p in payloads]

    def counts(self, batch: Batch) -> Counter[tuple[int, str, str, str]] | None:
        """What the audit ledger counts for a written batch, as (hour, stream,
        event_type, metric) -> n; None: every item as ``delivered``."""
        return None

    def describe(self) -> dict[str, Any]:
        """What ``evd audit`` and logs may say about the sink (e.g. its path)."""
        return {}

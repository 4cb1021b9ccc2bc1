"""The Kafka log (``log.backend: kafka``): the Producer and Consumer roles over aiokafka,
and the group membership that hands partitions to process and deliver pods.

Every stream is a topic ``{kafka.topic_prefix}{stream}`` with ``log.partitions``
partitions; a Kafka partition plays the part of the embedded log's set of
sub-logs, so every record's sub-log has source 0, and its offsets are Kafka's
(``next_offset`` = offset + 1). Records carry the same versioned msgpack
micro-batches as the embedded log (evd.core.log.records), keyed by their partition
number; the producer writes with ``acks=all``.

Consumers here are *assigned* partitions (the Consumer contract): which
partitions a process gets is decided by a :class:`GroupMember`, a member of one
consumer group per role that reads nothing itself and calls the role back when
partitions are revoked or assigned. Reading consumers commit under their own
group id (``{prefix}{name}``) with no membership, so Kafka's tools show every
sink's and the processors' offsets and lag by name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from evd.core.errors import LogOverloaded, LogUnavailable
from evd.core.log import Append, Producer
from evd.core.log.kafka.topics import (
    STREAMS,
    client_options,
    ensure_topics,
    start_with_retry,
    topic_name,
)

if TYPE_CHECKING:
    from evd.config import Config

__all__ = ["KafkaLog"]

log = logging.getLogger(__name__)


class KafkaLog(Producer):
    """The Producer over Kafka: one aiokafka producer, ``acks=all``.

    An append's future completes once the broker acknowledged the record, and
    fails with LogUnavailable when it did not within ``kafka.ack_timeout_s`` (the
    edge answers 503 + Retry-After; never 200 for a record not acknowledged).
    After such a failure new requests are refused at once for
    ``kafka.unavailable_s``, so a broker that is down costs each client one
    quick 503, and the first request after it recovers goes through: no
    restart. Bytes not yet acknowledged are bounded by ``log.max_pending_bytes``
    (LogOverloaded above it; a stage's own appends are not refused).

    Batching: records are appended to one open record batch per partition
    (aiokafka's BatchBuilder), which is handed to aiokafka whole
    (``send_batch``) ``kafka.linger_ms`` after the first record of the round,
    when it reaches ``kafka.max_batch_bytes``, or, while the partition's previous
    batch is still in aiokafka's hands, as soon as that one was taken. So the
    records of every request of a round that go to one partition travel as one
    batch, and batches grow with the load; per record only the builder's append
    is paid, not aiokafka's per-message send path (measured in docs/performance.md).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.k = cfg.kafka
        self.partitions = cfg.log.partitions
        self.max_pending = cfg.log.max_pending_bytes
        self._pending_bytes = 0
        self._producer: AIOKafkaProducer | None = None
        self._topics: dict[str, str] = {s: topic_name(self.k, s) for s in STREAMS}
        self._keys = [str(p).encode() for p in range(self.partitions)]
        self._unavailable_until = 0.0
        self._last_error = ""
        self._closed = False
        #: Each partition's batch being filled (for kafka.linger_ms), and its waiters.
        self._open: dict[tuple[str, int], _OpenBatch] = {}
        self._linger: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Future[None]] = set()
        #: Partitions with a batch in aiokafka's hands -> full batches waiting behind it.
        self._queued: dict[tuple[str, int], list[_OpenBatch]] = {}
        self._waiters: set[_Waiter] = set()

    @property
    def writable(self) -> bool:
        return self._producer is not None and not self._closed

    @property
    def pending_bytes(self) -> int:
        """Bytes of appends the broker has not acknowledged yet."""
        return self._pending_bytes

    @property
    def overloaded(self) -> bool:
        return self._pending_bytes > self.max_pending

    @property
    def stream_partitions(self) -> dict[str, int]:
        return dict.fromkeys(STREAMS, self.partitions)

    def partitions_of(self, stream: str) -> int:
        return self.partitions

    async def start(self) -> None:
        if self.k.create_topics:
            await ensure_topics(
                self.k, self.stream_partitions,
                # max_age_s 0 keeps records for ever: Kafka's -1 (its 0 deletes at once).
                retention_ms=int(self.cfg.log.retention.max_age_s * 1000) or -1,
            )
        k = self.k
        producer = AIOKafkaProducer(
            **client_options(k),
            acks="all",
            enable_idempotence=k.idempotence,
            linger_ms=0,  # batches are built here (kafka.linger_ms) and go as they are
            max_batch_size=k.max_batch_bytes,
            max_request_size=k.max_request_bytes,
            request_timeout_ms=int(k.ack_timeout_s * 1000),
        )
        await start_with_retry(producer, k, "the producer")
        self._producer = producer

    def _check(self, records: Iterable[Append]) -> None:
        for stream, partition, _ in records:
            if stream not in self._topics:
                raise ValueError(f"{stream!r} is not a stream name")
            if not 0 <= partition < self.partitions:
                raise ValueError(
                    f"partition {partition} of {stream} out of range 0..{self.partitions - 1}"
                )

    def _admit(self, size: int, internal: bool) -> None:
        if self._closed or self._producer is None:
            raise LogUnavailable("the kafka producer is closed")
        if internal:
            return
        if time.monotonic() < self._unavailable_until:
            raise LogUnavailable(f"kafka: {self._last_error}")
        if self._pending_bytes + size > self.max_pending and self._pending_bytes:
            raise LogOverloaded(
                f"{self._pending_bytes} bytes wait for the broker's acknowledgement"
            )

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        self._check(records)
        size = sum(len(payload) for _, _, payload in records)
        self._admit(size, internal)
        return self._enqueue(records, size, offsets=False)

    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        self._check(((stream, partition, payload),))
        self._admit(len(payload), internal)
        return self._enqueue(((stream, partition, payload),), len(payload), offsets=True)

    def _enqueue(self, records: Sequence[Append], size: int, offsets: bool) -> asyncio.Future[Any]:
        """Add ``records`` to the open batches of their partitions; the future of them all."""
        producer = self._producer
        assert producer is not None
        loop = asyncio.get_running_loop()
        # Pending from admission on, so appends admitted in one turn of the loop
        # count against each other.
        self._pending_bytes += size
        waiter = _Waiter(loop.create_future(), len(records), size, offsets)
        waiter.timer = loop.call_later(self.k.ack_timeout_s, self._expire, waiter)
        self._waiters.add(waiter)
        keys = self._keys
        for index, (stream, partition, payload) in enumerate(records):
            key = (stream, partition)
            batch = self._open.get(key)
            if batch is None:
                batch = self._open[key] = _OpenBatch(producer.create_batch())
            if batch.builder.append(timestamp=None, key=keys[partition], value=payload) is None:
                self._ship(key, self._open.pop(key))  # full: it goes (or queues), another opens
                batch = self._open[key] = _OpenBatch(producer.create_batch())
                if batch.builder.append(timestamp=None, key=keys[partition], value=payload) is None:
                    raise AssertionError("an empty batch refused a record")
            batch.entries.append((waiter, index))
        if self._linger is None:
            self._linger = loop.call_later(self.k.linger_ms / 1000, self._ship_all)
        return waiter.future

    def _ship_all(self) -> None:
        """The linger is over: every open batch goes, except those of partitions whose
        previous batch aiokafka has not taken yet (they go when it has)."""
        self._linger = None
        for key in [k for k in self._open if k not in self._queued]:
            self._ship(key, self._open.pop(key))

    def _ship(self, key: tuple[str, int], batch: _OpenBatch) -> None:
        """Hand ``batch`` to aiokafka, or queue it behind the partition's batch in hand.

        aiokafka takes one batch per partition at a time (the next waits until the
        one before was sent), so a partition has one send_batch call in progress:
        meanwhile records gather in its open batch, which grows with the load.
        """
        queued = self._queued.get(key)
        if queued is not None:
            queued.append(batch)
            return
        self._queued[key] = []
        task = asyncio.ensure_future(self._send_batch(key, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_batch(self, key: tuple[str, int], batch: _OpenBatch) -> None:
        """Hand one partition's batches to aiokafka in turn; settle each one's waiters
        when the broker acknowledges it."""
        producer = self._producer
        assert producer is not None
        stream, partition = key
        topic = self._topics[stream]
        while True:
            try:
                ack = await producer.send_batch(batch.builder, topic, partition=partition)
            except KafkaError as exc:
                self._fail_batch(batch, exc)
            else:
                ack.add_done_callback(functools.partial(self._acked, batch))
            queued = self._queued[key]
            if queued:
                batch = queued.pop(0)
            elif key in self._open and self._linger is None:
                batch = self._open.pop(key)  # gathered while the one before was in hand
            else:
                del self._queued[key]
                return

    def _acked(self, batch: _OpenBatch, ack: asyncio.Future[Any]) -> None:
        if ack.cancelled() or ack.exception() is not None:
            self._fail_batch(batch, ack.exception() or KafkaError("cancelled"))
            return
        base = ack.result().offset
        for position, (waiter, index) in enumerate(batch.entries):
            if waiter.offsets is not None:
                waiter.offsets[index] = base + position
            waiter.left -= 1
            if waiter.left == 0:
                self._settle(waiter, None)

    def _fail_batch(self, batch: _OpenBatch, exc: BaseException) -> None:
        if all(waiter.future.done() for waiter, _ in batch.entries):
            return  # every request in it was answered already (expired): nothing to tell
        self._failed(f"{type(exc).__name__}: {exc}")
        for waiter, _ in batch.entries:
            self._settle(waiter, LogUnavailable(f"kafka: {self._last_error}"))

    def _expire(self, waiter: _Waiter) -> None:
        self._failed(f"no acknowledgement from the broker within {self.k.ack_timeout_s:g} s")
        self._settle(waiter, LogUnavailable(f"kafka: {self._last_error}"))

    def _settle(self, waiter: _Waiter, error: Exception | None) -> None:
        """Complete ``waiter`` once (an ack after its expiry changes nothing)."""
        if waiter.future.done() or waiter not in self._waiters:
            return
        self._waiters.discard(waiter)
        self._pending_bytes -= waiter.size
        if waiter.timer is not None:
            waiter.timer.cancel()
        if error is not None:
            waiter.future.set_exception(error)
        else:
            waiter.future.set_result(None if waiter.offsets is None else waiter.offsets[0])

    def _failed(self, why: str) -> None:
        if time.monotonic() >= self._unavailable_until:
            log.warning("kafka: an append failed (%s): refusing requests for %g s",
                        why, self.k.unavailable_s)
        self._last_error = why
        self._unavailable_until = time.monotonic() + self.k.unavailable_s

    async def flush(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._ship_all()
        waiting = [w.future for w in self._waiters]
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        for waiter in list(self._waiters):
            self._settle(waiter, LogUnavailable("the kafka producer is closed"))
        if self._producer is not None:
            await self._producer.stop()


class _Waiter:
    """One append call: its future completes when all its records are acknowledged."""

    __slots__ = ("future", "left", "offsets", "size", "timer")

    def __init__(self, future: asyncio.Future[Any], count: int, size: int, offsets: bool) -> None:
        self.future = future
        self.left = count
        self.size = size
        self.offsets: list[int] | None = [0] * count if offsets else None
        self.timer: asyncio.TimerHandle | None = None


class _OpenBatch:
    """One partition's record batch being filled, and whose records are in it."""

    __slots__ = ("builder", "entries")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.entries: list[tuple[_Waiter, int]] = []


